"""Saving a converted model so that ``lcnn_convert.load(DIR)`` rebuilds it in one call.

``model.safetensors`` holds the state dict and, in its metadata, what is needed to rebuild the
module structure: the model name and source, class count and conversion options. Loading
rebuilds the original architecture with random weights, runs the (deterministic) graph pass
without estimating anything, and loads the saved tensors strictly. No pickle is involved.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_model as save_safetensors_from
from torch import nn

from .conversion import ConvertOptions, convert_with_options
from .errors import LcnnError, first_line
from .io import atomic_file
from .models import ModelSpec, classifier_classes, find_classifier, load_model_with_spec

WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
REPORT_FILE = "report.json"
METADATA_KEY = "lcnn_convert"
FORMAT_VERSION = 1


def save(model: nn.Module, directory: str | Path, spec: ModelSpec, replace_activations: bool = True) -> Path:
    """Write ``directory/model.safetensors`` (atomically) for a model converted from ``spec``."""
    found = find_classifier(model)
    metadata: dict[str, Any] = {
        "format": FORMAT_VERSION,
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
        raise LcnnError(f"{path}: its '{METADATA_KEY}' metadata is damaged (not JSON: {first_line(error, 80)})") from error
    if not isinstance(metadata, dict):
        raise LcnnError(f"{path}: its '{METADATA_KEY}' metadata is damaged (not a JSON object)")
    if metadata.get("format") != FORMAT_VERSION:
        raise LcnnError(f"{path} has format {metadata.get('format')}; this version reads {FORMAT_VERSION}")
    expected = {"source": str, "name": str, "num_classes": (int, type(None)), "replace_activations": bool}
    for key, kinds in expected.items():
        if not isinstance(metadata.get(key), kinds):
            raise LcnnError(f"{path}: its '{METADATA_KEY}' metadata is damaged ('{key}' is missing or of the wrong type)")
    return metadata


def load(path: str | Path) -> nn.Module:
    """Rebuild a converted model from an output dir (or its model.safetensors), in eval mode."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise LcnnError(f"no {WEIGHTS_FILE} in {path}")
    metadata = read_metadata(weights)
    original, _ = load_model_with_spec(
        f"{metadata['source']}:{metadata['name']}", pretrained=False, num_classes=metadata["num_classes"]
    )
    options = ConvertOptions(beta=1.0, replace_activations=metadata["replace_activations"], estimate_norms=False)
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
