"""Centered softplus: a smooth ReLU whose sharpness beta is learnable and whose value at 0 is 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .smooth_activation import (  # noqa: F401  (re-exported: their home before the other families)
    BETA_MAX,
    BETA_MIN,
    LOG2,
    LOG_BETA_MAX,
    LOG_BETA_MIN,
    LOG_CLAMP_MAX,
    LOG_CLAMP_MIN,
    SmoothActivation,
)


def _centered_softplus(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """(softplus(beta x) - log 2) / beta from ops that stay finite in every dtype: exp only ever
    sees non-positive arguments, and relu(x) is written (x + |x|)/2 so its autograd slope at 0 is 1/2."""
    magnitude = x.abs()
    return 0.5 * (x + magnitude) + (torch.log1p(torch.exp(-beta * magnitude)) - LOG2) / beta


# Above beta * x = 20, softplus(beta x) / beta equals x to within exp(-20) / beta.
FUSED_THRESHOLD = 20.0


def _fused_centered_softplus(x: torch.Tensor, beta: float) -> torch.Tensor:
    """The same values from torch's fused softplus kernel: two passes over x instead of nine."""
    return F.softplus(x, beta=beta, threshold=FUSED_THRESHOLD).sub_(LOG2 / beta)


def _can_fuse(x: torch.Tensor, log_beta: torch.Tensor) -> bool:
    """Eager CPU tensors only: reading beta as a number syncs a GPU stream, and functorch's
    wrapped tensors (vmap, grad) and tracers cannot be read as numbers at all. Not float64,
    whose precision the exp(-20) cut-off would spoil."""
    if x.device.type != "cpu" or x.dtype == torch.float64 or isinstance(x, torch.fx.Proxy):
        return False
    if torch.jit.is_tracing():
        return False
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not (wrapped(x) or wrapped(log_beta))


class _CenteredSoftplusFunction(torch.autograd.Function):
    """The same values with hand-written derivatives, used whenever autograd records.

    Autograd through the formula above gets two things wrong: its second derivative at x == 0 is 0
    (d sign(x) / dx = 0) where the true curvature peaks at beta / 4, and the backward of (...) / beta
    forms 1 / beta^2, which overflows float16 for beta < 3.9e-3. The derivatives below are
    sigmoid(beta x) for x and x sigmoid(beta x) - s for log beta: finite, and themselves
    differentiable, so double backward (curvature, gradient-norm penalty) sees the true curvature.

    Both come from the output alone: the layer that reads the output keeps it anyway, whereas
    keeping x (the BatchNorm's output, which a ReLU would have overwritten in place) held one more
    activation-sized tensor per site until backward.
    """

    generate_vmap_rule = True  # torch.func transforms (jacrev, jacfwd, vmap) work through it

    @staticmethod
    def forward(x: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
        if _can_fuse(x, log_beta):
            return _fused_centered_softplus(x, float(log_beta.exp()))
        return _centered_softplus(x, log_beta.exp().to(x.dtype))

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1], output)
        ctx.save_for_forward(inputs[1], output)

    @staticmethod
    def _derivatives(ctx, with_beta: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d output / dx, d output / d log beta or None) from the output y.

        With u = beta x: softplus(u) = beta y + log 2, sigmoid(u) = 1 - exp(-softplus(u)) and
        u = softplus(u) + log(sigmoid(u)), so x sigmoid(u) - y = (log 2 - softplus(u) exp(-softplus(u))
        + sigmoid(u) log(sigmoid(u))) / beta. The log's clamp gives the limit 0 where sigmoid(u)
        underflows to 0 (torch.xlogy would too, with a kernel several times slower than log).
        """
        log_beta, output = ctx.saved_tensors
        low_precision = output.dtype in (torch.float16, torch.bfloat16)
        y = output.float() if low_precision else output
        beta = log_beta.exp().to(y.dtype)
        soft = (beta * y + LOG2).clamp_min(0.0)
        decay = torch.exp(-soft)
        slope = 1.0 - decay
        beta_slope = None
        if with_beta:
            beta_slope = (LOG2 - soft * decay + slope * slope.clamp_min(1e-30).log()) / beta
        return (slope.to(output.dtype) if low_precision else slope), beta_slope

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not torch.is_grad_enabled() and grad.dtype == ctx.saved_tensors[1].dtype == torch.float32:
            return _CenteredSoftplusFunction._backward_in_place(ctx, grad)
        wants_beta = ctx.needs_input_grad[1] and engine_needs(ctx, 1)
        slope, beta_slope = _CenteredSoftplusFunction._derivatives(ctx, with_beta=wants_beta)
        grad_x = grad * slope if ctx.needs_input_grad[0] else None
        grad_log_beta = None
        if wants_beta:
            assert beta_slope is not None  # computed with_beta
            log_beta = ctx.saved_tensors[0]
            # summed in float32: one float16 term is finite, a sum over a batch of them may not be
            grad_log_beta = (grad.to(beta_slope.dtype) * beta_slope).sum().to(log_beta.dtype)
        return grad_x, grad_log_beta

    @staticmethod
    def _backward_in_place(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The same values with three activation-sized temporaries instead of six: a plain
        backward (no graph of its own) at the first layers of a large batch peaks here."""
        log_beta, output = ctx.saved_tensors
        beta = float(log_beta.exp())
        soft = output.mul(beta).add_(LOG2).clamp_min_(0.0)
        slope = soft.neg().exp_().neg_().add_(1.0)
        grad_x = grad * slope if ctx.needs_input_grad[0] else None
        grad_log_beta = None
        if ctx.needs_input_grad[1]:
            # beta (x slope - y) = log 2 - soft (1 - slope) + slope log(slope), as in _derivatives
            term = slope.clamp_min(1e-30).log_().mul_(slope)
            soft.mul_(slope.neg_().add_(1.0))
            term.sub_(soft).add_(LOG2)
            grad_log_beta = (torch.dot(grad.reshape(-1), term.view(-1)) / beta).to(log_beta.dtype)
        return grad_x, grad_log_beta

    @staticmethod
    def jvp(ctx, x_tangent: torch.Tensor | None, log_beta_tangent: torch.Tensor | None) -> torch.Tensor:
        slope, beta_slope = _CenteredSoftplusFunction._derivatives(ctx, with_beta=log_beta_tangent is not None)
        output = ctx.saved_tensors[1]
        tangent = torch.zeros_like(output)
        if x_tangent is not None:
            tangent = tangent + x_tangent * slope
        if log_beta_tangent is not None:
            assert beta_slope is not None  # computed with_beta
            tangent = tangent + (log_beta_tangent.to(beta_slope.dtype) * beta_slope).to(output.dtype)
        return tangent


def engine_needs(ctx, index: int) -> bool:
    """Whether this backward pass reaches input ``index``'s gradient (in an autograd.Function's
    backward). torch.autograd.grad(loss, images, create_graph=True) (the gradient-norm penalty)
    asks only for the input's gradient: building a parameter's there would only add nodes to a
    graph nobody differentiates."""
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):  # private API: assume needed where it is not there
        return True


def _records_autograd(x: torch.Tensor, log_beta: torch.Tensor) -> bool:
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return False
    return torch.is_grad_enabled() and (x.requires_grad or log_beta.requires_grad)


class CenteredSoftplus(SmoothActivation):
    """s_beta(x) = (softplus(beta * x) - log 2) / beta, with a learnable log beta.

    ``shift`` is a constant added to the output; it is 0 for converted ReLUs and log(2)/beta0 for
    converted plain softplus layers, so that replacing ``nn.Softplus(beta0)`` preserves the function
    (and needs no calibration: ``calibrated`` defaults to ``shift == 0``).
    """

    def __init__(
        self, beta: float = 100.0, learnable: bool = True, shift: float = 0.0, calibrated: bool | None = None
    ) -> None:
        super().__init__(beta, learnable, calibrated=not shift if calibrated is None else calibrated)
        self.shift = float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_beta = self.log_beta.clamp(LOG_CLAMP_MIN, LOG_CLAMP_MAX)
        if _records_autograd(x, log_beta):
            y = _CenteredSoftplusFunction.apply(x, log_beta)
        elif _can_fuse(x, log_beta):
            y = _fused_centered_softplus(x, float(log_beta.exp()))
        else:
            y = _centered_softplus(x, log_beta.exp().to(x.dtype))
        if self.shift:
            y = y + self.shift
        return y

    @property
    def label(self) -> str:
        return "softplus (exact)" if self.shift else "centered softplus"

    def lipschitz_constant(self) -> float:
        return 1.0

    def curvature_constant(self) -> float:
        """Largest second derivative, beta/4, reached at x = 0."""
        return self.frozen_beta() / 4.0

    def inference_form(self) -> nn.Module:
        from .inference import FrozenCenteredSoftplus

        return FrozenCenteredSoftplus(self.frozen_beta(), self.shift)

    def curvature_stand_in(self) -> nn.Module:
        from ..input_hessian import FixedBetaSoftplus

        return FixedBetaSoftplus(self.frozen_beta(), self.shift)

    def extra_repr(self) -> str:
        text = f"beta={self.frozen_beta():.4g}"
        return text + (f", shift={self.shift:.4g}" if self.shift else "")
