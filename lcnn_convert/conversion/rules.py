"""The replacement table of the graph pass: each rule is a matcher and a builder.

The pass walks the traced graph and, for every call node, applies the first rule whose matcher
accepts it: the node is replaced by a call to the module that the builder returns. The activation
rules are generated from the family table of ``activations.py``. Extend the table by passing your
own rules before (to take precedence over) the defaults::

    my_rule = ReplacementRule("gelu", "activation", match_module(nn.GELU), lambda ctx: MyAct())
    lc.convert(model, rules=(my_rule, *lc.DEFAULT_RULES))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import LcnnError
from ..layers import LipschitzBatchNorm, LipschitzBatchNormAct
from .activations import (
    ACTIVATION_FAMILIES,
    DEFAULT_ACTIVATION,
    LCNN_ACTIVATIONS,
    LEAF_ACTIVATION_TYPES,
    ActivationFamily,
    optional_types,
)

RuleKind = Literal["activation", "batchnorm"]


@dataclass
class RuleContext:
    """What a matcher or builder may look at: the node, the module it calls, and the options."""

    node: fx.Node | None
    module: nn.Module | None
    root: nn.Module
    beta: float
    replace_activations: bool
    rules: Sequence[ReplacementRule] = ()  # the rules in use (a norm-act block converts its activation with them)

    def argument(self, name: str, position: int, default: Any = None) -> Any:
        """A call argument by keyword or position (None for module-only contexts)."""
        if self.node is None:
            return default
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        return self.node.args[position] if len(self.node.args) > position else default

    def tensor(self, name: str, position: int) -> torch.Tensor | None:
        """The tensor behind a get_attr argument, or None if the argument is anything else."""
        value = self.argument(name, position)
        if not isinstance(value, fx.Node) or value.op != "get_attr" or not isinstance(value.target, str):
            return None
        owner: Any = self.root
        for part in value.target.split("."):
            owner = getattr(owner, part)
        return owner if isinstance(owner, torch.Tensor) else None


Matcher = Callable[[RuleContext], bool]
Builder = Callable[[RuleContext], nn.Module]


@dataclass(frozen=True)
class ReplacementRule:
    """``matches(ctx)`` selects a call; ``build(ctx)`` returns the module that replaces it.

    ``kind == "activation"`` rules are skipped when converting with replace_activations=False.
    ``inplace(ctx)`` says whether the matched call mutated its input, so that later readers of
    that input are rewired to the replacement's output.
    """

    name: str
    kind: RuleKind
    matches: Matcher
    build: Builder
    inplace: Callable[[RuleContext], bool] = lambda ctx: False


def match_module(*types: type, exact: bool = True) -> Matcher:
    """Calls of modules of these types (exact types by default: subclasses may change forward)."""

    def matches(ctx: RuleContext) -> bool:
        if ctx.module is None:
            return False
        return type(ctx.module) in types if exact else isinstance(ctx.module, types)

    return matches


def match_function(*functions: Callable) -> Matcher:
    return lambda ctx: ctx.node is not None and ctx.node.op == "call_function" and ctx.node.target in functions


def match_method(*names: str) -> Matcher:
    return lambda ctx: ctx.node is not None and ctx.node.op == "call_method" and ctx.node.target in names


BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
BATCHNORM_ACT_TYPES = optional_types("timm.layers.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct")
FROZEN_BATCHNORM_TYPES = optional_types("torchvision.ops.misc.FrozenBatchNorm2d", "timm.layers.FrozenBatchNorm2d")
FROZEN_BATCHNORM_ACT_TYPES = optional_types("timm.layers.FrozenBatchNormAct2d")


def _called_module(ctx: RuleContext) -> nn.Module:
    """The module of a module rule's call: its matcher (match_module) accepted only a context with one."""
    assert ctx.module is not None, "a module rule's builder was given a function or method call"
    return ctx.module


def _arguments(family: ActivationFamily, ctx: RuleContext) -> dict[str, Any]:
    return {p.name: ctx.argument(p.name, p.position, p.default) for p in family.parameters}


def _call_is_inplace(family: ActivationFamily, ctx: RuleContext) -> bool:
    assert ctx.node is not None  # function and method rules match call nodes only
    if ctx.node.target in family.in_place_variants:
        return True
    return family.inplace_position is not None and bool(ctx.argument("inplace", family.inplace_position, False))


def family_rules(family: ActivationFamily, activation: str = DEFAULT_ACTIVATION) -> tuple[ReplacementRule, ...]:
    """The rules that replace every call of ``family``: as a module, a function and a method.

    Piecewise-linear families round their kinks with ``activation``'s smooth ReLU; their rules
    are named ``<family>-<kind>@<activation>`` for activations other than the default (the names
    a saved model records to be rebuilt).
    """
    suffix = f"@{activation}" if family.piecewise_linear and activation != DEFAULT_ACTIVATION else ""
    rules = []
    if family.modules:
        rules.append(
            ReplacementRule(
                f"{family.name}-module{suffix}",
                "activation",
                match_module(*family.modules),
                lambda ctx: family.build(family.parameters_of_module(_called_module(ctx)), ctx.beta, activation),
                lambda ctx: bool(getattr(ctx.module, "inplace", False)),
            )
        )
    calls = (("function", family.functions, match_function), ("method", family.methods, match_method))
    for kind, targets, matcher in calls:
        if targets:
            rules.append(
                ReplacementRule(
                    f"{family.name}-{kind}{suffix}",
                    "activation",
                    matcher(*targets),
                    lambda ctx: family.build(_arguments(family, ctx), ctx.beta, activation),
                    lambda ctx: _call_is_inplace(family, ctx),
                )
            )
    return tuple(rules)


def activation_rules(activation: str = DEFAULT_ACTIVATION) -> tuple[ReplacementRule, ...]:
    if activation not in LCNN_ACTIVATIONS:
        raise LcnnError(f"activation must be one of {', '.join(LCNN_ACTIVATIONS)}, got '{activation}'")
    return tuple(rule for family in ACTIVATION_FAMILIES for rule in family_rules(family, activation))


def activation_from(module: nn.Module, ctx: RuleContext) -> nn.Module:
    """The activation inside a norm-act block, replaced by the first activation rule that matches it."""
    if not ctx.replace_activations:
        return module
    inner = RuleContext(None, module, ctx.root, ctx.beta, ctx.replace_activations, ctx.rules)
    rule = next((rule for rule in ctx.rules if rule.kind == "activation" and rule.matches(inner)), None)
    return module if rule is None else rule.build(inner)


def _has_running_stats(ctx: RuleContext) -> bool:
    return getattr(ctx.module, "running_var", None) is not None


def _functional_batchnorm_has_stats(ctx: RuleContext) -> bool:
    params_ok = all(
        ctx.argument(name, position) is None or ctx.tensor(name, position) is not None
        for name, position in (("weight", 3), ("bias", 4))
    )
    return ctx.tensor("running_mean", 1) is not None and ctx.tensor("running_var", 2) is not None and params_ok


def batchnorm_from_function(ctx: RuleContext) -> nn.Module:
    running_mean, running_var = ctx.tensor("running_mean", 1), ctx.tensor("running_var", 2)
    assert running_mean is not None and running_var is not None  # _functional_batchnorm_has_stats matched
    return LipschitzBatchNorm.from_tensors(
        weight=ctx.tensor("weight", 3),
        bias=ctx.tensor("bias", 4),
        running_mean=running_mean,
        running_var=running_var,
        eps=ctx.argument("eps", 7, 1e-5),
        momentum=ctx.argument("momentum", 6, 0.1),
    )


def _batchnorm_act(ctx: RuleContext, use_batch_stats: bool) -> nn.Module:
    module = _called_module(ctx)
    bn = LipschitzBatchNorm.from_batchnorm(module, use_batch_stats=use_batch_stats)
    return LipschitzBatchNormAct(bn, module.get_submodule("drop"), activation_from(module.get_submodule("act"), ctx))


def _both(*matchers: Matcher) -> Matcher:
    return lambda ctx: all(matcher(ctx) for matcher in matchers)


BATCHNORM_RULES: tuple[ReplacementRule, ...] = (
    ReplacementRule(
        "batchnorm-act",
        "batchnorm",
        _both(match_module(*BATCHNORM_ACT_TYPES), _has_running_stats),
        lambda ctx: _batchnorm_act(ctx, use_batch_stats=True),
    ),
    ReplacementRule(
        "frozen-batchnorm-act",
        "batchnorm",
        match_module(*FROZEN_BATCHNORM_ACT_TYPES),
        lambda ctx: _batchnorm_act(ctx, use_batch_stats=False),
    ),
    ReplacementRule(
        "batchnorm",
        "batchnorm",
        _both(match_module(*BATCHNORM_TYPES), _has_running_stats),
        lambda ctx: LipschitzBatchNorm.from_batchnorm(_called_module(ctx)),
    ),
    ReplacementRule(
        "frozen-batchnorm",
        "batchnorm",
        match_module(*FROZEN_BATCHNORM_TYPES),
        lambda ctx: LipschitzBatchNorm.from_batchnorm(_called_module(ctx), use_batch_stats=False),
    ),
    ReplacementRule(
        "batchnorm-function",
        "batchnorm",
        _both(match_function(F.batch_norm), _functional_batchnorm_has_stats),
        batchnorm_from_function,
    ),
)


def default_rules(activation: str = DEFAULT_ACTIVATION) -> tuple[ReplacementRule, ...]:
    """Every activation family of ``activations.py`` with ``activation`` as the smooth ReLU, then the BatchNorms."""
    return (*activation_rules(activation), *BATCHNORM_RULES)


DEFAULT_RULES: tuple[ReplacementRule, ...] = default_rules()
# Every rule this version knows by name (a saved model records the names of the rules it used).
KNOWN_RULES: dict[str, ReplacementRule] = {
    rule.name: rule for activation in LCNN_ACTIVATIONS for rule in default_rules(activation)
}
# The original's piecewise-linear activations, each replaced by a sharp smooth version when its
# curvature is measured (their own second derivative is 0 almost everywhere).
PIECEWISE_LINEAR_RULES: tuple[ReplacementRule, ...] = tuple(
    rule for family in ACTIVATION_FAMILIES if family.piecewise_linear for rule in family_rules(family)
)
# Types that trace as single calls so that the rules above can see them whole.
LEAF_TYPES: tuple[type, ...] = (
    BATCHNORM_ACT_TYPES + FROZEN_BATCHNORM_TYPES + FROZEN_BATCHNORM_ACT_TYPES + LEAF_ACTIVATION_TYPES
)
