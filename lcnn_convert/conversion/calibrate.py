"""Per-site beta calibration: as smooth as possible while keeping the original's top-1."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import BETA_MAX, CenteredSoftplus

SEARCH_STEPS = 14


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


@torch.no_grad()
def _preactivation_scales(model: nn.Module, sites: Sequence[CenteredSoftplus], example: tuple) -> list[float]:
    scales = [1.0] * len(sites)

    def record(index: int, inputs: tuple) -> None:
        spread = float(inputs[0].float().std())
        if math.isfinite(spread) and spread > 0:
            scales[index] = spread

    handles = [site.register_forward_pre_hook(lambda m, args, i=i: record(i, args)) for i, site in enumerate(sites)]
    try:
        model(*example)
    finally:
        for handle in handles:
            handle.remove()
    return scales


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
    of its own input range. t is found by bisection in log space on the top-1 agreement with the
    original model's logits on ``example``.
    """
    for site in sites:
        site.set_beta(BETA_MAX)
    scales = _preactivation_scales(model, sites, example)

    def agreement_at(sharpness: float) -> float:
        for site, scale in zip(sites, scales):
            site.set_beta(sharpness / scale)
        return top1_agreement(first_tensor(model(*example)), reference_logits)

    low, high = math.log(0.5), math.log(BETA_MAX * max(scales))
    best_sharpness, best_agreement = math.exp(high), agreement_at(math.exp(high))
    if best_agreement >= min_agreement:
        low_agreement = agreement_at(math.exp(low))
        if low_agreement >= min_agreement:
            best_sharpness, best_agreement = math.exp(low), low_agreement
        else:
            for _ in range(SEARCH_STEPS):
                middle = 0.5 * (low + high)
                agreement = agreement_at(math.exp(middle))
                if agreement >= min_agreement:
                    high, best_sharpness, best_agreement = middle, math.exp(middle), agreement
                else:
                    low = middle
    agreement_at(best_sharpness)
    return Calibration(best_sharpness, best_agreement, tuple(float(site.beta.detach()) for site in sites))
