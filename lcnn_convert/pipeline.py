"""The whole job behind ``lcnn-convert MODEL``: load -> convert -> fine-tune -> export -> verify -> report.

A plain conversion is written into a staged directory that replaces the output dir only when
complete. A fine-tuning run works in the output dir itself, because its epoch checkpoints must
survive an interruption; every file there is still written atomically, report.json last.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from . import __version__
from .artifacts import ONNX_FILE, REPORT_FILE, WEIGHTS_FILE, save
from .conversion import ConvertOptions, convert, convert_with_options
from .errors import LcnnError, first_line
from .export import DEFAULT_OPSET, export_onnx, external_data_path
from .bn_statistics import has_untrained_batchnorm, recalibrate_batchnorm
from .distributed import (
    DistributedContext,
    broadcast_from_main,
    initialize,
    launched_by_torchrun,
    share_outcome,
    shutdown,
)
from .finetune import CHECKPOINT_FILE, FinetuneConfig, finetune, load_checkpoint
from .io import StagedDirectory, WorkingDirectory
from .models import (
    ModelSpec,
    classifier_classes,
    data_config,
    find_classifier,
    load_model_with_spec,
    reset_head,
    resolve_model_name,
)
from .report import write_report
from .verify import DEFAULT_ATOL, verify_onnx

CALIBRATION_EXAMPLES = 256
BN_STATISTICS_BATCHES = 100
CURVATURE_PLOT = "curvature.png"
TRAINING_PLOT = "training.png"
RESUME_KEYS = ("model", "dataset", "num_classes", "seed", "batch_size")


@dataclass
class ConversionJob:
    model: str
    weights: Path | None = None
    pretrained: bool = True
    num_classes: int | None = None
    beta: float | str = "auto"
    image_size: int | None = None
    output: Path | None = None
    overwrite: bool = False
    opset: int = DEFAULT_OPSET
    device: str = "auto"
    atol: float = DEFAULT_ATOL
    seed: int = 0
    finetune: str | None = None
    evaluate: str | None = None
    data_dir: Path | None = None
    resume: bool = False
    eval_examples: int = 256
    training: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def dataset(self) -> str | None:
        return self.finetune or self.evaluate

    def validate(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise LcnnError(f"--num-classes must be a positive integer, got {self.num_classes}")
        if self.beta != "auto" and not (isinstance(self.beta, float) and self.beta > 0):
            raise LcnnError(f"--beta must be 'auto' or a number > 0, got {self.beta}")
        if self.image_size is not None and self.image_size < 8:
            raise LcnnError(f"--image-size must be at least 8, got {self.image_size}")
        if self.opset < DEFAULT_OPSET:
            raise LcnnError(f"--opset must be >= {DEFAULT_OPSET}, got {self.opset}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise LcnnError(f"--device must be auto, cpu or cuda, got '{self.device}'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise LcnnError("--device cuda was asked for but no CUDA device is available")
        if not self.atol > 0:
            raise LcnnError(f"--atol must be > 0, got {self.atol}")
        if self.finetune and self.evaluate and self.finetune != self.evaluate:
            raise LcnnError("--finetune and --eval name different datasets; --finetune evaluates on its own test split")
        if self.resume and not self.finetune:
            raise LcnnError("--resume continues a --finetune run; give the same --finetune DATASET")
        if self.eval_examples < 1:
            raise LcnnError(f"--eval-examples must be >= 1, got {self.eval_examples}")
        self.training.seed = self.seed
        if self.finetune:
            self.training.validate()


def parse_beta(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise LcnnError(f"--beta must be 'auto' or a number > 0, got '{text}'") from None
    if not value > 0:
        raise LcnnError(f"--beta must be 'auto' or a number > 0, got {text}")
    return value


def default_output(model: str) -> Path:
    return Path("lcnn-out") / re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def _step(console: Console, text: str, timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    with console.status(f"{text}…"):
        yield
    timings[key] = round(time.perf_counter() - start, 3)
    console.print(f"[green]✓[/green] {text} [dim]({timings[key]:.1f}s)[/dim]")


def _first_examples(dataset, count: int) -> torch.Tensor:
    return torch.stack([dataset[index][0] for index in range(min(count, len(dataset)))])


def _fit_head(model: nn.Module, job: ConversionJob, num_classes: int, dataset: str) -> None:
    if job.num_classes is not None and job.num_classes != num_classes:
        raise LcnnError(f"--num-classes {job.num_classes} conflicts with {dataset}, which has {num_classes} classes")
    found = find_classifier(model)
    if found is not None and classifier_classes(found[1]) != num_classes:
        reset_head(model, num_classes)


def measure(model: nn.Module, splits, examples: int) -> dict[str, Any]:
    """Accuracy, curvature and PGD accuracy on the first ``examples`` test images."""
    from .measure import adversarial_accuracy, estimate_curvature, evaluate_accuracy

    curvature = estimate_curvature(model, splits.test, max_examples=examples)
    metrics = {
        "accuracy": evaluate_accuracy(model, splits.test),
        **{key: value for key, value in curvature.to_dict().items() if key != "num_examples"},
        "curvature_examples": curvature.num_examples,
        "pgd_l2_accuracy": adversarial_accuracy(model, splits.test, "l2", mean=splits.mean, std=splits.std, max_examples=examples),
        "pgd_linf_accuracy": adversarial_accuracy(model, splits.test, "linf", mean=splits.mean, std=splits.std, max_examples=examples),
    }
    return metrics, list(curvature.per_example_curvature)


def run_conversion(job: ConversionJob, console: Console | None = None) -> dict[str, Any] | None:
    """Run the job and return the report (also written to report.json in the output dir).

    Launched by torchrun with several processes, fine-tuning runs data-parallel (see
    ``lcnn_convert.distributed``); only rank 0 returns the report, the other ranks return None.
    Without --finetune there is nothing to share out, and only rank 0 works.
    """
    console = console or Console(stderr=True)
    job.validate()
    spec = resolve_model_name(job.model)
    final = job.output or default_output(job.model)
    if launched_by_torchrun() and not job.finetune and int(os.environ.get("RANK", "0")) != 0:
        return None
    if job.finetune:
        distributed = initialize(job.device) if launched_by_torchrun() else None
        try:
            if distributed is not None and job.training.batch_size % distributed.world_size:
                raise LcnnError(
                    f"--batch-size {job.training.batch_size} is the global batch and must be a multiple of the "
                    f"{distributed.world_size} processes"
                )
            def open_directory() -> WorkingDirectory:
                return WorkingDirectory(final, overwrite=job.overwrite, resume=job.resume, resume_file=CHECKPOINT_FILE)

            directory = open_directory() if distributed is None else _run_on_main(distributed, open_directory)
            with directory or contextlib.nullcontext():
                out = directory.path if directory is not None else Path(final).expanduser().absolute()
                return _run(job, spec, out, console, directory, distributed)
        finally:
            shutdown()
    with StagedDirectory(final, job.overwrite) as stage:
        report = _run(job, spec, stage.path, console, None)
    report["output_dir"] = str(stage.final)
    return report


def _run_on_main(distributed: DistributedContext, work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0; an LcnnError there stops every rank with rank 0's message."""
    result, error = None, None
    if distributed.is_main:
        try:
            result = work()
        except LcnnError as failure:
            error = str(failure)
    share_outcome(distributed, error)
    return result


def _on_main(distributed: DistributedContext | None, work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 only (everywhere without DDP); its result reaches every rank."""
    if distributed is None:
        return work()
    return broadcast_from_main(distributed, _run_on_main(distributed, work))


def _main_first(distributed: DistributedContext | None, work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0, then (if it succeeded) on the other ranks; every rank gets its own result."""
    if distributed is None:
        return work()
    result = _run_on_main(distributed, work)
    return result if distributed.is_main else work()


def _run(
    job: ConversionJob,
    spec: ModelSpec,
    out: Path,
    console: Console,
    workdir: WorkingDirectory | None,
    distributed: DistributedContext | None = None,
) -> dict[str, Any] | None:
    from .data import load_dataset

    timings: dict[str, float] = {}
    device = distributed.device if distributed is not None else resolve_device(job.device)
    is_main = distributed is None or distributed.is_main
    if not is_main:
        console = Console(stderr=True, quiet=True)
    resume_state = _on_main(distributed, lambda: load_checkpoint(out / CHECKPOINT_FILE) if job.resume else None)
    with _step(console, f"load {spec}", timings, "load"):
        torch.manual_seed(job.seed)  # random initialisation (--no-pretrained, new heads) is part of the run
        model, spec = load_model_with_spec(str(spec), job.pretrained, job.weights, job.num_classes)
        config = data_config(model, spec)
    splits = None
    bn_statistics = resume_state.get("batchnorm_statistics") if resume_state is not None else None
    if job.dataset:
        with _step(console, f"load dataset {job.dataset}", timings, "data"):
            # rank 0 first: a download must happen once, and its errors are everyone's
            splits = _main_first(distributed, lambda: load_dataset(job.dataset, job.data_dir, config, job.image_size))
            _fit_head(model, job, splits.num_classes, job.dataset)
        if resume_state is None and has_untrained_batchnorm(model):
            step = "estimate BatchNorm statistics (the model's were never trained)"
            with _step(console, step, timings, "bn_statistics"):
                batches = recalibrate_batchnorm(
                    model.to(device), splits.train, BN_STATISTICS_BATCHES, job.training.batch_size, job.seed
                )
            bn_statistics = f"estimated on {batches} batches of {job.dataset} train: the model's were never trained"
        calibration = _first_examples(splits.train, CALIBRATION_EXAMPLES)
        channels, height, width = calibration.shape[1:]
    else:
        channels, height, width = config["input_size"]
        if job.image_size:
            height = width = job.image_size
        calibration = None  # calibrated on inputs synthesised from the model's BatchNorm statistics
    identity = {
        "model": job.model, "dataset": job.dataset, "num_classes": _classes(model), "seed": job.seed,
        "batch_size": job.training.batch_size,
    }  # fmt: skip
    if resume_state is not None:
        _check_resumable(resume_state, identity, out)
    elif workdir is not None:
        workdir.clear()

    metrics: dict[str, Any] = {}
    curvatures: dict[str, list[float]] = {}
    if resume_state is not None:
        metrics, curvatures = resume_state["metrics"], resume_state["curvatures"]
    elif splits is not None and is_main:
        with _step(console, "measure the original", timings, "measure_original"):
            metrics["original"], curvatures["original"] = measure(model.to(device), splits, job.eval_examples)

    with _step(console, "convert", timings, "convert"):
        if resume_state is not None:
            converted = convert_with_options(model, None, ConvertOptions(beta=1.0, estimate_norms=False))
        else:
            torch.manual_seed(job.seed)  # every rank converts to the same model
            try:
                examples = calibration.to(device) if calibration is not None else None
                converted = convert(model.to(device), examples, beta=job.beta, input_size=(channels, height, width))
            except RuntimeError as error:
                raise LcnnError(
                    f"{spec} does not run at {height}x{width} ({first_line(error)}); try another --image-size"
                ) from error
    conversion = resume_state["conversion"] if resume_state is not None else converted.conversion_report.to_dict()
    if resume_state is None and splits is not None and is_main:
        with _step(console, "measure the conversion", timings, "measure_converted"):
            metrics["converted"], curvatures["converted"] = measure(converted.to(device), splits, job.eval_examples)

    finetune_summary = None
    if job.finetune:
        checkpoint = out / CHECKPOINT_FILE
        extra = {"identity": identity, "metrics": metrics, "curvatures": curvatures, "conversion": conversion,
                 "batchnorm_statistics": bn_statistics}
        start = time.perf_counter()
        try:
            result = finetune(
                converted, splits.train, splits.test, job.training, checkpoint_path=checkpoint, resume=resume_state,
                device=device, console=console, extra_state=extra, distributed=distributed,
            )  # fmt: skip
        except RuntimeError as error:
            if distributed is None:
                raise
            # A rank that fails leaves the others' collectives broken; say what happened in one line.
            raise LcnnError(
                f"fine-tuning stopped: another rank failed or left the job ({first_line(error, 120)}); "
                "the last good checkpoint is kept"
            ) from error
        if not is_main:
            return None
        timings["finetune"] = round(time.perf_counter() - start, 3)
        finetune_summary = result.summary()
        if distributed is not None:
            finetune_summary["distributed"] = {
                "world_size": distributed.world_size, "backend": distributed.backend,
                "batch_per_rank": job.training.batch_size // distributed.world_size,
            }  # fmt: skip
        with _step(console, "measure the fine-tuned model", timings, "measure_finetuned"):
            metrics["finetuned"], curvatures["finetuned"] = measure(converted.to(device), splits, job.eval_examples)

    converted = converted.cpu().eval()
    with _step(console, "save weights", timings, "save"):
        save(converted, out, spec)
    shaped = torch.randn((2, channels, height, width), generator=torch.Generator().manual_seed(job.seed))
    with _step(console, f"export ONNX (opset {job.opset})", timings, "export"):
        export_onnx(converted, out / ONNX_FILE, calibration[:2] if calibration is not None else shaped, opset=job.opset)
    with _step(console, "verify in onnxruntime", timings, "verify"):
        real = _first_examples(splits.test, 32) if splits is not None else None
        parity = verify_onnx(converted, out / ONNX_FILE, real, atol=job.atol, seed=job.seed + 1)
    files = {"onnx": ONNX_FILE, "weights": WEIGHTS_FILE, "report": REPORT_FILE}
    if external_data_path(out / ONNX_FILE).is_file():
        files["onnx_data"] = external_data_path(ONNX_FILE).name
    if curvatures:
        from .plots import plot_curvature, plot_training

        plot_curvature(curvatures, out / CURVATURE_PLOT)
        files["curvature_plot"] = CURVATURE_PLOT
        if finetune_summary is not None:
            plot_training(result.step_log, finetune_summary["history"], out / TRAINING_PLOT)
            files["training_plot"] = TRAINING_PLOT
            files["checkpoint"] = CHECKPOINT_FILE
    report = {
        "model": job.model,
        "source": spec.source,
        "name": spec.name,
        "num_classes": _classes(converted),
        "input_size": [channels, height, width],
        "pretrained": job.pretrained and job.weights is None,
        "weights": str(job.weights) if job.weights else None,
        "dataset": job.dataset,
        "conversion": conversion,
        "batchnorm_statistics": bn_statistics,
        "parity": parity.to_dict(),
        "files": files,
        "timings_s": timings,
        "lcnn_convert_version": __version__,
    }
    if metrics:
        report["metrics"] = metrics
        report["measurement"] = {
            "examples": job.eval_examples,
            "curvature": "power iteration (10 steps) on input Hessian-vector products of the cross-entropy",
            "relu_models": "measured through a softplus(beta=1000) stand-in for ReLU, as the LCNN paper's baselines",
            "pgd": "L2 eps 0.5 and Linf eps 8/255 in [0,1] pixel space, 10 steps, step 2.5*eps/steps, random start",
        }
    if finetune_summary is not None:
        report["finetune"] = {**finetune_summary, "config": asdict(job.training)}
    if job.beta == "auto" and splits is not None:
        report["conversion"]["beta"]["calibration_data"] = f"{job.dataset} train"
    write_report(out / REPORT_FILE, report)
    report["output_dir"] = str(out)
    return report


def _classes(model: nn.Module) -> int | None:
    found = find_classifier(model)
    return classifier_classes(found[1]) if found else None


def _check_resumable(state: dict[str, Any], identity: dict[str, Any], out: Path) -> None:
    saved = state.get("identity", {})
    different = [key for key in RESUME_KEYS if saved.get(key) != identity.get(key)]
    if different:
        detail = ", ".join(f"{key}: checkpoint {saved.get(key)!r} vs now {identity.get(key)!r}" for key in different)
        raise LcnnError(f"cannot resume from {out / CHECKPOINT_FILE}: it belongs to another run ({detail})")
