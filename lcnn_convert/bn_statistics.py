"""BatchNorm running statistics: find untrained ones and estimate them from data.

A model built with random weights (``--no-pretrained``) has BatchNorms whose running statistics
were never updated (mean 0, variance 1). Conversion starts each Lipschitz BN's gamma at the layer's
eval-mode gain, so from such statistics gamma starts far too small: fine-tuning then clips every BN
and the scale of the activations collapses with depth (measured: resnet18 on digits ends at 10%
eval accuracy). Estimating the statistics first gives gamma its real starting value (98.3%).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from contextlib import ExitStack, contextmanager
from typing import Protocol, TypeGuard

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .layers import LipschitzBatchNorm


class _RunningStatisticsNorm(Protocol):
    """A BatchNorm that keeps running statistics (a torch BatchNorm built with track_running_stats)."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor
    momentum: float | None

    def train(self, mode: bool = True) -> nn.Module: ...


def _keeps_running_statistics(module: nn.Module) -> TypeGuard[_RunningStatisticsNorm]:
    # a torch BatchNorm without running statistics registers all three buffers as None
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, LipschitzBatchNorm)) and module.running_mean is not None


def _running_stat_norms(model: nn.Module) -> list[_RunningStatisticsNorm]:
    return [m for m in model.modules() if _keeps_running_statistics(m) and getattr(m, "use_batch_stats", True)]


def has_untrained_batchnorm(model: nn.Module) -> bool:
    """True when every BatchNorm still has its initial running statistics (mean 0, variance 1)."""
    norms = _running_stat_norms(model)
    return bool(norms) and all(not bool(m.running_mean.any()) and bool((m.running_var == 1).all()) for m in norms)


@contextmanager
def normalising_with_running_statistics(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm that keeps running statistics normalises with them, as in eval mode, and
    leaves them as they are; the rest of the model stays in its mode."""
    norms = [m for m in _running_stat_norms(model) if getattr(m, "training", False)]
    for norm in norms:
        norm.train(False)
    try:
        yield
    finally:
        for norm in norms:
            norm.train(True)


MIN_STATISTICS_BATCH = 16


def recalibrate_batchnorm(
    model: nn.Module, data: Dataset, batches: int = 100, batch_size: int = 128, seed: int = 0
) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` batches of ``data``.

    The statistics are plain averages over the batches, computed in train mode; other modules
    (dropout, ...) stay in eval mode. Each Lipschitz BN holds its clip factor meanwhile and moves
    gamma to match the new statistics, so the layer keeps its train-mode function. Returns the
    number of batches used. Batches have at least MIN_STATISTICS_BATCH images.
    """
    norms = _running_stat_norms(model)
    if not norms or batches <= 0:
        return 0
    was_training = model.training
    device = next(model.parameters()).device
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    generator = torch.Generator().manual_seed(seed)
    # Batch statistics need more than one value per channel, and a handful of images to mean much.
    batch_size = max(batch_size, MIN_STATISTICS_BATCH)
    if not isinstance(data, Sized):
        raise TypeError(f"{type(data).__name__} has no length: a map-style dataset (with __len__) is needed")
    loader = DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=generator, drop_last=len(data) % batch_size == 1
    )
    used = 0
    model.eval()
    with ExitStack() as stack, torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)  # augmentations draw from the global generator; keep the caller's untouched
        for norm in norms:
            if isinstance(norm, LipschitzBatchNorm):
                stack.enter_context(norm.holding_clip())
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0)
            norm.num_batches_tracked.zero_()
            norm.momentum = None  # cumulative average
            norm.train()
        for images, _ in loader:
            if used >= batches:
                break
            model(images.to(device))
            used += 1
    for norm, (momentum, tracked) in zip(norms, saved):
        norm.momentum = momentum
        norm.num_batches_tracked.copy_(tracked)
    model.train(was_training)
    return used
