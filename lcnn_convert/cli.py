"""The ``lcnn-convert`` command: a thin layer over lcnn_convert's Python API.

``lcnn-convert MODEL [OPTIONS]`` is short for ``lcnn-convert convert MODEL [OPTIONS]``; other
subcommands (``verify``) sit beside it. Every user error ends as one line on stderr and a
non-zero exit.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional, Protocol, cast

import typer
from rich.console import Console

from .defaults import (
    CALIBRATION_EXAMPLES,
    DEFAULT_ACTIVATION,
    DEFAULT_ATOL,
    DEFAULT_LOGIT_TOLERANCE,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_OPSET,
    DEFAULT_RANDOM_INPUTS,
    DEFAULT_RUNTIME,
    EVAL_EXAMPLES,
    LCNN_ACTIVATIONS,
    ONNX_RUNTIMES,
)
from .errors import Interrupted, InvalidSetting, LcnnError, Terminated, first_line
from .finetune_config import (
    AUTO_BATCH_SIZES,
    BETA_LR_FACTOR,
    LAMBDA_BETA_PER_SMOOTHNESS,
    MIN_STEPS_PER_EPOCH,
    FinetuneConfig,
)
from .io import out_of_space

app = typer.Typer(
    name="lcnn-convert",
    help=(
        "Convert a pretrained torchvision/timm CNN into a low-curvature network (LCNN), export it to "
        "ONNX and prove parity in onnxruntime.\n\n"
        "Main form: lcnn-convert MODEL [OPTIONS] (the same as lcnn-convert convert MODEL [OPTIONS]); "
        "options may come before MODEL too."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
COMMANDS = ("convert", "verify")
GROUP_OPTIONS = ("--help",)
# Typer vendors click in recent releases and uses the real one in older ones; its exceptions
# derive from whichever ClickException is in use.
DATASET_NAMES = "digits, cifar10, cifar100, svhn or folder:PATH"
CLICK_ERROR: type[Exception] = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")


class ClickError(Protocol):
    """What ``main`` reads of a CLICK_ERROR (click's ClickException, vendored or not)."""

    exit_code: int

    def format_message(self) -> str: ...


MAX_VERIFY_INPUTS = 10_000
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The help panels of the convert command's options.
PANEL_MODEL, PANEL_CONVERSION, PANEL_CALIBRATION = "Model", "Conversion", "Calibration"
PANEL_FINETUNING, PANEL_MEASURING, PANEL_OUTPUT = "Fine-tuning", "Measuring and parity", "Output"
# The fine-tuning options' defaults are FinetuneConfig's.
TRAINING = FinetuneConfig()


# centered-softplus, swish: the library's names, dashed as options are
# (members from the library's tables, which mypy cannot enumerate)
Activation = Enum("Activation", {name: name.replace("_", "-") for name in LCNN_ACTIVATIONS}, type=str)  # type: ignore[misc]
OnnxRuntime = Enum("OnnxRuntime", {name: name for name in ONNX_RUNTIMES}, type=str)  # type: ignore[misc]


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class Schedule(str, Enum):
    cosine = "cosine"
    onecycle = "onecycle"


# The options whose name is not "--" + the FinetuneConfig field's, dashed.
OPTION_OF_SETTING = {"lambda_grad": "--grad-norm", "refresh_batchnorm": "--refresh-bn"}


def option_of(setting: str) -> str:
    """The CLI option that sets a config field."""
    return OPTION_OF_SETTING.get(setting, "--" + setting.replace("_", "-"))


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C or SIGTERM before a run has claimed its output dir (typer would swallow it silently)."""
    try:
        yield
    except KeyboardInterrupt as stopped:
        raise Interrupted.from_signal(
            stopped, f"{Interrupted.signal_name(stopped)} before anything was written"
        ) from None


@contextlib.contextmanager
def _imports_held() -> Iterator[None]:
    """Import the stages (torch, onnx, ...) with Ctrl-C and SIGTERM held until they are done.

    A KeyboardInterrupt raised while a native extension runs Python code during its import
    aborts the process ("terminate called after throwing an instance of
    'pybind11::error_already_set'", exit -6) instead of unwinding; held, it ends in one line.
    """
    received: list[int] = []
    try:
        previous = {number: signal.signal(number, lambda n, _: received.append(n)) for number in HELD_SIGNALS}
    except ValueError:  # not the main thread: signals are not ours to hold
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        stopped = Terminated() if received[0] == signal.SIGTERM else KeyboardInterrupt()
        if isinstance(stopped, Terminated):
            _signals_received.append(signal.SIGTERM)
        raise Interrupted.from_signal(stopped, f"{Interrupted.signal_name(stopped)} before anything was written")


@app.command("convert", short_help="Convert MODEL to an LCNN, export ONNX, check parity (the default).")
def convert_command(
    model: Annotated[str, typer.Argument(help="Model name: resnet18, torchvision:resnet18 or timm:efficientnet_b0.")],
    weights: Annotated[
        Optional[Path],
        typer.Option(
            rich_help_panel=PANEL_MODEL,
            help="Local state dict (.pth/.pt read with weights_only=True, or .safetensors).",
        ),
    ] = None,
    pretrained: Annotated[
        bool,
        typer.Option(
            "--pretrained/--no-pretrained",
            rich_help_panel=PANEL_MODEL,
            help="Download the library's pretrained weights.",
        ),
    ] = True,
    num_classes: Annotated[
        Optional[int],
        typer.Option(rich_help_panel=PANEL_MODEL, help="Classes of the head; read from --weights when not given."),
    ] = None,
    image_size: Annotated[
        Optional[int],
        typer.Option(rich_help_panel=PANEL_MODEL, help="Square input size; default: the model's own data config."),
    ] = None,
    mean: Annotated[
        Optional[tuple[float, float, float]],
        typer.Option(
            rich_help_panel=PANEL_MODEL,
            metavar="R G B",
            help="Normalisation mean the model was trained with (default: its data config).",
        ),
    ] = None,
    std: Annotated[
        Optional[tuple[float, float, float]],
        typer.Option(
            rich_help_panel=PANEL_MODEL,
            metavar="R G B",
            help="Normalisation std the model was trained with (default: its data config).",
        ),
    ] = None,
    interpolation: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel=PANEL_MODEL,
            help="Resize interpolation: bilinear, bicubic, nearest, … (default: data config).",
        ),
    ] = None,
    beta: Annotated[
        str,
        typer.Option(
            rich_help_panel=PANEL_CONVERSION,
            help="'auto' (calibrate per ReLU-like site) or a fixed sharpness β > 0 for them.",
        ),
    ] = "auto",
    activation: Annotated[
        Activation,
        typer.Option(
            rich_help_panel=PANEL_CONVERSION,
            help="Smooth ReLU for ReLU-like activations: centered-softplus (the paper's) or swish "
            "(x·sigmoid(βx), about ReLU's ONNX speed). SiLU, GELU, … are converted exactly either way.",
        ),
    ] = Activation[DEFAULT_ACTIVATION],
    device: Annotated[
        Device,
        typer.Option(
            rich_help_panel=PANEL_CONVERSION,
            help="Where to convert, fine-tune and measure (auto: cuda when there is one).",
        ),
    ] = Device.auto,
    calibrate: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel=PANEL_CALIBRATION,
            help=f"Calibrate beta on {DATASET_NAMES}'s train split and measure fidelity on its test split "
            "(default without a dataset: inputs synthesised from the model's BatchNorm statistics).",
        ),
    ] = None,
    calibration_examples: Annotated[
        int, typer.Option(rich_help_panel=PANEL_CALIBRATION, help="Train images beta is calibrated on.")
    ] = CALIBRATION_EXAMPLES,
    min_agreement: Annotated[
        float,
        typer.Option(
            rich_help_panel=PANEL_CALIBRATION,
            help="Fidelity gate: least top-1 agreement with the original on real held-out images.",
        ),
    ] = DEFAULT_MIN_AGREEMENT,
    logit_tolerance: Annotated[
        float,
        typer.Option(
            rich_help_panel=PANEL_CALIBRATION,
            help="Calibration target: mean relative logit error allowed against the original.",
        ),
    ] = DEFAULT_LOGIT_TOLERANCE,
    data_dir: Annotated[
        Optional[Path],
        typer.Option(
            rich_help_panel=PANEL_CALIBRATION, help="Where datasets are (or are downloaded to); default a cache folder."
        ),
    ] = None,
    finetune: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel=PANEL_FINETUNING, help=f"Fine-tune on {DATASET_NAMES}, with the LCNN regularisers."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            rich_help_panel=PANEL_FINETUNING, help="Continue an interrupted --finetune run from its checkpoint."
        ),
    ] = False,
    epochs: Annotated[
        int, typer.Option(rich_help_panel=PANEL_FINETUNING, help="Fine-tuning epochs.")
    ] = TRAINING.epochs,
    max_steps: Annotated[
        Optional[int], typer.Option(rich_help_panel=PANEL_FINETUNING, help="Stop fine-tuning after this many steps.")
    ] = None,
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            rich_help_panel=PANEL_FINETUNING,
            help="Fine-tuning batch size (default: the largest of "
            f"{'/'.join(map(str, AUTO_BATCH_SIZES))} giving {MIN_STEPS_PER_EPOCH} steps an epoch).",
        ),
    ] = None,
    lr: Annotated[float, typer.Option(rich_help_panel=PANEL_FINETUNING, help="Peak learning rate.")] = TRAINING.lr,
    beta_lr: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel=PANEL_FINETUNING,
            help=f"Peak learning rate of log beta (default: {BETA_LR_FACTOR:g} x --lr).",
        ),
    ] = None,
    optimizer: Annotated[
        Optimizer, typer.Option(rich_help_panel=PANEL_FINETUNING, help="sgd: momentum 0.9, Nesterov.")
    ] = Optimizer(TRAINING.optimizer),
    schedule: Annotated[
        Schedule, typer.Option(rich_help_panel=PANEL_FINETUNING, help="The learning rate's schedule over the run.")
    ] = Schedule(TRAINING.schedule),
    weight_decay: Annotated[
        float,
        typer.Option(rich_help_panel=PANEL_FINETUNING, help="Weight decay (never on beta, gamma, scales, biases)."),
    ] = TRAINING.weight_decay,
    smoothness: Annotated[
        float,
        typer.Option(
            rich_help_panel=PANEL_FINETUNING,
            help="The accuracy/curvature trade-off: weight of the beta penalty (each beta times its family's "
            f"peak curvature per beta, the centered softplus's = 1) in the loss, in units of {LAMBDA_BETA_PER_SMOOTHNESS:g} "
            "(0: no beta penalty; lower keeps more accuracy, higher lowers curvature more).",
        ),
    ] = TRAINING.smoothness,
    lambda_gamma: Annotated[
        float, typer.Option(rich_help_panel=PANEL_FINETUNING, help="Weight of sum(|log gamma|) in the loss.")
    ] = TRAINING.lambda_gamma,
    grad_norm: Annotated[
        float,
        typer.Option(
            rich_help_panel=PANEL_FINETUNING,
            help="Weight of the input-gradient-norm penalty (double backprop; 0 = off).",
        ),
    ] = TRAINING.lambda_grad,
    grad_norm_share: Annotated[
        float,
        typer.Option(
            rich_help_panel=PANEL_FINETUNING,
            help="Share of each batch the gradient-norm penalty is computed on, in a second pass that "
            "normalises with the running BatchNorm statistics (1 = the whole batch, in the training pass; each "
            "image it covers costs about two training steps).",
        ),
    ] = TRAINING.grad_norm_share,
    distill: Annotated[
        float,
        typer.Option(
            rich_help_panel=PANEL_FINETUNING,
            help="Share of the loss that is KL to the original model's predictions (0 = labels only).",
        ),
    ] = TRAINING.distill,
    refresh_bn: Annotated[
        bool,
        typer.Option(
            "--refresh-bn/--no-refresh-bn",
            rich_help_panel=PANEL_FINETUNING,
            help="Re-estimate BatchNorm statistics for the final betas after the last epoch.",
        ),
    ] = TRAINING.refresh_batchnorm,
    atol: Annotated[
        float, typer.Option(rich_help_panel=PANEL_MEASURING, help="Parity gate on the logits' max abs difference.")
    ] = DEFAULT_ATOL,
    seed: Annotated[
        int, typer.Option(rich_help_panel=PANEL_MEASURING, help="Seed of the calibration and verification inputs.")
    ] = TRAINING.seed,
    evaluate: Annotated[
        Optional[str],
        typer.Option(
            "--eval",
            rich_help_panel=PANEL_MEASURING,
            help="Measure original and converted model on DATASET, no training.",
        ),
    ] = None,
    eval_examples: Annotated[
        int, typer.Option(rich_help_panel=PANEL_MEASURING, help="Test examples for curvature and PGD.")
    ] = EVAL_EXAMPLES,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", rich_help_panel=PANEL_OUTPUT, help="Output dir (default ./lcnn-out/MODEL)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(rich_help_panel=PANEL_OUTPUT, help="Replace a non-empty output dir.")
    ] = False,
    opset: Annotated[
        int, typer.Option(rich_help_panel=PANEL_OUTPUT, help=f"ONNX opset (>= {DEFAULT_OPSET}).")
    ] = DEFAULT_OPSET,
    json_output: Annotated[
        bool, typer.Option("--json", rich_help_panel=PANEL_OUTPUT, help="Print report.json instead of tables.")
    ] = False,
) -> None:
    """Convert MODEL, write model.onnx, model.safetensors and report.json, and check ONNX parity."""
    with _imports_held():
        from .pipeline import ConversionJob, parse_beta, run_conversion
        from .report import print_report

    training = FinetuneConfig(
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        beta_lr=beta_lr,
        optimizer=optimizer.value,
        schedule=schedule.value,
        weight_decay=weight_decay,
        smoothness=smoothness,
        lambda_gamma=lambda_gamma,
        lambda_grad=grad_norm,
        grad_norm_share=grad_norm_share,
        distill=distill,
        refresh_batchnorm=refresh_bn,
    )
    job = ConversionJob(
        model=model,
        weights=weights,
        pretrained=pretrained,
        num_classes=num_classes,
        beta=parse_beta(beta),
        activation=activation.value.replace("-", "_"),
        image_size=image_size,
        output=output,
        overwrite=overwrite,
        opset=opset,
        device=device.value,
        atol=atol,
        seed=seed,
        finetune=finetune,
        evaluate=evaluate,
        calibrate=calibrate,
        calibration_examples=calibration_examples,
        min_agreement=min_agreement,
        logit_tolerance=logit_tolerance,
        mean=mean,
        std=std,
        interpolation=interpolation,
        data_dir=data_dir,
        resume=resume,
        eval_examples=eval_examples,
        training=training,
    )
    with _interruptible():
        report = run_conversion(job)
    if report is None:  # another rank than 0 under torchrun: rank 0 writes and prints everything
        return
    if json_output:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, Console())
        Console(stderr=True).print(f"wrote {report.output_dir}")
    failures = report.failures()
    if failures:
        raise LcnnError("; ".join(failures))


@app.command("verify", short_help="Re-check an output dir's ONNX against its weights.")
def verify_command(
    directory: Annotated[
        Path, typer.Argument(help="An output dir written by lcnn-convert.", exists=True, file_okay=False)
    ],
    atol: Annotated[float, typer.Option(help="Parity gate on the logits' max abs difference.")] = DEFAULT_ATOL,
    num_inputs: Annotated[
        int, typer.Option(help="Random inputs to compare on.", min=1, max=MAX_VERIFY_INPUTS)
    ] = DEFAULT_RANDOM_INPUTS,
    runtime: Annotated[
        OnnxRuntime,
        typer.Option(help='The ONNX runtime that runs model.onnx; openvino: pip install "lcnn-convert\\[openvino]".'),
    ] = OnnxRuntime(DEFAULT_RUNTIME),
) -> None:
    """Re-check an output dir: its files against report.json's checksums, then model.onnx against
    the model rebuilt from model.safetensors, in onnxruntime or OpenVINO with the same gates."""
    if not atol > 0:
        raise LcnnError(f"--atol must be > 0, got {atol}")
    with _imports_held():
        from .artifacts import ONNX_FILE, check_files, load
        from .verify import runtime as onnx_runtime
        from .verify import verify_onnx
    with _interruptible():
        onnx_runtime(runtime.value)  # a missing runtime says what to install before anything is read
        check_files(directory)
        model = load(directory)
        onnx_path = directory / ONNX_FILE
        result = verify_onnx(model, onnx_path, num_random=num_inputs, atol=atol, runtime_name=runtime.value)
    print(result)
    if not result.passed:
        raise LcnnError(result.failure())


def _rank_prefix() -> str:
    """'rank N: ' under torchrun with several processes, where every rank reports for itself."""
    import os

    return f"rank {os.environ.get('RANK', '?')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


_signals_received: list[int] = []


def _terminate(signal_number: int, frame: object) -> None:
    _signals_received.append(signal_number)
    raise Terminated()


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.OutOfMemoryError))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    # The main form: anything but a command name or the group's own --help is the convert
    # command's, so its options may come before MODEL as well as after it.
    if args[0] not in COMMANDS and args[0] not in GROUP_OPTIONS:
        args.insert(0, "convert")
    # SIGTERM (docker stop, a batch scheduler, torchrun) unwinds like Ctrl-C: partial outputs are
    # removed, checkpoints kept, and one line says so.
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        previous = None
    try:
        command = typer.main.get_command(app)
        result = command.main(args=args, prog_name="lcnn-convert", standalone_mode=False)
        if result == 130:
            # typer turns a KeyboardInterrupt outside our commands' bodies (while parsing) into exit code 130
            terminated = signal.SIGTERM in _signals_received
            print(
                f"{'terminated (SIGTERM)' if terminated else 'interrupted (Ctrl-C)'} before anything was written",
                file=sys.stderr,
            )
            return 143 if terminated else 130
    except Interrupted as error:
        print(f"{_rank_prefix()}{error}", file=sys.stderr)
        return error.exit_code
    except LcnnError as error:
        text = error.named(option_of(error.setting)) if isinstance(error, InvalidSetting) else str(error)
        print(f"error: {_rank_prefix()}{text}", file=sys.stderr)
        return 1
    except CLICK_ERROR as caught:
        click_error = cast(ClickError, caught)
        print(f"error: {click_error.format_message()} (see lcnn-convert --help)", file=sys.stderr)
        return click_error.exit_code or 2
    except (typer.Abort, KeyboardInterrupt) as stopped:
        name = Interrupted.signal_name(stopped) if isinstance(stopped, KeyboardInterrupt) else "interrupted"
        print(f"{name} before anything was written", file=sys.stderr)
        return 143 if isinstance(stopped, Terminated) else 130
    except Exception as error:
        # Resource exhaustion can strike anywhere; the run's own cleanup has already run.
        if _is_out_of_memory(error):
            print(
                f"error: {_rank_prefix()}out of memory ({first_line(error, 160)}); try a smaller --image-size, "
                "--batch-size or --eval-examples",
                file=sys.stderr,
            )
            return 1
        full = out_of_space(error)
        if full is not None:
            print(f"error: {_rank_prefix()}{full}", file=sys.stderr)
            return 1
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
