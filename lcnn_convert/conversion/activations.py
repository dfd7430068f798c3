"""The one table that knows each activation: how it is called, and what replaces it.

A family lists the module types, functions and method names that compute one activation, how to
read its parameters from a module or a call, and how to build its LCNN replacement. Everything
else is derived from this table: the replacement rules (``rules.py``), the activations inside
timm's norm-act blocks, the leaf modules of tracing, the listing of calls left in the graph, the
bound's constants for activations left in place, the functional calls watched after a failed
trace, and the ReLU-like stand-ins curvature measurement uses for the original model.

Adding a family here (or passing your own rules, see ``examples/custom_rule.py``) is all it takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import CenteredSoftplus, ScaledActivation, SmoothActivation, SmoothHardswish, SmoothPiecewiseLinear
from ..layers.smooth_activation import HARD_SIGMOID

from ..defaults import DEFAULT_ACTIVATION, LCNN_ACTIVATIONS  # noqa: F401  (importable without torch there)


@dataclass(frozen=True)
class Parameter:
    """An activation's parameter: the module attribute and the call argument (name, position) it is in."""

    name: str
    position: int
    default: Any
    attribute: str | None = None  # default: ``name``


@dataclass(frozen=True)
class ActivationFamily:
    """One activation, every way it is called, and its LCNN replacement.

    ``build(parameters, beta, activation)`` returns the replacement; ``beta`` is the initial
    sharpness of calibrated families, ``activation`` the smooth ReLU chosen for piecewise-linear
    ones. ``piecewise_linear`` families (kinks, curvature 0 almost everywhere) are calibrated and
    get a sharp smooth stand-in when the original's curvature is measured; the others contain the
    original exactly, at the initial beta of their replacement.
    """

    name: str
    build: Callable[[dict[str, Any], float, str], SmoothActivation]
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    parameters: tuple[Parameter, ...] = ()
    inplace_position: int | None = None
    piecewise_linear: bool = False
    in_place_variants: tuple[Any, ...] = field(default=())  # functions/methods that always write in place

    def parameters_of_module(self, module: nn.Module) -> dict[str, Any]:
        return {p.name: getattr(module, p.attribute or p.name, p.default) for p in self.parameters}

    def call_names(self) -> set[str]:
        names = {getattr(function, "__name__", str(function)) for function in self.functions}
        return names | set(self.methods)


def optional_types(*paths: str) -> tuple[type, ...]:
    found = []
    for path in paths:
        module_name, _, attr = path.rpartition(".")
        try:
            module = __import__(module_name, fromlist=[attr])
            found.append(getattr(module, attr))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _timm(*names: str) -> tuple[type, ...]:
    return optional_types(*(f"timm.layers.activations.{name}" for name in names))


def _relu(parameters: dict[str, Any], beta: float, activation: str) -> SmoothActivation:
    if activation == "swish":
        return ScaledActivation("silu", beta, calibrated=True)
    return CenteredSoftplus(beta)


def _piecewise(kinks, weights, slope=0.0, value_at_zero=0.0):
    def build(parameters: dict[str, Any], beta: float, activation: str) -> SmoothActivation:
        kink_values, weight_values, slope_value, zero_value = (
            value(parameters) if callable(value) else value for value in (kinks, weights, slope, value_at_zero)
        )
        return SmoothPiecewiseLinear(kink_values, weight_values, slope_value, zero_value, beta=beta, relu=activation)

    return build


def _hardtanh_value_at_zero(parameters: dict[str, Any]) -> float:
    return min(max(0.0, float(parameters["min_val"])), float(parameters["max_val"]))


def _scaled(function: str, initial_beta: float = 1.0, **fixed: Any):
    def build(parameters: dict[str, Any], beta: float, activation: str) -> SmoothActivation:
        return ScaledActivation(function, initial_beta, calibrated=False, **fixed, **parameters)

    return build


def _softplus(parameters: dict[str, Any], beta: float, activation: str) -> SmoothActivation:
    """Keep a softplus's own beta; the constant shift log(2)/beta keeps the function exact."""
    own = float(parameters["beta"])
    return CenteredSoftplus(beta=own, shift=math.log(2.0) / own)


def _gelu(parameters: dict[str, Any], beta: float, activation: str) -> SmoothActivation:
    approximate = str(parameters.get("approximate", "none"))
    if approximate == "none":
        return ScaledActivation("gelu", 1.0, calibrated=False)
    return ScaledActivation("gelu", 1.0, calibrated=False, approximate=approximate)


INPLACE = Parameter("inplace", -1, False)

ACTIVATION_FAMILIES: tuple[ActivationFamily, ...] = (
    ActivationFamily(
        "relu",
        _relu,
        modules=(nn.ReLU,),
        functions=(F.relu, torch.relu, F.relu_, torch.relu_),
        methods=("relu", "relu_"),
        inplace_position=1,
        piecewise_linear=True,
        in_place_variants=(F.relu_, torch.relu_, "relu_"),
    ),
    ActivationFamily(
        "relu6",
        _piecewise((0.0, 6.0), (1.0, -1.0)),
        modules=(nn.ReLU6,),
        functions=(F.relu6,),
        inplace_position=1,
        piecewise_linear=True,
    ),
    ActivationFamily(
        "leaky_relu",
        _piecewise((0.0,), lambda p: (1.0 - float(p["negative_slope"]),), lambda p: float(p["negative_slope"])),
        modules=(nn.LeakyReLU,),
        functions=(F.leaky_relu,),
        parameters=(Parameter("negative_slope", 1, 0.01),),
        inplace_position=2,
        piecewise_linear=True,
    ),
    ActivationFamily(
        "hardtanh",
        _piecewise(lambda p: (float(p["min_val"]), float(p["max_val"])), (1.0, -1.0), 0.0, _hardtanh_value_at_zero),
        modules=(nn.Hardtanh,),
        functions=(F.hardtanh,),
        parameters=(Parameter("min_val", 1, -1.0), Parameter("max_val", 2, 1.0)),
        inplace_position=3,
        piecewise_linear=True,
    ),
    ActivationFamily(
        "hardsigmoid",
        _piecewise(HARD_SIGMOID["kinks"], HARD_SIGMOID["weights"], 0.0, HARD_SIGMOID["value_at_zero"]),
        modules=(nn.Hardsigmoid, *_timm("HardSigmoid")),
        functions=(F.hardsigmoid,),
        inplace_position=1,
        piecewise_linear=True,
    ),
    ActivationFamily(
        "hardswish",
        lambda p, beta, activation: SmoothHardswish(beta, relu=activation),
        modules=(nn.Hardswish, *_timm("HardSwish")),
        functions=(F.hardswish,),
        inplace_position=1,
        piecewise_linear=True,
    ),
    ActivationFamily(
        "silu",
        _scaled("silu"),
        modules=(nn.SiLU, *_timm("Swish")),
        functions=(F.silu,),
        inplace_position=1,
    ),
    # x sigmoid(1.702 x) = silu(1.702 x) / 1.702: the SiLU family at beta = 1.702
    ActivationFamily("quick_gelu", _scaled("silu", 1.702), modules=_timm("QuickGELU")),
    ActivationFamily(
        "gelu", _gelu, modules=(nn.GELU,), functions=(F.gelu,), parameters=(Parameter("approximate", 99, "none"),)
    ),
    ActivationFamily("gelu_tanh", _scaled("gelu", approximate="tanh"), modules=_timm("GELUTanh")),
    ActivationFamily("timm_gelu", _scaled("gelu"), modules=_timm("GELU")),
    ActivationFamily(
        "mish", _scaled("mish"), modules=(nn.Mish, *_timm("Mish")), functions=(F.mish,), inplace_position=1
    ),
    ActivationFamily(
        "sigmoid",
        _scaled("sigmoid"),
        modules=(nn.Sigmoid, *_timm("Sigmoid")),
        functions=(torch.sigmoid, F.sigmoid),
        methods=("sigmoid", "sigmoid_"),
        in_place_variants=("sigmoid_",),
    ),
    ActivationFamily(
        "tanh",
        _scaled("tanh"),
        modules=(nn.Tanh, *_timm("Tanh")),
        functions=(torch.tanh, F.tanh),
        methods=("tanh", "tanh_"),
        in_place_variants=("tanh_",),
    ),
    ActivationFamily("softsign", _scaled("softsign"), modules=(nn.Softsign,), functions=(F.softsign,)),
    ActivationFamily(
        "elu",
        _scaled("elu"),
        modules=(nn.ELU,),
        functions=(F.elu,),
        parameters=(Parameter("alpha", 1, 1.0),),
        inplace_position=2,
    ),
    ActivationFamily(
        "celu",
        _scaled("celu"),
        modules=(nn.CELU,),
        functions=(F.celu,),
        parameters=(Parameter("alpha", 1, 1.0),),
        inplace_position=2,
    ),
    ActivationFamily("selu", _scaled("selu"), modules=(nn.SELU,), functions=(F.selu,), inplace_position=1),
    ActivationFamily(
        "softplus", _softplus, modules=(nn.Softplus,), functions=(F.softplus,), parameters=(Parameter("beta", 1, 1.0),)
    ),
)

# Activations no family covers, and why they stay; reported for every call left in the graph.
UNCONVERTED_ACTIVATIONS: dict[str, str] = {
    "PReLU": "PReLU's negative slopes are learned per channel; no rule for it yet, left as is",
    "prelu": "PReLU's negative slopes are learned per channel; no rule for it yet, left as is",
    "GLU": "GLU multiplies two halves of its input (a gate, not an elementwise activation); left as is",
    "glu": "GLU multiplies two halves of its input (a gate, not an elementwise activation); left as is",
    "HardMish": "HardMish (x clamp(x + 2, 0, 2) / 2) is piecewise quadratic; no rule for it yet, left as is",
    "hard_mish": "HardMish (x clamp(x + 2, 0, 2) / 2) is piecewise quadratic; no rule for it yet, left as is",
    "RReLU": "RReLU draws its negative slope at random in training; left as is",
    "Threshold": "Threshold is discontinuous; no smooth family keeps it; left as is",
}
# Layers that are not activations but keep a model from having global constants; listed with the reason.
NORMALISATIONS_LEFT: dict[str, str] = {
    name: f"{name} normalises each example by its own statistics: its slope depends on the input (no global "
    "Lipschitz constant); left as is"
    for name in ("LayerNorm", "LayerNorm2d", "GroupNorm", "RMSNorm", "LayerNormAct", "LayerNormAct2d", "InstanceNorm2d")
}
ATTENTION_LEFT: dict[str, str] = {
    name: "attention multiplies input-dependent tensors (softmax(QK^T) V): no global constants; left as is"
    for name in ("MultiheadAttention", "scaled_dot_product_attention", "softmax", "Softmax")
}


def family_of_module(module: nn.Module) -> ActivationFamily | None:
    return next((family for family in ACTIVATION_FAMILIES if type(module) in family.modules), None)


def family_of_call(target: Any) -> ActivationFamily | None:
    return next(
        (family for family in ACTIVATION_FAMILIES if target in family.functions or target in family.methods), None
    )


ACTIVATION_MODULE_TYPES: tuple[type, ...] = tuple(t for family in ACTIVATION_FAMILIES for t in family.modules)
# Module types fx would otherwise trace into (timm's are plain Modules): kept as single calls.
LEAF_ACTIVATION_TYPES: tuple[type, ...] = tuple(
    t for t in ACTIVATION_MODULE_TYPES if not t.__module__.startswith("torch.")
)
ACTIVATION_CALL_NAMES: frozenset[str] = frozenset(
    name for family in ACTIVATION_FAMILIES for name in family.call_names()
)
ACTIVATION_MODULE_NAMES: frozenset[str] = frozenset(t.__name__ for t in ACTIVATION_MODULE_TYPES)
# Called outside the graph (a model fx cannot trace): every activation function, as torch sees it.
WATCHED_ACTIVATION_FUNCTIONS: tuple[Callable, ...] = tuple(
    {
        *(function for family in ACTIVATION_FAMILIES for function in family.functions),
        *(
            getattr(torch.Tensor, method)
            for family in ACTIVATION_FAMILIES
            for method in family.methods
            if hasattr(torch.Tensor, method)
        ),
    }
)


def original_constants(module: nn.Module) -> tuple[float, float] | None:
    """(Lipschitz, curvature) of an activation module left in place, when its family is smooth."""
    family = family_of_module(module)
    if family is None or family.piecewise_linear:
        return None
    replacement = family.build(family.parameters_of_module(module), 1.0, DEFAULT_ACTIVATION)
    return replacement.lipschitz_constant(), replacement.curvature_constant()
