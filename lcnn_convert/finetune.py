"""Stage 3, fine-tune: a short run with the LCNN regularisers, resumable epoch by epoch.

loss = (1 - distill) * CE + distill * KL(original || model) + lambda_beta * sum(c * beta)
       + lambda_gamma * sum(|log gamma|) [+ lambda_grad * mean ||d CE_i / dx||^2]

(the last mean over ``grad_norm_share`` of each batch: see ``cross_entropy_and_grad_penalty``)

What makes a few epochs enough (docs/finetuning.md has the sweep behind each default):

- log beta learns at ``beta_lr`` (BETA_LR_FACTOR x lr): at the common lr the penalty moves a
  calibrated beta by a few percent in a run, and the model stays as curved as it started;
- the batch size is chosen so that an epoch has at least MIN_STEPS_PER_EPOCH steps;
- the original's logits are soft targets (``distill``): the teacher is the model we started from;
- after the last epoch the BatchNorm statistics are re-estimated for the new betas
  (``refresh_batchnorm``): the running ones, averaged while beta moved, cost points of accuracy.

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
from collections.abc import Callable, Iterator, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from .bn_statistics import normalising_with_running_statistics, recalibrate_batchnorm
from .distributed import DistributedContext, sum_across_ranks
from .data import UnreadableExample
from .errors import LcnnError, first_line
from .finetune_config import (  # noqa: F401  (re-exported: the names this stage has always had)
    AUTO_BATCH_SIZES,
    BETA_LR_FACTOR,
    LAMBDA_BETA_PER_SMOOTHNESS,
    MIN_STEPS_PER_EPOCH,
    FinetuneConfig,
    auto_batch_size,
)
from .io import atomic_file
from .layers import LipschitzBatchNorm, SmoothActivation, one_norm_per_step
from .layers.centered_softplus import BETA_MAX
from .layers.normalized_linear import _OperatorNormalized
from .measure import evaluate_accuracy

CHECKPOINT_FILE = "checkpoint.pt"
NO_DECAY_SUFFIXES = ("log_beta", "log_gamma", "scale")


# Fine-tuning keeps beta at or above this: below it the activation is nearly linear over the
# pre-activations' range (little more smoothness to gain), and float32 rounding of the exported
# (softplus(beta x) - log 2) / beta grows as 1/beta (beta 0.03 from random weights: ONNX parity
# 2.1e-4, against 1e-4).
FINETUNE_BETA_MIN = 0.1
# The BatchNorm statistics after the last epoch: batches of REFRESH_BATCH_SIZE unaugmented train images.
REFRESH_BATCHES = 20
REFRESH_BATCH_SIZE = 128


@dataclass
class EpochRecord:
    epoch: int
    steps: int
    loss: float
    label_loss: float  # cross-entropy, mixed with the KL divergence to the original by distill
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
    config: FinetuneConfig | None = None  # the settings used, automatic ones filled in
    batchnorm_refreshed: bool = False

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else None
        return {
            "config": asdict(self.config) | {"lambda_beta": self.config.lambda_beta} if self.config else None,
            "batchnorm_refreshed": self.batchnorm_refreshed,
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "beta_mean": last.beta_mean if last else None,
            "gamma_mean": last.gamma_mean if last else None,
            "lipschitz_mean": last.lipschitz_mean if last else None,
            "history": [asdict(record) for record in self.history],
        }


def regularisers(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the "beta" terms, sum of the "gamma" terms) the LCNN layers state: c * beta of every
    learnable activation (c its family's ``sharpness_per_beta``), |log gamma| of every Lipschitz BN."""
    zero = next(model.parameters()).new_zeros(())
    terms: dict[str, list[torch.Tensor]] = {"beta": [], "gamma": []}
    for module in model.modules():
        if not _is_regularised(module):
            continue
        kind = module.regulariser
        if kind in terms and not (isinstance(module, SmoothActivation) and not module.log_beta.requires_grad):
            terms[kind].append(module.regulariser_term())
    beta, gamma = (torch.stack(found).sum() if found else zero for found in terms.values())
    return beta, gamma


class _Regularised(Protocol):
    """An LCNN layer that adds a term to the loss; ``regulariser`` names its kind ("beta" or "gamma")."""

    regulariser: str

    def regulariser_term(self) -> torch.Tensor: ...


def _is_regularised(module: nn.Module) -> TypeGuard[_Regularised]:
    return hasattr(module, "regulariser")


@torch.no_grad()
def layer_statistics(model: nn.Module) -> dict[str, float]:
    """Mean beta, mean gamma and mean Lipschitz constant of the Lipschitz BNs."""
    betas = [m.frozen_beta() for m in model.modules() if isinstance(m, SmoothActivation)]
    bns = [m for m in model.modules() if isinstance(m, LipschitzBatchNorm)]
    return {
        "beta_mean": float(np.mean(betas)) if betas else 0.0,
        "gamma_mean": float(np.mean([m.log_gamma.exp().item() for m in bns])) if bns else 0.0,
        "lipschitz_mean": float(np.mean([m.lipschitz_constant() for m in bns])) if bns else 0.0,
    }


def _parameter_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """log beta learns at its own rate; beta, gamma, explicit scales and 1-d tensors (BN affine,
    biases) get no weight decay."""
    decay, no_decay, log_betas = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.endswith("log_beta"):
            log_betas.append(parameter)
        elif name.endswith(NO_DECAY_SUFFIXES) or parameter.ndim <= 1:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr": config.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": config.lr},
        {"params": log_betas, "weight_decay": 0.0, "lr": config.beta_lr or config.lr},
    ]
    return [group for group in groups if group["params"]]


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    groups = _parameter_groups(model, config)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)


def _scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig, total_steps: int):
    if config.schedule == "onecycle":
        # each group's own peak (log beta's is beta_lr); a resumed optimizer's state remembers it
        peaks = [group.get("max_lr", group["lr"]) for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=max(total_steps, 1))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))


@torch.no_grad()
def _keep_beta_in_range(model: nn.Module) -> None:
    low, high = math.log(FINETUNE_BETA_MIN), math.log(BETA_MAX)
    for module in model.modules():
        if isinstance(module, SmoothActivation) and module.log_beta.requires_grad:
            module.log_beta.clamp_(low, high)


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
        "numpy": torch.from_numpy(
            np.frombuffer(np.random.get_state(legacy=False)["state"]["key"].tobytes(), dtype=np.uint8).copy()
        ),
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
    if not isinstance(test, Sized):
        raise TypeError(f"{type(test).__name__} has no length: a map-style dataset (with __len__) is needed")
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
    sampler: DistributedSampler[Any] = DistributedSampler(
        train, num_replicas=distributed.world_size, rank=distributed.rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    assert config.batch_size is not None  # a resolved config
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
    with normalising_with_running_statistics(model) if batch == 1 else contextlib.nullcontext():
        yield


def penalty_examples(batch: int, share: float) -> int:
    """How many of a batch's examples the gradient-norm penalty is computed on: ``share`` of them,
    rounded up."""
    return min(batch, max(1, math.ceil(batch * share)))


def cross_entropy_and_grad_penalty(
    model: nn.Module,
    images,
    labels,
    lambda_grad: float,
    teacher_logits=None,
    distill: float = 0.0,
    share: float = 1.0,
):
    """(label loss, gradient penalty). The label loss is the cross-entropy, mixed with the KL
    divergence to ``teacher_logits`` by ``distill``; the penalty is the mean squared norm of the
    cross-entropy's input gradient, 0 unless ``lambda_grad``.

    With ``share`` < 1 the penalty is computed on the first ``penalty_examples`` images only, in a
    second pass that normalises with the BatchNorm running statistics (the deployed model's
    gradient, unbiased over a shuffled batch; the statistics of a handful of images would make
    each one's gradient depend on the others) and shares the first pass's norm estimates; both
    graphs are freed by the one backward of the summed loss.
    """
    if lambda_grad == 0:
        logits = model(images)
        return label_loss(logits, labels, teacher_logits, distill), images.new_zeros(())
    count = penalty_examples(len(images), share)
    if count == len(images):
        images = images.detach().requires_grad_(True)
        logits = model(images)
        return label_loss(logits, labels, teacher_logits, distill), _input_gradient_penalty(logits, labels, images)
    # The penalty's pass runs on the module itself: under DistributedDataParallel a second forward of
    # the wrapper before backward would be a second reduction; its gradients reach the same
    # parameters and are reduced with the first pass's.
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    with one_norm_per_step(module):
        logits = model(images)
        penalised = images[:count].detach().requires_grad_(True)
        with normalising_with_running_statistics(module):
            penalty = _input_gradient_penalty(module(penalised), labels[:count], penalised)
    return label_loss(logits, labels, teacher_logits, distill), penalty


def _input_gradient_penalty(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """mean_i ||d CE_i / d x_i||^2, differentiable (double backward)."""
    per_example = F.cross_entropy(logits, labels, reduction="none")
    (input_gradient,) = torch.autograd.grad(per_example.sum(), images, create_graph=True)
    return input_gradient.flatten(1).square().sum(1).mean()


def label_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, distill: float
) -> torch.Tensor:
    """(1 - distill) * CE(labels) + distill * KL(softmax(teacher) || softmax(logits)) (CE alone without a teacher)."""
    cross_entropy = F.cross_entropy(logits, labels)
    if teacher_logits is None or distill == 0:
        return cross_entropy
    divergence = F.kl_div(
        F.log_softmax(logits.float(), -1),
        F.log_softmax(teacher_logits.float(), -1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - distill) * cross_entropy + distill * divergence


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
    teacher: nn.Module | None = None,
    statistics_data: Dataset | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place; checkpoint after each epoch; continue from ``resume``.

    ``extra_state`` (tensors, numbers, strings, lists and dicts of them) is stored in every
    checkpoint beside the training state, for the caller to read back on resume.

    ``teacher`` (the original model) gives the soft targets of ``config.distill``; without it the
    loss is the cross-entropy alone. ``statistics_data`` (unaugmented train images) is what the
    BatchNorm statistics are re-estimated on after the last epoch (``config.refresh_batchnorm``);
    without it, ``train`` is.

    Stops with an LcnnError (the last epoch checkpoint left intact) if the loss becomes NaN/Inf.

    With ``distributed`` (see ``lcnn_convert.distributed``) the model trains wrapped in
    DistributedDataParallel, ``config.batch_size`` is the global batch, split evenly over the
    ranks; the logged terms and the accuracy are averaged over all ranks; only rank 0 prints
    and writes checkpoints.
    """
    config.validate()
    if not isinstance(train, Sized):
        raise TypeError(f"{type(train).__name__} has no length: a map-style dataset (with __len__) is needed")
    config = config.resolved(len(train), distributed.world_size if distributed is not None else 1)
    assert config.batch_size is not None  # resolved
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

    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    result = FinetuneResult(
        epochs=0, steps=0, seconds=0.0, step_log={"loss": [], "beta_mean": [], "gamma_mean": []}, config=config
    )
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
        result.batchnorm_refreshed = bool(resume.get("batchnorm_refreshed", False))
        console.print(f"[cyan]resuming[/cyan] after epoch {start_epoch} (step {result.steps})")

    for epoch in range(start_epoch, config.epochs):
        if config.max_steps is not None and result.steps >= config.max_steps:
            break
        torch.manual_seed(config.seed * 1_000_003 + epoch)
        loader = _train_loader(train, config, epoch, distributed)
        totals = {"loss": 0.0, "label_loss": 0.0, "beta_term": 0.0, "gamma_term": 0.0, "grad_term": 0.0}
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
                with torch.autocast(device_type=device.type, enabled=use_amp):
                    teacher_logits = None
                    if teacher is not None and config.distill > 0:
                        with torch.no_grad():
                            teacher_logits = teacher(images)
                    with _running_statistics_for_one_example(model, len(labels)):
                        label_term, grad_penalty = cross_entropy_and_grad_penalty(
                            trained,
                            images,
                            labels,
                            config.lambda_grad,
                            teacher_logits,
                            config.distill,
                            config.grad_norm_share,
                        )
                beta_sum, gamma_sum = regularisers(model)
                terms = {
                    "label_loss": label_term.float(),
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
                _keep_beta_in_range(model)
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
                        f"loss {totals['loss'] / batches:.3f} label {totals['label_loss'] / batches:.3f} "
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
        last = epoch + 1 == config.epochs or (config.max_steps is not None and result.steps >= config.max_steps)
        if last and config.refresh_batchnorm:
            # The running statistics were averaged while beta moved; re-estimated for the final
            # betas, the same images on every rank give every rank the same statistics.
            refreshing = time.perf_counter()
            try:
                recalibrate_batchnorm(
                    model,
                    statistics_data if statistics_data is not None else train,
                    REFRESH_BATCHES,
                    REFRESH_BATCH_SIZE,
                    config.seed * 1_000_003 + epoch,
                )
            except (OSError, ValueError, UnreadableExample) as error:
                kept = f"the last good checkpoint (epoch {epoch}) is kept" if epoch else "no checkpoint was written"
                raise LcnnError(
                    f"re-estimating the BatchNorm statistics after epoch {epoch + 1} stopped: {first_line(error)}; "
                    f"{kept}"
                ) from error
            model.train()
            result.batchnorm_refreshed = True
            seconds += time.perf_counter() - refreshing
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
                "batchnorm_refreshed": result.batchnorm_refreshed,
                **(extra_state or {}),
            }
            save_checkpoint(checkpoint_path, model, optimizer, scheduler, state)
        if on_epoch_end is not None:
            on_epoch_end(record)
    model.eval()
    return result
