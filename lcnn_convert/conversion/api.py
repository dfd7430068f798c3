"""Stage 2, convert: any traceable classifier -> an LCNN with the same function."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..bn_statistics import has_untrained_batchnorm
from ..errors import LcnnError, first_line
from ..layers import SmoothActivation
from ..layers.centered_softplus import BETA_MAX, BETA_MIN
from ..models import data_config
from .bound import curvature_bound
from ..defaults import DEFAULT_MIN_AGREEMENT
from ..fidelity import Fidelity, compare_logits, first_tensor, logits_of
from .calibrate import DEFAULT_LOGIT_TOLERANCE, calibrate_beta
from .graph_pass import (
    apply_rules,
    capture_input_shapes,
    list_unconverted,
    normalize_linear_layers,
    propagate_shapes,
)
from .module_swap import find_functional_calls, swap_inside_leaves, swap_modules
from .report import BetaChoice, ConversionReport
from .activations import DEFAULT_ACTIVATION, LCNN_ACTIVATIONS
from .rules import ReplacementRule, default_rules
from .synthetic import SYNTHESIS_STEPS, SYNTHETIC_EXAMPLES, can_synthesize, synthesize_inputs
from .tracing import LcnnGraphModule, trace

logger = logging.getLogger(__name__)

# With no data and no trained BatchNorm statistics to synthesise inputs from, every site gets
# beta = 100: on a digits ResNet-18 it kept 100% top-1 agreement with the ReLU original
# (../shared/LCNN_NOTES.md); fine-tuning lowers it.
DEFAULT_BETA = 100.0
MIN_AGREEMENT = DEFAULT_MIN_AGREEMENT
# Of the user's example inputs, this share is held out of calibration to measure fidelity on.
HELD_OUT_SHARE = 0.25
MIN_HELD_OUT = 4
UNTRAINED_STATISTICS_NOTE = (
    "BatchNorm running statistics are untrained (mean 0, variance 1), so each Lipschitz BN's gamma "
    "starts from meaningless gains and fine-tuning will collapse; estimate them first with "
    "lcnn_convert.recalibrate_batchnorm(model, train_data)"
)
NO_DATA_NOTE = (
    f"no example inputs and no trained BatchNorm statistics to synthesise any: every activation at beta = "
    f"{DEFAULT_BETA:g}, fidelity not measured; pass example_inputs (real images) to calibrate and measure it"
)
USER_DATA = "user calibration data"


@dataclass(frozen=True)
class ConvertOptions:
    beta: float | str = "auto"
    replace_activations: bool = True
    rules: tuple[ReplacementRule, ...] = default_rules()
    estimate_norms: bool = True
    logit_tolerance: float = DEFAULT_LOGIT_TOLERANCE
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    input_size: tuple[int, ...] | None = None  # (C, H, W) without data; default: the model's data config
    seed: int = 0


@dataclass(frozen=True)
class CalibrationData:
    """Inputs to calibrate beta on, inputs to measure fidelity on, and where both came from."""

    calibration: tuple[torch.Tensor, ...]
    held_out: tuple[torch.Tensor, ...] | None
    source: str
    synthetic: bool = False
    held_out_source: str | None = None  # e.g. "digits test"; default: the held-out part of ``source``

    def fidelity_source(self, calibrated: bool) -> str:
        if self.held_out is None:
            return f"{self.source} (calibration set itself)" if calibrated else self.source
        return self.held_out_source or f"{self.source} (held-out part)"


def split_examples(example: tuple[torch.Tensor, ...], source: str, synthetic: bool = False) -> CalibrationData:
    """Hold the last HELD_OUT_SHARE of the examples out of calibration (none below 2 * MIN_HELD_OUT)."""
    count = len(example[0])
    held = int(count * HELD_OUT_SHARE) if count >= 2 * MIN_HELD_OUT else 0
    if held == 0:
        return CalibrationData(example, None, source, synthetic)
    return CalibrationData(
        tuple(t[: count - held] for t in example), tuple(t[count - held :] for t in example), source, synthetic
    )


def _as_tuple(
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None, name: str = "example_inputs"
) -> tuple[torch.Tensor, ...] | None:
    """The model's positional inputs: a tensor, or a tuple/list of tensors with the same batch size."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        inputs: tuple = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        inputs = tuple(example_inputs)
    else:
        hint = "; convert it with torch.from_numpy" if type(example_inputs).__module__.startswith("numpy") else ""
        raise TypeError(
            f"{name} must be a torch.Tensor (or a tuple of them, one per model input), got "
            f"{type(example_inputs).__module__}.{type(example_inputs).__name__}{hint}"
        )
    if not inputs or not all(isinstance(item, torch.Tensor) for item in inputs):
        kinds = ", ".join(type(item).__name__ for item in inputs) or "nothing"
        raise TypeError(f"{name} must hold torch.Tensors, got {kinds}")
    sizes = {int(item.shape[0]) if item.ndim else -1 for item in inputs}
    if -1 in sizes:
        raise ValueError(f"{name} must have a batch dimension; got a 0-d tensor")
    if sizes == {0}:
        raise ValueError(f"{name} is an empty batch (0 examples)")
    if len(sizes) > 1:
        raise ValueError(f"{name} tensors have different batch sizes {sorted(sizes)}")
    return inputs


def _default_example(model: nn.Module, input_size: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
    """Two random inputs: only their shape matters, for the operator norms."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    size = input_size or data_config(model).input_size
    return (torch.randn((2, *size), generator=generator).to(device),)


def _check_beta(beta: float | str) -> None:
    expected = f"'auto' or a number in [{BETA_MIN:g}, {BETA_MAX:g}]"
    if isinstance(beta, str):
        if beta != "auto":
            raise LcnnError(f"beta must be {expected}, got '{beta}'")
    elif isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be {expected}, got {type(beta).__name__}")
    elif not BETA_MIN <= beta <= BETA_MAX:
        raise LcnnError(f"beta must be {expected}, got {beta}")


def convert(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    beta: float | str = "auto",
    replace_activations: bool = True,
    rules: Sequence[ReplacementRule] | None = None,
    logit_tolerance: float = DEFAULT_LOGIT_TOLERANCE,
    held_out_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    input_size: Sequence[int] | None = None,
    activation: str = DEFAULT_ACTIVATION,
) -> nn.Module:
    """Return an LCNN version of ``model``; the original is left unchanged.

    Every activation call gets a curvature-controlled version with one learnable beta per call
    site (``lcnn_convert.conversion.activations`` lists the families): smooth ones (SiLU, GELU,
    Mish, ELU, sigmoid, ...) become g(beta x) / beta, exact at beta = 1; ReLU and its piecewise-linear
    kin (ReLU6, leaky ReLU, hardswish, hard sigmoid, hardtanh) get their kinks rounded by
    ``activation``'s smooth ReLU, the centered softplus (the paper's) or "swish" (x sigmoid(beta x),
    which onnxruntime runs at about ReLU's speed). BatchNorms become Lipschitz BatchNorms, and every
    conv/linear is divided by its operator norm at its real input size with the scale pushed into
    the following BN (or kept as an explicit scalar).

    ``beta="auto"`` calibrates beta per site: the smoothest shared sharpness whose mean relative
    logit error stays within ``logit_tolerance`` (2%) of the original with >= 99% top-1 agreement.
    Only the piecewise-linear sites are calibrated: the smooth families are exact as converted.
    It calibrates on ``example_inputs`` (real images; a quarter of them is held out to measure
    fidelity on, unless ``held_out_inputs`` are given), or without them on inputs synthesised from
    the model's BatchNorm statistics (at ``input_size`` (C, H, W), default the model's data config;
    ~50 forward/backward passes of 32 images); a model with neither gets DEFAULT_BETA (100). A
    number fixes beta at every piecewise-linear site. ``rules`` replaces the default replacement
    table (see ``lcnn_convert.DEFAULT_RULES``; ``activation`` then has no effect). The result carries a ``conversion_report`` attribute whose
    ``fidelity`` compares it with the original on inputs calibration did not use.
    """
    if not isinstance(model, nn.Module):
        hint = f"; load one by name with lcnn_convert.load_model({model!r})" if isinstance(model, str) else ""
        raise TypeError(f"convert() takes an nn.Module, got {type(model).__name__}{hint}")
    _check_beta(beta)
    if activation not in LCNN_ACTIVATIONS:
        raise LcnnError(f"activation must be one of {', '.join(LCNN_ACTIVATIONS)}, got '{activation}'")
    if not 0 < logit_tolerance < 1:
        raise LcnnError(f"logit_tolerance must lie in (0, 1), got {logit_tolerance}")
    options = ConvertOptions(
        beta,
        replace_activations,
        tuple(default_rules(activation) if rules is None else rules),
        logit_tolerance=logit_tolerance,
        input_size=None if input_size is None else tuple(int(size) for size in input_size),
    )
    example = _as_tuple(example_inputs)
    held_out = _as_tuple(held_out_inputs, "held_out_inputs")
    data = None
    if example is None and held_out is not None:
        raise LcnnError("held_out_inputs are compared after calibrating on example_inputs; pass those too")
    if example is not None and held_out is not None:
        data = CalibrationData(example, held_out, USER_DATA)
    elif example is not None and beta == "auto":
        data = split_examples(example, USER_DATA)
    elif example is not None:
        data = CalibrationData(example, None, "user example inputs")
    return convert_with_options(model, data, options)


def synthetic_calibration_data(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> CalibrationData:
    """SYNTHETIC_EXAMPLES inputs synthesised from ``model``'s BatchNorm statistics, a quarter held out."""
    size = input_size or data_config(model).input_size
    inputs = synthesize_inputs(model, size, SYNTHETIC_EXAMPLES, SYNTHESIS_STEPS, seed=seed, progress=progress)
    return split_examples((inputs,), "synthetic from BatchNorm statistics", synthetic=True)


def convert_with_options(model: nn.Module, data: CalibrationData | None, options: ConvertOptions) -> nn.Module:
    """``convert`` with its inputs already sorted: ``data`` calibrates beta (when options.beta is
    "auto") and measures fidelity. Without data, a model whose BatchNorms hold trained statistics
    is calibrated on inputs synthesised from them."""
    was_training = model.training
    untrained_statistics = has_untrained_batchnorm(model)
    converted_from = copy.deepcopy(model).eval()
    auto = options.beta == "auto" and options.estimate_norms
    if data is None and auto and can_synthesize(converted_from):
        data = synthetic_calibration_data(converted_from, options.input_size, options.seed)
    calibrate = auto and data is not None
    example: tuple[torch.Tensor, ...] | None
    if data is not None:
        example = data.calibration
    else:
        example = _default_example(converted_from, options.input_size) if options.estimate_norms else None
    initial_beta = DEFAULT_BETA if isinstance(options.beta, str) else float(options.beta)

    reference = None
    if calibrate:
        assert example is not None  # data's calibration inputs
        with torch.no_grad():
            reference = first_tensor(converted_from(*example))
        if reference.ndim != 2:
            raise ValueError(
                f"the model returns {list(reference.shape)}, not [batch, classes] logits: beta='auto' calibrates "
                "against classifier logits; pass a number as beta"
            )

    traced: LcnnGraphModule | None  # None: module swap (report.method "module-swap")
    try:
        traced = trace(converted_from)
        report = ConversionReport("fx")
    except Exception as error:  # tracing fails in many ways (TraceError, TypeError, ...)
        reason = f"{type(error).__name__}: {first_line(error)}"
        logger.info("fx tracing failed (%s); falling back to module swap", reason)
        traced = None
        report = ConversionReport("module-swap", fallback_reason=reason[:300])
    converted: nn.Module = converted_from if traced is None else traced

    shapes: dict[str, list[tuple[int, ...]]] = {}
    if options.estimate_norms:
        assert example is not None  # data's, or a default one
        shapes = capture_input_shapes(converted, example)
    if traced is not None:
        activations, batchnorms = apply_rules(traced, options.rules, initial_beta, options.replace_activations)
        inside_activations, inside_batchnorms = swap_inside_leaves(
            traced, options.rules, initial_beta, options.replace_activations
        )
        activations, batchnorms = activations + inside_activations, batchnorms + inside_batchnorms
        report.skipped = list_unconverted(traced, options.replace_activations)
        normalized, skipped = normalize_linear_layers(traced, shapes, traced.graph, options.estimate_norms)
    else:
        activations, batchnorms = swap_modules(converted, options.rules, initial_beta, options.replace_activations)
        normalized, skipped = normalize_linear_layers(converted, shapes, None, options.estimate_norms)
        converted.eval()
        if options.estimate_norms:
            assert example is not None  # data's, or a default one
            report.skipped = find_functional_calls(converted, example, f"fx tracing failed ({report.fallback_reason})")
    if untrained_statistics and options.estimate_norms:
        report.notes.append(UNTRAINED_STATISTICS_NOTE)
    report.activations_replaced, report.batchnorms_replaced = activations, batchnorms
    report.layers_normalized = normalized
    report.skipped += skipped
    converted.eval()  # new layers are created in train mode; calibration and the bound need eval

    sites = [m for m in converted.modules() if isinstance(m, SmoothActivation) and m.calibrated]
    if calibrate and sites:
        assert data is not None and example is not None and reference is not None  # set above when calibrating
        result = calibrate_beta(
            converted,
            sites,
            example,
            reference,
            min_agreement=None if data.synthetic else options.min_agreement,
            logit_tolerance=options.logit_tolerance,
        )
        report.beta = BetaChoice(
            "auto",
            calibration_data=data.source,
            sharpness=result.sharpness,
            top1_agreement=result.top1_agreement,
            mean_relative_logit_error=result.mean_relative_logit_error,
            logit_tolerance=result.logit_tolerance,
            calibration_examples=len(example[0]),
        )
    elif options.beta == "auto":
        report.beta = BetaChoice("auto-default", value=initial_beta)
        if options.estimate_norms and data is None:
            report.notes.append(NO_DATA_NOTE)
    else:
        report.beta = BetaChoice("fixed", value=initial_beta)
    smooth_activations = [m for m in converted.modules() if isinstance(m, SmoothActivation)]
    report.activation_kinds = dict(Counter(m.label for m in smooth_activations).most_common())
    betas = [m.frozen_beta() for m in smooth_activations]
    if betas:
        report.beta.mean, report.beta.min, report.beta.max = sum(betas) / len(betas), min(betas), max(betas)
    if data is not None and options.estimate_norms:
        report.fidelity = _fidelity(converted_from, converted, data, calibrate, reference)

    if traced is not None:
        if example is not None:
            try:
                propagate_shapes(traced, example)  # the converted graph's sizes, for the pools' constants
            except Exception:  # noqa: BLE001 - without sizes the bound uses size-free constants
                pass
        (lipschitz, curvature), unbounded_by = curvature_bound(traced)
        report.lipschitz_bound = None if lipschitz == float("inf") else lipschitz
        report.curvature_bound = None if curvature == float("inf") else curvature
        if unbounded_by:
            report.bound_notes.append(f"unbounded: no global constants for {', '.join(unbounded_by)}")
    else:
        report.bound_notes.append("not computed: module swap keeps no graph of how layers connect")

    converted.train(was_training)
    converted.conversion_report = report  # type: ignore[assignment]  # Module.__setattr__ takes any value; torch's stub says Tensor | Module
    return converted


def _fidelity(
    original: nn.Module, converted: nn.Module, data: CalibrationData, calibrated: bool, reference: torch.Tensor | None
) -> Fidelity:
    """The converted model against the original on the held-out inputs (or, without any, the calibration ones,
    whose ``reference`` logits are known already)."""
    inputs = data.held_out if data.held_out is not None else data.calibration
    source = data.fidelity_source(calibrated)
    reference = reference if data.held_out is None else None
    if len(inputs) != 1:  # several model inputs: logits_of batches a single tensor
        with torch.no_grad():
            logits, expected = first_tensor(converted(*inputs)), first_tensor(original(*inputs))
        return compare_logits(logits, expected, source, data.synthetic)
    expected = reference if reference is not None else logits_of(original, inputs[0])
    return compare_logits(logits_of(converted, inputs[0]), expected, source, data.synthetic)


def conversion_report(converted: nn.Module) -> ConversionReport:
    """What ``convert`` did to ``converted`` (the report it attaches to the model it returns)."""
    report = getattr(converted, "conversion_report", None)
    if not isinstance(report, ConversionReport):
        raise LcnnError(f"{type(converted).__name__} was not made by lcnn_convert.convert: it has no conversion report")
    return report
