"""Stage 1, load: model names -> nn.Module, with pretrained or local weights.

Names follow the two libraries' own conventions: ``resnet18`` (torchvision first, then timm),
``torchvision:resnet18`` or ``timm:resnet18``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .errors import LcnnError, first_line

Source = Literal["torchvision", "timm"]
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
DEFAULT_INPUT_SIZE = (3, 224, 224)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    source: Source
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


@lru_cache(maxsize=1)
def torchvision_classifiers() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


@lru_cache(maxsize=1)
def timm_models() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def resolve_model_name(name: str) -> ModelSpec:
    """Map a user's model name to a library and a model, or fail with the closest names."""
    source, _, bare = name.rpartition(":")
    bare = bare.strip()
    if source and source not in ("torchvision", "timm"):
        raise LcnnError(f"unknown model source '{source}' in '{name}': use torchvision:NAME or timm:NAME")
    if source in ("", "torchvision") and bare in torchvision_classifiers():
        return ModelSpec("torchvision", bare)
    if source in ("", "timm"):
        import timm

        if bare in timm_models() or (("." in bare) and timm.is_model(bare)):
            return ModelSpec("timm", bare)
    candidates = {
        "": torchvision_classifiers() + timm_models(),
        "torchvision": torchvision_classifiers(),
        "timm": timm_models(),
    }[source]
    close = difflib.get_close_matches(bare, list(dict.fromkeys(candidates)), n=5, cutoff=0.6)
    where = f"{source} " if source else "torchvision or timm "
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise LcnnError(f"unknown model '{name}': not a {where}classification model{hint}")


def find_classifier(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The classification head: timm's get_classifier(), else the last Linear (or Conv) layer."""
    named = dict(model.named_modules())
    get_classifier = getattr(model, "get_classifier", None)
    head = None
    if callable(get_classifier):
        with contextlib.suppress(AttributeError, NotImplementedError):
            head = get_classifier()
    if head is not None:
        for path, module in named.items():
            if module is head and (hasattr(head, "out_features") or hasattr(head, "out_channels")):
                return path, module
    for kinds in ((nn.Linear,), (nn.Conv2d,)):
        last = [(path, module) for path, module in named.items() if type(module) in kinds]
        if last:
            return last[-1]
    return None


def classifier_classes(module: nn.Module) -> int:
    """The number of outputs of a head ``find_classifier`` found (a Linear, a Conv or timm's own)."""
    for attribute in ("out_features", "out_channels"):
        if hasattr(module, attribute):
            return int(getattr(module, attribute))
    raise LcnnError(f"the head {type(module).__name__} states no number of classes (no out_features/out_channels)")


def reset_head(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a fresh, randomly initialised head with ``num_classes`` outputs."""
    reset_classifier = getattr(model, "reset_classifier", None)
    if callable(reset_classifier):
        reset_classifier(num_classes)
        return
    found = find_classifier(model)
    if found is None:
        raise LcnnError(f"cannot find the classification head of {type(model).__name__} to resize it")
    path, head = found
    new_head: nn.Module
    if isinstance(head, nn.Linear):
        new_head = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    elif isinstance(head, nn.Conv2d):
        (kernel_height, kernel_width), (stride_y, stride_x) = head.kernel_size, head.stride
        padding = head.padding if isinstance(head.padding, str) else (head.padding[0], head.padding[1])
        new_head = nn.Conv2d(
            head.in_channels, num_classes, (kernel_height, kernel_width), (stride_y, stride_x), padding
        )
    else:
        raise LcnnError(
            f"cannot resize the head of {type(model).__name__}: a {type(head).__name__}, not a Linear or Conv2d"
        )
    model.set_submodule(path, new_head.to(head.weight))
    if hasattr(model, "num_classes"):
        setattr(model, "num_classes", num_classes)  # noqa: B010 - a plain attribute; nn.Module's typing says Tensor


def _build(spec: ModelSpec, pretrained: bool, num_classes: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if spec.source == "timm":
        import timm

        return timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    import torchvision

    if not pretrained:
        return torchvision.models.get_model(spec.name, weights=None, **kwargs)
    weights = torchvision.models.get_model_weights(spec.name).DEFAULT
    model = torchvision.models.get_model(spec.name, weights=weights)
    if num_classes is not None and num_classes != len(weights.meta["categories"]):
        reset_head(model, num_classes)
    return model


@contextlib.contextmanager
def _quiet_hub_retries() -> Iterator[None]:
    """Offline, huggingface_hub logs every retry of every file; the one-line error says it all."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _build_pretrained(spec: ModelSpec, num_classes: int | None) -> nn.Module:
    try:
        with _quiet_hub_retries():
            return _build(spec, pretrained=True, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError, ImportError) as error:
        # Downloads fail in many library-specific ways (URLError, HTTP errors, hub errors);
        # all of them are OSError/RuntimeError subclasses.
        raise LcnnError(
            f"could not get pretrained weights for {spec} ({first_line(error, 160)}); "
            "pass --weights PATH to use a local checkpoint, or --no-pretrained for random weights"
        ) from error


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or a torch file with ``weights_only=True``.

    Accepts a plain state dict or one wrapped as {"state_dict": ...} / {"model": ...}; strips the
    ``module.`` prefix that DataParallel/DDP adds. Never executes code stored in a pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise LcnnError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path))
        except Exception as error:  # noqa: BLE001 - a damaged file can fail in any way inside the reader
            raise LcnnError(
                f"cannot read weights file {path}: not a valid safetensors file ({first_line(error, 120)})"
            ) from error
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            forbidden = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
            if forbidden is None:
                raise LcnnError(
                    f"cannot read weights file {path}: not a PyTorch checkpoint (bad pickle data)"
                ) from error
            raise LcnnError(
                f"refusing to load {path}: it would import {forbidden.group(1)}, and checkpoints are only read "
                "with weights_only=True; re-save it as a plain state dict or .safetensors"
            ) from error
        except Exception as error:  # noqa: BLE001 - garbage bytes can break the unpickler in any way (IndexError, KeyError, ...)
            raise LcnnError(
                f"cannot read weights file {path}: not a PyTorch checkpoint ({first_line(error, 120)})"
            ) from error
    for _ in range(3):
        if isinstance(loaded, Mapping):
            wrapped = next((loaded[key] for key in WRAPPER_KEYS if isinstance(loaded.get(key), Mapping)), None)
            if wrapped is not None:
                loaded = wrapped
    if not isinstance(loaded, Mapping) or not loaded:
        raise LcnnError(f"cannot read weights file {path}: expected a state dict of tensors")
    state = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise LcnnError(f"cannot read weights file {path}: entry '{key}' is not a tensor")
        state[key.removeprefix("module.")] = value
    bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise LcnnError(f"weights file {path} holds NaN or Inf values (in {len(bad)} tensors, e.g. '{bad[0]}')")
    return state


def _head_classes_in(state: Mapping[str, torch.Tensor], spec: ModelSpec) -> tuple[str, int] | None:
    skeleton = _build(spec, pretrained=False, num_classes=None)
    found = find_classifier(skeleton)
    if found is None:
        return None
    key = f"{found[0]}.weight"
    if key not in state:
        return None
    weight = state[key]
    if weight.ndim < 2 or weight.shape[0] == 0:
        raise LcnnError(
            f"the head weight '{key}' in the weights file has shape {list(weight.shape)}: expected [classes, features] "
            "with at least one class"
        )
    return key, int(weight.shape[0])


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """load_state_dict(strict=True) with the mismatch summarised in one line."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong_shape = [key for key in own if key in state and own[key].shape != state[key].shape]
    wrong_kind = [
        f"'{key}' is {state[key].dtype}"
        for key in own
        if key in state and own[key].is_floating_point() and not state[key].is_floating_point()
    ]
    if wrong_kind:
        # int8, bool or complex tensors would be cast into float parameters without a word
        raise LcnnError(
            f"{origin} holds {len(wrong_kind)} non-float tensors for float parameters (e.g. {wrong_kind[0]})"
        )
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. '{keys[0]}')")
        raise LcnnError(f"{origin} does not match {type(model).__name__}: {', '.join(parts)}")
    model.load_state_dict(state, strict=True)


def create_model(
    name: str,
    pretrained: bool = True,
    weights: str | Path | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """Build a torchvision or timm classifier by name, with its weights, in eval mode.

    ``weights`` (a local state dict) wins over ``pretrained``. With local weights and no
    ``num_classes``, the class count is read from the checkpoint's head.
    """
    model, _ = load_model_with_spec(name, pretrained=pretrained, weights=weights, num_classes=num_classes)
    return model


# The earlier name, kept: lcnn_convert.load_model(NAME).
load_model = create_model


def load_model_with_spec(
    name: str,
    pretrained: bool = True,
    weights: str | Path | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, ModelSpec]:
    if num_classes is not None and num_classes < 1:
        raise LcnnError(f"num_classes must be a positive integer, got {num_classes}")
    spec = resolve_model_name(name)
    if weights is not None:
        state = read_state_dict(weights)
        head = _head_classes_in(state, spec)
        if head is not None and num_classes is not None and head[1] != num_classes:
            raise LcnnError(
                f"{weights} has a {head[1]}-class head ('{head[0]}') but num_classes={num_classes} was asked for"
            )
        if num_classes is None and head is not None:
            num_classes = head[1]
        model = _build(spec, pretrained=False, num_classes=num_classes)
        load_weights(model, state, f"weights file {weights}")
    elif pretrained:
        model = _build_pretrained(spec, num_classes)
    else:
        model = _build(spec, pretrained=False, num_classes=num_classes)
    return model.eval(), spec


@dataclass(frozen=True)
class DataConfig:
    """What a model expects of its input, as timm's ``pretrained_cfg`` states it: the ``(C, H, W)`` size,
    the normalisation and the resize interpolation. ``to_dict()`` is timm's data-config dict."""

    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> DataConfig:
        """A timm-style dict (``timm.data.resolve_data_config``, a ``pretrained_cfg``); missing keys
        take ImageNet's defaults. Values are checked where they are used (``load_dataset``)."""
        default = cls()
        size = tuple(int(value) for value in config.get("input_size") or default.input_size)
        if len(size) != 3:
            raise LcnnError(f"a data config's input_size is (channels, height, width), got {size}")
        return cls(
            input_size=(size[0], size[1], size[2]),
            mean=tuple(config.get("mean", default.mean)),
            std=tuple(config.get("std", default.std)),
            interpolation=str(config.get("interpolation", default.interpolation)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def data_config(model: nn.Module, spec: ModelSpec | None = None) -> DataConfig:
    """Input size, mean, std and interpolation the model expects (timm's or torchvision's)."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, Mapping) and pretrained_cfg.get("input_size"):
        return DataConfig.from_mapping(pretrained_cfg)
    if spec is not None and spec.source == "torchvision":
        import torchvision

        try:
            transforms = torchvision.models.get_model_weights(spec.name).DEFAULT.transforms()
        except (ValueError, AttributeError):
            transforms = None
        if transforms is not None:
            size = transforms.crop_size[0]
            return DataConfig(
                (3, size, size), tuple(transforms.mean), tuple(transforms.std), transforms.interpolation.value
            )
    return DataConfig()
