"""Saving a converted model so that ``lcnn_convert.load_converted(DIR)`` rebuilds it in one call.

``model.safetensors`` holds the state dict and, in its metadata, what is needed to rebuild the
module structure: the model name and source, class count, conversion options, the names of the
replacement rules used and the lcnn_convert version that wrote it. Loading rebuilds the original
architecture with random weights, runs the (deterministic) graph pass with the same rules without
estimating anything, and loads the saved tensors strictly. No pickle is involved.

Format 1 (lcnn_convert 0.1.0 before rules were recorded) could only have used the default rules of
its day (ReLU and softplus, ``FORMAT_1_RULES``), and is read as such.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_model as save_safetensors_from
from torch import nn

from . import __version__
from .conversion import DEFAULT_RULES, ConvertOptions, ReplacementRule, convert_with_options
from .conversion.rules import KNOWN_RULES
from .errors import LcnnError, first_line
from .io import atomic_file
from .models import ModelSpec, classifier_classes, find_classifier, load_model_with_spec

WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
REPORT_FILE = "report.json"
METADATA_KEY = "lcnn_convert"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
# The default rules when format 1 was written: ReLU and softplus only (SiLU, GELU, ... were left).
FORMAT_1_RULES = (
    "relu-module",
    "relu-function",
    "relu-method",
    "softplus-module",
    "softplus-function",
    "batchnorm-act",
    "frozen-batchnorm-act",
    "batchnorm",
    "frozen-batchnorm",
    "batchnorm-function",
)


def save(
    model: nn.Module,
    directory: str | Path,
    spec: ModelSpec,
    replace_activations: bool = True,
    rules: Sequence[ReplacementRule] = DEFAULT_RULES,
) -> Path:
    """Write ``directory/model.safetensors`` (atomically) for a model converted from ``spec`` with ``rules``."""
    found = find_classifier(model)
    metadata: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "lcnn_convert_version": __version__,
        "rules": [rule.name for rule in rules],
        "source": spec.source,
        "name": spec.name,
        "num_classes": classifier_classes(found[1]) if found else None,
        "replace_activations": replace_activations,
        "pretrained_cfg": _jsonable(getattr(model, "pretrained_cfg", None)),
    }
    path = Path(directory) / WEIGHTS_FILE
    with atomic_file(path) as temporary:
        save_safetensors_from(model, str(temporary), metadata={METADATA_KEY: json.dumps(metadata)})
    return path


def checksum(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def checksums(directory: str | Path, names: Iterable[str]) -> dict[str, str]:
    """What report.json records of the files written beside it."""
    return {name: checksum(Path(directory) / name) for name in sorted(names) if name != REPORT_FILE}


def check_files(directory: str | Path) -> None:
    """Raise unless ``directory`` holds a readable report.json and every file it lists, unchanged."""
    directory = Path(directory)
    report_path = directory / REPORT_FILE
    if not directory.is_dir():
        raise LcnnError(f"no such output dir: {directory}")
    try:
        report = json.loads(report_path.read_text())
        if isinstance(report, dict) and "checksums" not in report:
            raise LcnnError(f"{report_path} records no checksums (written by an older lcnn-convert): convert again")
        recorded = report["checksums"]
        if not isinstance(recorded, dict) or not all(isinstance(value, str) for value in recorded.values()):
            raise TypeError("checksums is not a name -> digest table")
    except FileNotFoundError:
        raise LcnnError(f"no {REPORT_FILE} in {directory}: not a complete lcnn-convert output") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LcnnError(f"{report_path} is unreadable or damaged ({first_line(error, 120)})") from error
    for name in (WEIGHTS_FILE, ONNX_FILE):
        if name not in recorded:
            raise LcnnError(f"{report_path} records no checksum of {name}")
    for name, digest in sorted(recorded.items()):
        path = directory / name
        if not path.is_file():
            raise LcnnError(f"{name} is missing from {directory} (report.json lists it)")
        if checksum(path) != digest:
            raise LcnnError(f"{path} has changed since lcnn-convert wrote it (its checksum differs from report.json's)")


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as error:  # noqa: BLE001 - a damaged file fails in many ways inside the reader
        raise LcnnError(f"cannot read {path}: not a valid safetensors file ({first_line(error, 120)})") from error
    if raw is None:
        raise LcnnError(f"{path} was not written by lcnn_convert (no '{METADATA_KEY}' metadata)")
    try:
        metadata = json.loads(raw)
    except ValueError as error:
        raise LcnnError(
            f"{path}: its '{METADATA_KEY}' metadata is damaged (not JSON: {first_line(error, 80)})"
        ) from error
    if not isinstance(metadata, dict):
        raise LcnnError(f"{path}: its '{METADATA_KEY}' metadata is damaged (not a JSON object)")
    written = metadata.get("format")
    if written not in READABLE_FORMATS:
        by = f" by lcnn_convert {metadata['lcnn_convert_version']}" if "lcnn_convert_version" in metadata else ""
        raise LcnnError(
            f"{path} has format {written} (written{by}); lcnn_convert {__version__} reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    if written == 1:
        metadata = {**metadata, "rules": list(FORMAT_1_RULES), "lcnn_convert_version": None}
    expected: dict[str, type | tuple[type, ...]] = {
        "source": str,
        "name": str,
        "num_classes": (int, type(None)),
        "replace_activations": bool,
        "rules": list,
    }
    for key, kinds in expected.items():
        if not isinstance(metadata.get(key), kinds):
            raise LcnnError(
                f"{path}: its '{METADATA_KEY}' metadata is damaged ('{key}' is missing or of the wrong type)"
            )
    return metadata


def _rules_to_rebuild(
    weights: Path, recorded: list[Any], rules: Sequence[ReplacementRule] | None
) -> tuple[ReplacementRule, ...]:
    """The rules the model was converted with, in their order: ``rules`` (checked against the
    recorded names), or this version's built-in rules of those names."""
    if not all(isinstance(name, str) for name in recorded):
        raise LcnnError(f"{weights}: its '{METADATA_KEY}' metadata is damaged ('rules' is not a list of names)")
    if rules is not None:
        given = [rule.name for rule in rules]
        if given != recorded:
            raise LcnnError(f"{weights} was converted with the rules {recorded}; the rules given are {given}")
        return tuple(rules)
    known = KNOWN_RULES
    unknown = [name for name in recorded if name not in known]
    if unknown:
        raise LcnnError(
            f"{weights} was converted with rules that are not lcnn_convert's defaults ({', '.join(unknown)}); "
            "pass the same rules: lcnn_convert.load_converted(path, rules=...)"
        )
    return tuple(known[name] for name in recorded)


def load_converted(path: str | Path, rules: Sequence[ReplacementRule] | None = None) -> nn.Module:
    """Rebuild a converted model from an output dir (or its model.safetensors), in eval mode.

    A model converted with rules of your own (``lc.convert(..., rules=...)``) needs the same
    ``rules`` to be rebuilt; the defaults are found by the names recorded in the file.
    """
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise LcnnError(f"no {WEIGHTS_FILE} in {path}")
    metadata = read_metadata(weights)
    used = _rules_to_rebuild(weights, metadata["rules"], rules)
    original, _ = load_model_with_spec(
        f"{metadata['source']}:{metadata['name']}", pretrained=False, num_classes=metadata["num_classes"]
    )
    options = ConvertOptions(
        beta=1.0, replace_activations=metadata["replace_activations"], estimate_norms=False, rules=used
    )
    model = convert_with_options(original, None, options)
    try:
        missing, unexpected = load_safetensors_into(model, str(weights), strict=False)
    except (SafetensorError, RuntimeError) as error:
        raise LcnnError(f"{weights} does not fit the rebuilt model: {first_line(error)}") from error
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        raise LcnnError(f"{weights} does not fit the rebuilt {metadata['name']}: {detail}")
    if metadata.get("pretrained_cfg") is not None:
        model.pretrained_cfg = metadata["pretrained_cfg"]
    return model.eval()


# The earlier name, kept: lcnn_convert.load(DIR).
load = load_converted
