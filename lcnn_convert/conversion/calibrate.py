"""Per-site beta calibration: as smooth as possible while keeping the original's top-1."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import BETA_MAX, CenteredSoftplus

# The search stops once the smallest passing sharpness is known to within 5%; it spends at most
# MAX_EVALUATIONS forward passes of the example after the first two.
SHARPNESS_PRECISION = 0.05
MAX_EVALUATIONS = 10
MIN_SHARPNESS = 0.5


@dataclass(frozen=True)
class Calibration:
    sharpness: float
    top1_agreement: float
    betas: tuple[float, ...]


def first_tensor(output: object) -> torch.Tensor:
    """The logits of a model whose forward returns a tensor, a tuple or a dict."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"model output of type {type(output).__name__} holds no tensor")


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def _slack(logits: torch.Tensor, reference_classes: torch.Tensor, allowed_misses: int) -> float:
    """How far the agreement is from failing: the (allowed_misses + 1)-th smallest margin of the
    reference class over the best other class, relative to the logits' spread. Positive while the
    agreement holds; unlike the agreement itself it moves continuously with the sharpness."""
    logits = logits.float()
    chosen = logits.gather(1, reference_classes[:, None]).squeeze(1)
    others = logits.scatter(1, reference_classes[:, None], float("-inf")).amax(1)
    margins = (chosen - others).sort().values
    spread = float(logits.std()) or 1.0
    return float(margins[min(allowed_misses, len(margins) - 1)]) / spread


@torch.no_grad()
def _preactivation_scales(
    model: nn.Module, sites: Sequence[CenteredSoftplus], example: tuple
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
    sites: Sequence[CenteredSoftplus],
    example: tuple[torch.Tensor, ...],
    reference_logits: torch.Tensor,
    min_agreement: float = 0.99,
) -> Calibration:
    """Set beta_k = t / std_k at every site and find the smallest t that keeps the agreement.

    std_k is the spread of site k's input with all sites near-ReLU (beta = BETA_MAX), so t is a
    dimensionless sharpness shared by all sites: each site's softplus bends over the same fraction
    of its own input range. t is found to within SHARPNESS_PRECISION by regula falsi (Illinois) on
    the softness u = 1/t, bracketed between a passing and a failing u: the reference-class margin
    that decides the top-1 agreement moves about linearly in u (a softplus differs from ReLU by
    O(1/beta)), so a few forward passes replace a bisection's sixteen.
    """
    for site in sites:
        site.set_beta(BETA_MAX)
    scales, sharp_logits = _preactivation_scales(model, sites, example)
    classes = reference_logits.argmax(-1)
    allowed_misses = int(math.floor((1.0 - min_agreement) * len(classes) + 1e-9))

    def evaluate(softness: float) -> tuple[float, float]:
        for site, scale in zip(sites, scales):
            site.set_beta(1.0 / (softness * scale))
        logits = first_tensor(model(*example))
        return top1_agreement(logits, reference_logits), _slack(logits, classes, allowed_misses)

    # u = 1/t from the sharpest sites allowed (all at BETA_MAX) to the smoothest searched (t = 0.5)
    passing = 1.0 / (BETA_MAX * max(scales))
    passing_agreement = top1_agreement(sharp_logits, reference_logits)
    passing_slack = _slack(sharp_logits, classes, allowed_misses)
    failing = 1.0 / MIN_SHARPNESS
    agreement, slack = evaluate(failing)
    if agreement >= min_agreement:
        passing, passing_agreement, failing = failing, agreement, None
    elif passing_agreement >= min_agreement:
        failing_slack, kept_side = slack, None
        for _ in range(MAX_EVALUATIONS):
            if failing / passing <= 1.0 + SHARPNESS_PRECISION:
                break
            # The secant's root, nudged by half the precision towards the bracket end farther from
            # it so that the next pass can close the bracket from that side; never at an end.
            secant = passing + (failing - passing) * passing_slack / max(passing_slack - failing_slack, 1e-30)
            low, high = math.log(passing), math.log(failing)
            root = math.log(max(secant, 1e-300))
            nudge = 0.5 * math.log1p(SHARPNESS_PRECISION)
            root = root - nudge if root - low > high - root else root + nudge
            inner = min(0.1 * (high - low), nudge)
            softness = math.exp(min(max(root, low + inner), high - inner))
            agreement, slack = evaluate(softness)
            if agreement >= min_agreement:
                passing, passing_agreement, passing_slack = softness, agreement, slack
                failing_slack = failing_slack / 2 if kept_side == "failing" else failing_slack
                kept_side = "failing"
            else:
                failing, failing_slack = softness, slack
                passing_slack = passing_slack / 2 if kept_side == "passing" else passing_slack
                kept_side = "passing"
    sharpness = 1.0 / passing
    for site, scale in zip(sites, scales):
        site.set_beta(sharpness / scale)
    return Calibration(sharpness, passing_agreement, tuple(float(site.beta.detach()) for site in sites))
