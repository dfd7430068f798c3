"""The replacement table of the graph pass: each rule is a matcher and a builder.

The pass walks the traced graph and, for every call node, applies the first rule whose matcher
accepts it: the node is replaced by a call to the module that the builder returns. Extend the
table by passing your own rules before (to take precedence over) the defaults::

    my_rule = ReplacementRule("gelu", "activation", match_module(nn.GELU), lambda ctx: MyAct())
    lc.convert(model, rules=(my_rule, *lc.DEFAULT_RULES))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..layers import CenteredSoftplus, LipschitzBatchNorm, LipschitzBatchNormAct

RuleKind = Literal["activation", "batchnorm"]


@dataclass
class RuleContext:
    """What a matcher or builder may look at: the node, the module it calls, and the options."""

    node: fx.Node | None
    module: nn.Module | None
    root: nn.Module
    beta: float
    replace_activations: bool

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
        if not isinstance(value, fx.Node) or value.op != "get_attr":
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


def _optional_types(*paths: str) -> tuple[type, ...]:
    found = []
    for path in paths:
        module_name, _, attr = path.rpartition(".")
        try:
            module = __import__(module_name, fromlist=[attr])
            found.append(getattr(module, attr))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
BATCHNORM_ACT_TYPES = _optional_types("timm.layers.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct")
FROZEN_BATCHNORM_TYPES = _optional_types("torchvision.ops.misc.FrozenBatchNorm2d", "timm.layers.FrozenBatchNorm2d")
FROZEN_BATCHNORM_ACT_TYPES = _optional_types("timm.layers.FrozenBatchNormAct2d")
CONVERTIBLE_ACTIVATION_TYPES = (nn.ReLU, nn.Softplus)


def softplus_from_relu(ctx: RuleContext) -> nn.Module:
    return CenteredSoftplus(beta=ctx.beta)


def softplus_from_softplus(beta: float) -> nn.Module:
    """Keep a softplus's own beta; the constant shift log(2)/beta keeps the function exact."""
    return CenteredSoftplus(beta=beta, shift=math.log(2.0) / beta)


def activation_from(module: nn.Module, ctx: RuleContext) -> nn.Module:
    """The activation inside a norm-act block, converted only if it is a ReLU or softplus."""
    if not ctx.replace_activations or type(module) not in CONVERTIBLE_ACTIVATION_TYPES:
        return module
    if isinstance(module, nn.Softplus):
        return softplus_from_softplus(module.beta)
    return softplus_from_relu(ctx)


def _has_running_stats(ctx: RuleContext) -> bool:
    return getattr(ctx.module, "running_var", None) is not None


def _functional_batchnorm_has_stats(ctx: RuleContext) -> bool:
    params_ok = all(
        ctx.argument(name, position) is None or ctx.tensor(name, position) is not None
        for name, position in (("weight", 3), ("bias", 4))
    )
    return ctx.tensor("running_mean", 1) is not None and ctx.tensor("running_var", 2) is not None and params_ok


def batchnorm_from_function(ctx: RuleContext) -> nn.Module:
    return LipschitzBatchNorm.from_tensors(
        weight=ctx.tensor("weight", 3),
        bias=ctx.tensor("bias", 4),
        running_mean=ctx.tensor("running_mean", 1),
        running_var=ctx.tensor("running_var", 2),
        eps=ctx.argument("eps", 7, 1e-5),
        momentum=ctx.argument("momentum", 6, 0.1),
    )


def _batchnorm_act(ctx: RuleContext, use_batch_stats: bool) -> nn.Module:
    bn = LipschitzBatchNorm.from_batchnorm(ctx.module, use_batch_stats=use_batch_stats)
    return LipschitzBatchNormAct(bn, ctx.module.drop, activation_from(ctx.module.act, ctx))


def _both(*matchers: Matcher) -> Matcher:
    return lambda ctx: all(matcher(ctx) for matcher in matchers)


DEFAULT_RULES: tuple[ReplacementRule, ...] = (
    ReplacementRule(
        "relu-module", "activation", match_module(nn.ReLU), softplus_from_relu, lambda ctx: ctx.module.inplace
    ),
    ReplacementRule(
        "relu-function",
        "activation",
        match_function(F.relu, torch.relu, F.relu_, torch.relu_),
        softplus_from_relu,
        lambda ctx: ctx.node.target in (F.relu_, torch.relu_) or bool(ctx.argument("inplace", 1, False)),
    ),
    ReplacementRule(
        "relu-method",
        "activation",
        match_method("relu", "relu_"),
        softplus_from_relu,
        lambda ctx: ctx.node.target == "relu_",
    ),
    ReplacementRule(
        "softplus-module", "activation", match_module(nn.Softplus), lambda ctx: softplus_from_softplus(ctx.module.beta)
    ),
    ReplacementRule(
        "softplus-function",
        "activation",
        match_function(F.softplus),
        lambda ctx: softplus_from_softplus(float(ctx.argument("beta", 1, 1.0))),
    ),
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
        lambda ctx: LipschitzBatchNorm.from_batchnorm(ctx.module),
    ),
    ReplacementRule(
        "frozen-batchnorm",
        "batchnorm",
        match_module(*FROZEN_BATCHNORM_TYPES),
        lambda ctx: LipschitzBatchNorm.from_batchnorm(ctx.module, use_batch_stats=False),
    ),
    ReplacementRule(
        "batchnorm-function",
        "batchnorm",
        _both(match_function(F.batch_norm), _functional_batchnorm_has_stats),
        batchnorm_from_function,
    ),
)

# Types that trace as single calls so that the rules above can see them whole.
LEAF_TYPES: tuple[type, ...] = BATCHNORM_ACT_TYPES + FROZEN_BATCHNORM_TYPES + FROZEN_BATCHNORM_ACT_TYPES
