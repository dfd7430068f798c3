"""torch.fx tracing that honours timm's leaf modules and autowrapped functions."""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import fx, nn

from ..layers import LCNN_LAYERS
from ..models import find_classifier
from .rules import LEAF_TYPES


def _timm_leaves() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    try:
        from timm.layers import DropBlock2d, DropPath, get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    functions = tuple(fn for fn in get_notrace_functions() if callable(fn))
    return (*get_notrace_modules(), DropPath, DropBlock2d), functions


class LcnnTracer(fx.Tracer):
    """Keeps timm's no-trace modules, norm-act blocks and LCNN layers as single calls."""

    def __init__(self, extra_leaf_types: tuple[type, ...] = ()) -> None:
        timm_modules, timm_functions = _timm_leaves()
        super().__init__(autowrap_functions=timm_functions)
        self.leaf_types = (*timm_modules, *LEAF_TYPES, *LCNN_LAYERS, *extra_leaf_types)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self.leaf_types) or super().is_leaf_module(module, qualified_name)


class LcnnGraphModule(fx.GraphModule):
    """A converted, traced model that keeps the head API timm users rely on."""

    classifier_path: str | None = None

    def __deepcopy__(self, memo: dict) -> LcnnGraphModule:
        # GraphModule's deepcopy rebuilds the module from its graph and drops plain attributes.
        result = cast(LcnnGraphModule, super().__deepcopy__(memo))  # torch builds a type(self)
        for name in ("classifier_path", "conversion_report", *KEPT_ATTRIBUTES):
            if name in self.__dict__:
                setattr(result, name, copy.deepcopy(self.__dict__[name], memo))
        return result

    def get_classifier(self) -> nn.Module:
        if self.classifier_path is None:
            raise AttributeError("this model has no recognised classification head")
        return self.get_submodule(self.classifier_path)

    def reset_classifier(self, num_classes: int, global_pool: Any = None) -> None:
        """Replace the head with a fresh normalized linear layer with ``num_classes`` outputs."""
        from ..layers import NormalizedLinear

        if global_pool is not None:
            raise ValueError("a converted model's global pooling is fixed; only num_classes can change")
        head = self.get_classifier()
        assert self.classifier_path is not None  # get_classifier raised otherwise
        # plain int attributes of a linear or conv head, which mypy reads through Module.__getattr__
        in_features = cast(int, head.in_features if hasattr(head, "in_features") else head.in_channels)
        fresh = nn.Linear(in_features, num_classes).to(head.get_parameter("weight"))
        layer, _ = NormalizedLinear.from_linear(fresh, explicit_scale=True)
        self.set_submodule(self.classifier_path, layer)
        self.num_classes = num_classes


# Attributes that timm/torchvision users read off a model and that tracing would drop.
KEPT_ATTRIBUTES = ("pretrained_cfg", "default_cfg", "num_classes", "num_features", "global_pool", "feature_info")


def trace(model: nn.Module, extra_leaf_types: tuple[type, ...] = ()) -> LcnnGraphModule:
    """Symbolically trace ``model`` (in its current mode) into an LcnnGraphModule."""
    tracer = LcnnTracer(extra_leaf_types)
    graph = tracer.trace(model)
    graph_module = LcnnGraphModule(tracer.root, graph, type(model).__name__)
    for name in KEPT_ATTRIBUTES:
        if hasattr(model, name) and not isinstance(getattr(model, name), (nn.Module, torch.Tensor)):
            setattr(graph_module, name, getattr(model, name))
    found = find_classifier(model)
    graph_module.classifier_path = found[0] if found else None
    return graph_module
