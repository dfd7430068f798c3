"""Convolutions and linear layers divided by their operator spectral norm.

A linear layer's norm, and a 1x1 unpadded convolution's (a matrix applied at every pixel kept by
the stride), is the largest singular value of its weight matrix, computed exactly. Any other
convolution's norm depends on the size of its input (padding and stride), so it is found by
Lanczos iteration on A^T A, where A is the operator itself applied to one example of the layer's
real input shape; A^T comes from autograd, which makes it exact for any stride, dilation, groups
and padding mode. Lanczos (with full reorthogonalisation) converges in far fewer steps than power
iteration on the dense top spectrum of a convolution, and like it never over-estimates the norm.
In training, one power-iteration step per forward pass follows the weights as they move.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import EllipsisType

import torch
import torch.nn.functional as F
from torch import nn

from .centered_softplus import engine_needs

CONVERSION_ITERATIONS = 64
# Relative change of the top Ritz value (sigma^2) at which Lanczos stops.
CONVERSION_TOLERANCE = 1e-5
REORTHOGONALIZE_BELOW = 0.5**0.5


# The smallest sigma a layer divides by. Dividing by a smaller one would only make the normalized
# norm smaller than 1 (the bound still holds), while W / sigma(W) is singular at W = 0: a layer
# whose weight starts at zero would get an enormous first gradient step and overflow.
MIN_SIGMA = 1e-3

# The layers NormalizedConv normalizes.
ConvLayer = nn.Conv1d | nn.Conv2d | nn.Conv3d


def top_singular_pair(matrices: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """Largest singular value over a batch of matrices (groups, out, in), the index of the matrix
    that has it, and its unit right singular vector; from the smaller Gram matrix in float64."""
    matrices = matrices.double()
    wide = matrices.shape[-1] > matrices.shape[-2]
    gram = matrices @ matrices.mT if wide else matrices.mT @ matrices
    values, vectors = torch.linalg.eigh(gram)
    index = int(values[:, -1].argmax())
    top = max(float(values[index, -1]), 0.0)
    vector = vectors[index, :, -1]
    if wide:  # a left singular vector u: the right one is W^T u / sigma
        vector = matrices[index].mT @ vector
    norm = vector.norm()
    if norm > 0:
        vector = vector / norm
    else:
        vector = torch.zeros_like(vector)
        vector[0] = 1.0
    return math.sqrt(top), index, vector


def top_singular_value(
    gram: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    iterations: int = CONVERSION_ITERATIONS,
    tolerance: float = CONVERSION_TOLERANCE,
) -> tuple[float, torch.Tensor]:
    """sqrt of the largest eigenvalue of the PSD map ``gram`` (A^T A), and its unit Ritz vector.

    Lanczos with full reorthogonalisation: the basis is kept (iterations vectors of the input's
    size), so a stop on a small change of the top Ritz value is not fooled the way power iteration
    is by a start vector nearly orthogonal to the top singular vector: the Krylov space holds every
    direction the map has shown. Ritz values never exceed the true top eigenvalue.
    """
    shape = start.shape
    basis = torch.empty((iterations, start.numel()), dtype=start.dtype, device=start.device)
    basis[0] = (start / start.norm()).flatten()
    diagonal: list[float] = []
    off_diagonal: list[float] = []
    top, settled, size = 0.0, 0, 1
    ritz = torch.ones(1, dtype=torch.float64)
    for step in range(iterations):
        image = gram(basis[step].view(shape)).flatten()
        diagonal.append(float(basis[step] @ image))
        stacked = basis[: step + 1]
        # Classical Gram-Schmidt, repeated only when it cancelled most of the vector (Daniel et
        # al.'s test; "twice is enough"): each pass reads the whole basis, and one usually suffices.
        for _ in range(2):
            before = image.norm()
            image = image - stacked.T @ (stacked @ image)
            if image.norm() > REORTHOGONALIZE_BELOW * before:
                break
        tridiagonal = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
        if off_diagonal:
            links = torch.tensor(off_diagonal, dtype=torch.float64)
            tridiagonal += torch.diag(links, 1) + torch.diag(links, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        previous, top = top, max(float(values[-1]), 0.0)
        ritz, size = vectors[:, -1], step + 1
        residual = float(image.norm())
        if residual <= 1e-12 * max(top, 1e-30) or step + 1 == iterations:
            break  # an invariant subspace: the top eigenvalue in it is exact
        settled = settled + 1 if step > 0 and top - previous <= tolerance * top else 0
        if settled == 2:
            break
        off_diagonal.append(residual)
        basis[step + 1] = image / residual
    top_vector = basis[:size].T @ ritz.to(basis.dtype)  # once: it reads the whole basis
    norm = top_vector.norm()
    if norm > 0:
        top_vector = top_vector / norm
    else:
        top_vector = basis[0].clone()
    return math.sqrt(top), top_vector.view(shape)


def single_tap(
    spatial: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, ...] | None:
    """The kernel tap every output of a zero-padded conv reads, when that is one tap: a one-pixel
    input (a 3x3 conv at layer4 of a ResNet fed 32x32 images) whose padding yields a one-pixel
    output sees only the tap that lands on the pixel. The conv is then a 1x1 one with that tap's
    matrix, about ten times faster through double backward on CPU than the padded 3x3."""
    taps = []
    for size, k, s, pad, d in zip(spatial, kernel_size, stride, padding, dilation):
        if size != 1 or (size + 2 * pad - d * (k - 1) - 1) // s != 0 or pad % d or pad // d >= k:
            return None
        taps.append(pad // d)
    return tuple(taps)


def tap_index(taps: Sequence[int]) -> tuple[EllipsisType | slice, ...]:
    """The index of a conv weight that keeps only the kernel tap ``taps`` (a kernel of size 1)."""
    return (..., *(slice(t, t + 1) for t in taps))


class _DivideBySigma(torch.autograd.Function):
    """y / sigma for a scalar sigma, keeping the quotient for backward instead of y.

    A layer whose forward computed op(x, W / sigma) kept a normalized copy of its whole weight
    alive until backward (45 MB for a ResNet-18). op(x, W) / sigma = op(x, W / sigma) for a linear
    op, and the quotient is what the next layer keeps anyway, so this keeps nothing of its own.
    """

    @staticmethod
    def forward(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return y / sigma

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1], output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        sigma, quotient = ctx.saved_tensors
        grad_sigma = None
        if ctx.needs_input_grad[1] and engine_needs(ctx, 1):
            # d(y / sigma) / d sigma = -y / sigma^2 = -quotient / sigma, summed in float32: a
            # float16 sum over a batch can overflow where each term does not
            total = (grad * quotient).sum(dtype=torch.promote_types(grad.dtype, torch.float32))
            grad_sigma = -total.to(sigma.dtype).reshape(sigma.shape) / sigma
        return grad / sigma, grad_sigma


class _OperatorNormalized(nn.Module):
    """Shared machinery: weight / sigma(weight), optionally times an explicit slope ``scale``.

    ``sigma`` is the stored norm estimate used in eval mode; in train mode every forward pass runs
    one more power-iteration step (as spectral normalisation does) and uses a sigma that is
    differentiable with respect to the weight. ``scale`` exists only where no BatchNorm follows to
    absorb the layer's original slope; it is the layer's Lipschitz constant.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    scale: nn.Parameter | None
    # buffers (registered in _init_normalization)
    sigma: torch.Tensor
    input_shape: torch.Tensor
    _power_vector: torch.Tensor | None
    # within one_norm_per_step: the step's differentiable sigma, once computed (None: not yet)
    _step_sigma: torch.Tensor | None = None
    _sharing_sigma: bool = False

    def _init_normalization(self, input_shape: Sequence[int], explicit_scale: bool) -> None:
        self.register_buffer("sigma", torch.ones((), device=self.weight.device))
        self.register_buffer("input_shape", torch.tensor(list(input_shape), dtype=torch.long))
        self.register_buffer("_power_vector", None, persistent=False)
        self.scale = nn.Parameter(torch.ones((), device=self.weight.device)) if explicit_scale else None

    def _operator(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _image_and_gram(self, vector: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A v, A^T A v), A^T from autograd."""
        with torch.enable_grad():
            vector = vector.detach().requires_grad_(True)
            image = self._operator(vector, weight)
            (gram,) = torch.autograd.grad(image, vector, image)
        return image.detach(), gram

    def _power_step(self, vector: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T A v / ||A^T A v||, ||A v||) for a unit vector v."""
        image, gram = self._image_and_gram(vector, weight)
        norm = gram.norm()
        # An all-zero weight (a zero-initialised head) maps every vector to 0: keep the old vector
        # rather than a zero one, from which the iteration could never recover once the weight grows.
        next_vector = torch.where(norm > 0, gram / norm.clamp_min(1e-30), vector.detach())
        return next_vector, image.norm()

    def _start_vector(self, shape: Sequence[int]) -> torch.Tensor:
        vector = self._power_vector
        if vector is None or tuple(vector.shape[1:]) != tuple(shape):
            generator = torch.Generator(device="cpu").manual_seed(0)
            vector = torch.randn((1, *shape), generator=generator).to(self.weight)
            vector = vector / vector.norm()
        return vector

    def _matrix_norm(self, weight: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        """(exact norm, top right singular vector) when the operator is a plain matrix."""
        return None

    @torch.no_grad()
    def estimate_operator_norm(
        self,
        iterations: int = CONVERSION_ITERATIONS,
        tolerance: float = CONVERSION_TOLERANCE,
        weight: torch.Tensor | None = None,
    ) -> float:
        """||A|| of ``weight`` (default: the raw weight): exact for matrices, else by Lanczos."""
        weight = self.weight.detach() if weight is None else weight.detach()
        stored_dtype = weight.dtype
        if stored_dtype in (torch.float16, torch.bfloat16):
            # A^T A v overflows float16 once ||A|| passes ~256, and bfloat16's 8 bits of mantissa
            # leave sigma ~10% off: iterate in float32.
            weight = weight.float()
        exact = self._matrix_norm(weight)
        if exact is not None:
            estimate, vector = exact
            self._power_vector = vector.to(stored_dtype)
            return estimate
        start = self._start_vector(self.input_shape.tolist()).to(weight.dtype)
        estimate, vector = top_singular_value(
            lambda v: self._image_and_gram(v, weight)[1], start, iterations, tolerance
        )
        self._power_vector = vector.to(stored_dtype)
        return estimate

    def _training_sigma(self, input_shape: Sequence[int]) -> torch.Tensor:
        if self._sharing_sigma and self._step_sigma is not None:
            return self._step_sigma
        sigma = self._next_training_sigma(input_shape)
        if self._sharing_sigma:
            self._step_sigma = sigma
        return sigma

    def _next_training_sigma(self, input_shape: Sequence[int]) -> torch.Tensor:
        if self._power_vector is None or tuple(self._power_vector.shape[1:]) != tuple(input_shape):
            self.input_shape = torch.tensor(list(input_shape), dtype=torch.long)
            self.estimate_operator_norm()
        assert self._power_vector is not None  # estimate_operator_norm sets it
        vector, _ = self._power_step(self._power_vector, self.weight.detach())
        self._power_vector = vector
        # sqrt of a clamped sum of squares: norm() has a 0/0 gradient at an all-zero weight
        sigma = self._operator(vector, self.weight).square().sum().clamp_min(MIN_SIGMA**2).sqrt()
        with torch.no_grad():
            self.sigma.copy_(sigma)
        return sigma

    def normalized_weight(self, input_shape: Sequence[int] | None = None) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            sigma = self._training_sigma(input_shape or self.input_shape.tolist())
        else:
            sigma = self.sigma
        return self.weight / sigma.clamp_min(MIN_SIGMA)

    def _normalized_operator(self, x: torch.Tensor, input_shape: Sequence[int] | None = None) -> torch.Tensor:
        """A(x) with the normalized weight; in training the division follows the operator."""
        if self.training and torch.is_grad_enabled():
            sigma = self._training_sigma(input_shape or self.input_shape.tolist()).clamp_min(MIN_SIGMA)
            return _DivideBySigma.apply(self._operator(x, self.weight), sigma.to(x.dtype))
        return self._operator(x, self.normalized_weight())

    def lipschitz_constant(self) -> float:
        return abs(float(self.scale.detach())) if self.scale is not None else 1.0

    def curvature_constant(self) -> float:
        return 0.0

    @torch.no_grad()
    def _normalize_from(self, source: ConvLayer | nn.Linear, sigma: float | None) -> float:
        """Copy ``source``'s parameters and divide them by its operator norm.

        With an explicit scale, scale = sigma and the layer is unchanged. Without one, the bias is
        divided by sigma as well and the caller must let the next layer absorb 1/sigma.
        """
        self.weight.copy_(source.weight)
        if sigma is None:
            sigma = self.estimate_operator_norm()
            if sigma < MIN_SIGMA:
                # an all-zero weight (a zero-initialised head): any sigma keeps the function, and
                # 1 leaves an explicit scale of 1 to learn from
                sigma = 1.0 if not self.weight.any() else MIN_SIGMA
        self.sigma.fill_(sigma)
        if self.bias is not None:
            assert source.bias is not None  # the layer has a bias exactly when its source has one
            self.bias.copy_(source.bias if self.scale is not None else source.bias / sigma)
        if self.scale is not None:
            self.scale.fill_(sigma)
        return sigma


@contextmanager
def one_norm_per_step(model: nn.Module) -> Iterator[None]:
    """Every forward pass inside uses the first one's differentiable sigma per normalized layer:
    a training step that runs the model twice (the gradient-norm penalty's extra pass over part of
    the batch) takes one power-iteration step per layer, as a step with one pass does, and the
    two passes' gradients meet in one sigma."""
    layers = [m for m in model.modules() if isinstance(m, _OperatorNormalized)]
    for layer in layers:
        layer._sharing_sigma, layer._step_sigma = True, None
    try:
        yield
    finally:
        for layer in layers:
            layer._sharing_sigma, layer._step_sigma = False, None


class NormalizedConv(_OperatorNormalized):
    """A Conv1d/2d/3d whose weight is divided by its operator norm at the layer's input size."""

    def curvature_stand_in(self) -> nn.Module | None:
        from ..input_hessian import InputGradientConv

        return InputGradientConv.from_conv(self)

    def __init__(self, conv: ConvLayer, input_shape: Sequence[int], explicit_scale: bool) -> None:
        super().__init__()
        self.dims = conv.weight.dim() - 2
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice: list[int] | None = getattr(
            conv, "_reversed_padding_repeated_twice", None
        )
        self.weight = nn.Parameter(torch.empty_like(conv.weight))
        self.bias = nn.Parameter(torch.empty_like(conv.bias)) if conv.bias is not None else None
        self._init_normalization(input_shape, explicit_scale)

    @classmethod
    def from_conv(
        cls,
        conv: ConvLayer,
        input_shape: Sequence[int],
        explicit_scale: bool,
        sigma: float | None = None,
    ) -> tuple[NormalizedConv, float]:
        layer = cls(conv, input_shape, explicit_scale)
        return layer, layer._normalize_from(conv, sigma)

    def _single_tap(self, spatial: Sequence[int]) -> tuple[int, ...] | None:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        return single_tap(spatial, self.kernel_size, self.stride, self.padding, self.dilation)

    def _matrix_norm(self, weight: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        """A 1x1 convolution without padding applies one matrix (per group) at every pixel the
        stride keeps: its norm is that matrix's, and the top vector sits at pixel 0. So does any
        conv whose input and output are one pixel, with the tap it reads."""
        unpadded = self.padding in ("valid", "same") or not any(self.padding)
        taps = self._single_tap(self.input_shape.tolist()[1:])
        if taps is not None:
            weight = weight[tap_index(taps)]
        elif any(k != 1 for k in self.kernel_size) or not unpadded:
            return None
        matrices = weight.reshape(self.groups, self.out_channels // self.groups, -1)
        norm, group, top = top_singular_pair(matrices)
        vector = torch.zeros((1, *self.input_shape.tolist()), dtype=weight.dtype, device=weight.device)
        width = self.in_channels // self.groups
        index: tuple[int | slice, ...] = (0, slice(group * width, (group + 1) * width), *([0] * self.dims))
        vector[index] = top.to(vector)
        return norm, vector

    def _operator(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        eager = not (isinstance(x, torch.fx.Proxy) or tracing)  # a traced graph keeps the general conv
        taps = self._single_tap(x.shape[2:]) if eager else None
        if taps is not None:
            return conv(x, weight[tap_index(taps)], None, 1, 0, 1, self.groups)
        if self.padding_mode != "zeros":
            assert self._reversed_padding_repeated_twice is not None  # every torch conv sets it
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, weight, None, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._normalized_operator(x, x.shape[1:])
        if self.scale is not None:
            y = y * self.scale
        return y + self.bias.view(-1, *([1] * self.dims)) if self.bias is not None else y

    def inference_form(self) -> nn.Module:
        """A plain conv with the eval-mode weight (weight / sigma, times the scale) as its weight:
        exported, a Conv on a constant instead of the Clip and Div that normalise it at every run."""
        # Callable[...]: torch types Conv2d's sizes as 2-tuples, the stored ones as tuple[int, ...]
        # (here of the length the class needs)
        conv_types: tuple[Callable[..., ConvLayer], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        conv_type = conv_types[self.dims - 1]
        conv = conv_type(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(_folded_weight(self))
            if self.bias is not None:
                assert conv.bias is not None  # built with bias=True
                conv.bias.copy_(self.bias)
        return conv.eval()

    def extra_repr(self) -> str:
        scale = f", scale={float(self.scale.detach()):.4g}" if self.scale is not None else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, groups={self.groups}, sigma={float(self.sigma):.4g}{scale}"
        )


class NormalizedLinear(_OperatorNormalized):
    """An nn.Linear divided by its spectral norm (independent of the input size)."""

    def __init__(self, linear: nn.Linear, explicit_scale: bool) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(torch.empty_like(linear.weight))
        self.bias = nn.Parameter(torch.empty_like(linear.bias)) if linear.bias is not None else None
        self._init_normalization((linear.in_features,), explicit_scale)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, explicit_scale: bool, sigma: float | None = None
    ) -> tuple[NormalizedLinear, float]:
        layer = cls(linear, explicit_scale)
        return layer, layer._normalize_from(linear, sigma)

    def _matrix_norm(self, weight: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        norm, _, vector = top_singular_pair(weight.unsqueeze(0))
        return norm, vector.to(weight).unsqueeze(0)

    def _operator(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._normalized_operator(x)
        if self.scale is not None:
            y = y * self.scale
        return y + self.bias if self.bias is not None else y

    def inference_form(self) -> nn.Module:
        """A plain linear layer with the eval-mode weight (see NormalizedConv.inference_form)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(_folded_weight(self))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.eval()

    def extra_repr(self) -> str:
        scale = f", scale={float(self.scale.detach()):.4g}" if self.scale is not None else ""
        return f"{self.in_features}, {self.out_features}, sigma={float(self.sigma):.4g}{scale}"


def _folded_weight(layer: _OperatorNormalized) -> torch.Tensor:
    with torch.no_grad():
        weight = layer.weight / layer.sigma.clamp_min(MIN_SIGMA)
        return weight * layer.scale if layer.scale is not None else weight
