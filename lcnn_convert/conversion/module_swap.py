"""Fallback for models that torch.fx cannot trace: swap modules in place.

Without a graph, calls that are not modules (F.relu in a forward, x.relu_()) cannot be replaced;
they are found by running the model once under a TorchFunctionMode and listed in the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from ..layers import LCNN_LAYERS
from .activations import WATCHED_ACTIVATION_FUNCTIONS
from .graph_pass import count_layers
from .report import Skipped
from .rules import ReplacementRule, RuleContext

WATCHED_FUNCTIONS = {**dict.fromkeys(WATCHED_ACTIVATION_FUNCTIONS, "activation"), F.batch_norm: "batchnorm"}


def swap_modules(
    model: nn.Module, rules: Sequence[ReplacementRule], beta: float, replace_activations: bool
) -> tuple[list[str], list[str]]:
    """Apply the module rules to every submodule; return the replaced activation and BN paths."""
    activations: list[str] = []
    batchnorms: list[str] = []
    active_rules = [rule for rule in rules if replace_activations or rule.kind != "activation"]
    for path, module in list(model.named_modules()):
        if not path or any(path.startswith(done + ".") for done in activations + batchnorms):
            continue
        ctx = RuleContext(None, module, model, beta, replace_activations, active_rules)
        rule = next((rule for rule in active_rules if rule.matches(ctx)), None)
        if rule is None:
            continue
        replacement = rule.build(ctx)
        model.set_submodule(path, replacement)
        softplus_count, bn_count = count_layers(replacement)
        activations += [path] * softplus_count
        batchnorms += [path] * bn_count
    return activations, batchnorms


class _FunctionalCallRecorder(TorchFunctionMode):
    def __init__(self, module_stack: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.module_stack = module_stack
        self.calls: dict[tuple[str, str], str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = WATCHED_FUNCTIONS.get(func)
        if kind is not None and not any(isinstance(module, LCNN_LAYERS) for _, module in self.module_stack):
            scope = self.module_stack[-1][0] if self.module_stack else ""
            self.calls.setdefault((scope, getattr(func, "__name__", str(func))), kind)
        return func(*args, **(kwargs or {}))


def find_functional_calls(model: nn.Module, example: tuple[torch.Tensor, ...], why: str) -> list[Skipped]:
    """Run ``model`` once and list the activation and batch_norm calls made outside LCNN layers."""
    stack: list[tuple[str, nn.Module]] = []
    handles = []

    def enter(module: nn.Module, args: tuple, path: str) -> None:
        stack.append((path, module))

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        stack.pop()

    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, path=path: enter(m, a, path)))
        handles.append(module.register_forward_hook(leave))
    recorder = _FunctionalCallRecorder(stack)
    try:
        with torch.no_grad(), recorder:
            model(*(tensor[:1] for tensor in example))
    finally:
        for handle in handles:
            handle.remove()
    return [
        Skipped(f"{scope or '<root>'}:{name}", kind, f"functional call not replaced: {why}")
        for (scope, name), kind in recorder.calls.items()
    ]


def swap_inside_leaves(
    graph_module: fx.GraphModule, rules: Sequence[ReplacementRule], beta: float, replace_activations: bool
) -> tuple[list[str], list[str]]:
    """Apply the module rules inside the module calls that the graph pass left whole.

    fx does not trace into a leaf (timm's no-trace blocks such as MobileVitBlock and NormFreeBlock, or
    a module it cannot trace), so its activations and BatchNorms never reach the graph's rules; the
    leaf keeps its own forward and gets its submodules swapped in place, as the module-swap fallback does.
    """
    activations: list[str] = []
    batchnorms: list[str] = []
    done: set[str] = set()
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or node.target in done:
            continue
        done.add(node.target)
        leaf = graph_module.get_submodule(node.target)
        if isinstance(leaf, LCNN_LAYERS) or not any(True for _ in leaf.children()):
            continue
        inside_activations, inside_batchnorms = swap_modules(leaf, rules, beta, replace_activations)
        activations += [f"{node.target}.{path}" for path in inside_activations]
        batchnorms += [f"{node.target}.{path}" for path in inside_batchnorms]
    return activations, batchnorms
