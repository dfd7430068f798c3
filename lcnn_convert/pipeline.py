"""The whole job behind ``lcnn-convert MODEL``: load -> convert -> export -> verify -> report.

Everything is written into a staged directory that replaces the output dir only when complete.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from . import __version__
from .artifacts import ONNX_FILE, REPORT_FILE, WEIGHTS_FILE, save
from .conversion import convert
from .errors import LcnnError
from .export import DEFAULT_OPSET, export_onnx
from .io import StagedDirectory
from .models import classifier_classes, data_config, find_classifier, load_model_with_spec, resolve_model_name
from .report import write_report
from .verify import DEFAULT_ATOL, verify_onnx

CALIBRATION_BATCH = 32


@dataclass
class ConversionJob:
    model: str
    weights: Path | None = None
    pretrained: bool = True
    num_classes: int | None = None
    beta: float | str = "auto"
    image_size: int | None = None
    output: Path | None = None
    overwrite: bool = False
    opset: int = DEFAULT_OPSET
    device: str = "auto"
    atol: float = DEFAULT_ATOL
    seed: int = 0

    def validate(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise LcnnError(f"--num-classes must be a positive integer, got {self.num_classes}")
        if self.beta != "auto" and not (isinstance(self.beta, float) and self.beta > 0):
            raise LcnnError(f"--beta must be 'auto' or a number > 0, got {self.beta}")
        if self.image_size is not None and self.image_size < 8:
            raise LcnnError(f"--image-size must be at least 8, got {self.image_size}")
        if self.opset < DEFAULT_OPSET:
            raise LcnnError(f"--opset must be >= {DEFAULT_OPSET}, got {self.opset}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise LcnnError(f"--device must be auto, cpu or cuda, got '{self.device}'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise LcnnError("--device cuda was asked for but no CUDA device is available")
        if not self.atol > 0:
            raise LcnnError(f"--atol must be > 0, got {self.atol}")


def parse_beta(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise LcnnError(f"--beta must be 'auto' or a number > 0, got '{text}'") from None
    if not value > 0:
        raise LcnnError(f"--beta must be 'auto' or a number > 0, got {text}")
    return value


def default_output(model: str) -> Path:
    return Path("lcnn-out") / re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def _step(console: Console, text: str, timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    with console.status(f"{text}…"):
        yield
    timings[key] = round(time.perf_counter() - start, 3)
    console.print(f"[green]✓[/green] {text} [dim]({timings[key]:.1f}s)[/dim]")


def run_conversion(job: ConversionJob, console: Console | None = None) -> dict[str, Any]:
    """Run the job and return the report; the output dir holds model.onnx, model.safetensors, report.json."""
    console = console or Console(stderr=True)
    job.validate()
    spec = resolve_model_name(job.model)
    timings: dict[str, float] = {}
    with StagedDirectory(job.output or default_output(job.model), job.overwrite) as stage:
        with _step(console, f"load {spec}", timings, "load"):
            model, spec = load_model_with_spec(str(spec), job.pretrained, job.weights, job.num_classes)
            config = data_config(model, spec)
            channels, height, width = config["input_size"]
            if job.image_size:
                height = width = job.image_size
            generator = torch.Generator().manual_seed(job.seed)
            calibration = torch.randn((CALIBRATION_BATCH, channels, height, width), generator=generator)
            device = resolve_device(job.device)
        with _step(console, "convert", timings, "convert"):
            try:
                converted = convert(model.to(device), calibration.to(device), beta=job.beta)
            except RuntimeError as error:
                reason = str(error).strip().splitlines()[0][:200]
                raise LcnnError(f"{spec} does not run at {height}x{width} ({reason}); try another --image-size") from error
            converted = converted.cpu()
        with _step(console, "save weights", timings, "save"):
            save(converted, stage.path, spec)
        with _step(console, f"export ONNX (opset {job.opset})", timings, "export"):
            export_onnx(converted, stage.path / ONNX_FILE, calibration[:2], opset=job.opset)
        with _step(console, "verify in onnxruntime", timings, "verify"):
            parity = verify_onnx(converted, stage.path / ONNX_FILE, calibration, atol=job.atol, seed=job.seed + 1)
        found = find_classifier(converted)
        report = {
            "model": job.model,
            "source": spec.source,
            "name": spec.name,
            "num_classes": classifier_classes(found[1]) if found else None,
            "input_size": [channels, height, width],
            "pretrained": job.pretrained and job.weights is None,
            "weights": str(job.weights) if job.weights else None,
            "conversion": converted.conversion_report.to_dict(),
            "parity": parity.to_dict(),
            "files": {"onnx": ONNX_FILE, "weights": WEIGHTS_FILE, "report": REPORT_FILE},
            "timings_s": timings,
            "lcnn_convert_version": __version__,
        }
        report["conversion"]["beta"]["calibration_data"] = "random normal" if job.beta == "auto" else None
        write_report(stage.path / REPORT_FILE, report)
    report["output_dir"] = str(stage.final)
    return report
