"""Calibration inputs without data, from the statistics a trained BatchNorm network carries.

Random normal inputs are no stand-in for images: on a digits ResNet-18 a beta calibrated on them
kept 20% accuracy. Every BatchNorm of a trained network holds the per-channel mean and variance its
input had over the training data, so a batch of inputs optimised until each BN's batch statistics
match its running ones (ZeroQ, Cai et al. 2020) drives every layer the way real data does. The
activation spreads and the relative logit error that calibration measures then come out close to
real data's (docs/fidelity.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..bn_statistics import has_untrained_batchnorm
from .rules import FROZEN_BATCHNORM_TYPES

SYNTHETIC_EXAMPLES = 32
SYNTHESIS_STEPS = 50
SYNTHESIS_LR = 0.5


def statistic_norms(model: nn.Module) -> list[nn.Module]:
    """The modules whose running mean and variance describe their input on the training data."""
    found = []
    for module in model.modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, FROZEN_BATCHNORM_TYPES)
        if (
            is_bn
            and getattr(module, "running_mean", None) is not None
            and getattr(module, "running_var", None) is not None
        ):
            found.append(module)
    return found


def can_synthesize(model: nn.Module) -> bool:
    """True for a model with BatchNorms whose running statistics were trained."""
    return bool(statistic_norms(model)) and not has_untrained_batchnorm(model)


def _statistics_gap(norms: Sequence[nn.Module], losses: list[torch.Tensor]) -> list[RemovableHandle]:
    """Forward pre-hooks adding each BN's |batch mean - running mean| + |batch std - running std|."""

    def hook(norm: nn.Module, args: tuple) -> None:
        running_mean, running_var = norm.running_mean, norm.running_var
        assert isinstance(running_mean, torch.Tensor) and isinstance(running_var, torch.Tensor)  # statistic_norms
        eps = cast(float, norm.eps)  # a plain attribute, which mypy reads through Module.__getattr__
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dims)
        std = (x.var(dims, unbiased=False) + eps).sqrt()
        running_std = (running_var.to(x.dtype) + eps).sqrt()
        losses.append((mean - running_mean.to(x.dtype)).norm() + (std - running_std).norm())

    return [norm.register_forward_pre_hook(hook) for norm in norms]


def synthesize_inputs(
    model: nn.Module,
    input_size: Sequence[int],
    count: int = SYNTHETIC_EXAMPLES,
    steps: int = SYNTHESIS_STEPS,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> torch.Tensor:
    """``count`` inputs of ``input_size`` (C, H, W) whose BatchNorm batch statistics match the running ones.

    Adam on the inputs alone, from standard normals, for ``steps`` steps, in eval mode (every BN
    normalises with its running statistics, as at inference). ``progress(step, steps, loss)`` is
    called after every step. The model is left as it was.
    """
    norms = statistic_norms(model)
    if not norms:
        raise ValueError("synthesizing inputs needs BatchNorm statistics, and this model has no BatchNorm")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn((count, *input_size), generator=generator).to(device, dtype).requires_grad_()
    optimizer = torch.optim.Adam([inputs], lr=SYNTHESIS_LR)
    losses: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    handles = _statistics_gap(norms, losses)
    try:
        for step in range(steps):
            losses.clear()
            model(inputs)
            loss = torch.stack(losses).sum()
            (gradient,) = torch.autograd.grad(loss, inputs)  # no parameter gradients are formed
            inputs.grad = gradient
            optimizer.step()
            if progress is not None:
                progress(step + 1, steps, float(loss.detach()))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return inputs.detach()
