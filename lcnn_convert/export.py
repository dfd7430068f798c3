"""Stage 4, export: an LCNN (or any model) to a standard-ops ONNX file with a dynamic batch."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import onnx
import torch
from torch import nn

from .errors import LcnnError, first_line
from .io import atomic_file

DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DYNAMO_MIN_OPSET = 18
STANDARD_DOMAINS = ("", "ai.onnx")


def check_standard_ops(model: onnx.ModelProto) -> None:
    """Raise if any node lives outside the default ONNX domain (it would not run everywhere)."""
    custom = sorted({f"{node.domain}::{node.op_type}" for node in model.graph.node if node.domain not in STANDARD_DOMAINS})
    if custom:
        raise LcnnError(f"ONNX export used non-standard ops: {', '.join(custom)}")


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to a scratch file: when the TorchScript exporter gives up on a graph it
    prints the whole IR from C++ (around 200 lines), which Python's redirect_stderr cannot catch;
    we fall back to the other exporter, so the dump is noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters, some notebooks)
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool) -> None:
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    quiet = (warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()))
    with quiet[0], quiet[1], quiet[2], _quiet_native_stderr():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool) -> None:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=shapes,
            optimize=True,
        )
        program.save(str(path), external_data=False)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` in eval mode on the CPU to ``path`` (written atomically) and check it.

    Uses the TorchScript-based exporter (fast, and it folds eval-time constants such as W/sigma),
    falling back to the torch.export-based one (opset >= 18) for graphs the first cannot trace.
    The file passes onnx.checker and uses only default-domain ops.
    """
    if opset < DEFAULT_OPSET:
        raise LcnnError(f"opset must be >= {DEFAULT_OPSET}, got {opset}")
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    example_input = example_input.detach().cpu()
    with atomic_file(path) as temporary:
        try:
            _export_torchscript(model, example_input, temporary, opset, dynamic_batch)
        except Exception as script_error:  # the exporters raise many unrelated types
            # Some graphs (e.g. scaled_dot_product_attention under jit tracing) only export
            # through torch.export; that exporter starts at opset 18.
            try:
                _export_dynamo(model, example_input, temporary, max(opset, DYNAMO_MIN_OPSET), dynamic_batch)
            except Exception:
                raise LcnnError(f"ONNX export failed: {first_line(script_error)}") from script_error
        exported = onnx.load(str(temporary))
        try:
            onnx.checker.check_model(exported, full_check=True)
        except onnx.checker.ValidationError as error:
            raise LcnnError(f"exported ONNX fails onnx.checker: {first_line(error)}") from error
        check_standard_ops(exported)
    return path
