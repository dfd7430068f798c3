"""Stage 3, fine-tune: a short run with the LCNN regularisers, resumable epoch by epoch.

loss = CE + lambda_beta * sum(beta) + lambda_gamma * sum(|log gamma|) [+ lambda_grad * mean ||d CE_i / dx||^2]

Every epoch reseeds torch from (seed, epoch) and shuffles with its own generator, so an epoch's
work depends only on the state at its start: a run resumed from an epoch checkpoint ends in the
same state as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from .distributed import DistributedContext, sum_across_ranks
from .data import UnreadableExample
from .errors import LcnnError, first_line
from .io import atomic_file
from .layers import CenteredSoftplus, LipschitzBatchNorm
from .layers.normalized_linear import _OperatorNormalized
from .measure import evaluate_accuracy

CHECKPOINT_FILE = "checkpoint.pt"
NO_DECAY_SUFFIXES = ("log_beta", "log_gamma", "scale")


@dataclass
class FinetuneConfig:
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 0.01
    optimizer: Literal["sgd", "adamw"] = "sgd"
    schedule: Literal["cosine", "onecycle"] = "cosine"
    weight_decay: float = 5e-4
    lambda_beta: float = 1e-2
    lambda_gamma: float = 1e-2
    lambda_grad: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.optimizer in ("sgd", "adamw"), f"--optimizer must be sgd or adamw, got {self.optimizer}"),
            (self.schedule in ("cosine", "onecycle"), f"--schedule must be cosine or onecycle, got {self.schedule}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.lambda_beta >= 0, f"--lambda-beta must be >= 0, got {self.lambda_beta}"),
            (self.lambda_gamma >= 0, f"--lambda-gamma must be >= 0, got {self.lambda_gamma}"),
            (self.lambda_grad >= 0, f"--grad-norm must be >= 0, got {self.lambda_grad}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LcnnError(message)


@dataclass
class EpochRecord:
    epoch: int
    steps: int
    loss: float
    cross_entropy: float
    beta_term: float
    gamma_term: float
    grad_term: float
    beta_mean: float
    gamma_mean: float
    lipschitz_mean: float
    test_accuracy: float
    seconds: float
    images_per_second: float


@dataclass
class FinetuneResult:
    epochs: int
    steps: int
    seconds: float
    history: list[EpochRecord] = field(default_factory=list)
    step_log: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else None
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "beta_mean": last.beta_mean if last else None,
            "gamma_mean": last.gamma_mean if last else None,
            "lipschitz_mean": last.lipschitz_mean if last else None,
            "history": [asdict(record) for record in self.history],
        }


def regularisers(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of beta over centered softplus sites, sum of |log gamma| over Lipschitz BNs)."""
    zero = next(model.parameters()).new_zeros(())
    betas = [m.beta for m in model.modules() if isinstance(m, CenteredSoftplus) and m.log_beta.requires_grad]
    gammas = [m.log_gamma.abs() for m in model.modules() if isinstance(m, LipschitzBatchNorm)]
    return (torch.stack(betas).sum() if betas else zero), (torch.stack(gammas).sum() if gammas else zero)


@torch.no_grad()
def layer_statistics(model: nn.Module) -> dict[str, float]:
    """Mean beta, mean gamma and mean Lipschitz constant of the Lipschitz BNs."""
    betas = [m.beta.item() for m in model.modules() if isinstance(m, CenteredSoftplus)]
    bns = [m for m in model.modules() if isinstance(m, LipschitzBatchNorm)]
    return {
        "beta_mean": float(np.mean(betas)) if betas else 0.0,
        "gamma_mean": float(np.mean([m.log_gamma.exp().item() for m in bns])) if bns else 0.0,
        "lipschitz_mean": float(np.mean([m.lipschitz_constant() for m in bns])) if bns else 0.0,
    }


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """beta, gamma, explicit scales and 1-d tensors (BN affine, biases) get no weight decay."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if name.endswith(NO_DECAY_SUFFIXES) or parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    groups = _parameter_groups(model, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)


def _scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig, total_steps: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=max(total_steps, 1))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))


def _fast_forward(scheduler, steps: int) -> None:
    """Bring a new schedule to ``steps``: the same learning rates as the interrupted run's when
    --epochs/--max-steps are the same, and the longer schedule's when a resume extends the run
    (an old schedule's own state would run past its end)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(steps):
            scheduler.step()


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
    }


def _power_vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module._power_vector.detach().cpu()
        for name, module in model.named_modules()
        if isinstance(module, _OperatorNormalized) and module._power_vector is not None
    }


def _restore_power_vectors(model: nn.Module, vectors: dict[str, torch.Tensor], device: torch.device) -> None:
    modules = dict(model.named_modules())
    for name, vector in vectors.items():
        modules[name]._power_vector = vector.to(device)


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Written atomically; read back with weights_only=True (tensors, numbers, strings only)."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "power_vectors": _power_vectors(model),
        "rng": _rng_state(),
        **state,
    }
    with atomic_file(path) as temporary, open(temporary, "wb") as handle:
        torch.save(payload, handle)  # through a Python file: a full disk then surfaces as its OSError


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "steps", "seconds", "history", "step_log")


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt zip, bad pickle data, ...
        raise LcnnError(f"cannot read checkpoint {path}: {first_line(error, 160)}") from error
    if not isinstance(state, dict):
        raise LcnnError(f"cannot read checkpoint {path}: it holds a {type(state).__name__}, not a training checkpoint")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise LcnnError(f"cannot read checkpoint {path}: not a training checkpoint of lcnn-convert (no '{missing[0]}')")
    return state


def _accuracy(model: nn.Module, test: Dataset, distributed: DistributedContext | None) -> float:
    """Test accuracy; under DDP each rank scores every world_size-th example and the counts are summed."""
    if distributed is None:
        return evaluate_accuracy(model, test)
    share = Subset(test, range(distributed.rank, len(test), distributed.world_size))
    correct = round(evaluate_accuracy(model, share) * len(share)) if len(share) else 0
    counts = sum_across_ranks(distributed, torch.tensor([correct, len(share)]))
    return float(counts[0] / counts[1])


def _train_loader(train: Dataset, config: FinetuneConfig, epoch: int, distributed: DistributedContext | None):
    seed = config.seed * 1_000_003
    if distributed is None:
        order = torch.Generator().manual_seed(seed + epoch)
        return DataLoader(train, batch_size=config.batch_size, shuffle=True, generator=order, drop_last=False)
    # DistributedSampler draws the permutation a single process draws from the same seed and gives
    # rank r the examples r, r + W, r + 2W, ...: together the ranks' k-th batches are the single
    # process's k-th batch.
    sampler = DistributedSampler(
        train, num_replicas=distributed.world_size, rank=distributed.rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return DataLoader(train, batch_size=config.batch_size // distributed.world_size, sampler=sampler, drop_last=False)


def _reading(loader: DataLoader, epoch: int):
    """The loader's batches; an unreadable example stops the run with one line naming it."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (OSError, ValueError, UnreadableExample) as error:
            kept = f"the last good checkpoint (epoch {epoch}) is kept" if epoch else "no checkpoint was written"
            raise LcnnError(f"epoch {epoch + 1} stopped: {first_line(error)}; {kept}") from error
        yield batch


@contextlib.contextmanager
def _running_statistics_for_one_example(model: nn.Module, batch: int) -> Iterator[None]:
    """A batch of a single image has no batch statistics (BatchNorm raises on a 1x1 feature map):
    it is normalised with the running ones instead. Batch size 1, or a last batch of one."""
    norms = []
    if batch == 1:
        norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, LipschitzBatchNorm))
                 and m.training]  # fmt: skip
    for module in norms:
        module.eval()
    try:
        yield
    finally:
        for module in norms:
            module.train()


def cross_entropy_and_grad_penalty(model: nn.Module, images, labels, lambda_grad: float):
    if lambda_grad == 0:
        return F.cross_entropy(model(images), labels), images.new_zeros(())
    images = images.detach().requires_grad_(True)
    per_example = F.cross_entropy(model(images), labels, reduction="none")
    (input_gradient,) = torch.autograd.grad(per_example.sum(), images, create_graph=True)
    penalty = input_gradient.flatten(1).square().sum(1).mean()
    return per_example.mean(), penalty


def finetune(
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    config: FinetuneConfig,
    checkpoint_path: Path | None = None,
    resume: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    console: Console | None = None,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
    extra_state: dict[str, Any] | None = None,
    distributed: DistributedContext | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place; checkpoint after each epoch; continue from ``resume``.

    ``extra_state`` (tensors, numbers, strings, lists and dicts of them) is stored in every
    checkpoint beside the training state, for the caller to read back on resume.

    Stops with an LcnnError (the last epoch checkpoint left intact) if the loss becomes NaN/Inf.

    With ``distributed`` (see ``lcnn_convert.distributed``) the model trains wrapped in
    DistributedDataParallel, ``config.batch_size`` is the global batch, split evenly over the
    ranks; the logged terms and the accuracy are averaged over all ranks; only rank 0 prints
    and writes checkpoints.
    """
    config.validate()
    device = torch.device(device)
    console = console or Console(stderr=True)
    is_main = distributed is None or distributed.is_main
    if not is_main:
        console = Console(stderr=True, quiet=True)
        checkpoint_path = None
    if distributed is not None and config.batch_size % distributed.world_size:
        raise LcnnError(f"batch size {config.batch_size} must be a multiple of the {distributed.world_size} processes")
    model.to(device).train()
    trained = model
    if distributed is not None:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, config, total_steps)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    result = FinetuneResult(epochs=0, steps=0, seconds=0.0, step_log={"loss": [], "beta_mean": [], "gamma_mean": []})
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = group.get("initial_lr", config.lr)  # the schedule's start, as in a fresh run
        scheduler = _scheduler(optimizer, config, total_steps)
        _fast_forward(scheduler, min(int(resume["steps"]), total_steps))
        _restore_power_vectors(model, resume.get("power_vectors", {}), device)
        start_epoch = int(resume["epoch"])
        result.steps = int(resume["steps"])
        result.seconds = float(resume["seconds"])
        result.history = [EpochRecord(**record) for record in resume["history"]]
        result.step_log = {key: list(values) for key, values in resume["step_log"].items()}
        result.epochs = start_epoch
        console.print(f"[cyan]resuming[/cyan] after epoch {start_epoch} (step {result.steps})")

    for epoch in range(start_epoch, config.epochs):
        if config.max_steps is not None and result.steps >= config.max_steps:
            break
        torch.manual_seed(config.seed * 1_000_003 + epoch)
        loader = _train_loader(train, config, epoch, distributed)
        totals = {"loss": 0.0, "cross_entropy": 0.0, "beta_term": 0.0, "gamma_term": 0.0, "grad_term": 0.0}
        seen = batches = 0
        started = time.perf_counter()
        columns = (
            TextColumn(f"epoch {epoch + 1}/{config.epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("train", total=len(loader), stats="")
            for images, labels in _reading(loader, epoch):
                if config.max_steps is not None and result.steps >= config.max_steps:
                    break
                images, labels = images.to(device), labels.to(device)
                with torch.autocast(device_type=device.type, enabled=use_amp), \
                        _running_statistics_for_one_example(model, len(labels)):
                    cross_entropy, grad_penalty = cross_entropy_and_grad_penalty(
                        trained, images, labels, config.lambda_grad
                    )
                beta_sum, gamma_sum = regularisers(model)
                terms = {
                    "cross_entropy": cross_entropy.float(),
                    "beta_term": config.lambda_beta * beta_sum,
                    "gamma_term": config.lambda_gamma * gamma_sum,
                    "grad_term": config.lambda_grad * grad_penalty.float(),
                }
                loss = sum(terms.values())
                # Every rank takes the same decision from the same (averaged) numbers.
                averaged = sum_across_ranks(distributed, torch.stack([loss.detach().float(), *terms.values()]).detach())
                averaged = averaged / (distributed.world_size if distributed is not None else 1)
                if not torch.isfinite(averaged).all():
                    kept = f"the last good checkpoint (epoch {epoch}) is kept" if epoch else "no checkpoint was written"
                    raise LcnnError(
                        f"loss became {averaged[0].item()} at epoch {epoch + 1}, step {result.steps + 1}; stopped, "
                        f"{kept}; try a lower --lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                result.steps += 1
                batches += 1
                seen += len(labels)
                totals["loss"] += averaged[0].item()
                for key, value in zip(terms, averaged[1:]):
                    totals[key] += value.item()
                statistics = layer_statistics(model)
                result.step_log["loss"].append(averaged[0].item())
                result.step_log["beta_mean"].append(statistics["beta_mean"])
                result.step_log["gamma_mean"].append(statistics["gamma_mean"])
                rate = seen / max(time.perf_counter() - started, 1e-9)
                progress.update(
                    task,
                    advance=1,
                    stats=(
                        f"loss {totals['loss'] / batches:.3f} ce {totals['cross_entropy'] / batches:.3f} "
                        f"β-term {totals['beta_term'] / batches:.3f} γ-term {totals['gamma_term'] / batches:.3f} "
                        f"β̄ {statistics['beta_mean']:.2f} {rate:.0f} img/s"
                    ),
                )
        seconds = time.perf_counter() - started
        if distributed is not None:
            # The last step's statistics update was each rank's own: start the evaluation (and
            # the next epoch) from rank 0's, the ones its checkpoint holds.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        accuracy = _accuracy(model, test, distributed)
        statistics = layer_statistics(model)
        record = EpochRecord(
            epoch=epoch + 1,
            steps=result.steps,
            **{key: value / max(batches, 1) for key, value in totals.items()},
            **statistics,
            test_accuracy=accuracy,
            seconds=seconds,
            images_per_second=seen * (distributed.world_size if distributed else 1) / max(seconds, 1e-9),
        )
        result.history.append(record)
        result.epochs = epoch + 1
        result.seconds += seconds
        console.print(
            f"epoch {epoch + 1}: loss {record.loss:.4f}, test accuracy {accuracy:.2%}, "
            f"mean β {record.beta_mean:.3g}, mean γ {record.gamma_mean:.3g} ({seconds:.1f}s)"
        )
        if checkpoint_path is not None:
            state = {
                "epoch": epoch + 1,
                "steps": result.steps,
                "seconds": result.seconds,
                "history": [asdict(item) for item in result.history],
                "step_log": result.step_log,
                "config": asdict(config),
                **(extra_state or {}),
            }
            save_checkpoint(checkpoint_path, model, optimizer, scheduler, state)
        if on_epoch_end is not None:
            on_epoch_end(record)
    model.eval()
    return result
