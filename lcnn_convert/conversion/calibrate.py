"""Per-site beta calibration: the smoothest activations whose logits stay within a tolerance of the original's.

The criterion is the mean relative logit error (``lcnn_convert.fidelity``), not the top-1 agreement
on the calibration images: agreement depends on how far each image is from a decision boundary, and
the images a model was trained on sit much farther than new ones, so a sharpness found at the edge
of 99% agreement on training images kept only 94.7-95.7% on held-out ones. The relative logit error
measures the function itself; on the digits models it came out within ~10% on training, held-out
and BN-synthesised images alike (docs/fidelity.md), so a tolerance met on any of them holds on new
data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..defaults import DEFAULT_LOGIT_TOLERANCE  # held-out top-1 agreement of the digits models >= 99.4% at it
from ..fidelity import first_tensor
from ..layers import BETA_MAX, SmoothActivation

# The search stops once the smallest passing sharpness is known to within 5%, or after
# MAX_EVALUATIONS forward passes of the calibration inputs.
SHARPNESS_PRECISION = 0.05
MAX_EVALUATIONS = 10
MIN_SHARPNESS = 0.5
FIRST_SHARPNESS = 64.0


@dataclass(frozen=True)
class Calibration:
    """The shared sharpness t (beta_k = t / std_k) and what it gave on the calibration inputs."""

    sharpness: float
    top1_agreement: float
    mean_relative_logit_error: float
    logit_tolerance: float
    evaluations: int
    betas: tuple[float, ...]


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def mean_relative_logit_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    from ..fidelity import relative_logit_errors

    return float(relative_logit_errors(logits, reference).mean())


@torch.no_grad()
def _preactivation_scales(
    model: nn.Module, sites: Sequence[SmoothActivation], example: tuple
) -> tuple[list[float], torch.Tensor]:
    """Each site's input spread, and the logits, from one forward pass."""
    scales = [1.0] * len(sites)

    def record(index: int, inputs: tuple) -> None:
        spread = float(inputs[0].float().std())
        if math.isfinite(spread) and spread > 0:
            scales[index] = spread

    handles = [site.register_forward_pre_hook(lambda m, args, i=i: record(i, args)) for i, site in enumerate(sites)]
    try:
        logits = first_tensor(model(*example))
    finally:
        for handle in handles:
            handle.remove()
    return scales, logits


@torch.no_grad()
def calibrate_beta(
    model: nn.Module,
    sites: Sequence[SmoothActivation],
    example: tuple[torch.Tensor, ...],
    reference_logits: torch.Tensor,
    min_agreement: float | None = 0.99,
    logit_tolerance: float = DEFAULT_LOGIT_TOLERANCE,
) -> Calibration:
    """Set beta_k = t / std_k at every site and find the smallest t whose logits stay within tolerance.

    std_k is the spread of site k's input with all sites near-ReLU (beta = BETA_MAX), so t is a
    dimensionless sharpness shared by all sites: each site's softplus bends over the same fraction
    of its own input range. A sharpness passes when the mean relative logit error on ``example`` is
    at most ``logit_tolerance`` and, unless ``min_agreement`` is None (inputs that only stand in for
    data, whose top-1 classes mean little), the top-1 agreement is at least ``min_agreement``.

    The error falls about as 1/t (a softplus differs from ReLU by O(1/beta)), so the search is a
    secant on log error over log t: the first step from t = 64 usually lands within a few percent,
    and regula falsi (Illinois) closes the bracket to SHARPNESS_PRECISION in 2-4 more passes.
    """
    for site in sites:
        site.set_beta(BETA_MAX)
    scales, sharp_logits = _preactivation_scales(model, sites, example)
    target = math.log(logit_tolerance)

    def gap(logits: torch.Tensor) -> tuple[float, float, float]:
        """(log error - log tolerance, raised above 0 when the agreement fails; agreement; error)."""
        agreement = top1_agreement(logits, reference_logits)
        error = mean_relative_logit_error(logits, reference_logits)
        value = math.log(max(error, 1e-300)) - target
        if min_agreement is not None and agreement < min_agreement:
            value = max(value, math.log1p(SHARPNESS_PRECISION))
        return value, agreement, error

    def evaluate(sharpness: float) -> tuple[float, float, float]:
        for site, scale in zip(sites, scales):
            site.set_beta(sharpness / scale)
        return gap(first_tensor(model(*example)))

    sharpest = BETA_MAX * max(scales)  # every site at BETA_MAX or above it (clamped)
    passing = (sharpest, *gap(sharp_logits))
    failing: tuple[float, float, float, float] | None = None
    evaluations = 0
    if passing[1] <= 0:
        candidate = min(FIRST_SHARPNESS, sharpest)
        kept_side = None
        nudge = 0.5 * math.log1p(SHARPNESS_PRECISION)
        while evaluations < MAX_EVALUATIONS:
            low = math.log(failing[0]) if failing is not None else None
            high = math.log(passing[0])
            if low is not None and high - low <= math.log1p(SHARPNESS_PRECISION):
                break
            if evaluations > 0:
                if failing is None:
                    # error ~ 1/t: the root is about gap below log t; aim a little below it to bracket
                    if passing[0] <= MIN_SHARPNESS:
                        break
                    root = high + passing[1] - nudge
                    candidate = math.exp(max(root, math.log(MIN_SHARPNESS)))
                else:
                    assert low is not None  # log of failing's sharpness
                    root = high - passing[1] * (low - high) / (failing[1] - passing[1] or 1e-30)
                    # nudged by half the precision towards the bracket end farther from it, so that
                    # the next pass can close the bracket from that side; never at an end
                    root = root - nudge if root - low > high - root else root + nudge
                    inner = min(0.1 * (high - low), nudge)
                    candidate = math.exp(min(max(root, low + inner), high - inner))
            value, agreement_at, error_at = evaluate(candidate)
            evaluations += 1
            if value <= 0:
                passing = (candidate, value, agreement_at, error_at)
                if failing is not None and kept_side == "failing":
                    failing = (failing[0], failing[1] / 2, failing[2], failing[3])
                kept_side = "failing"
            else:
                failing = (candidate, value, agreement_at, error_at)
                if kept_side == "passing":
                    passing = (passing[0], passing[1] / 2, passing[2], passing[3])
                kept_side = "passing"
    sharpness, _, agreement, error = passing  # the halved gaps of regula falsi are search state only
    for site, scale in zip(sites, scales):
        site.set_beta(sharpness / scale)
    return Calibration(
        sharpness=sharpness,
        top1_agreement=agreement,
        mean_relative_logit_error=error,
        logit_tolerance=logit_tolerance,
        evaluations=evaluations + 1,
        betas=tuple(float(site.beta.detach()) for site in sites),
    )
