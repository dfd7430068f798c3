"""Stage 2, convert: any traceable classifier -> an LCNN with the same function."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..bn_statistics import has_untrained_batchnorm
from ..errors import LcnnError, first_line
from ..layers import CenteredSoftplus
from ..models import data_config
from .bound import curvature_bound
from .calibrate import calibrate_beta, first_tensor
from .graph_pass import apply_rules, capture_input_shapes, list_unconverted, normalize_linear_layers
from .module_swap import find_functional_calls, swap_modules
from .report import ConversionReport
from .rules import DEFAULT_RULES, ReplacementRule
from .tracing import trace

logger = logging.getLogger(__name__)

# With no data to calibrate on, beta = 100 is the documented default: on a ResNet-18 it kept 100%
# top-1 agreement with the ReLU original (../shared/LCNN_NOTES.md); fine-tuning lowers it.
DEFAULT_BETA = 100.0
MIN_AGREEMENT = 0.99
UNTRAINED_STATISTICS_NOTE = (
    "BatchNorm running statistics are untrained (mean 0, variance 1), so each Lipschitz BN's gamma "
    "starts from meaningless gains and fine-tuning will collapse; estimate them first with "
    "lcnn_convert.recalibrate_batchnorm(model, train_data)"
)


@dataclass(frozen=True)
class ConvertOptions:
    beta: float | str = "auto"
    replace_activations: bool = True
    rules: tuple[ReplacementRule, ...] = DEFAULT_RULES
    estimate_norms: bool = True


def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _default_example(model: nn.Module) -> tuple[torch.Tensor, ...]:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return (torch.randn((2, *data_config(model)["input_size"]), generator=generator).to(device),)


def _check_beta(beta: float | str) -> None:
    if isinstance(beta, str):
        if beta != "auto":
            raise LcnnError(f"beta must be 'auto' or a positive number, got '{beta}'")
    elif not beta > 0:
        raise LcnnError(f"beta must be 'auto' or a positive number, got {beta}")


def convert(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    beta: float | str = "auto",
    replace_activations: bool = True,
    rules: Sequence[ReplacementRule] | None = None,
) -> nn.Module:
    """Return an LCNN version of ``model``; the original is left unchanged.

    ReLU/softplus calls become centered softplus (one learnable beta per call site), BatchNorms
    become Lipschitz BatchNorms, and every conv/linear is divided by its operator norm at its real
    input size with the scale pushed into the following BN (or kept as an explicit scalar).

    ``beta="auto"`` calibrates beta per site on ``example_inputs`` (smallest sharpness keeping
    >= 99% top-1 agreement with the original); without example inputs, or with a number, every
    site gets that beta (DEFAULT_BETA = 100 for "auto" without inputs). ``rules`` replaces the
    default replacement table (see ``lcnn_convert.DEFAULT_RULES``). The result carries a
    ``conversion_report`` attribute.
    """
    _check_beta(beta)
    options = ConvertOptions(beta, replace_activations, tuple(DEFAULT_RULES if rules is None else rules))
    return convert_with_options(model, _as_tuple(example_inputs), options)


def convert_with_options(
    model: nn.Module, example: tuple[torch.Tensor, ...] | None, options: ConvertOptions
) -> nn.Module:
    was_training = model.training
    untrained_statistics = has_untrained_batchnorm(model)
    converted_from = copy.deepcopy(model).eval()
    calibrate = options.beta == "auto" and example is not None and options.estimate_norms
    if example is None:
        example = _default_example(converted_from) if options.estimate_norms else None
    initial_beta = DEFAULT_BETA if isinstance(options.beta, str) else float(options.beta)

    reference = None
    if calibrate:
        with torch.no_grad():
            reference = first_tensor(converted_from(*example))

    try:
        converted = trace(converted_from)
        report = ConversionReport("fx")
    except Exception as error:  # tracing fails in many ways (TraceError, TypeError, ...)
        reason = f"{type(error).__name__}: {first_line(error)}"
        logger.info("fx tracing failed (%s); falling back to module swap", reason)
        converted = converted_from
        report = ConversionReport("module-swap", fallback_reason=reason[:300])

    shapes = capture_input_shapes(converted, example) if options.estimate_norms else {}
    if report.method == "fx":
        activations, batchnorms = apply_rules(converted, options.rules, initial_beta, options.replace_activations)
        report.skipped = list_unconverted(converted, options.replace_activations)
        normalized, skipped = normalize_linear_layers(converted, shapes, converted.graph, options.estimate_norms)
    else:
        activations, batchnorms = swap_modules(converted, options.rules, initial_beta, options.replace_activations)
        normalized, skipped = normalize_linear_layers(converted, shapes, None, options.estimate_norms)
        converted.eval()
        if options.estimate_norms:
            report.skipped = find_functional_calls(converted, example, f"fx tracing failed ({report.fallback_reason})")
    if untrained_statistics and options.estimate_norms:
        report.notes.append(UNTRAINED_STATISTICS_NOTE)
    report.activations_replaced, report.batchnorms_replaced = activations, batchnorms
    report.layers_normalized = normalized
    report.skipped += skipped
    converted.eval()  # new layers are created in train mode; calibration and the bound need eval

    sites = [m for m in converted.modules() if isinstance(m, CenteredSoftplus) and not m.shift]
    if calibrate and sites:
        result = calibrate_beta(converted, sites, example, reference, MIN_AGREEMENT)
        report.beta = {"mode": "auto", "sharpness": result.sharpness, "top1_agreement": result.top1_agreement}
    else:
        mode = "auto-default" if options.beta == "auto" else "fixed"
        report.beta = {"mode": mode, "value": initial_beta}
    betas = [float(m.beta.detach()) for m in converted.modules() if isinstance(m, CenteredSoftplus)]
    if betas:
        report.beta.update(mean=sum(betas) / len(betas), min=min(betas), max=max(betas))

    if report.method == "fx":
        (lipschitz, curvature), unbounded_by = curvature_bound(converted)
        report.lipschitz_bound = None if lipschitz == float("inf") else lipschitz
        report.curvature_bound = None if curvature == float("inf") else curvature
        if unbounded_by:
            report.bound_notes.append(f"unbounded: no global constants for {', '.join(unbounded_by)}")
    else:
        report.bound_notes.append("not computed: module swap keeps no graph of how layers connect")

    converted.train(was_training)
    converted.conversion_report = report
    return converted
