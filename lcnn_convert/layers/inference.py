"""Inference forms of the LCNN layers: trained values frozen into constants for export.

A learnable beta exports as Clip/Exp nodes on log beta evaluated at every run, and the general
formula as a chain of a dozen elementwise ops; onnxruntime fuses none of them. Frozen, the centered
softplus is nine standard elementwise ops with beta and 1/beta as constants.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .centered_softplus import CenteredSoftplus

LOG2 = math.log(2.0)


class FrozenCenteredSoftplus(nn.Module):
    """s(x) = relu(x) + log(1/2 + exp(-|beta x| - log 2)) / beta (+ shift), beta a constant.

    The same function as CenteredSoftplus: (softplus(t) - log 2) / beta with t = beta x, where
    softplus(t) - log 2 = relu(t) + log((1 + exp(-|t|)) / 2). exp only sees non-positive arguments.
    """

    def __init__(self, beta: float, shift: float = 0.0) -> None:
        super().__init__()
        self.beta = float(beta)
        self.inverse_beta = 1.0 / self.beta
        self.shift = float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bend = torch.log(0.5 + torch.exp(-LOG2 - (x * self.beta).abs()))
        y = torch.relu(x) + bend * self.inverse_beta
        return y + self.shift if self.shift else y

    def extra_repr(self) -> str:
        return f"beta={self.beta:.4g}" + (f", shift={self.shift:.4g}" if self.shift else "")


def freeze_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every CenteredSoftplus replaced by its frozen form (eval use only)."""
    if isinstance(model, CenteredSoftplus):
        return FrozenCenteredSoftplus(float(model.beta.detach()), model.shift)
    frozen = copy.deepcopy(model)
    for name, module in list(frozen.named_modules()):
        if name and isinstance(module, CenteredSoftplus):
            frozen.set_submodule(name, FrozenCenteredSoftplus(float(module.beta.detach()), module.shift))
    return frozen
