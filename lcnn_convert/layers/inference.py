"""Inference forms of the LCNN layers: trained values frozen into constants for export.

A learnable beta exports as Clip/Exp nodes on log beta evaluated at every run, and the general
formula as a chain of a dozen elementwise ops; onnxruntime fuses none of them. Frozen, the centered
softplus is eight standard elementwise ops with beta and 1/beta as constants (docs/benchmarks.md
compares the forms measured).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


LOG2 = math.log(2.0)


class FrozenCenteredSoftplus(nn.Module):
    """s(x) = (relu(t) - log(sigmoid(|t|)) - log 2) / beta + shift with t = beta x, beta a constant.

    The same function as CenteredSoftplus, (softplus(t) - log 2) / beta, since softplus(t) =
    relu(t) + log(1 + exp(-|t|)) = relu(t) - log(sigmoid(|t|)). sigmoid(|t|) lies in [1/2, 1], so the
    log is finite in every dtype, and onnxruntime's Sigmoid kernel is vectorised where its Exp and
    Softplus are slower.

    Written as ((softplus(t) - offset) * output_scale) with t = input_scale * x, offset = log 2 -
    beta * shift and output_scale = 1 / beta: ``fold_scales`` moves input_scale, output_scale and
    offset into neighbouring layers where that is exact and sets them to 1, 1 and 0, and an op
    whose constant is neutral is not emitted.
    """

    def __init__(self, beta: float, shift: float = 0.0) -> None:
        super().__init__()
        self.beta = float(beta)
        self.shift = float(shift)
        self.input_scale = self.beta
        self.output_scale = 1.0 / self.beta
        self.offset = LOG2 - self.beta * self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x * self.input_scale if self.input_scale != 1.0 else x
        negative_part = torch.log(torch.sigmoid(t.abs()))
        y = torch.relu(t) - (negative_part + self.offset if self.offset else negative_part)
        return y * self.output_scale if self.output_scale != 1.0 else y

    def extra_repr(self) -> str:
        return f"beta={self.beta:.4g}" + (f", shift={self.shift:.4g}" if self.shift else "")


def freeze_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LCNN layer that has an inference form replaced by it: each
    activation with beta a constant, each Lipschitz BN with its clip factor folded (eval use only)."""
    inference_form = getattr(model, "inference_form", None)
    if callable(inference_form):
        return inference_form()
    frozen = copy.deepcopy(model)
    for name, module in list(frozen.named_modules()):
        if name and callable(getattr(module, "inference_form", None)):
            frozen.set_submodule(name, module.inference_form())
    return frozen
