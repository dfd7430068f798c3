"""Checks for a CUDA machine (CI has no GPU, so the test suite cannot make them).

    PYTHONPATH=. python benchmarks/cuda_check.py           # on a machine with a GPU
    DEVICE=cpu PYTHONPATH=. python benchmarks/cuda_check.py # the same code paths on the CPU

Prints PASS/FAIL per check and INFO lines with timings, and exits non-zero when a check fails:
the custom autograd Functions against float64 CPU results, the converted model's forward and
curvature estimate on the device against the CPU, and LCNN training steps under autocast (as
``finetune()`` runs them on CUDA) staying finite, timed against a plain step.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import lcnn_convert as lc  # noqa: E402
from lcnn_convert import CenteredSoftplus  # noqa: E402
from lcnn_convert.finetune import cross_entropy_and_grad_penalty, regularisers  # noqa: E402
from lcnn_convert.finetune_config import GRAD_NORM_SHARE  # noqa: E402
from lcnn_convert.measure import estimate_curvature  # noqa: E402
from performance import BETA, random_model  # noqa: E402

DEVICE = torch.device(os.environ.get("DEVICE", "cuda"))
failures: list[str] = []


def check(name: str, passed: bool, detail: str = "") -> None:
    print(("PASS " if passed else "FAIL ") + name, detail, flush=True)
    if not passed:
        failures.append(name)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(function: Callable[[], object], reps: int) -> float:
    for _ in range(2):
        function()
    synchronize()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def check_softplus() -> None:
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64)
    results = []
    for device in ("cpu", DEVICE):
        layer = CenteredSoftplus(beta=3.0).double().to(device)
        inputs = x.clone().to(device).requires_grad_(True)
        layer(inputs).square().sum().backward()
        results.append((layer(inputs).detach().cpu(), inputs.grad.cpu(), layer.log_beta.grad.cpu()))
    check(
        "centered softplus: values and gradients match float64 CPU", all(torch.allclose(a, b) for a, b in zip(*results))
    )
    layer = CenteredSoftplus(beta=3.0).double().to(DEVICE)
    probe = torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    check("centered softplus: gradgradcheck", torch.autograd.gradgradcheck(layer, (probe,)))
    dtypes = (torch.float16, torch.bfloat16) if DEVICE.type == "cuda" else (torch.bfloat16,)
    for dtype in dtypes:
        layer = CenteredSoftplus(beta=3.0).to(DEVICE)
        inputs = torch.randn(8, 16, device=DEVICE, dtype=dtype, requires_grad=True)
        with torch.autocast(DEVICE.type, dtype=dtype):
            output = layer(inputs)
        output.float().sum().backward()
        check(f"centered softplus under autocast {dtype}", bool(torch.isfinite(inputs.grad).all()), str(output.dtype))


def check_converted_model() -> None:
    converted = lc.convert(random_model("resnet18", 32, num_classes=10), torch.randn(8, 3, 32, 32), beta=BETA).eval()
    on_device = copy.deepcopy(converted).to(DEVICE)
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        difference = (on_device(images.to(DEVICE)).cpu() - converted(images)).abs().max().item()
    check("converted resnet18: forward on the device matches the CPU", difference < 1e-3, f"max diff {difference:.1e}")

    generator = torch.Generator().manual_seed(3)
    data = (torch.randn(32, 3, 32, 32, generator=generator), torch.randint(0, 10, (32,), generator=generator))
    cpu = estimate_curvature(converted, data).curvature_mean
    fast = estimate_curvature(on_device, data).curvature_mean
    plain = estimate_curvature(on_device, data, input_only_products=False).curvature_mean
    agree = abs(fast - cpu) <= 1e-3 * cpu and abs(plain - fast) <= 1e-3 * fast
    check(
        "curvature on the device matches the CPU, with and without stand-ins",
        agree,
        f"{cpu:.5g} {fast:.5g} {plain:.5g}",
    )
    reference = median_seconds(
        lambda: estimate_curvature(on_device, data, iterations=10, method="power", input_only_products=False), 3
    )
    default = median_seconds(lambda: estimate_curvature(on_device, data), 3)
    print(
        f"INFO curvature estimator: reference {reference * 1e3:.0f} ms, default {default * 1e3:.0f} ms, "
        f"speed-up {reference / default:.2f}x",
        flush=True,
    )


def check_training_steps(batch: int, size: int, reps: int) -> None:
    original = random_model("resnet18", size, num_classes=10)
    images = torch.randn(batch, 3, size, size)
    converted = lc.convert(copy.deepcopy(original), images[:8], beta=BETA).to(DEVICE).train()
    original = original.to(DEVICE).train()
    images, labels = images.to(DEVICE), torch.randint(0, 10, (batch,), device=DEVICE)
    for lambda_grad in (0.0, 0.1):
        plain_optimizer = torch.optim.SGD(original.parameters(), lr=1e-3)
        lcnn_optimizer = torch.optim.SGD(converted.parameters(), lr=1e-3)

        def plain() -> None:
            plain_optimizer.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE.type):
                loss = F.cross_entropy(original(images), labels)
            loss.backward()
            plain_optimizer.step()

        def lcnn() -> torch.Tensor:
            lcnn_optimizer.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE.type):
                cross_entropy, penalty = cross_entropy_and_grad_penalty(
                    converted, images, labels, lambda_grad, share=GRAD_NORM_SHARE
                )
                beta_term, gamma_term = regularisers(converted)
                loss = cross_entropy + 1e-2 * beta_term + 1e-2 * gamma_term + lambda_grad * penalty
            loss.backward()
            lcnn_optimizer.step()
            return loss.detach()

        check(
            f"training step b{batch}@{size}, grad-norm penalty {lambda_grad}: finite loss", bool(torch.isfinite(lcnn()))
        )
        plain_time, lcnn_time = median_seconds(plain, reps), median_seconds(lcnn, reps)
        print(
            f"INFO training step b{batch}@{size}, penalty {lambda_grad}: plain {plain_time * 1e3:.1f} ms, "
            f"LCNN {lcnn_time * 1e3:.1f} ms, ratio {lcnn_time / plain_time:.2f}",
            flush=True,
        )


def main() -> int:
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}", flush=True)
    check_softplus()
    check_converted_model()
    cases = [(128, 32, 20), (128, 224, 20)] if DEVICE.type == "cuda" else [(16, 32, 2)]
    for batch, size, reps in cases:
        check_training_steps(batch, size, reps)
    print("FAILED: " + ", ".join(failures) if failures else "ALL PASSED", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
