"""gamma-Lipschitz batch normalization, built from an existing BatchNorm."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


MIN_GAIN = 1e-12


def _log_at_least(gain: torch.Tensor) -> torch.Tensor:
    """The log gamma, in ``gain``'s dtype, whose exp is >= gain as clip_factor computes it (same dtype,
    same torch exp), so that min(1, gamma / gain) is exactly 1: rounding it down in float16 or
    bfloat16 would shrink every gain of a freshly converted layer."""
    # log in at least float32 (CPU half-precision log is not everywhere); then a few ulps up at most
    log_gain = gain.log() if gain.dtype in (torch.float32, torch.float64) else gain.float().log().to(gain.dtype)
    towards = torch.full_like(log_gain, math.inf)
    while bool(log_gain.exp() < gain):
        log_gain = torch.nextafter(log_gain, towards)
    return log_gain


class LipschitzBatchNorm(nn.Module):
    """y_c = clip * w_c * (x_c - mean_c) / sqrt(var_c + eps) + b_c, clip = min(1, gamma / max_c |g_c|).

    g_c = w_c / sqrt(running_var_c + eps) are the eval-mode channel gains. The clip factor keeps
    their ratios and bounds the layer's Lipschitz constant (in eval mode) by gamma = exp(log_gamma).
    gamma starts at max_c |g_c|, which makes the layer equal to the BatchNorm it came from. In train
    mode the normalisation uses batch statistics exactly like BatchNorm (the clip factor always uses
    the running variance), so fine-tuning behaves as it would with the original layer.
    Works for 1d, 2d and 3d inputs alike.
    """

    # buffers
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        use_batch_stats: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.use_batch_stats = use_batch_stats
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.log_gamma = nn.Parameter(torch.zeros(()))
        self._held_clip: torch.Tensor | None = None
        self.reset_gamma()

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, use_batch_stats: bool = True) -> LipschitzBatchNorm:
        """Copy a BatchNorm-like module (BatchNormNd, SyncBatchNorm, FrozenBatchNorm2d, ...)."""
        running_mean, running_var = bn.running_mean, bn.running_var
        if not isinstance(running_mean, torch.Tensor) or not isinstance(running_var, torch.Tensor):
            raise TypeError(f"{type(bn).__name__} keeps no running statistics to copy")
        return cls.from_tensors(
            weight=getattr(bn, "weight", None),
            bias=getattr(bn, "bias", None),
            running_mean=running_mean,
            running_var=running_var,
            eps=cast(float, bn.eps),  # a plain attribute, which mypy reads through Module.__getattr__
            momentum=getattr(bn, "momentum", 0.1),
            use_batch_stats=use_batch_stats,
            num_batches_tracked=getattr(bn, "num_batches_tracked", None),
        )

    @classmethod
    def from_tensors(
        cls,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
        momentum: float | None = 0.1,
        use_batch_stats: bool = True,
        num_batches_tracked: torch.Tensor | None = None,
    ) -> LipschitzBatchNorm:
        layer = cls(running_mean.numel(), eps=eps, momentum=momentum, use_batch_stats=use_batch_stats)
        layer.to(device=running_mean.device, dtype=running_mean.dtype)
        with torch.no_grad():
            if weight is not None:
                layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
            layer.running_mean.copy_(running_mean)
            layer.running_var.copy_(running_var)
            if num_batches_tracked is not None:
                layer.num_batches_tracked.copy_(num_batches_tracked)
        if not use_batch_stats:
            layer.weight.requires_grad_(False)
            layer.bias.requires_grad_(False)
        layer.reset_gamma()
        return layer

    def channel_gains(self) -> torch.Tensor:
        """|g_c|: the eval-mode per-channel slopes before clipping."""
        return self.weight.abs() / torch.sqrt(self.running_var + self.eps)

    def clip_factor(self) -> torch.Tensor:
        if self._held_clip is not None:
            return self._held_clip
        largest_gain = self.channel_gains().max().clamp_min(MIN_GAIN)
        return torch.clamp(self.log_gamma.exp() / largest_gain, max=1.0)

    @torch.no_grad()
    def reset_gamma(self) -> None:
        """Set gamma to max |g_c|: the layer then equals the unconstrained BatchNorm exactly.

        A BN whose gains are all zero (timm's zero-initialised last BN of a residual block) gets
        gamma = 1 instead: any gamma >= 0 preserves it, and 1 leaves room to learn.
        """
        largest_gain = self.channel_gains().max()
        self.log_gamma.fill_(_log_at_least(largest_gain) if float(largest_gain) > MIN_GAIN else 0.0)

    @contextmanager
    def holding_clip(self) -> Iterator[None]:
        """Keep the clip factor at its current value while the running statistics are re-estimated.

        On leaving, gamma is moved so that the clip factor computed from the new running variance
        is the held one: the layer computes the same function (with better statistics) and gamma
        is again its eval-mode Lipschitz constant.
        """
        held = self.clip_factor().detach().clone()
        self._held_clip = held
        try:
            yield
        finally:
            self._held_clip = None
            with torch.no_grad():
                largest_gain = float(self.channel_gains().max())
                if largest_gain > MIN_GAIN:
                    if float(held) < 1.0:
                        # a clip that underflowed to 0 (gamma far below every channel's gain) stays
                        # the smallest representable one
                        self.log_gamma.fill_(math.log(max(float(held) * largest_gain, MIN_GAIN)))
                    elif float(self.log_gamma.exp()) < largest_gain:
                        self.log_gamma.fill_(_log_at_least(self.channel_gains().max()))

    @torch.no_grad()
    def absorb_input_scale(self, scale: float) -> None:
        """Make the layer give the same output for inputs divided by ``scale``.

        Used when the preceding conv is divided by its operator norm: mean / s, var / s^2 and
        eps / s^2 make BN(conv(x) / s) == BN_old(conv(x)).
        """
        self.running_mean.div_(scale)
        self.running_var.div_(scale**2)
        self.eps = self.eps / scale**2
        self.reset_gamma()

    def get_extra_state(self) -> torch.Tensor:
        # eps changes when a conv's scale is absorbed; keep it in the state dict (as a tensor,
        # so that safetensors can hold it) to rebuild the exact layer.
        return torch.tensor(self.eps, dtype=torch.float64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.eps = float(state)

    def lipschitz_constant(self) -> float:
        """Eval-mode Lipschitz constant: max_c |clip * g_c| = min(gamma, max_c |g_c|)."""
        with torch.no_grad():
            return float((self.clip_factor() * self.channel_gains()).max())

    def curvature_constant(self) -> float:
        return 0.0

    regulariser = "gamma"

    def regulariser_term(self) -> torch.Tensor:
        """What fine-tuning adds to the loss (times lambda_gamma): |log gamma|."""
        return self.log_gamma.abs()

    def curvature_stand_in(self) -> nn.Module | None:
        from ..input_hessian import ChannelAffine

        return ChannelAffine.from_batchnorm(self)

    def inference_form(self) -> nn.Module:
        """The eval-mode layer with its clip factor folded into the weight: an exported graph is then
        a plain BatchNormalization (which runtimes fold into the conv before it), not the ReduceMax,
        Exp, Clip and Div nodes that compute the factor at every run."""
        with torch.no_grad():
            return FrozenLipschitzBatchNorm(
                self.weight * self.clip_factor(), self.bias, self.running_mean, self.running_var, self.eps
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training and self.use_batch_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if batch_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight * self.clip_factor(),
            self.bias,
            batch_stats,
            momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        gamma = float(self.log_gamma.detach().exp())
        return f"{self.num_features}, eps={self.eps:.3g}, momentum={self.momentum}, gamma={gamma:.4g}"


class FrozenLipschitzBatchNorm(nn.Module):
    """A LipschitzBatchNorm's eval-mode function with every value a constant (export only)."""

    # buffers
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
    ) -> None:
        super().__init__()
        for name, value in (("weight", weight), ("bias", bias), ("running_mean", mean), ("running_var", var)):
            self.register_buffer(name, value.detach().clone())
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class LipschitzBatchNormAct(nn.Module):
    """timm's BatchNormAct2d after conversion: Lipschitz BN, then its drop layer and activation."""

    def __init__(self, bn: LipschitzBatchNorm, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.bn = bn
        self.drop = drop
        self.act = act

    def absorb_input_scale(self, scale: float) -> None:
        self.bn.absorb_input_scale(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.bn(x)))
