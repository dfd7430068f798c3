"""Centered softplus: a smooth ReLU whose sharpness beta is learnable and whose value at 0 is 0."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

LOG2 = math.log(2.0)
# Outside this range float16 cannot hold 1/beta or beta*x well enough; the clamp keeps every
# supported dtype finite (see tests/test_layers.py).
BETA_MIN = 1e-3
BETA_MAX = 1e4


def _float32_inside(value: float, towards: float) -> float:
    """The float32 nearest ``value`` strictly on the side of ``towards``: a log beta stored at a
    clamp end must lie strictly inside the clamp (whose gradient is 0 at and beyond its ends), or
    beta could never move again."""
    stored = np.float32(value)
    while (float(stored) <= value) if towards > value else (float(stored) >= value):
        stored = np.nextafter(stored, np.float32(towards))
    return float(stored)


LOG_CLAMP_MIN, LOG_CLAMP_MAX = math.log(BETA_MIN), math.log(BETA_MAX)
LOG_BETA_MIN = _float32_inside(LOG_CLAMP_MIN, towards=0.0)
LOG_BETA_MAX = _float32_inside(LOG_CLAMP_MAX, towards=0.0)


class CenteredSoftplus(nn.Module):
    """s_beta(x) = (softplus(beta * x) - log 2) / beta, with a learnable log beta.

    Computed as ``x/2 + |x|/2 + (log1p(exp(-beta*|x|)) - log 2) / beta``: exp only ever sees
    non-positive arguments, so no dtype overflows, and writing relu(x) as (x + |x|)/2 keeps the
    autograd slope at x == 0 equal to the true value 1/2.

    ``shift`` is a constant added to the output; it is 0 for converted ReLUs and log(2)/beta0 for
    converted plain softplus layers, so that replacing ``nn.Softplus(beta0)`` preserves the function.
    """

    def __init__(self, beta: float = 100.0, learnable: bool = True, shift: float = 0.0) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        log_beta = torch.tensor(min(max(math.log(beta), LOG_BETA_MIN), LOG_BETA_MAX))
        if learnable:
            self.log_beta = nn.Parameter(log_beta)
        else:
            self.register_buffer("log_beta", log_beta)
        self.shift = float(shift)

    @property
    def beta(self) -> torch.Tensor:
        return self.log_beta.clamp(LOG_CLAMP_MIN, LOG_CLAMP_MAX).exp()

    @torch.no_grad()
    def set_beta(self, beta: float) -> None:
        self.log_beta.fill_(min(max(math.log(float(beta)), LOG_BETA_MIN), LOG_BETA_MAX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta.to(x.dtype)
        magnitude = x.abs()
        y = 0.5 * (x + magnitude) + (torch.log1p(torch.exp(-beta * magnitude)) - LOG2) / beta
        if self.shift:
            y = y + self.shift
        return y

    def lipschitz_constant(self) -> float:
        return 1.0

    def curvature_constant(self) -> float:
        """Largest second derivative, beta/4, reached at x = 0."""
        return float(self.beta.detach()) / 4.0

    def extra_repr(self) -> str:
        text = f"beta={float(self.beta.detach()):.4g}"
        return text + (f", shift={self.shift:.4g}" if self.shift else "")
