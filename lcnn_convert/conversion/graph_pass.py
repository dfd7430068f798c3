"""The fx pass: replace matched calls by LCNN modules, then normalize convs and linears."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol, TypeGuard

import torch
from torch import fx, nn

from torch.nn.modules.batchnorm import _NormBase

from ..layers import LCNN_LAYERS, LipschitzBatchNorm, NormalizedConv, NormalizedLinear, SmoothActivation
from .activations import (
    ACTIVATION_CALL_NAMES,
    ACTIVATION_MODULE_NAMES,
    ATTENTION_LEFT,
    NORMALISATIONS_LEFT,
    UNCONVERTED_ACTIVATIONS,
)
from .report import Skipped
from .rules import ReplacementRule, RuleContext

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class AbsorbsInputScale(Protocol):
    """A layer that can take over a preceding layer's 1/sigma (a Lipschitz BN, alone or in a norm-act block)."""

    def absorb_input_scale(self, scale: float) -> None: ...


def _absorbs_input_scale(module: nn.Module) -> TypeGuard[AbsorbsInputScale]:
    return hasattr(module, "absorb_input_scale")


def _module_calls(graph: fx.Graph) -> Counter[str]:
    return Counter(node.target for node in graph.nodes if node.op == "call_module")


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack), "") if stack else ""


def _free_name(root: nn.Module, wanted: str) -> str:
    taken = {name for name, _ in root.named_modules()}
    taken |= {name for name, _ in root.named_parameters()} | {name for name, _ in root.named_buffers()}
    name, index = wanted, 1
    while name in taken:
        name, index = f"{wanted}_{index}", index + 1
    return name


def _rewire_inplace(graph: fx.Graph, mutated: fx.Node, old: fx.Node, new: fx.Node) -> None:
    """An in-place call changed ``mutated``: later readers of it must read ``new`` instead."""
    after = False
    for node in graph.nodes:
        if node is old:
            after = True
            continue
        if after and node is not new and mutated in node.all_input_nodes:
            node.replace_input_with(mutated, new)


def node_label(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    scope = _scope(node)
    return f"{scope}:{node.name}" if scope else node.name


def count_layers(module: nn.Module) -> tuple[int, int]:
    """How many LCNN activations and Lipschitz BN layers ``module`` holds (itself included)."""
    modules = list(module.modules())
    return (
        sum(isinstance(m, SmoothActivation) for m in modules),
        sum(isinstance(m, LipschitzBatchNorm) for m in modules),
    )


def apply_rules(
    graph_module: fx.GraphModule,
    rules: Sequence[ReplacementRule],
    beta: float,
    replace_activations: bool,
) -> tuple[list[str], list[str]]:
    """Replace every call that a rule matches; return the labels of replaced activations and BNs."""
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    sites_seen: Counter[str] = Counter()
    activations: list[str] = []
    batchnorms: list[str] = []
    active_rules = [rule for rule in rules if replace_activations or rule.kind != "activation"]
    for node in list(graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        ctx = RuleContext(node, module, graph_module, beta, replace_activations, active_rules)
        rule = next((rule for rule in active_rules if rule.matches(ctx)), None)
        if rule is None:
            continue
        if node.op == "call_module":
            site = sites_seen[node.target]
            sites_seen[node.target] += 1
            if site > 0 and rule.kind != "activation":
                continue  # a shared BN stays shared: this call already reaches its replacement
            # Each call site of a shared activation gets its own replacement (one beta per site).
            # The first takes the original path; later ones match against `modules`, not the root.
            target = node.target if site == 0 else _free_name(graph_module, f"{node.target}_{site}")
        else:
            scope = _scope(node)
            target = _free_name(graph_module, f"{scope}.lcnn_{node.name}" if scope else f"lcnn_{node.name}")
        replacement = rule.build(ctx)
        graph_module.add_submodule(target, replacement)
        source = node.args[0] if node.args else next(iter(node.kwargs.values()))
        with graph.inserting_before(node):
            new_node = graph.call_module(target, (source,))
        new_node.meta = dict(node.meta)
        node.replace_all_uses_with(new_node)
        if rule.inplace(ctx) and isinstance(source, fx.Node):
            _rewire_inplace(graph, source, node, new_node)
        graph.erase_node(node)
        softplus_count, bn_count = count_layers(replacement)
        activations += [target] * softplus_count
        batchnorms += [target] * bn_count
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()
    return activations, batchnorms


def list_unconverted(graph_module: fx.GraphModule, replace_activations: bool) -> list[Skipped]:
    """Activations, BatchNorms, other normalisations and attention still in the graph after the
    rules ran, with the reason each was left."""
    modules = dict(graph_module.named_modules())
    skipped = []
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            name = type(module).__name__
            if not isinstance(module, LCNN_LAYERS) and (isinstance(module, _NormBase) or "BatchNorm" in name):
                reason = (
                    "BatchNorm without running statistics (track_running_stats=False)"
                    if getattr(module, "running_var", None) is None
                    else f"{name} is a BatchNorm subclass with its own forward; no rule for it"
                )
                skipped.append(Skipped(node_label(node), "batchnorm", reason))
                continue
            left = _left_inside(module, replace_activations)
            if left is not None:
                skipped.append(Skipped(node_label(node), *left))
        elif node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            if name in ACTIVATION_CALL_NAMES or name in UNCONVERTED_ACTIVATIONS:
                skipped.append(Skipped(node_label(node), "activation", _activation_reason(name, replace_activations)))
            elif name in ATTENTION_LEFT:
                skipped.append(Skipped(node_label(node), "attention", ATTENTION_LEFT[name]))
            elif name in ("layer_norm", "group_norm", "rms_norm"):
                skipped.append(
                    Skipped(node_label(node), "norm", NORMALISATIONS_LEFT["LayerNorm"].replace("LayerNorm", name))
                )
            elif name == "batch_norm":
                reason = "functional batch_norm whose statistics are not module attributes"
                skipped.append(Skipped(node_label(node), "batchnorm", reason))
    return skipped


def _left_inside(module: nn.Module, replace_activations: bool) -> tuple[str, str] | None:
    """(kind, reason) for the first activation, normalisation or attention a module call leaves."""
    for child in module.modules():
        if isinstance(child, LCNN_LAYERS):
            continue
        child_name = type(child).__name__
        if child_name in ACTIVATION_MODULE_NAMES or child_name in UNCONVERTED_ACTIVATIONS:
            return "activation", _activation_reason(child_name, replace_activations)
        if child_name in NORMALISATIONS_LEFT:
            return "norm", NORMALISATIONS_LEFT[child_name]
        if child_name in ATTENTION_LEFT:
            return "attention", ATTENTION_LEFT[child_name]
    return None


def _activation_reason(name: str, replace_activations: bool) -> str:
    if name in UNCONVERTED_ACTIVATIONS:
        return UNCONVERTED_ACTIVATIONS[name]
    if not replace_activations:
        return f"{name} kept: replace_activations=False"
    return f"{name} was not matched by the rules in use; left as is"


def propagate_shapes(graph_module: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> None:
    """Run one example through the graph, writing each node's output shape and dtype into
    ``node.meta["tensor_meta"]`` (torch.fx's ShapeProp): what the norms (a layer's input size) and
    the bound (a pool's window overlaps) read."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(graph_module).propagate(*(tensor[:1] for tensor in example))


def input_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The per-example shape of a node's first input, from ``propagate_shapes``; None if unknown."""
    first = node.args[0] if node.args else None
    meta = first.meta.get("tensor_meta") if isinstance(first, fx.Node) else None
    return tuple(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else None


def capture_input_shapes(model: nn.Module, example: tuple[torch.Tensor, ...]) -> dict[str, list[tuple[int, ...]]]:
    """Every per-example input shape each conv and linear layer is called with, in call order: a
    layer called at several sizes (a shared head over a feature pyramid) is normalized at each.

    A traced model is shape-propagated (``propagate_shapes``, which also leaves the shapes in its
    graph for the bound); a model that could not be traced is watched with forward hooks."""
    shapes: dict[str, list[tuple[int, ...]]] = {}

    def add(path: str, shape: tuple[int, ...]) -> None:
        if shape not in shapes.setdefault(path, []):
            shapes[path].append(shape)

    traced = model if isinstance(model, fx.GraphModule) else None
    if traced is not None:
        try:
            propagate_shapes(traced, example)
        except Exception:  # noqa: BLE001 - an op the interpreter cannot replay: watch the forward instead
            traced = None
    if traced is not None:
        modules = dict(traced.named_modules())
        for node in traced.graph.nodes:
            if node.op == "call_module" and type(modules[node.target]) in (*CONV_TYPES, nn.Linear):
                shape = input_shape(node)
                if shape is not None:
                    add(node.target, shape)
        return shapes
    handles = []
    for path, module in model.named_modules():
        if type(module) in (*CONV_TYPES, nn.Linear):
            handles.append(
                module.register_forward_pre_hook(lambda m, args, path=path: add(path, tuple(args[0].shape[1:])))
            )
    try:
        with torch.no_grad():
            model(*(tensor[:1] for tensor in example))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _absorbing_norm(node: fx.Node, modules: dict[str, nn.Module], calls: Counter[str]) -> AbsorbsInputScale | None:
    """The Lipschitz BN that reads only this node's output and nothing else, if there is one."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or calls[str(users[0].target)] != 1:
        return None
    follower = modules[str(users[0].target)]  # a call_module node's target is the module's path
    if not _absorbs_input_scale(follower) or users[0].args[:1] != (node,):
        return None
    return follower


def normalize_linear_layers(
    model: nn.Module,
    shapes: dict[str, list[tuple[int, ...]]],
    graph: fx.Graph | None,
    estimate: bool = True,
) -> tuple[list[str], list[Skipped]]:
    """Divide every conv and linear by its operator norm, pushing 1/sigma into a following BN.

    A conv called at several input sizes (``shapes``) is divided by the largest of its norms there,
    so that it is 1-Lipschitz at each.

    Without a graph (module swap) nothing is known about what follows a layer, so every layer
    keeps its slope as an explicit scale. ``estimate=False`` builds the structure only (the
    values come from a saved state dict).
    """
    modules = dict(model.named_modules())
    calls = _module_calls(graph) if graph is not None else Counter()
    nodes = {node.target: node for node in graph.nodes if node.op == "call_module"} if graph is not None else {}
    normalized, skipped = [], []
    for path, module in modules.items():
        is_conv = type(module) in CONV_TYPES
        if not (is_conv or type(module) is nn.Linear):
            if isinstance(module, (*CONV_TYPES, nn.Linear)) and (graph is None or path in nodes):
                reason = f"{type(module).__name__} subclasses {type(module).__mro__[1].__name__} with its own forward"
                skipped.append(Skipped(path, "linear", reason + "; not normalized"))
            continue
        if graph is not None and path not in nodes:
            continue
        if estimate and path not in shapes:
            skipped.append(Skipped(path, "linear", "not reached by the example input; not normalized"))
            continue
        norm = _absorbing_norm(nodes[path], modules, calls) if path in nodes and calls[path] == 1 else None
        sigma = None if estimate else 1.0
        layer: NormalizedConv | NormalizedLinear
        if is_conv:
            sizes = shapes.get(path) or [(module.in_channels, *([1] * (module.weight.dim() - 2)))]
            candidates = [
                NormalizedConv.from_conv(module, size, explicit_scale=norm is None, sigma=sigma) for size in sizes
            ]
            layer, sigma = max(candidates, key=lambda candidate: candidate[1])
        else:
            layer, sigma = NormalizedLinear.from_linear(module, explicit_scale=norm is None, sigma=sigma)
        if norm is not None:
            norm.absorb_input_scale(sigma)
        model.set_submodule(path, layer)
        normalized.append(path)
    return normalized, skipped
