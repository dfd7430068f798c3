"""The data-free curvature bound, propagated through the converted graph.

For f = g o h: Lip(f) <= Lip(g) Lip(h) and Curv(f) <= Curv(g) Lip(h)^2 + Lip(g) Curv(h).
Each node carries (Lipschitz bound, curvature bound) of the map from the input to its output;
sums add, concatenations add in quadrature, and every LCNN layer states its own constants.
Pooling has zero curvature almost everywhere (max pooling is piecewise linear, average pooling
linear); its L2 Lipschitz constant depends on how often windows overlap (see ``pool_lipschitz``).
Any op without known constants makes the bound infinite, and is named in the notes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Protocol, SupportsInt, TypeGuard

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activations import original_constants

Bound = tuple[float, float]
INFINITE: Bound = (math.inf, math.inf)

IDENTITY_MODULES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Flatten,
    nn.Unflatten,
)
POOL_MODULES = {
    nn.MaxPool1d: ("max", 1),
    nn.MaxPool2d: ("max", 2),
    nn.MaxPool3d: ("max", 3),
    nn.AvgPool1d: ("avg", 1),
    nn.AvgPool2d: ("avg", 2),
    nn.AvgPool3d: ("avg", 3),
    nn.AdaptiveMaxPool1d: ("adaptive", 1),
    nn.AdaptiveMaxPool2d: ("adaptive", 2),
    nn.AdaptiveMaxPool3d: ("adaptive", 3),
    nn.AdaptiveAvgPool1d: ("adaptive", 1),
    nn.AdaptiveAvgPool2d: ("adaptive", 2),
    nn.AdaptiveAvgPool3d: ("adaptive", 3),
}
POOL_FUNCTIONS = {
    "max_pool1d": ("max", 1),
    "max_pool2d": ("max", 2),
    "max_pool3d": ("max", 3),
    "avg_pool1d": ("avg", 1),
    "avg_pool2d": ("avg", 2),
    "avg_pool3d": ("avg", 3),
    "adaptive_max_pool1d": ("adaptive", 1),
    "adaptive_max_pool2d": ("adaptive", 2),
    "adaptive_avg_pool1d": ("adaptive", 1),
    "adaptive_avg_pool2d": ("adaptive", 2),
    "adaptive_avg_pool3d": ("adaptive", 3),
}
IDENTITY_MODULE_NAMES = {
    "SelectAdaptivePool2d",
    "DropPath",
    "DropBlock2d",
    "AdaptiveAvgMaxPool2d",
    "FastAdaptiveAvgPool",
}
RESHAPING = {
    "flatten",
    "reshape",
    "view",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "getitem",
    "mean",
    "dropout",
    "clone",
    "to",
    "type_as",
    "float",
    "narrow",
    "chunk",
    "split",
    "unbind",
    "identity",
    "pad",
}
NOT_TENSORS = {"size", "dim", "getattr", "numel", "shape"}
SUMS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
CONCATENATIONS = {torch.cat, torch.concat, torch.stack}
SCALINGS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}


def _compose(outer: Bound, inner: Bound) -> Bound:
    lipschitz, curvature = outer
    inner_lipschitz, inner_curvature = inner
    if math.isinf(lipschitz) or math.isinf(curvature):
        return INFINITE
    try:
        composed_curvature = curvature * inner_lipschitz**2 if curvature else 0.0
    except OverflowError:  # deep nets (DenseNet-201) pass 1e308: the bound is then of no use anyway
        return INFINITE
    return lipschitz * inner_lipschitz, composed_curvature + lipschitz * inner_curvature


def _tuple(value: object, dims: int) -> tuple[int | None, ...]:
    """A pool's size argument per dimension (None: the input's, in an adaptive pool's output size)."""
    if isinstance(value, (tuple, list)):
        return tuple(value)
    if not isinstance(value, SupportsInt):  # an argument computed in the graph (an fx Node)
        raise TypeError(f"not a size: {value!r}")
    return (int(value),) * dims


def pool_lipschitz(
    kind: str, dims: int, kernel=None, stride=None, dilation=1, padding=0, count_include_pad=True, output_size=None
) -> float:
    """L2 Lipschitz constant of a pooling op (its curvature is 0 almost everywhere).

    An input element lies in at most m = prod_d ceil(span_d / stride_d) windows. Max pooling:
    ||P(x) - P(y)||^2 <= sum over windows of the largest |x_i - y_i|^2 <= m ||x - y||^2, so sqrt(m)
    (2 for ResNet's 3x3/2 stem pool, 3 for a 3x3/1 pool). Average pooling is linear, a matrix A
    whose rows (windows) sum to 1 and whose columns (inputs) sum to at most m / n when every window
    divides by its n elements, so ||A||_2 <= sqrt(||A||_1 ||A||_inf) = sqrt(m / n) (Schur's test;
    1/2 for a 2x2/2 pool, 1 for a 3x3/1 pool, which maps a constant image to itself). Left out of
    the count, padding makes border windows divide by fewer, down to 1: sqrt(m). Adaptive pools: 1
    for a global pool; otherwise neighbouring windows share at most one element per dimension, so
    sqrt(2^dims).
    """
    if kind == "adaptive":
        sizes = [size for size in _tuple(output_size, dims) if size is not None] if output_size is not None else []
        return 1.0 if sizes and all(size == 1 for size in sizes) else math.sqrt(2.0**dims)
    kernel = _tuple(kernel, dims)
    stride = kernel if stride is None or stride == [] or stride == () else _tuple(stride, dims)
    dilation = _tuple(dilation, dims)
    windows = 1
    for k, s, d in zip(kernel, stride, dilation):
        windows *= min(k, math.ceil(((k - 1) * d + 1) / s))
    if kind == "max":
        return math.sqrt(windows)
    count = math.prod(kernel) if (count_include_pad or not any(_tuple(padding, dims))) else 1
    return math.sqrt(windows / count)


def _adaptive_windows(length: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling windows along one dimension: [floor(i L / out), ceil((i + 1) L / out))."""
    return [((i * length) // out, -((-(i + 1) * length) // out)) for i in range(out)]


def adaptive_pool_lipschitz(average: bool, input_size: Sequence[int], output_size: object) -> float:
    """L2 Lipschitz constant of an adaptive pool at a known input size, from its window layout.

    The windows are products of one interval per dimension. Max: sqrt(prod_d m_d), m_d the most
    windows one element lies in along d (as ``pool_lipschitz``). Average: Schur's test with rows
    summing to 1 and columns to prod_d max_j sum_{windows i containing j} 1 / n_i, so a global
    average over n elements is 1/sqrt(n)."""
    outputs = _tuple(output_size, len(input_size))
    product = 1.0
    for length, out in zip(input_size, outputs):
        windows = _adaptive_windows(length, length if out is None else out)
        weights = [1.0 / (end - start) if average else 1.0 for start, end in windows]
        product *= max(
            sum(weight for (start, end), weight in zip(windows, weights) if start <= j < end) for j in range(length)
        )
    return math.sqrt(product)


def _adaptive_from_shape(node: fx.Node, average: bool, dims: int, output_size: object) -> float | None:
    """``adaptive_pool_lipschitz`` at the node's input size where shape propagation recorded it."""
    from .graph_pass import input_shape

    shape = input_shape(node)
    if shape is None or len(shape) < dims or output_size is None:
        return None
    return adaptive_pool_lipschitz(average, shape[-dims:], output_size)


def _pool_module_lipschitz(module: nn.Module) -> float:
    kind, dims = POOL_MODULES[type(module)]
    if kind == "adaptive":
        return pool_lipschitz(kind, dims, output_size=module.output_size)
    return pool_lipschitz(
        kind,
        dims,
        module.kernel_size,
        module.stride,
        getattr(module, "dilation", 1),
        module.padding,
        getattr(module, "count_include_pad", True),
    )


def _pool_call_lipschitz(node: fx.Node, name: str) -> float:
    kind, dims = POOL_FUNCTIONS[name]
    names = {
        "adaptive": ("input", "output_size"),
        "max": ("input", "kernel_size", "stride", "padding", "dilation"),
        "avg": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    }[kind]
    values = {**dict(zip(names, node.args)), **node.kwargs}
    if kind == "adaptive":
        return pool_lipschitz(kind, dims, output_size=values.get("output_size"))
    return pool_lipschitz(
        kind,
        dims,
        values["kernel_size"],
        values.get("stride"),
        values.get("dilation", 1),
        values.get("padding", 0),
        values.get("count_include_pad", True),
    )


class StatesConstants(Protocol):
    """A layer that states its own constants: every LCNN layer (a user's layers may too)."""

    def lipschitz_constant(self) -> float: ...

    def curvature_constant(self) -> float: ...


def _states_constants(module: nn.Module) -> TypeGuard[StatesConstants]:
    return hasattr(module, "lipschitz_constant") and hasattr(module, "curvature_constant")


def module_constants(module: nn.Module) -> Bound | None:
    """(Lipschitz, curvature) of a module, or None when they are not known."""
    if _states_constants(module):
        return module.lipschitz_constant(), module.curvature_constant()
    if type(module) in POOL_MODULES:
        return _pool_module_lipschitz(module), 0.0
    if isinstance(module, IDENTITY_MODULES) or type(module).__name__ in IDENTITY_MODULE_NAMES:
        return 1.0, 0.0
    constants = original_constants(module)  # a smooth activation left in place (replace_activations=False)
    if constants is not None:
        return constants
    if isinstance(module, nn.Sequential) or type(module).__name__ == "LipschitzBatchNormAct":
        bound: Bound = (1.0, 0.0)
        for child in module.children():
            constants = module_constants(child)
            if constants is None:
                return None
            bound = _compose(constants, bound)
        return bound
    return None


def _name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[str(node.target)]).__name__  # a call_module node's target is the module's path
    return getattr(node.target, "__name__", str(node.target))


def _scalar(value: object) -> float | None:
    return abs(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def curvature_bound(graph_module: fx.GraphModule) -> tuple[Bound, list[str]]:
    """((Lipschitz, curvature) bound of the logits, names of ops that made it infinite)."""
    modules = dict(graph_module.named_modules())
    bounds: dict[fx.Node, Bound] = {}
    unknown: set[str] = set()
    result: Bound = INFINITE
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            bounds[node] = (1.0, 0.0)
            continue
        inputs = [bounds[arg] for arg in node.all_input_nodes if arg in bounds]
        if node.op == "output":
            result = inputs[0] if inputs else (0.0, 0.0)
            break
        if not inputs:
            continue  # does not depend on the input: a constant
        name = _name(node, modules)
        if name in NOT_TENSORS:
            continue
        bound = _node_bound(node, name, modules, inputs)
        if bound is None:
            unknown.add(name)
            bound = INFINITE
        bounds[node] = bound
    return result, sorted(unknown) if math.isinf(result[1]) else []


def _node_bound(node: fx.Node, name: str, modules: dict[str, nn.Module], inputs: list[Bound]) -> Bound | None:
    path = str(node.target)  # the module's path, for a call_module node
    if node.op == "call_module" and POOL_MODULES.get(type(modules[path]), ("", 0))[0] == "adaptive":
        module = modules[path]
        average = "Avg" in type(module).__name__
        factor = _adaptive_from_shape(node, average, POOL_MODULES[type(module)][1], module.output_size)
        if factor is not None:
            return inputs[0][0] * factor, inputs[0][1] * factor
    if node.op == "call_module":
        constants = module_constants(modules[path])
        return None if constants is None else _compose(constants, inputs[0])
    if node.target in SUMS or name in ("add", "sub", "add_", "sub_"):
        return _sum(inputs)
    if node.target in CONCATENATIONS or name in ("cat", "stack"):
        return math.hypot(*(b[0] for b in inputs)), math.hypot(*(b[1] for b in inputs))  # no overflow
    if node.target in SCALINGS or name in ("mul", "div", "mul_", "div_"):
        if len(inputs) != 1:
            return None  # product of two input-dependent tensors: no global bound
        factor = next((_scalar(arg) for arg in node.args if not isinstance(arg, fx.Node)), None)
        if not factor:
            return None
        factor = 1.0 / factor if node.target in (operator.truediv, torch.div) or name in ("div", "div_") else factor
        return inputs[0][0] * factor, inputs[0][1] * factor
    if name in POOL_FUNCTIONS:
        try:
            factor = _pool_call_lipschitz(node, name)
            if POOL_FUNCTIONS[name][0] == "adaptive":
                values = {**dict(zip(("input", "output_size"), node.args)), **node.kwargs}
                exact = _adaptive_from_shape(node, "avg" in name, POOL_FUNCTIONS[name][1], values.get("output_size"))
                factor = factor if exact is None else exact
        except (KeyError, TypeError, ValueError):
            return None  # arguments computed in the graph: no constant known
        return inputs[0][0] * factor, inputs[0][1] * factor
    if name in RESHAPING or node.target in (F.dropout, torch.flatten):
        return inputs[0]
    return None


def _sum(inputs: Iterable[Bound]) -> Bound:
    inputs = list(inputs)
    return sum(b[0] for b in inputs), sum(b[1] for b in inputs)
