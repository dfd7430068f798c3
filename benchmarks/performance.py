"""Performance benchmarks: converted LCNN vs the original model, as ratios measured side by side.

    python benchmarks/performance.py                         # all of them, writes docs/benchmarks.md
    python benchmarks/performance.py --only onnx --output -  # one group, print the table

Groups (--only): onnx (onnxruntime latency), onnx-forms (what each way of writing the activation
costs in onnxruntime, at best), finetune (step time), memory (peak allocation of a training step),
curvature (estimator time and estimate), convert (convert() time).

Every figure is a ratio of two things timed alternately in the same process (A B B A A B ...),
after warm-up, as the median of the per-repetition ratios over --reps repetitions (>= 20). Models
have random weights with BatchNorm statistics estimated on random images (no downloads); the
ONNX comparison exports the original through the same exporter from the same weights.
"""

from __future__ import annotations

import argparse
import gc
import math
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lcnn_convert as lc
from lcnn_convert.defaults import LCNN_ACTIVATIONS
from lcnn_convert.finetune import cross_entropy_and_grad_penalty, penalty_examples, regularisers
from lcnn_convert.finetune_config import GRAD_NORM_SHARE
from lcnn_convert.measure import estimate_curvature
from lcnn_convert.layers.inference import FrozenCenteredSoftplus

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
BETA = 10.0
ONNX_CASES = [("resnet18", 1, 224), ("resnet18", 64, 32), ("resnet50", 1, 224), ("efficientnet_b0", 1, 224)]
GROUPS = ("onnx", "onnx-swish", "onnx-forms", "openvino", "finetune", "memory", "curvature", "convert")


@dataclass
class Row:
    group: str
    case: str
    ratio: float
    goal: str
    baseline: str
    candidate: str
    detail: str = ""

    def met(self) -> str:
        if self.ratio != self.ratio:  # NaN: nothing was measured
            return "not measured"
        if not self.goal.startswith(("≤", "≥")):
            return "—"  # shown for context: the issue sets no goal for it
        limit = float(self.goal.lstrip("≤≥ ×").rstrip("×"))
        ok = self.ratio <= limit if self.goal.startswith("≤") else self.ratio >= limit
        return "yes" if ok else "**no**"


def random_model(name: str, size: int, num_classes: int = 1000) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    # untrained BN statistics blow deep random nets up in eval mode: estimate them on random images
    images = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
    lc.recalibrate_batchnorm(
        model, torch.utils.data.TensorDataset(images, torch.zeros(16, dtype=torch.long)), batches=2, batch_size=8
    )
    return model.eval()


def alternate(first: Callable[[], object], second: Callable[[], object], reps: int, warmup: int = 3):
    """Per-repetition times of ``first`` and ``second``, run alternately (ABBA order)."""
    for _ in range(warmup):
        first()
        second()
    times_first, times_second = [], []

    def timed(function: Callable[[], object]) -> float:
        started = time.perf_counter()
        function()
        return time.perf_counter() - started

    for rep in range(reps):
        if rep % 2 == 0:
            times_first.append(timed(first))
            times_second.append(timed(second))
        else:
            times_second.append(timed(second))
            times_first.append(timed(first))
    return times_first, times_second


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def ms(times: list[float]) -> str:
    return f"{1000 * statistics.median(times):.2f} ms"


# ---------------------------------------------------------------------------------------------


def quiet_session(path: Path):
    """An onnxruntime session whose threads sleep between runs. By default they spin for a while
    after each run, and two sessions timed alternately then compete for the same cores: that once
    doubled the original's latency here and hid most of the converted model's overhead."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _exp_log_form(self: FrozenCenteredSoftplus, x: torch.Tensor) -> torch.Tensor:
    """The frozen form exported before this one: relu(x) + log(1/2 + exp(-|beta x| - log 2)) / beta."""
    bend = torch.log(0.5 + torch.exp(-math.log(2.0) - (x * self.beta).abs()))
    return torch.relu(x) + bend / self.beta


ONNX_FORMS = {
    "learnable β exported as is": (False, None),
    "β frozen, exp/log form": (True, _exp_log_form),
    "β frozen, sigmoid/log form (default)": (True, FrozenCenteredSoftplus.forward),
}


def latency_row(case: str, original, converted: nn.Module, path: Path, example, feed, reps: int) -> Row:
    """The latency of ``path``'s session against the original's, with ``converted``'s parity."""
    parity = lc.verify_onnx(converted, path, example, num_random=4)
    lcnn = quiet_session(path)
    base, cand = alternate(lambda: original.run(None, feed), lambda: lcnn.run(None, feed), reps)
    row = Row(
        "onnx latency",
        case,
        median_ratio(cand, base),
        "≤ 1.10×",
        ms(base),
        ms(cand),
        f"parity {'passed' if parity.passed else 'FAILED'}, max abs diff {parity.max_abs_diff:.1e}",
    )
    print(row, file=sys.stderr)
    return row


def bench_onnx(reps: int) -> list[Row]:
    rows = []
    for name, batch, size in ONNX_CASES:
        model = random_model(name, size)
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        converted = lc.convert(model, example, beta=BETA).eval()
        feed = {"input": torch.randn(batch, 3, size, size).numpy()}
        with tempfile.TemporaryDirectory() as folder:
            original = quiet_session(lc.export_onnx(model, Path(folder) / "original.onnx", example[:1]))
            default_forward = FrozenCenteredSoftplus.forward
            for form, (frozen, forward) in ONNX_FORMS.items():
                FrozenCenteredSoftplus.forward = forward or default_forward
                try:
                    path = lc.export_onnx(
                        converted,
                        Path(folder) / "converted.onnx",
                        example[:1],
                        frozen=frozen,
                        fold=forward is None or forward is default_forward,
                    )
                finally:
                    FrozenCenteredSoftplus.forward = default_forward
                case = f"{name} b{batch}@{size}, {form}"
                rows.append(latency_row(case, original, converted, path, example, feed, reps))
    return rows


def bench_onnx_swish(reps: int) -> list[Row]:
    """convert(activation="swish"): ReLUs become x sigmoid(beta x), exported with beta a constant."""
    rows = []
    for name, batch, size in ONNX_CASES:
        model = random_model(name, size)
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        converted = lc.convert(model, example, beta=BETA, activation="swish").eval()
        feed = {"input": torch.randn(batch, 3, size, size).numpy()}
        with tempfile.TemporaryDirectory() as folder:
            original = quiet_session(lc.export_onnx(model, Path(folder) / "original.onnx", example[:1]))
            path = lc.export_onnx(converted, Path(folder) / "converted.onnx", example[:1])
            case = f"{name} b{batch}@{size}, --activation swish"
            rows.append(latency_row(case, original, converted, path, example, feed, reps))
    return rows


def openvino_model(path: Path):
    """OpenVINO's CPU plugin on THREADS threads, latency mode, float32 (as `verify --runtime openvino`)."""
    import openvino

    config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    return openvino.Core().compile_model(str(path), "CPU", config)


def bench_openvino(reps: int) -> list[Row]:
    """Both LCNN activations in a second runtime: the same exported files, timed in OpenVINO."""
    rows = []
    for name, batch, size in ONNX_CASES[:3]:
        model = random_model(name, size)
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        images = torch.randn(batch, 3, size, size).numpy()
        with tempfile.TemporaryDirectory() as folder:
            original = openvino_model(lc.export_onnx(model, Path(folder) / "original.onnx", example[:1]))
            for activation in LCNN_ACTIVATIONS:
                converted = lc.convert(model, example, beta=BETA, activation=activation).eval()
                path = lc.export_onnx(converted, Path(folder) / f"{activation}.onnx", example[:1])
                parity = lc.verify_onnx(converted, path, example, num_random=4, runtime_name="openvino")
                lcnn = openvino_model(path)
                base, cand = alternate(lambda: original(images), lambda: lcnn(images), reps)
                rows.append(
                    Row(
                        "openvino latency",
                        f"{name} b{batch}@{size}, {activation.replace('_', ' ')}",
                        median_ratio(cand, base),
                        "—",
                        ms(base),
                        ms(cand),
                        f"OpenVINO parity {'passed' if parity.passed else 'FAILED'}, max abs diff {parity.max_abs_diff:.1e}",
                    )
                )
                print(rows[-1], file=sys.stderr)
    return rows


# Activation forms spliced into the original's export in place of each (conv-fused) Relu, with
# beta = 1: no scaling ops, i.e. what each form would cost with beta, 1/beta and, where the name
# says so, the log 2 shift folded into the neighbouring convolutions. Lower bounds, not exports.
ACTIVATION_FORMS: dict[str, list[tuple[str, list[str]]]] = {
    "Relu, then one Add (any single unfused op)": [("Relu", ["x"]), ("Add", ["0", "log2"])],
    "Softplus op (shift folded)": [("Softplus", ["x"])],
    "Log(1 + Exp(t)) (shift folded; inf for t > 88)": [("Exp", ["x"]), ("Add", ["0", "one"]), ("Log", ["1"])],
    "Relu(t) − Log(Sigmoid(|t|)) (shift folded)": [
        ("Relu", ["x"]),
        ("Abs", ["x"]),
        ("Sigmoid", ["1"]),
        ("Log", ["2"]),
        ("Sub", ["0", "3"]),
    ],
    "Relu(t) − (Log(Sigmoid(|t|)) + log 2)": [
        ("Relu", ["x"]),
        ("Abs", ["x"]),
        ("Sigmoid", ["1"]),
        ("Log", ["2"]),
        ("Add", ["3", "log2"]),
        ("Sub", ["0", "4"]),
    ],
}
# The forms that compute the centered softplus exactly in float32 (Log(1 + Exp) overflows; the lone
# Add is only what any one unfused op costs); the best of them is the floor the export is held to.
EXACT_FORMS = (
    "Softplus op (shift folded)",
    "Relu(t) − Log(Sigmoid(|t|)) (shift folded)",
    "Relu(t) − (Log(Sigmoid(|t|)) + log 2)",
)
# the performance issue's cases for the centered softplus: resnet18 b1@224, b64@32, resnet50 b1@224
FORM_CASES = ONNX_CASES[:3]


def splice_activation(model, form: list[tuple[str, list[str]]]):
    """A copy of an ONNX model with every Relu replaced by ``form``: a list of (op, inputs), where an
    input is "x" (the Relu's input), the index of an earlier op in the form, or a constant's name."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    spliced = onnx.ModelProto()
    spliced.CopyFrom(model)
    graph = spliced.graph
    constants = {"log2": math.log(2.0), "one": 1.0}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, dtype=np.float32), k) for k, v in constants.items())
    nodes = []
    for index, node in enumerate(graph.node):
        if node.op_type != "Relu":
            nodes.append(node)
            continue
        names = [f"act{index}_{step}" for step in range(len(form) - 1)] + [node.output[0]]
        for step, (op, inputs) in enumerate(form):
            sources = [node.input[0] if i == "x" else names[int(i)] if i.isdigit() else i for i in inputs]
            nodes.append(helper.make_node(op, sources, [names[step]]))
    del graph.node[:]
    graph.node.extend(nodes)
    return spliced


def bench_onnx_forms(reps: int) -> list[Row]:
    """Each activation form spliced into the ReLU original, then the default export (centered
    softplus, beta frozen) against the best exact form's floor, all timed in this run."""
    import onnx

    rows = []
    for name, batch, size in FORM_CASES:
        model = random_model(name, size)
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        feed = {"input": torch.randn(batch, 3, size, size).numpy()}
        ratios = {}
        with tempfile.TemporaryDirectory() as folder:
            path = lc.export_onnx(model, Path(folder) / "original.onnx", example[:1])
            original = quiet_session(path)
            for form, ops in ACTIVATION_FORMS.items():
                spliced = Path(folder) / "spliced.onnx"
                onnx.save(splice_activation(onnx.load(str(path)), ops), str(spliced))
                candidate = quiet_session(spliced)
                base, cand = alternate(lambda: original.run(None, feed), lambda: candidate.run(None, feed), reps)
                ratios[form] = median_ratio(cand, base)
                rows.append(
                    Row(
                        "onnx activation form",
                        f"{name} b{batch}@{size}, {form}",
                        ratios[form],
                        "—",
                        ms(base),
                        ms(cand),
                        "ReLU original with this form in place of each Relu",
                    )
                )
                print(rows[-1], file=sys.stderr)
            converted = lc.convert(model, example, beta=BETA).eval()
            exported = quiet_session(lc.export_onnx(converted, Path(folder) / "converted.onnx", example[:1]))
            base, cand = alternate(lambda: original.run(None, feed), lambda: exported.run(None, feed), reps)
            default = median_ratio(cand, base)
            best = min(EXACT_FORMS, key=ratios.__getitem__)
            rows.append(
                Row(
                    "onnx activation form",
                    f"{name} b{batch}@{size}, default export ÷ best exact form's floor",
                    default / ratios[best],
                    "≤ 1.05×",
                    f"floor {ratios[best]:.2f}×",
                    f"default {default:.2f}×",
                    f"best exact form: {best}",
                )
            )
            print(rows[-1], file=sys.stderr)
    return rows


def _training_steps(
    lambda_grad: float, batch: int = 128, size: int = 32, share: float = GRAD_NORM_SHARE
) -> tuple[Callable[[], None], Callable[[], None], nn.Module, nn.Module]:
    """(plain CE step on the original, LCNN step on the converted model): resnet18, ``batch`` images
    at ``size``; the gradient-norm penalty (``lambda_grad``) on ``share`` of them."""
    original = random_model("resnet18", size, num_classes=10)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    converted = lc.convert(original, images[:8], beta=BETA)
    original.train()
    converted.train()
    plain_optimizer = torch.optim.SGD(original.parameters(), lr=1e-3, momentum=0.9)
    lcnn_optimizer = torch.optim.SGD(converted.parameters(), lr=1e-3, momentum=0.9)

    def plain() -> None:
        plain_optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(original(images), labels).backward()
        plain_optimizer.step()

    def lcnn() -> None:
        lcnn_optimizer.zero_grad(set_to_none=True)
        cross_entropy, penalty = cross_entropy_and_grad_penalty(converted, images, labels, lambda_grad, share=share)
        beta_term, gamma_term = regularisers(converted)
        (cross_entropy + 1e-2 * beta_term + 1e-2 * gamma_term + lambda_grad * penalty).backward()
        lcnn_optimizer.step()

    return plain, lcnn, original, converted


# At 32x32 a ResNet's layer4 sees 1x1 maps, where the LCNN's convs run as 1x1 convs (exact) and
# the original's padded 3x3 convs take mkldnn's slow path; at 64x64 (2x2 maps) neither does.
FINETUNE_CASES = [(128, 32), (64, 64)]
PENALTY_WEIGHT = 0.1
# (lambda_grad, share of the batch the penalty covers, goal)
STEP_VARIANTS = [
    (0.0, GRAD_NORM_SHARE, "≤ 1.20×"),
    (PENALTY_WEIGHT, GRAD_NORM_SHARE, "≤ 2.00×"),
    (PENALTY_WEIGHT, 1.0, "—"),
]


def _step_case(batch: int, size: int, lambda_grad: float, share: float) -> str:
    case = f"resnet18 b{batch}@{size}"
    if not lambda_grad:
        return case + ", β/γ terms"
    covered = "whole batch" if share == 1 else f"{penalty_examples(batch, share)} of {batch} images (default)"
    return case + f", β/γ terms, + gradient-norm penalty on {covered}"


def bench_finetune(reps: int) -> list[Row]:
    rows = []
    for (batch, size), (lambda_grad, share, goal) in itertools.product(FINETUNE_CASES, STEP_VARIANTS):
        plain, lcnn, _, _ = _training_steps(lambda_grad, batch, size, share)
        base, cand = alternate(plain, lcnn, reps)
        case = _step_case(batch, size, lambda_grad, share)
        rows.append(Row("fine-tuning step", case, median_ratio(cand, base), goal, ms(base), ms(cand)))
        print(rows[-1], file=sys.stderr)
    return rows


# Buffers above 64 KiB come from mmap and go back to the system when freed, so the process's
# resident size follows the live tensors instead of what glibc's arenas kept.
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field + ":")))


def memory_child(variant: str, lambda_grad: float, batch: int, size: int, share: float) -> None:
    """In a fresh interpreter: peak resident memory of one training step above the resident memory
    before it (models, optimizer state and warm-up allocations excluded), printed as JSON."""
    torch.set_num_threads(THREADS)
    plain, lcnn, _, _ = _training_steps(lambda_grad, batch, size, share)
    step = plain if variant == "plain" else lcnn
    for _ in range(2):
        step()
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident size, to now
    step()
    print(json.dumps({"peak_kib": _status_kib("VmHWM") - before}))


def peak_step_memory(variant: str, lambda_grad: float, batch: int, size: int, share: float) -> int:
    environment = {**os.environ, **MEMORY_CHILD_ENV}
    command = [sys.executable, __file__, "--memory-child", variant, "--lambda-grad", str(lambda_grad)]
    command += ["--batch", str(batch), "--size", str(size), "--share", str(share)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_kib"] * 1024


# (batch, size, lambda_grad, share, goal): the default fine-tuning's goal is the memory issue's,
# the penalty's (≤ 2×) the performance issue's
MEMORY_CASES = [
    (128, 32, 0.0, GRAD_NORM_SHARE, "≤ 1.30×"),
    (128, 32, PENALTY_WEIGHT, 1.0, "—"),
    (64, 64, 0.0, GRAD_NORM_SHARE, "—"),
    (64, 64, PENALTY_WEIGHT, GRAD_NORM_SHARE, "≤ 2.00×"),
    (64, 64, PENALTY_WEIGHT, 1.0, "—"),
]


def bench_memory(reps: int) -> list[Row]:
    """Peak memory of a training step, each in its own process (reps does not apply)."""
    rows = []
    for batch, size, lambda_grad, share, goal in MEMORY_CASES:
        base = peak_step_memory("plain", lambda_grad, batch, size, share)
        cand = peak_step_memory("lcnn", lambda_grad, batch, size, share)
        rows.append(
            Row(
                "peak memory",
                _step_case(batch, size, lambda_grad, share) + " training step",
                cand / base,
                goal,
                f"{base / 2**20:.0f} MiB",
                f"{cand / 2**20:.0f} MiB",
                "resident size above the pre-step level, one process per figure",
            )
        )
        print(rows[-1], file=sys.stderr)
    return rows


# (options, goal): the default estimator, then each of its two changes alone.
CURVATURE_CANDIDATES = {
    "6 Lanczos steps, input-only products (default)": ({}, "≥ 2.00×"),
    "10 power steps, input-only products": ({"iterations": 10, "method": "power"}, "—"),
    "6 Lanczos steps, layers differentiated as they are": ({"input_only_products": False}, "—"),
}


def bench_curvature(reps: int) -> list[Row]:
    model = lc.convert(random_model("resnet18", 32, num_classes=10), torch.randn(8, 3, 32, 32), beta=BETA).eval()
    generator = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 3, 32, 32, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    )
    # The reference method: 10 power steps, plain reverse over reverse through the model's own layers.
    reference = lambda: estimate_curvature(model, data, iterations=10, method="power", input_only_products=False)  # noqa: E731
    reference_mean = reference().curvature_mean
    converged_mean = estimate_curvature(model, data, iterations=30).curvature_mean
    rows = []
    for name, (options, goal) in CURVATURE_CANDIDATES.items():
        candidate = lambda: estimate_curvature(model, data, **options)  # noqa: E731
        mean = candidate().curvature_mean
        base, cand = alternate(reference, candidate, reps, warmup=1)
        detail = (
            f"mean curvature {mean:.4g} vs {reference_mean:.4g} ({(mean - reference_mean) / reference_mean:+.1%}); "
            f"converged (30 Lanczos steps) {converged_mean:.4g}"
        )
        rows.append(
            Row(
                "curvature estimator",
                f"resnet18 LCNN, 32 images @32: {name} vs 10 power steps",
                median_ratio(base, cand),
                goal,
                ms(base),
                ms(cand),
                detail,
            )
        )
        print(rows[-1], file=sys.stderr)
    return rows


# the performance issue's case: convert() including beta calibration on 32 images, against one batch-1 forward
CONVERT_CALIBRATION_IMAGES = 32


def bench_convert(reps: int) -> list[Row]:
    rows = []
    for name in ("resnet50", "efficientnet_b0"):
        model = random_model(name, 224)
        image = torch.randn(1, 3, 224, 224)
        example = torch.randn(CONVERT_CALIBRATION_IMAGES, 3, 224, 224, generator=torch.Generator().manual_seed(4))

        def forward() -> None:
            with torch.no_grad():
                model(image)

        forwards, converts = alternate(forward, lambda: lc.convert(model, example, beta="auto"), reps, warmup=1)
        rows.append(
            Row(
                "convert()",
                f"{name}, β calibrated on {CONVERT_CALIBRATION_IMAGES} images @224",
                median_ratio(converts, forwards),
                "≤ 40×",
                f"forward b1 {ms(forwards)}",
                f"convert {statistics.median(converts):.2f} s",
            )
        )
        print(rows[-1], file=sys.stderr)
    return rows


BENCHMARKS: dict[str, Callable[[int], list[Row]]] = {
    "onnx": bench_onnx,
    "onnx-swish": bench_onnx_swish,
    "onnx-forms": bench_onnx_forms,
    "openvino": bench_openvino,
    "finetune": bench_finetune,
    "memory": bench_memory,
    "curvature": bench_curvature,
    "convert": bench_convert,
}


def markdown(rows: list[Row]) -> str:
    lines = [
        "| what | case | ratio | goal | met | original / reference | converted / candidate | notes |",
        "|---|---|---:|---|---|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.group} | {row.case} | {row.ratio:.2f}× | {row.goal} | {row.met()} | {row.baseline} | "
            f"{row.candidate} | {row.detail} |"
        )
    return "\n".join(lines) + "\n"


def machine() -> str:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {onnxruntime.__version__} ({THREADS} intra-op threads), Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=GROUPS, default=list(GROUPS))
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per figure (>= 20)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file, or - for stdout")
    parser.add_argument("--memory-child", choices=("plain", "lcnn"), help=argparse.SUPPRESS)
    parser.add_argument("--lambda-grad", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--share", type=float, default=GRAD_NORM_SHARE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.lambda_grad, args.batch, args.size, args.share)
        return 0
    torch.set_num_threads(THREADS)
    rows = [row for group in args.only for row in BENCHMARKS[group](args.reps)]
    table = markdown(rows)
    if args.output == "-":
        print(table)
        return 0
    text = (
        "# Benchmarks\n\nWritten by `python benchmarks/performance.py` "
        f"({time.strftime('%Y-%m-%d')}; {machine()}).\n\n"
        "Each ratio is converted ÷ original (or reference ÷ candidate for the curvature speed-up), timed "
        f"alternately in one process, the median of per-repetition ratios over {args.reps} repetitions "
        "after warm-up. Random weights, BatchNorm statistics estimated on random images, β = 10 where "
        "fixed.\n\n" + table
    )
    Path(args.output).write_text(text)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
