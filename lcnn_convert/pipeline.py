"""The whole job behind ``lcnn-convert MODEL``: load -> convert -> fine-tune -> export -> verify -> report.

Every run holds its output dir's lock and writes into a staging folder inside it
(``lcnn_convert.io.OutputDirectory``); the new files replace the previous output only once they are
complete, report.json last. A fine-tuning run's epoch checkpoints stay in the staging folder when
it stops, for ``--resume``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from rich.console import Console
from torch import nn

from . import __version__
from .artifacts import ONNX_FILE, REPORT_FILE, WEIGHTS_FILE, checksum, checksums, save
from .bn_statistics import has_untrained_batchnorm, recalibrate_batchnorm
from .conversion import CalibrationData, ConversionReport, ConvertOptions, convert_with_options
from .conversion.rules import default_rules
from .conversion.api import conversion_report, synthetic_calibration_data
from .conversion.synthetic import can_synthesize
from .distributed import (
    DistributedContext,
    broadcast_from_main,
    initialize,
    launched_by_torchrun,
    share_outcome,
    shutdown,
)
from .errors import Interrupted, LcnnError, first_line
from .defaults import (
    CALIBRATION_EXAMPLES,
    DEFAULT_ACTIVATION,
    DEFAULT_ATOL,
    LCNN_ACTIVATIONS,
    DEFAULT_LOGIT_TOLERANCE,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_OPSET,
    EVAL_EXAMPLES,
)
from .export import DYNAMO_MIN_OPSET, check_opset, export_onnx, external_data_path, written_opset
from .fidelity import measure_fidelity
from .finetune import CHECKPOINT_FILE, FinetuneConfig, finetune, load_checkpoint
from .io import OutputDirectory
from .layers.centered_softplus import BETA_MAX, BETA_MIN
from .models import (
    DataConfig,
    ModelSpec,
    classifier_classes,
    data_config,
    find_classifier,
    load_model_with_spec,
    reset_head,
    resolve_model_name,
)
from .preprocessing import Preprocessing, check_overrides, preprocessing_candidates, preprocessing_for
from .measure import ModelMetrics
from .report import FidelityGate, FinetuneOutcome, RunReport, write_report
from .verify import ParityResult, verify_onnx

if TYPE_CHECKING:
    from .data import DatasetSplits

T = TypeVar("T")

# Test images the converted model is compared with the original on (all of a smaller test split),
# held in memory: 1024 at 224x224 are 600 MB.
FIDELITY_EXAMPLES = 1024
PARITY_EXAMPLES = 32
BN_STATISTICS_BATCHES = 100
BN_STATISTICS_BATCH_SIZE = 128
# The original's accuracy under other common normalisations is checked on this many test images;
# it is called wrong when another one scores PREPROCESSING_GAIN higher, or it is within
# CHANCE_FACTOR of chance.
PREPROCESSING_CHECK_EXAMPLES = 256
PREPROCESSING_GAIN = 0.2
CHANCE_FACTOR = 1.5
CURVATURE_PLOT = "curvature.png"
TRAINING_PLOT = "training.png"
ROBUSTNESS_PLOT = "robustness.png"
MAX_IMAGE_SIZE = 4096
MAX_CLASSES = 1_000_000
MAX_SEED = 2**32 - 1  # numpy's generators take 32-bit seeds


@dataclass
class ConversionJob:
    model: str
    weights: Path | None = None
    pretrained: bool = True
    num_classes: int | None = None
    beta: float | str = "auto"
    activation: str = DEFAULT_ACTIVATION
    image_size: int | None = None
    output: Path | None = None
    overwrite: bool = False
    opset: int = DEFAULT_OPSET
    device: str = "auto"
    atol: float = DEFAULT_ATOL
    seed: int = 0
    finetune: str | None = None
    evaluate: str | None = None
    calibrate: str | None = None
    calibration_examples: int = CALIBRATION_EXAMPLES
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    logit_tolerance: float = DEFAULT_LOGIT_TOLERANCE
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    data_dir: Path | None = None
    resume: bool = False
    eval_examples: int = EVAL_EXAMPLES
    training: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def dataset(self) -> str | None:
        return self.finetune or self.evaluate or self.calibrate

    @property
    def measures(self) -> bool:
        """Accuracy, curvature and robustness are measured for --finetune and --eval runs."""
        return bool(self.finetune or self.evaluate)

    def validate(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise LcnnError(f"--num-classes must be a positive integer, got {self.num_classes}")
        if self.beta != "auto":
            parse_beta(str(self.beta))
        if self.num_classes is not None and self.num_classes > MAX_CLASSES:
            raise LcnnError(f"--num-classes must be at most {MAX_CLASSES:,}, got {self.num_classes:,}")
        if self.image_size is not None and not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise LcnnError(f"--image-size must lie in [8, {MAX_IMAGE_SIZE}], got {self.image_size}")
        if not 0 <= self.seed <= MAX_SEED:
            raise LcnnError(f"--seed must lie in [0, 2**32 - 1], got {self.seed}")
        check_opset(self.opset)
        if self.activation not in LCNN_ACTIVATIONS:
            choices = ", ".join(name.replace("_", "-") for name in LCNN_ACTIVATIONS)
            raise LcnnError(f"--activation must be one of {choices}, got '{self.activation}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise LcnnError(f"--device must be auto, cpu or cuda, got '{self.device}'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise LcnnError("--device cuda was asked for but no CUDA device is available")
        if not self.atol > 0:
            raise LcnnError(f"--atol must be > 0, got {self.atol}")
        named = {
            name: value
            for name, value in (
                ("--finetune", self.finetune),
                ("--eval", self.evaluate),
                ("--calibrate", self.calibrate),
            )
            if value
        }
        if len(set(named.values())) > 1:
            raise LcnnError(
                f"{' and '.join(named)} name different datasets; each run calibrates, measures and trains on one"
            )
        if self.resume and not self.finetune:
            raise LcnnError("--resume continues a --finetune run; give the same --finetune DATASET")
        if self.eval_examples < 1:
            raise LcnnError(f"--eval-examples must be >= 1, got {self.eval_examples}")
        if self.calibration_examples < 2:
            raise LcnnError(f"--calibration-examples must be >= 2, got {self.calibration_examples}")
        if not 0 <= self.min_agreement <= 1:
            raise LcnnError(f"--min-agreement must lie in [0, 1], got {self.min_agreement}")
        if not 0 < self.logit_tolerance < 1:
            raise LcnnError(f"--logit-tolerance must lie in (0, 1), got {self.logit_tolerance}")
        check_overrides(self.mean, self.std, self.interpolation)
        self.training.seed = self.seed
        if self.finetune:
            self.training.validate()


def parse_beta(text: str) -> float | str:
    if text == "auto":
        return "auto"
    expected = f"'auto' or a number in [{BETA_MIN:g}, {BETA_MAX:g}] (the LCNN activations' range)"
    try:
        value = float(text)
    except ValueError:
        raise LcnnError(f"--beta must be {expected}, got '{text}'") from None
    if not BETA_MIN <= value <= BETA_MAX:
        raise LcnnError(f"--beta must be {expected}, got {text}")
    return value


def default_output(model: str) -> Path:
    return Path("lcnn-out") / re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def _step(console: Console, text: str, timings: dict[str, float], key: str, spinner: bool = True) -> Iterator[None]:
    """Time a stage and tick it off; ``spinner=False`` for a stage that shows a progress bar of its own
    (rich shows one live display at a time)."""
    start = time.perf_counter()
    with console.status(f"{text}…") if spinner else contextlib.nullcontext():
        yield
    timings[key] = round(time.perf_counter() - start, 3)
    console.print(f"[green]✓[/green] {text} [dim]({timings[key]:.1f}s)[/dim]")


def _examples(dataset, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` examples drawn without replacement by ``seed`` (folders list their images by class),
    in index order; all of them when the dataset is smaller."""
    total = len(dataset)
    if count >= total:
        indices = list(range(total))
    else:
        indices = sorted(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].tolist())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # an augmenting transform draws from the global generator
        items = [dataset[index] for index in indices]
    return torch.stack([image for image, _ in items]), torch.tensor([int(label) for _, label in items])


@contextlib.contextmanager
def _progress_bar(console: Console, text: str) -> Iterator[Callable[[int, int, float], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn(text),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3g}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(text, total=None, loss=float("nan"))

        def update(step: int, steps: int, loss: float) -> None:
            progress.update(task, completed=step, total=steps, loss=loss)

        yield update


def _fit_head(model: nn.Module, job: ConversionJob, num_classes: int, dataset: str) -> bool:
    """Give the model a head of the dataset's class count; True when it had to be replaced."""
    if job.num_classes is not None and job.num_classes != num_classes:
        raise LcnnError(f"--num-classes {job.num_classes} conflicts with {dataset}, which has {num_classes} classes")
    found = find_classifier(model)
    if found is not None and classifier_classes(found[1]) != num_classes:
        reset_head(model, num_classes)
        return True
    return False


def _measure(run: Run, model: nn.Module, epsilons: dict[str, list[float]] | None = None) -> ModelMetrics:
    from .measure import measure_model

    splits = run.data
    return measure_model(
        model.to(run.device),
        splits.test,
        run.job.eval_examples,
        run.budgets,
        epsilons,
        splits.mean,
        splits.std,
        None if model is run.original else _original_confidence(run),
    )


def _original_confidence(run: Run) -> float:
    from .measure import accuracy_and_confidence

    original = run.metrics.get("original")
    if original is not None and original.confidence is not None:
        return original.confidence
    # metrics resumed from a checkpoint of a release that did not measure the confidence
    return accuracy_and_confidence(run.original.to(run.device), run.data.test)[1]


def _curve_epsilons(run: Run) -> dict[str, list[float]] | None:
    """The original's curve budgets, at which the converted and fine-tuned models are attacked."""
    original = run.metrics.get("original")
    if original is None:
        return None
    return {norm: list(curve.epsilons) for norm, curve in original.robustness.items()}


def run_conversion(job: ConversionJob, console: Console | None = None) -> RunReport | None:
    """Run the job and return the report (also written to report.json in the output dir).

    Launched by torchrun with several processes, fine-tuning runs data-parallel (see
    ``lcnn_convert.distributed``); only rank 0 returns the report, the other ranks return None.
    Without --finetune there is nothing to share out, and only rank 0 works.

    Ctrl-C (or SIGTERM, under the CLI) ends in ``Interrupted``, whose message says what was kept.
    """
    console = console or Console(stderr=True)
    job.validate()
    spec = resolve_model_name(job.model)
    final = job.output or default_output(job.model)
    if launched_by_torchrun() and not job.finetune and int(os.environ.get("RANK", "0")) != 0:
        return None
    distributed = initialize(job.device) if job.finetune and launched_by_torchrun() else None
    directory: OutputDirectory | None = None
    try:
        if distributed is not None and job.training.batch_size and job.training.batch_size % distributed.world_size:
            raise LcnnError(
                f"--batch-size {job.training.batch_size} is the global batch and must be a multiple of the "
                f"{distributed.world_size} processes"
            )

        def open_directory() -> OutputDirectory:
            return OutputDirectory.open(
                final,
                overwrite=job.overwrite,
                resume=job.resume,
                resumable=bool(job.finetune),
                resume_file=CHECKPOINT_FILE,
            )

        directory = open_directory() if distributed is None else _run_on_main(distributed, open_directory)
        with directory or contextlib.nullcontext():
            # ranks other than 0 write nothing; they only need a path to name
            out = directory.staging if directory is not None else Path(final).expanduser().absolute()
            report = _run(job, spec, out, console, distributed)
            if directory is not None:
                directory.commit(last=[REPORT_FILE])
    except KeyboardInterrupt as stopped:
        raise Interrupted.from_signal(stopped, _interruption_note(stopped, job, directory)) from None
    finally:
        if distributed is not None:
            shutdown()
    if report is not None and directory is not None:
        report.output_dir = str(directory.path)
    return report


def _interruption_note(stopped: KeyboardInterrupt, job: ConversionJob, directory: OutputDirectory | None) -> str:
    """What was interrupted and what is kept, in one line."""
    what = f"{Interrupted.signal_name(stopped)}: the {'fine-tuning ' if job.finetune else ''}run was stopped"
    if directory is None:
        return f"{what} before it wrote anything"
    checkpoint = directory.staging / CHECKPOINT_FILE
    if job.finetune and checkpoint.is_file():
        try:
            epoch = f" (epoch {int(torch.load(checkpoint, map_location='cpu', weights_only=True)['epoch'])})"
        except Exception:  # noqa: BLE001 - the note must not fail; the epoch is a detail
            epoch = ""
        return (
            f"{what}; {directory.path} is as it was, and the last checkpoint{epoch} is kept in {checkpoint.parent}: "
            "run the same command with --resume to continue"
        )
    return f"{what}; nothing was kept, {directory.path} is as it was"


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


@dataclass
class Run:
    """What the stages of one run share: the job, where it writes, and what each stage produced."""

    job: ConversionJob
    spec: ModelSpec
    out: Path
    console: Console
    distributed: DistributedContext | None
    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    resume_state: dict[str, Any] | None = None
    config: DataConfig = field(default_factory=DataConfig)
    splits: DatasetSplits | None = None  # when a dataset was named
    head_reset: bool = False
    identity: dict[str, Any] = field(default_factory=dict)  # the settings a --resume must match
    bn_statistics: str | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    fidelity_inputs: tuple[torch.Tensor, torch.Tensor] | None = None  # held-out test images and labels
    metrics: dict[str, ModelMetrics] = field(default_factory=dict)  # "original", "converted", "finetuned"
    finetune: FinetuneOutcome | None = None
    # what the stages produce, in order; read them through the properties below
    loaded: nn.Module | None = None
    chosen_preprocessing: Preprocessing | None = None
    converted: nn.Module | None = None
    conversion: ConversionReport | None = None
    parity: ParityResult | None = None

    @property
    def original(self) -> nn.Module:
        return _produced(self.loaded, "the original model")

    @property
    def preprocessing(self) -> Preprocessing:
        return _produced(self.chosen_preprocessing, "the preprocessing")

    @property
    def lcnn(self) -> nn.Module:
        return _produced(self.converted, "the converted model")

    @property
    def data(self) -> DatasetSplits:
        return _produced(self.splits, "the dataset")

    @property
    def is_main(self) -> bool:
        return self.distributed is None or self.distributed.is_main

    @property
    def budgets(self) -> dict[str, float]:
        """The headline PGD budgets of the run's dataset."""
        from .measure import headline_budgets

        return headline_budgets(self.job.dataset)

    def step(self, text: str, key: str, spinner: bool = True):
        return _step(self.console, text, self.timings, key, spinner)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.console.print(f"[yellow]warning:[/yellow] {text}", highlight=False, soft_wrap=True)


def _produced(value: T | None, what: str) -> T:
    """A stage's product, which a later stage needs (a stage order bug otherwise, not a user error)."""
    if value is None:
        raise RuntimeError(f"{what} is read before the stage that produces it ran")
    return value


def _run(
    job: ConversionJob,
    spec: ModelSpec,
    out: Path,
    console: Console,
    distributed: DistributedContext | None = None,
) -> RunReport | None:
    device = distributed.device if distributed is not None else resolve_device(job.device)
    if distributed is not None and not distributed.is_main:
        console = Console(stderr=True, quiet=True)
    run = Run(job, spec, out, console, distributed, device)
    run.resume_state = _on_main(distributed, lambda: load_checkpoint(out / CHECKPOINT_FILE) if job.resume else None)
    _load(run)
    if job.dataset:
        _load_data(run)
    else:
        _check_runs_at_input_size(run)
    _check_identity(run)
    if run.resume_state is not None:
        state = run.resume_state
        run.metrics = {
            name: ModelMetrics.from_dict(metrics, state["curvatures"][name])
            for name, metrics in state["metrics"].items()
        }
    elif run.splits is not None and run.is_main and job.measures:
        with run.step("measure the original", "measure_original"):
            run.metrics["original"] = _measure(run, run.original)
    if run.splits is not None and run.is_main and run.resume_state is None:
        _check_preprocessing(run)
    _convert(run)
    if run.resume_state is None and run.splits is not None and run.is_main and job.measures:
        with run.step("measure the conversion", "measure_converted"):
            run.metrics["converted"] = _measure(run, run.lcnn, _curve_epsilons(run))
    if job.finetune:
        _finetune(run)
        if not run.is_main:
            return None
    _export_and_verify(run)
    return _report(run)


def _load(run: Run) -> None:
    job = run.job
    with run.step(f"load {run.spec}", "load"):
        torch.manual_seed(job.seed)  # random initialisation (--no-pretrained, new heads) is part of the run
        run.loaded, run.spec = load_model_with_spec(str(run.spec), job.pretrained, job.weights, job.num_classes)
        run.config = data_config(run.loaded, run.spec)
    run.chosen_preprocessing = preprocessing_for(run.config, job.mean, job.std, job.interpolation, job.image_size)
    channels, height, width = run.config.input_size
    if job.image_size:
        height = width = job.image_size
    run.input_size = (channels, height, width)


def _load_data(run: Run) -> None:
    from .data import load_dataset

    job = run.job
    config = run.preprocessing.applied_to(run.config)
    dataset = _produced(job.dataset, "the dataset's name")
    with run.step(f"load dataset {dataset}", "data"):
        # rank 0 first: a download must happen once, and its errors are everyone's
        run.splits = _main_first(run.distributed, lambda: load_dataset(dataset, job.data_dir, config, job.image_size))
        run.head_reset = _fit_head(run.original, job, run.data.num_classes, dataset)
    splits = run.data
    run.chosen_preprocessing = replace(run.preprocessing, image_size=splits.image_size)
    run.input_size = (run.input_size[0], splits.image_size, splits.image_size)
    _check_runs_at_input_size(run)
    if run.resume_state is None and has_untrained_batchnorm(run.original):
        step = "estimate BatchNorm statistics (the model's were never trained)"
        with run.step(step, "bn_statistics"):
            batches = recalibrate_batchnorm(
                run.original.to(run.device), splits.train, BN_STATISTICS_BATCHES, BN_STATISTICS_BATCH_SIZE, job.seed
            )
        run.bn_statistics = f"estimated on {batches} batches of {dataset} train: the model's were never trained"
    elif run.resume_state is not None:
        run.bn_statistics = run.resume_state.get("batchnorm_statistics")
    test_images, test_labels = _examples(splits.test, FIDELITY_EXAMPLES, job.seed + 1)
    run.fidelity_inputs = (test_images, test_labels)
    channels, height, width = (int(size) for size in test_images.shape[1:])
    run.input_size = (channels, height, width)


def _check_runs_at_input_size(run: Run) -> None:
    """One forward pass of two images before any work: a model that cannot take the input size
    (AlexNet on 32x32, a ViT at anything but its own size) fails here, in one line."""
    height, width = run.input_size[1:]
    probe = torch.zeros((2, *run.input_size), device=run.device)
    model = run.original.to(run.device)
    was_training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(probe)
    except Exception as error:  # noqa: BLE001 - shape errors surface as RuntimeError, AssertionError, ValueError, ...
        if _is_out_of_memory(error):
            raise
        raise LcnnError(
            f"{run.spec} does not run at {height}x{width} ({first_line(error, 160)}); try another --image-size"
        ) from error
    finally:
        model.train(was_training)
    logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise LcnnError(f"{run.spec} returns {shape} at {height}x{width}, not [batch, classes] logits")


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError))


def _check_identity(run: Run) -> None:
    run.identity = resume_identity(run.job, _classes(run.original))
    if run.resume_state is not None:
        _check_resumable(run.resume_state, run.identity, run.out / CHECKPOINT_FILE)


def resume_identity(job: ConversionJob, num_classes: int | None) -> dict[str, Any]:
    """Every setting that changes a fine-tuning run's result; a --resume must match all of them.

    Left out: where the run writes and reads (--output, --data-dir), --device, how it prints, and
    --epochs/--max-steps, which say where the run stops: a resume may extend a run (its learning-rate
    schedule is then the longer run's from the resumed step on).
    """
    identity = {
        "model": job.model,
        "weights": checksum(job.weights) if job.weights else None,
        "pretrained": job.pretrained,
        "num_classes": num_classes,
        "dataset": job.dataset,
        "image_size": job.image_size,
        "mean": list(job.mean) if job.mean else None,
        "std": list(job.std) if job.std else None,
        "interpolation": job.interpolation,
        "beta": job.beta,
        "activation": job.activation,
        "calibration_examples": job.calibration_examples,
        "logit_tolerance": job.logit_tolerance,
        "min_agreement": job.min_agreement,
        "opset": job.opset,
        "atol": job.atol,
        "seed": job.seed,
        "eval_examples": job.eval_examples,
    }
    training = asdict(job.training)
    for key in ("seed", "epochs", "max_steps"):  # the run's --seed is above; see the docstring
        training.pop(key)
    return identity | {f"training.{key}": value for key, value in training.items()}


def _check_preprocessing(run: Run) -> None:
    """Warn when the original scores near chance, or far better with another common normalisation."""
    if run.head_reset or not (run.job.weights or run.job.pretrained):
        return  # random weights or a fresh head score at chance whatever the preprocessing
    images, labels = _produced(run.fidelity_inputs, "the held-out test images")
    check = slice(0, PREPROCESSING_CHECK_EXAMPLES)
    scored = preprocessing_candidates(run.original, images[check], labels[check], run.preprocessing)
    used = scored[0]
    best = max(scored[1:], key=lambda candidate: candidate[1], default=used)
    classes = run.data.num_classes
    chance = 1.0 / classes
    if best[1] >= used[1] + PREPROCESSING_GAIN:
        run.warn(
            f"the original scores {used[1]:.1%} on {run.job.dataset} test with {used[0]}, but {best[1]:.1%} with "
            f"{best[0]}: the preprocessing is probably wrong (pass --mean/--std as the model was trained)"
        )
    elif used[1] <= CHANCE_FACTOR * chance:
        run.warn(
            f"the original scores {used[1]:.1%} on {run.job.dataset} test, near chance ({chance:.1%}), with a head "
            f"that already has its {classes} classes: the preprocessing (--mean/--std, --interpolation) or the "
            "label order is probably wrong"
        )


def _calibration_data(run: Run) -> CalibrationData | None:
    """Train images to calibrate on and test images to measure fidelity on; without a dataset,
    inputs synthesised from the model's BatchNorm statistics (or nothing, for a model without them)."""
    job = run.job
    if run.splits is not None:
        images, _ = _examples(run.splits.calibration_pool, job.calibration_examples, job.seed)
        held_out, _ = _produced(run.fidelity_inputs, "the held-out test images")
        return CalibrationData((images,), (held_out,), f"{job.dataset} train", held_out_source=f"{job.dataset} test")
    if not can_synthesize(run.original):
        return None
    text = "synthesise calibration inputs from BatchNorm statistics"
    with run.step(text, "synthesize", spinner=False), _progress_bar(run.console, text) as progress:
        return synthetic_calibration_data(run.original.to(run.device), run.input_size, job.seed, progress)


def _convert(run: Run) -> None:
    job = run.job
    if run.resume_state is not None:
        with run.step("convert", "convert"):
            options = ConvertOptions(beta=1.0, estimate_norms=False, rules=default_rules(job.activation))
            run.converted = convert_with_options(run.original, None, options)
        run.conversion = ConversionReport.from_dict(run.resume_state["conversion"])
        return
    data = _calibration_data(run)
    options = ConvertOptions(
        beta=job.beta,
        rules=default_rules(job.activation),
        logit_tolerance=job.logit_tolerance,
        min_agreement=job.min_agreement,
        input_size=run.input_size,
        seed=job.seed,
    )
    with run.step("convert", "convert"):
        torch.manual_seed(job.seed)  # every rank converts to the same model
        if data is not None:
            data = CalibrationData(
                tuple(t.to(run.device) for t in data.calibration),
                None if data.held_out is None else tuple(t.to(run.device) for t in data.held_out),
                data.source,
                data.synthetic,
                data.held_out_source,
            )
        try:
            run.converted = convert_with_options(run.original.to(run.device), data, options)
        except RuntimeError as error:
            if _is_out_of_memory(error):
                raise
            height, width = run.input_size[1:]
            raise LcnnError(
                f"{run.spec} does not run at {height}x{width} ({first_line(error)}); try another --image-size"
            ) from error
    report = conversion_report(run.lcnn)
    run.conversion = report
    fidelity = report.fidelity
    if fidelity is None:
        run.warn("fidelity not measured: no data and no BatchNorm statistics; pass --calibrate DATASET")
    elif fidelity.synthetic:
        run.warn(
            f"fidelity ({fidelity.top1_agreement:.1%} top-1 agreement) was measured on synthetic inputs only; "
            "pass --calibrate DATASET to calibrate and measure it on real images"
        )


def _finetune(run: Run) -> None:
    job, splits = run.job, run.data
    # plain values: the checkpoint is read back with torch.load(weights_only=True)
    extra = {
        "identity": run.identity,
        "metrics": {name: metrics.to_dict() for name, metrics in run.metrics.items()},
        "curvatures": {name: list(metrics.curvature.per_example_curvature) for name, metrics in run.metrics.items()},
        "conversion": _produced(run.conversion, "the conversion report").to_dict(),
        "batchnorm_statistics": run.bn_statistics,
    }
    start = time.perf_counter()
    try:
        result = finetune(
            run.lcnn,
            splits.train,
            splits.test,
            job.training,
            checkpoint_path=run.out / CHECKPOINT_FILE,
            resume=run.resume_state,
            device=run.device,
            console=run.console,
            extra_state=extra,
            distributed=run.distributed,
            teacher=_teacher(run),
            statistics_data=splits.calibration_pool,
        )
    except RuntimeError as error:
        if run.distributed is None:
            raise
        # A rank that fails leaves the others' collectives broken; say what happened in one line.
        raise LcnnError(
            f"fine-tuning stopped: another rank failed or left the job ({first_line(error, 120)}); "
            "the last good checkpoint is kept"
        ) from error
    if not run.is_main:
        return
    run.timings["finetune"] = round(time.perf_counter() - start, 3)
    with run.step("measure the fine-tuned model", "measure_finetuned"):
        run.metrics["finetuned"] = _measure(run, run.lcnn, _curve_epsilons(run))
        held_out, _ = _produced(run.fidelity_inputs, "the held-out test images")
        fidelity = measure_fidelity(run.original, run.lcnn, held_out, f"{job.dataset} test")
    run.finetune = FinetuneOutcome(
        result,
        fidelity,
        distilled_from_original=_teacher(run) is not None and job.training.distill > 0,
        distributed=run.distributed,
    )


def _teacher(run: Run) -> nn.Module | None:
    """The original model, whose predictions are the fine-tuning's soft targets, when they mean
    something: not from random weights, never-trained BatchNorm statistics or a head just reset
    to the dataset's classes (an ImageNet model on CIFAR-10)."""
    job = run.job
    if run.head_reset or run.bn_statistics is not None or not (job.weights or job.pretrained):
        return None
    return run.original


def _export_and_verify(run: Run) -> None:
    job = run.job
    run.converted = run.lcnn.cpu().eval()
    shaped = torch.randn((2, *run.input_size), generator=torch.Generator().manual_seed(job.seed))
    with run.step("save weights", "save"):
        save(run.lcnn, run.out, run.spec, rules=default_rules(job.activation))
    with run.step(f"export ONNX (opset {job.opset})", "export"):
        export_onnx(run.lcnn, run.out / ONNX_FILE, shaped, opset=job.opset)
    opset = written_opset(run.out / ONNX_FILE)
    if opset != job.opset:
        run.warn(
            f"model.onnx has opset {opset}, not {job.opset}: this graph only exports through torch.export, "
            f"which writes opset {DYNAMO_MIN_OPSET} or newer"
        )
    with run.step("verify in onnxruntime", "verify"):
        real = run.fidelity_inputs[0][:PARITY_EXAMPLES] if run.fidelity_inputs is not None else None
        run.parity = verify_onnx(run.lcnn, run.out / ONNX_FILE, real, atol=job.atol, seed=job.seed + 1)


def _report(run: Run) -> RunReport:
    from .measure import MeasurementSettings

    job, out = run.job, run.out
    files = {"onnx": ONNX_FILE, "weights": WEIGHTS_FILE, "report": REPORT_FILE}
    if external_data_path(out / ONNX_FILE).is_file():
        files["onnx_data"] = external_data_path(ONNX_FILE).name
    from .plots import plot_curvature, plot_robustness, plot_training

    if run.metrics:
        per_example = {name: metrics.curvature.per_example_curvature for name, metrics in run.metrics.items()}
        plot_curvature(per_example, out / CURVATURE_PLOT)
        files["curvature_plot"] = CURVATURE_PLOT
        plot_robustness(
            {name: metrics.robustness for name, metrics in run.metrics.items()}, run.budgets, out / ROBUSTNESS_PLOT
        )
        files["robustness_plot"] = ROBUSTNESS_PLOT
    if run.finetune is not None:
        plot_training(run.finetune.result.step_log, run.finetune.result.history, out / TRAINING_PLOT)
        files["training_plot"] = TRAINING_PLOT
        files["checkpoint"] = CHECKPOINT_FILE
    conversion = _produced(run.conversion, "the conversion report")
    report = RunReport(
        model=job.model,
        source=run.spec.source,
        name=run.spec.name,
        num_classes=_classes(run.lcnn),
        input_size=list(run.input_size),
        pretrained=job.pretrained and job.weights is None,
        weights=str(job.weights) if job.weights else None,
        dataset=job.dataset,
        preprocessing=run.preprocessing,
        conversion=conversion,
        fidelity_gate=FidelityGate(
            job.min_agreement,
            gated=conversion.fidelity is not None and not conversion.fidelity.synthetic and not job.finetune,
        ),
        batchnorm_statistics=run.bn_statistics,
        parity=_produced(run.parity, "the parity check"),
        files=files,
        timings_s=run.timings,
        metrics=dict(run.metrics),
        measurement=MeasurementSettings(job.eval_examples, run.budgets) if run.metrics else None,
        finetune=run.finetune,
        warnings=run.warnings,
        checksums=checksums(out, files.values()),
        lcnn_convert_version=__version__,
    )
    write_report(out / REPORT_FILE, report)
    return report


def _classes(model: nn.Module) -> int | None:
    found = find_classifier(model)
    return classifier_classes(found[1]) if found else None


# what each identity key is called on the command line, for the refusal
_OPTION_NAMES = {
    "model": "MODEL",
    "weights": "--weights (contents)",
    "pretrained": "--pretrained",
    "dataset": "--finetune",
    "training.lambda_grad": "--grad-norm",
    "training.refresh_batchnorm": "--refresh-bn/--no-refresh-bn",
}


def _check_resumable(state: dict[str, Any], identity: dict[str, Any], checkpoint: Path) -> None:
    saved = state.get("identity")
    if not isinstance(saved, dict):
        raise LcnnError(f"cannot resume from {checkpoint}: it records no run settings (not written by this version)")
    different = [key for key in identity if saved.get(key, "(not recorded)") != identity[key]]
    if different:

        def option(key: str) -> str:
            return _OPTION_NAMES.get(key, "--" + key.removeprefix("training.").replace("_", "-"))

        detail = ", ".join(
            f"{option(key)} {saved.get(key, '(not recorded)')!r} then, {identity[key]!r} now" for key in different[:4]
        )
        raise LcnnError(
            f"cannot resume from {checkpoint}: it was made with other settings ({detail}); "
            "resume with the same settings, or start again with --overwrite"
        )
