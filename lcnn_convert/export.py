"""Stage 4, export: an LCNN (or any model) to a standard-ops ONNX file with a dynamic batch."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import onnx
import torch
from torch import nn

from .defaults import DEFAULT_OPSET
from .errors import LcnnError, first_line
from .fold_scales import fold_activation_scales
from .io import out_of_space
from .layers.inference import freeze_for_inference

# The newest opset torch.onnx writes (onnxruntime runs it); past it the exporter silently writes another.
MAX_OPSET = 23
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DYNAMO_MIN_OPSET = 18
STANDARD_DOMAINS = ("", "ai.onnx")
# A protobuf message cannot exceed 2 GiB: past this many bytes of weights the tensors go to a
# side file (``model.onnx.data``), with margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def check_opset(opset: int) -> None:
    if not DEFAULT_OPSET <= opset <= MAX_OPSET:
        raise LcnnError(
            f"opset must lie in [{DEFAULT_OPSET}, {MAX_OPSET}] (what torch.onnx writes and onnxruntime runs), got {opset}"
        )


def written_opset(model: onnx.ModelProto | str | Path) -> int:
    """The default-domain opset of an ONNX model (or file)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return max(entry.version for entry in model.opset_import if entry.domain in STANDARD_DOMAINS)


def external_data_path(path: str | Path) -> Path:
    """Where the weights of ``path`` live when it is exported with external data."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def needs_external_data(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) > EXTERNAL_DATA_THRESHOLD


def check_standard_ops(model: onnx.ModelProto) -> None:
    """Raise if any node lives outside the default ONNX domain (it would not run everywhere)."""
    custom = sorted(
        {f"{node.domain}::{node.op_type}" for node in model.graph.node if node.domain not in STANDARD_DOMAINS}
    )
    if custom:
        raise LcnnError(f"ONNX export used non-standard ops: {', '.join(custom)}")


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Send file descriptors 1 and 2 to a scratch file: when the TorchScript exporter gives up on a
    graph it prints the whole IR from C++ to stdout (around 200 lines), which Python's
    redirect_stdout cannot catch; we fall back to the other exporter, so the dump is noise."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError):  # no real fds (embedded interpreters, some notebooks)
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            for fd, copy_of in zip((1, 2), saved):
                os.dup2(copy_of, fd)
                os.close(copy_of)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool) -> None:
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    quiet = (warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()))
    with quiet[0], quiet[1], quiet[2], _quiet_native_output():
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


def _export_dynamo(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool, external: bool
) -> None:
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
        assert program is not None  # None only for the TorchScript exporter (dynamo=False)
        program.save(str(path), external_data=external)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    external_data: bool | None = None,
    frozen: bool = True,
    fold: bool = True,
) -> Path:
    """Export ``model`` in eval mode on the CPU to ``path`` and check it.

    Uses the TorchScript-based exporter (fast, and it folds eval-time constants such as W/sigma),
    falling back to the torch.export-based one (opset >= 18) for graphs the first cannot trace.
    The file passes onnx.checker and uses only default-domain ops. With ``frozen`` (the default)
    every centered softplus is exported in its inference form, beta a constant
    (``layers.inference``): the learnable form costs ~1.5x the original's latency in
    onnxruntime, see docs/benchmarks.md. With ``fold`` as well, beta, 1/beta and the log 2 shift
    move into the neighbouring layers' constants wherever that is exact (``fold_scales``). Models
    with more than ~1.8 GB of weights (``external_data=None``), or any model with
    ``external_data=True``, keep their tensors in ``path`` + ".data" beside the graph; onnxruntime
    and onnx.load find it by the graph's path.

    Everything is built in a scratch directory beside ``path``; the data file is moved into place
    first and the graph last, so an existing ``path`` is only ever replaced by a complete export.
    """
    check_opset(opset)
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    if frozen:
        model = freeze_for_inference(model)
        if fold:
            model, _ = fold_activation_scales(model, example_input.detach().cpu())
    external = needs_external_data(model) if external_data is None else external_data
    example_input = example_input.detach().cpu()
    data_path = external_data_path(path)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        raw, final = scratch / "exported.onnx", scratch / path.name
        expected_opset = opset
        try:
            _export_torchscript(model, example_input, raw, opset, dynamic_batch)
        except Exception as script_error:  # the exporters raise many unrelated types
            if out_of_space(script_error) is not None:
                raise
            # Some graphs (e.g. scaled_dot_product_attention under jit tracing) only export
            # through torch.export; that exporter starts at opset 18.
            for leftover in scratch.iterdir():
                leftover.unlink()
            expected_opset = max(opset, DYNAMO_MIN_OPSET)
            try:
                _export_dynamo(model, example_input, raw, expected_opset, dynamic_batch, external)
            except Exception:
                raise LcnnError(f"ONNX export failed: {first_line(script_error)}") from script_error
        # Re-saved so that the tensors sit in one file under our name (or inline), whatever the
        # exporter chose.
        onnx.save_model(
            onnx.load(str(raw)),
            str(final),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=1024,
        )
        try:
            onnx.checker.check_model(str(final), full_check=True)  # by path: works past 2 GiB
        except onnx.checker.ValidationError as error:
            raise LcnnError(f"exported ONNX fails onnx.checker: {first_line(error)}") from error
        written = onnx.load(str(final), load_external_data=False)
        check_standard_ops(written)
        if written_opset(written) != expected_opset:
            raise LcnnError(f"the ONNX exporter wrote opset {written_opset(written)} instead of {expected_opset}")
        if external:
            os.replace(scratch / data_path.name, data_path)
        os.replace(final, path)
        if not external:
            data_path.unlink(missing_ok=True)  # a previous export's weights, no longer referenced
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path
