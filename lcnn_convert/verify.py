"""Stage 5, verify: an ONNX runtime (onnxruntime, or OpenVINO) against PyTorch eval mode on the same inputs.

A file that passes in two independent runtimes is what "runs anywhere" means: ``RUNTIMES`` knows
each one (how to load a file, how to run a batch, what to install), and ``verify_onnx`` applies the
same gates whichever runs it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .fidelity import first_tensor
from .defaults import DEFAULT_ATOL, DEFAULT_RANDOM_INPUTS, DEFAULT_RUNTIME, ONNX_RUNTIMES
from .errors import LcnnError, first_line

DEFAULT_MIN_TOP1 = 1.0
DEFAULT_TIE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ParityResult:
    """How far the ONNX logits are from PyTorch's. ``max_rel_diff`` = max |diff| / max |logit|.

    ``top1_agreement`` compares argmaxes over the inputs whose PyTorch logits have a top-2
    margin of at least ``tie_tolerance`` (1e-5 by default, 10x below atol): a random-weight
    model on random inputs produces near-ties that float rounding breaks either way, and those
    ``near_ties`` are counted apart. ``top1_exact_agreement`` compares every input.
    """

    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float
    top1_exact_agreement: float
    near_ties: int
    num_inputs: int
    atol: float
    min_top1_agreement: float
    passed: bool
    runtime: str = "onnxruntime"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failure(self) -> str | None:
        """One line saying which gate failed and by how much, or None if it passed."""
        if self.passed:
            return None
        problems = []
        if not self.max_abs_diff <= self.atol:
            problems.append(f"max abs diff {self.max_abs_diff:.3g} > atol {self.atol:.3g}")
        if self.top1_agreement < self.min_top1_agreement:
            problems.append(f"top-1 agreement {self.top1_agreement:.2%} < {self.min_top1_agreement:.2%}")
        return f"ONNX parity failed in {self.runtime}: " + "; ".join(problems) + f" over {self.num_inputs} inputs"

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity {verdict}: max abs diff {self.max_abs_diff:.3g} (atol {self.atol:.3g}), "
            f"max rel diff {self.max_rel_diff:.3g}, top-1 agreement {self.top1_agreement:.2%} "
            f"over {self.num_inputs} inputs ({self.runtime})"
        )


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise LcnnError(f"onnxruntime cannot load {path}: {first_line(error)}") from error


@dataclass(frozen=True)
class LoadedOnnx:
    """An ONNX file loaded once into a runtime: ``run`` maps a float32 NCHW array to the first
    output; ``input_dims`` are the input's dimensions (None where dynamic)."""

    run: Callable[[np.ndarray], np.ndarray]
    input_dims: list[int | None]


@dataclass(frozen=True)
class Runtime:
    """One ONNX runtime: ``load(path)`` loads a file into it; ``install`` says how to get it where
    it is missing."""

    name: str
    module: str
    install: str
    load: Callable[[Path], LoadedOnnx]


def _onnxruntime_load(path: Path) -> LoadedOnnx:
    session = onnx_session(path)
    first = session.get_inputs()[0]
    dims = [dim if isinstance(dim, int) else None for dim in first.shape]
    return LoadedOnnx(lambda batch: session.run(None, {first.name: batch})[0], dims)


def _openvino_load(path: Path) -> LoadedOnnx:
    import openvino

    core = openvino.Core()
    try:
        model = core.read_model(str(path))
    except Exception as error:  # OpenVINO raises RuntimeError/its own types for unreadable graphs
        raise LcnnError(f"OpenVINO cannot load {path}: {first_line(error)}") from error
    shape = model.inputs[0].get_partial_shape()
    dims = [dim.get_length() if dim.is_static else None for dim in shape]
    try:
        # f32 inference precision: the CPU plugin would otherwise run in bf16 where the CPU has it
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    except Exception as error:
        raise LcnnError(f"OpenVINO cannot compile {path}: {first_line(error)}") from error
    return LoadedOnnx(lambda batch: np.asarray(compiled(batch)[compiled.output(0)]), dims)


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": Runtime("onnxruntime", "onnxruntime", "pip install onnxruntime", _onnxruntime_load),
    "openvino": Runtime("openvino", "openvino", 'pip install "lcnn-convert[openvino]"', _openvino_load),
}
assert tuple(RUNTIMES) == ONNX_RUNTIMES, "defaults.ONNX_RUNTIMES names what RUNTIMES runs"


def runtime(name: str) -> Runtime:
    """The runtime called ``name``, checked to be importable (one line saying what to install if not)."""
    import importlib.util

    if name not in RUNTIMES:
        raise LcnnError(f"unknown runtime '{name}'; known: {', '.join(RUNTIMES)}")
    found = RUNTIMES[name]
    if importlib.util.find_spec(found.module) is None:
        raise LcnnError(f"the {found.name} runtime is not installed: {found.install}")
    return found


def _input_shape(loaded: LoadedOnnx, inputs: torch.Tensor | None) -> tuple[int, ...]:
    if inputs is not None:
        return tuple(inputs.shape[1:])
    dims = loaded.input_dims[1:]
    static = [dim for dim in dims if isinstance(dim, int)]
    if len(static) != len(dims):
        raise LcnnError("the ONNX input has dynamic non-batch dimensions; pass example inputs to verify with")
    return tuple(static)


def verify_onnx(
    model: nn.Module,
    path: str | Path,
    inputs: torch.Tensor | None = None,
    num_random: int = DEFAULT_RANDOM_INPUTS,
    atol: float = DEFAULT_ATOL,
    min_top1_agreement: float = DEFAULT_MIN_TOP1,
    seed: int = 0,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    runtime_name: str = DEFAULT_RUNTIME,
) -> ParityResult:
    """Compare the logits of ``runtime_name`` (a key of RUNTIMES, on the CPU) with the PyTorch
    model's (eval mode, CPU, float32).

    Runs ``num_random`` standard-normal inputs of the model's input shape, plus ``inputs`` (real
    data) when given. Passes when max |diff| <= atol and top-1 agreement >= min_top1_agreement.
    """
    path = Path(path)
    found = runtime(runtime_name)
    loaded = found.load(path)
    shape = _input_shape(loaded, inputs)
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randn((num_random, *shape), generator=generator)] if num_random > 0 else []
    if inputs is not None:
        batches.append(inputs.detach().float().cpu())
    if not batches:
        raise LcnnError("nothing to verify on: num_random is 0 and no inputs were given")
    batch = torch.cat(batches)
    model = copy.deepcopy(model).cpu().float().eval()
    with torch.no_grad():
        expected = first_tensor(model(batch)).numpy()
    try:
        actual = loaded.run(batch.numpy())
    except Exception as error:  # each runtime's own error types
        raise LcnnError(f"{found.name} failed to run {path}: {first_line(error)}") from error
    if actual.shape != expected.shape:
        raise LcnnError(f"ONNX output shape {actual.shape} differs from PyTorch's {expected.shape}")
    difference = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    max_abs = float(difference.max()) if difference.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    same_class = actual.argmax(-1) == expected.argmax(-1)
    top2 = np.sort(expected, axis=-1)[..., -2:] if expected.shape[-1] > 1 else np.zeros((len(expected), 2))
    decisive = (top2[..., 1] - top2[..., 0]) >= tie_tolerance
    agreement = float(same_class[decisive].mean()) if decisive.any() else 1.0
    finite = bool(np.isfinite(actual).all())
    passed = finite and max_abs <= atol and agreement >= min_top1_agreement
    return ParityResult(
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        top1_agreement=agreement,
        top1_exact_agreement=float(same_class.mean()),
        near_ties=int((~decisive).sum()),
        num_inputs=int(batch.shape[0]),
        atol=atol,
        min_top1_agreement=min_top1_agreement,
        passed=passed,
        runtime=found.name,
    )
