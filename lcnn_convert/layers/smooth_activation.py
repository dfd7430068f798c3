"""Curvature-controlled activations: one learnable sharpness beta, constants in closed form.

Every LCNN activation is a ``SmoothActivation``: beta = exp(log beta), clamped to [BETA_MIN,
BETA_MAX], with its Lipschitz and curvature constants as functions of beta. Two kinds:

- ``ScaledActivation``: f(x) = g(0) + (g(beta x) - g(0)) / beta for a smooth g (SiLU, GELU, Mish,
  ELU, sigmoid, ...). At beta = 1 it *is* g, so converting g is exact; its slope is g's and its
  curvature is beta times g's, so lowering beta flattens it towards the line g(0) + g'(0) x.
- ``SmoothPiecewiseLinear`` and ``SmoothHardswish``: a piecewise-linear activation (ReLU6, leaky
  ReLU, hard sigmoid, hardtanh, hardswish) with each ReLU kink rounded by a smooth ReLU r_beta, the
  centered softplus (softplus(beta z) - log 2) / beta or the swish z sigmoid(beta z). They equal the
  original only as beta -> infinity, so conversion calibrates beta like the centered softplus'.

The constants of r (slope range, peak curvature, ...) are measured once in float64 on a fine grid and
rounded outwards (tests/test_activations.py checks every constant against autograd).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG2 = math.log(2.0)
# The centered softplus's peak |f''| per unit of beta: the unit of every family's beta penalty.
REFERENCE_CURVATURE = 0.25
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


class SmoothActivation(nn.Module):
    """The LCNN activation protocol: a learnable log beta and what the rest of the package asks of it.

    ``calibrated`` says whether conversion calibrates beta (the family holds the original only as a
    limit) or keeps the initial beta (the family holds the original exactly there).
    """

    regulariser = "beta"

    def __init__(self, beta: float, learnable: bool = True, calibrated: bool = True) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        log_beta = torch.tensor(min(max(math.log(beta), LOG_BETA_MIN), LOG_BETA_MAX))
        if learnable:
            self.log_beta = nn.Parameter(log_beta)
        else:
            self.register_buffer("log_beta", log_beta)
        self.calibrated = bool(calibrated)

    @property
    def beta(self) -> torch.Tensor:
        return self.log_beta.clamp(LOG_CLAMP_MIN, LOG_CLAMP_MAX).exp()

    @torch.no_grad()
    def set_beta(self, beta: float) -> None:
        self.log_beta.fill_(min(max(math.log(float(beta)), LOG_BETA_MIN), LOG_BETA_MAX))

    def frozen_beta(self) -> float:
        return float(self.beta.detach())

    @property
    def label(self) -> str:
        """What the layer is, for reports: "centered softplus", "swish", "gelu (exact)", ..."""
        return type(self).__name__

    @property
    def sharpness_per_beta(self) -> float:
        """Peak |f''| per unit of beta, over the centered softplus's (1/4). The penalty on beta times
        this weighs the same shape the same in every family: x sigmoid(beta x) is as sharp as the
        centered softplus at twice its beta, so a plain beta penalty would leave it twice as sharp."""
        return 1.0

    def regulariser_term(self) -> torch.Tensor:
        """What fine-tuning adds to the loss (times lambda_beta): beta, as in the paper, in the
        centered softplus's units of peak curvature (``sharpness_per_beta``)."""
        return self.beta * self.sharpness_per_beta

    def lipschitz_constant(self) -> float:
        raise NotImplementedError

    def curvature_constant(self) -> float:
        raise NotImplementedError

    def inference_form(self) -> nn.Module:
        """The same function with beta a constant, for export (eval use only)."""
        raise NotImplementedError

    def curvature_stand_in(self) -> nn.Module:
        """What input-Hessian measurement runs in this layer's place (eval use only)."""
        return self.inference_form()


# ---------------------------------------------------------------------------------------------
# Smooth functions g with their constants: slope range over the reals, peak |g''|.


@dataclass(frozen=True)
class SmoothFunction:
    """g with g(0), its slope range [slope_min, slope_max] and sup |g''|, for ScaledActivation.

    ``saturating`` functions (sigmoid, tanh, softsign: bounded, often gates) are scaled inside
    only, g(beta x), which keeps their range: a gate stays in (0, 1) and tends to the constant
    g(0) as beta falls, where the outer form would let it leave the range.
    """

    function: Callable[..., torch.Tensor]
    value_at_zero: Callable[..., float]
    slope_range: Callable[..., tuple[float, float]]
    curvature: Callable[..., float]
    saturating: bool = False


def _constant(value: float) -> Callable[..., float]:
    return lambda **parameters: value


SELU_SCALE, SELU_ALPHA = 1.0507009873554805, 1.6732632423543772

# Measured in float64 on [-60, 60] at 5e-5 spacing, rounded outwards.
SMOOTH_FUNCTIONS: dict[str, SmoothFunction] = {
    "silu": SmoothFunction(F.silu, _constant(0.0), lambda: (-0.09984, 1.09984), _constant(0.5)),
    "gelu": SmoothFunction(
        lambda x, approximate="none": F.gelu(x, approximate=approximate),
        _constant(0.0),
        lambda approximate="none": (-0.12900, 1.12900),
        _constant(0.79789),
    ),
    "mish": SmoothFunction(F.mish, _constant(0.0), lambda: (-0.11253, 1.08850), _constant(0.64421)),
    "sigmoid": SmoothFunction(torch.sigmoid, _constant(0.5), lambda: (0.0, 0.25), _constant(0.096226), True),
    "tanh": SmoothFunction(torch.tanh, _constant(0.0), lambda: (0.0, 1.0), _constant(0.76981), True),
    "softsign": SmoothFunction(F.softsign, _constant(0.0), lambda: (0.0, 1.0), _constant(2.0), True),
    # x > 0: x; x <= 0: alpha (exp(x) - 1), whose second derivative is at most alpha
    "elu": SmoothFunction(
        lambda x, alpha=1.0: F.elu(x, alpha),
        _constant(0.0),
        lambda alpha=1.0: (0.0, max(1.0, alpha)),
        lambda alpha=1.0: alpha,
    ),
    # x <= 0: alpha (exp(x / alpha) - 1): slope at most 1, curvature at most 1 / alpha
    "celu": SmoothFunction(
        lambda x, alpha=1.0: F.celu(x, alpha),
        _constant(0.0),
        lambda alpha=1.0: (0.0, 1.0),
        lambda alpha=1.0: 1 / alpha,
    ),
    "selu": SmoothFunction(
        F.selu, _constant(0.0), lambda: (0.0, SELU_SCALE * SELU_ALPHA), _constant(SELU_SCALE * SELU_ALPHA)
    ),
}


class ScaledActivation(SmoothActivation):
    """f(x) = g(0) + (g(beta x) - g(0)) / beta: g itself at beta = 1, flatter below it.

    Slope range: g's (f'(x) = g'(beta x)); curvature: beta sup |g''|. With g = SiLU and beta
    calibrated, x sigmoid(beta x) is also a smooth ReLU (the ``swish`` LCNN activation).
    Saturating g (sigmoid, tanh) are f(x) = g(beta x) instead: slope beta g', curvature beta^2 sup|g''|.
    """

    def __init__(
        self,
        function: str,
        beta: float = 1.0,
        learnable: bool = True,
        calibrated: bool = False,
        **parameters: float | str,
    ) -> None:
        super().__init__(beta, learnable, calibrated)
        if function not in SMOOTH_FUNCTIONS:
            raise ValueError(f"unknown smooth function '{function}'; known: {', '.join(SMOOTH_FUNCTIONS)}")
        self.function = function
        self.parameters_of_function = dict(parameters)
        spec = SMOOTH_FUNCTIONS[function]
        self._g = spec.function
        self.offset = float(spec.value_at_zero(**parameters))

    @property
    def label(self) -> str:
        if self.function == "silu" and self.calibrated:
            return "swish"
        return f"{self.function} (exact)"

    def _spec(self) -> SmoothFunction:
        return SMOOTH_FUNCTIONS[self.function]

    @property
    def sharpness_per_beta(self) -> float:
        return self._spec().curvature(**self.parameters_of_function) / REFERENCE_CURVATURE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta.to(x.dtype)
        if self.function == "silu":
            return x * torch.sigmoid(x * beta)  # silu(beta x) / beta, which overflows where beta x does
        y = self._g(x * beta, **self.parameters_of_function)
        if self._spec().saturating:
            return y
        if self.offset:
            return self.offset + (y - self.offset) / beta
        return y / beta

    def lipschitz_constant(self) -> float:
        low, high = self._spec().slope_range(**self.parameters_of_function)
        return max(abs(low), abs(high)) * (self.frozen_beta() if self._spec().saturating else 1.0)

    def curvature_constant(self) -> float:
        beta = self.frozen_beta()
        return beta ** (2 if self._spec().saturating else 1) * self._spec().curvature(**self.parameters_of_function)

    def inference_form(self) -> nn.Module:
        return FrozenScaledActivation(self.function, self.frozen_beta(), self.offset, self.parameters_of_function)

    def extra_repr(self) -> str:
        parameters = "".join(f", {name}={value}" for name, value in self.parameters_of_function.items())
        return f"{self.function}{parameters}, beta={self.frozen_beta():.4g}" + (
            ", calibrated" if self.calibrated else ""
        )


class FrozenScaledActivation(nn.Module):
    """ScaledActivation with beta a constant. At beta = 1 it is g itself (the original's export);
    SiLU's family is written x sigmoid(beta x), the pattern onnxruntime fuses."""

    def __init__(self, function: str, beta: float, offset: float, parameters: dict) -> None:
        super().__init__()
        self.function, self.beta, self.offset = function, float(beta), float(offset)
        self.parameters_of_function = dict(parameters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = SMOOTH_FUNCTIONS[self.function].function
        if self.beta == 1.0:
            return g(x, **self.parameters_of_function)
        if self.function == "silu":
            return x * torch.sigmoid(x * self.beta)
        y = g(x * self.beta, **self.parameters_of_function)
        if SMOOTH_FUNCTIONS[self.function].saturating:
            return y
        return self.offset + (y - self.offset) / self.beta if self.offset else y / self.beta

    def extra_repr(self) -> str:
        return f"{self.function}, beta={self.beta:.4g}"


# ---------------------------------------------------------------------------------------------
# Smooth ReLUs r_beta(z) = r(beta z) / beta that round the kinks of piecewise-linear activations.


@dataclass(frozen=True)
class SmoothRelu:
    """A smooth ReLU r and its constants (beta-free: r_beta's are these, curvature times beta).

    slope_range: of r'; curvature: sup |r''|; moment: sup |u r''(u)|; tail: sup over w >= 0 of
    w max(|1 - r'(w)|, |r'(-w)|) (how fast the slope settles); deviation: sup |r(u) - relu(u)|.
    """

    name: str
    function: Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]
    slope_range: tuple[float, float]
    curvature: float
    moment: float
    tail: float
    deviation: float


LOW_PRECISION = (torch.float16, torch.bfloat16)


def _softplus_relu(z: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """(softplus(beta z) - log 2) / beta by torch's softplus, whose double backward is one native
    kernel and right at z = 0; in float32 for half-precision inputs, where beta z can overflow."""
    if z.dtype in LOW_PRECISION:
        beta = beta.float() if isinstance(beta, torch.Tensor) else beta
        return _softplus_relu(z.float(), beta).to(z.dtype)
    # past the threshold softplus(u) is u: below float32's resolution at 20, float64's at 40
    threshold = 40.0 if z.dtype == torch.float64 else 20.0
    return (F.softplus(z * beta, threshold=threshold) - LOG2) / beta


def _swish_relu(z: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    return z * torch.sigmoid(z * beta)


SMOOTH_RELUS: dict[str, SmoothRelu] = {
    "centered_softplus": SmoothRelu(
        "centered_softplus", _softplus_relu, (0.0, 1.0), REFERENCE_CURVATURE, 0.22388, 0.27847, LOG2
    ),
    "swish": SmoothRelu("swish", _swish_relu, (-0.09984, 1.09984), 0.5, 0.30240, 0.26460, 0.27847),
}


def _slope_interval(slope: float, weights: Sequence[float], low: float, high: float) -> tuple[float, float]:
    """The range of slope + sum_k w_k r'(.) when each r' lies anywhere in [low, high]."""
    least = slope + sum(min(w * low, w * high) for w in weights)
    most = slope + sum(max(w * low, w * high) for w in weights)
    return least, most


class SmoothPiecewiseLinear(SmoothActivation):
    """f(x) = value_at_zero + slope x + sum_k w_k (r_beta(x - k_k) - r_beta(-k_k)).

    With r = ReLU this is any continuous piecewise-linear activation (ReLU6: kinks 0 and 6, weights
    1 and -1; leaky ReLU(a): slope a, kink 0 with weight 1 - a; hard sigmoid: kinks -3 and 3, weights
    1/6 and -1/6, value 1/2 at 0); r_beta rounds each kink and f(0) stays exact. Constants (upper
    bounds): slope from interval arithmetic over the r' ranges, curvature beta sup|r''| sum |w_k|.
    """

    def __init__(
        self,
        kinks: Sequence[float],
        weights: Sequence[float],
        slope: float = 0.0,
        value_at_zero: float = 0.0,
        beta: float = 100.0,
        relu: str = "centered_softplus",
        learnable: bool = True,
    ) -> None:
        super().__init__(beta, learnable, calibrated=True)
        if len(kinks) != len(weights) or not kinks:
            raise ValueError("one weight per kink, and at least one kink")
        self.kinks = tuple(float(k) for k in kinks)
        self.weights = tuple(float(w) for w in weights)
        self.slope, self.value_at_zero = float(slope), float(value_at_zero)
        self.relu = SMOOTH_RELUS[relu]

    @property
    def label(self) -> str:
        return f"piecewise-linear, {self.relu.name.replace('_', ' ')} kinks"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _piecewise(x, self.beta.to(x.dtype), self)

    def lipschitz_constant(self) -> float:
        least, most = _slope_interval(self.slope, self.weights, *self.relu.slope_range)
        return max(abs(least), abs(most))

    def curvature_constant(self) -> float:
        return self.frozen_beta() * self.relu.curvature * sum(abs(w) for w in self.weights)

    @property
    def sharpness_per_beta(self) -> float:
        return self.relu.curvature * sum(abs(w) for w in self.weights) / REFERENCE_CURVATURE

    def inference_form(self) -> nn.Module:
        return _FrozenPiecewise(self, self.frozen_beta())

    def extra_repr(self) -> str:
        return (
            f"kinks={self.kinks}, weights={tuple(round(w, 4) for w in self.weights)}, slope={self.slope:g}, "
            f"value_at_zero={self.value_at_zero:g}, relu={self.relu.name}, beta={self.frozen_beta():.4g}"
        )


def _piecewise(
    x: torch.Tensor, beta: torch.Tensor | float, spec: SmoothPiecewiseLinear | _PiecewiseSpec
) -> torch.Tensor:
    r = spec.relu.function
    y = x * spec.slope + spec.value_at_zero if spec.slope else None
    for kink, weight in zip(spec.kinks, spec.weights):
        at_zero = r(x.new_tensor(-kink), beta)  # keeps f(0) exact at every beta
        term = (r(x - kink, beta) - at_zero) * weight
        y = term + spec.value_at_zero if y is None else y + term
    assert y is not None  # a spec has at least one kink
    return y


class _FrozenPiecewise(nn.Module):
    def __init__(self, layer: SmoothPiecewiseLinear, beta: float) -> None:
        super().__init__()
        self.layer_spec = _PiecewiseSpec(layer.kinks, layer.weights, layer.slope, layer.value_at_zero, layer.relu)
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _piecewise(x, self.beta, self.layer_spec)


@dataclass(frozen=True)
class _PiecewiseSpec:
    kinks: tuple[float, ...]
    weights: tuple[float, ...]
    slope: float
    value_at_zero: float
    relu: SmoothRelu


class PiecewiseConstants(TypedDict):
    kinks: tuple[float, ...]
    weights: tuple[float, ...]
    value_at_zero: float


HARD_SIGMOID: PiecewiseConstants = {"kinks": (-3.0, 3.0), "weights": (1 / 6, -1 / 6), "value_at_zero": 0.5}


class SmoothHardswish(SmoothActivation):
    """f(x) = x h_beta(x), h_beta the smooth hard sigmoid: hardswish (x relu6(x + 3) / 6) as beta -> inf.

    Bounds, from f' = h + x h' and f'' = 2 h' + x h'' with |x| <= 3 + |x -+ 3| near each kink:
    Lipschitz <= 1 + (4 D + T) / (6 beta) + (r'_max - r'_min) / 2, curvature <=
    (r'_max - r'_min) / 3 + beta sup|r''| + sup|u r''(u)| / 3 (D, T: r's deviation and tail).
    """

    def __init__(self, beta: float = 100.0, relu: str = "centered_softplus", learnable: bool = True) -> None:
        super().__init__(beta, learnable, calibrated=True)
        self.relu = SMOOTH_RELUS[relu]
        self.gate_spec = _PiecewiseSpec(HARD_SIGMOID["kinks"], HARD_SIGMOID["weights"], 0.0, 0.5, self.relu)

    @property
    def label(self) -> str:
        return f"hardswish, {self.relu.name.replace('_', ' ')} kinks"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _piecewise(x, self.beta.to(x.dtype), self.gate_spec)

    def lipschitz_constant(self) -> float:
        low, high = self.relu.slope_range
        beta = self.frozen_beta()
        return 1.0 + (4 * self.relu.deviation + self.relu.tail) / (6 * beta) + (high - low) / 2

    def curvature_constant(self) -> float:
        low, high = self.relu.slope_range
        return (high - low) / 3 + self.frozen_beta() * self.relu.curvature + self.relu.moment / 3

    @property
    def sharpness_per_beta(self) -> float:
        return self.relu.curvature / REFERENCE_CURVATURE

    def inference_form(self) -> nn.Module:
        return _FrozenHardswish(self.gate_spec, self.frozen_beta())

    def extra_repr(self) -> str:
        return f"relu={self.relu.name}, beta={self.frozen_beta():.4g}"


class _FrozenHardswish(nn.Module):
    def __init__(self, gate_spec: _PiecewiseSpec, beta: float) -> None:
        super().__init__()
        self.gate_spec, self.beta = gate_spec, float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _piecewise(x, self.beta, self.gate_spec)
