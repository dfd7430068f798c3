"""Stand-ins for convolutions, BatchNorms and centered softplus that make input-Hessian-vector
products cheaper.

An input-Hessian-vector product by reverse over reverse differentiates the backward pass. Through
a convolution that takes two convolutions (the direction forward through the layer, and the
resulting gradient back), but torch's double backward of a convolution also forms the weight
gradient, a third convolution, whether anything needs it or not (it does so with frozen weights
too): a third of a product's time on resnet18. The stand-in conv's backward is a conv_transpose of
constant weights, whose own backward is one convolution. An eval-mode BatchNorm is the per-channel
affine map it computes, and its stand-in computes it as one. A centered softplus with its beta
held fixed is torch's softplus, whose first and second derivatives are single native kernels; the
training layer recovers its derivatives from its output (to keep no input for backward) in several
ops, each of which the product differentiates again.

Values are those of the layers they replace up to rounding; the stand-ins are for eval-mode
measurement copies only: they hold the replaced layers' weights (not copies), as constants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LipschitzBatchNorm, NormalizedConv
from .layers.centered_softplus import FUSED_THRESHOLD, LOG2
from .layers.normalized_linear import ConvLayer, single_tap, tap_index

CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d)
TRANSPOSED_CONVOLUTIONS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


class _ConvolveInputOnly(torch.autograd.Function):
    """conv(x, weight) with weight a constant; the backward is a differentiable conv_transpose."""

    @staticmethod
    def forward(
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> torch.Tensor:
        return CONVOLUTIONS[weight.dim() - 3](x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(x.shape[2:]), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        spatial, stride, padding, dilation, groups = ctx.geometry
        # A strided conv maps several input sizes to one output size; output_padding picks ours.
        output_padding = tuple(
            size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, out, s, p, d, k in zip(spatial, grad.shape[2:], stride, padding, dilation, weight.shape[2:])
        )
        transpose = TRANSPOSED_CONVOLUTIONS[weight.dim() - 3]
        grad_input = transpose(grad, weight, None, stride, padding, output_padding, groups, dilation)
        return grad_input, None, None, None, None, None


def _explicit_padding(conv: ConvLayer | NormalizedConv) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(symmetric padding for the conv, extra (left, right, ...) zero padding for F.pad), or None
    when the padding is not zeros. 'same' splits its total padding with the extra on the right."""
    dims = conv.weight.dim() - 2
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0,) * dims, ()
    if not isinstance(conv.padding, str):
        return tuple(conv.padding), ()
    # 'same'
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    symmetric = tuple(total // 2 for total in totals)
    extra = [side for total in reversed(totals) for side in (0, total - 2 * (total // 2))]
    return symmetric, tuple(extra) if any(extra) else ()


class InputGradientConv(nn.Module):
    """A convolution with constant weights whose double backward forms no weight gradient."""

    # buffers
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        extra_padding: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups = groups
        self.extra_padding = tuple(extra_padding)

    @classmethod
    def from_conv(cls, conv: ConvLayer | NormalizedConv) -> InputGradientConv | None:
        """The stand-in for an nn.Conv1d/2d/3d or an eval-mode NormalizedConv; None for padding
        modes other than zeros."""
        padding = _explicit_padding(conv)
        if padding is None:
            return None
        if isinstance(conv, NormalizedConv):
            with torch.no_grad():
                weight = conv.normalized_weight()
                if conv.scale is not None:
                    weight = weight * conv.scale
        else:
            weight = conv.weight
        return cls(weight, conv.bias, conv.stride, padding[0], conv.dilation, conv.groups, padding[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra_padding:
            x = F.pad(x, self.extra_padding)
        weight, stride, padding = self.weight, self.stride, self.padding
        taps = single_tap(x.shape[2:], weight.shape[2:], stride, padding, self.dilation)
        if taps is not None:  # as in NormalizedConv: the padded conv reads one tap of a 1-pixel map
            weight = weight[tap_index(taps)]
            stride, padding = (1,) * len(taps), (0,) * len(taps)
        y = _ConvolveInputOnly.apply(x, weight, stride, padding, self.dilation, self.groups)
        return y if self.bias is None else y + self.bias.view(-1, *[1] * (y.dim() - 2))


class ChannelAffine(nn.Module):
    """x * scale + shift per channel (dimension 1): an eval-mode BatchNorm."""

    # buffers
    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach())
        self.register_buffer("shift", shift.detach())

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> ChannelAffine | None:
        """None for a BatchNorm without running statistics (it normalises by the batch's own)."""
        # a BatchNorm's optional parameters and buffers are None when absent
        running_mean, running_var = bn.running_mean, bn.running_var
        if not isinstance(running_mean, torch.Tensor) or not isinstance(running_var, torch.Tensor):
            return None
        eps = cast(float, bn.eps)  # a plain attribute, which mypy reads through Module.__getattr__
        with torch.no_grad():
            if isinstance(bn, LipschitzBatchNorm):
                weight = bn.weight * bn.clip_factor()
            else:
                weight = bn.weight if isinstance(bn.weight, torch.Tensor) else torch.ones_like(running_var)
            bias = bn.bias if isinstance(bn.bias, torch.Tensor) else torch.zeros_like(running_mean)
            scale = weight * torch.rsqrt(running_var + eps)
            return cls(scale, bias - running_mean * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1, *[1] * (x.dim() - 2))
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))


class FixedBetaSoftplus(nn.Module):
    """(softplus(beta x) - log 2) / beta + shift with beta a constant, by torch's softplus."""

    def __init__(self, beta: float, shift: float = 0.0) -> None:
        super().__init__()
        self.beta, self.shift = float(beta), float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Past the threshold softplus returns x, whose second derivative 0 stands for
        # beta sigmoid'(beta x) < beta exp(-threshold): below float32's resolution at 20, float64's at 40.
        threshold = 2 * FUSED_THRESHOLD if x.dtype == torch.float64 else FUSED_THRESHOLD
        return F.softplus(x, self.beta, threshold) - (LOG2 / self.beta - self.shift)


# Stand-ins for torch's own layers, by exact type: a subclass may change forward (timm's Conv2dSame
# pads dynamically, StdConv2d standardises its weight), so it keeps its own layer. LCNN layers name
# their own (``curvature_stand_in``); a user's table may add their own layers. Each maker takes a
# module of its key's type.
STAND_INS: dict[type, Callable[..., nn.Module | None]] = {
    nn.Conv1d: InputGradientConv.from_conv,
    nn.Conv2d: InputGradientConv.from_conv,
    nn.Conv3d: InputGradientConv.from_conv,
    nn.BatchNorm1d: ChannelAffine.from_batchnorm,
    nn.BatchNorm2d: ChannelAffine.from_batchnorm,
    nn.BatchNorm3d: ChannelAffine.from_batchnorm,
}


class _NamesOwnStandIn(Protocol):
    def curvature_stand_in(self) -> nn.Module | None: ...


def _names_own_stand_in(module: nn.Module) -> TypeGuard[_NamesOwnStandIn]:
    return callable(getattr(module, "curvature_stand_in", None))


def _stand_in_maker(module: nn.Module, stand_ins: dict[type, Callable]) -> Callable[..., nn.Module | None] | None:
    """The maker of ``module``'s stand-in, which takes a module of ``module``'s type."""
    make = stand_ins.get(type(module))
    if make is None and _names_own_stand_in(module):
        return type(module).curvature_stand_in
    return make


def swap_for_input_hessian(model: nn.Module, stand_ins: dict[type, Callable] = STAND_INS) -> list[str]:
    """Replace, in place, every layer of ``model`` (in eval mode) that has a stand-in in
    ``stand_ins`` or names its own; return the replaced paths."""
    if model.training:
        raise ValueError("input-Hessian stand-ins hold eval-mode values: put the model in eval mode first")
    swapped: list[str] = []
    for path, module in list(model.named_modules()):
        if any(path.startswith(done + ".") for done in swapped):
            continue  # inside a layer already replaced
        make = _stand_in_maker(module, stand_ins)
        replacement = make(module) if make is not None and path else None
        if replacement is not None:
            model.set_submodule(path, replacement.eval())
            swapped.append(path)
    return swapped
