"""Stage 4, export: an LCNN (or any model) to a standard-ops ONNX file with a dynamic batch."""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import onnx
import torch
from torch import nn

from .errors import LcnnError
from .io import atomic_file

DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
STANDARD_DOMAINS = ("", "ai.onnx")


def check_standard_ops(model: onnx.ModelProto) -> None:
    """Raise if any node lives outside the default ONNX domain (it would not run everywhere)."""
    custom = sorted({f"{node.domain}::{node.op_type}" for node in model.graph.node if node.domain not in STANDARD_DOMAINS})
    if custom:
        raise LcnnError(f"ONNX export used non-standard ops: {', '.join(custom)}")


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` in eval mode on the CPU to ``path`` (written atomically) and check it.

    Uses the TorchScript-based exporter (fast, and it folds every eval-time constant: 1/beta,
    the BN clip factor, W/sigma). The file passes onnx.checker and uses only default-domain ops.
    """
    if opset < DEFAULT_OPSET:
        raise LcnnError(f"opset must be >= {DEFAULT_OPSET}, got {opset}")
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    example_input = example_input.detach().cpu()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with atomic_file(path) as temporary:
        try:
            with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (example_input,),
                    str(temporary),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes=axes,
                    do_constant_folding=True,
                )
        except Exception as error:  # the exporter raises many unrelated types
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LcnnError(f"ONNX export failed: {first_line[:200]}") from error
        exported = onnx.load(str(temporary))
        try:
            onnx.checker.check_model(exported, full_check=True)
        except onnx.checker.ValidationError as error:
            raise LcnnError(f"exported ONNX fails onnx.checker: {str(error).splitlines()[0]}") from error
        check_standard_ops(exported)
    return path
