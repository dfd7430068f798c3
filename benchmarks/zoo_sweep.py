"""Sweep the model zoo: every torchvision classifier and lcnn_convert.zoo.TIMM_ZOO, random weights.

    python benchmarks/zoo_sweep.py                      # everything, writes docs/zoo.md
    python benchmarks/zoo_sweep.py --only resnet18 timm:dla34 --output -   # a few, print the table

Each model goes through convert -> forward -> export -> onnxruntime parity (lcnn_convert.zoo.check_model)
in a child process of its own, so that a crash or a hang is recorded against the model and the
sweep goes on. Results are also kept as JSON lines (--json) to rerun only what failed (--rerun-failed).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

import torch

from lcnn_convert.models import torchvision_classifiers
from lcnn_convert.zoo import TIMM_ZOO, ZooResult, check_model, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def _child(name: str, queue) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    queue.put(check_model(name).to_dict())


def run_one(name: str, timeout: float) -> ZooResult:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(name, queue))
    started = time.perf_counter()
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        return ZooResult(model=name, reason=f"timed out after {timeout:.0f}s", seconds=round(timeout, 1))
    if not queue.empty():
        return ZooResult(**queue.get())
    return ZooResult(
        model=name,
        reason=f"child process died (exit code {process.exitcode})",
        seconds=round(time.perf_counter() - started, 1),
    )


def all_models() -> list[str]:
    return [f"torchvision:{name}" for name in torchvision_classifiers()] + [f"timm:{name}" for name in TIMM_ZOO]


def summary(results: list[ZooResult]) -> str:
    def counts(prefix: str) -> str:
        chosen = [r for r in results if r.model.startswith(prefix)]
        ok = sum(r.status == "ok" for r in chosen)
        return f"{ok}/{len(chosen)} ok" if chosen else "none run"

    total = sum(r.seconds for r in results)
    return f"torchvision: {counts('torchvision:')}; timm: {counts('timm:')}; {total / 60:.1f} min of model time"


def render(results: list[ZooResult]) -> str:
    """docs/zoo.md: how the sweep was run, the counts, and one row per model."""
    header = (
        "# Model-zoo sweep\n\n"
        "Every torchvision classification model and the timm models of `lcnn_convert.zoo.TIMM_ZOO`, built\n"
        "with random weights (BatchNorm statistics estimated on 16 random images), converted with β = 10,\n"
        "run, exported to ONNX and compared with onnxruntime on 6 random images: parity passes at a max abs\n"
        "difference of the logits ≤ 1e-4 with the same top-1 class. Random weights can give logits in the\n"
        "hundreds, where float32 rounding alone exceeds 1e-4; for those the original model is exported and\n"
        "checked the same way, and the conversion passes if its difference relative to its own largest\n"
        "logit is at most 2× the original's (a fixed β also rescales the logits: random RepVGG-A0 goes from\n"
        "1.4 to 555); both absolute differences are listed. Torchvision's ViTs have zero-initialised heads,\n"
        "hence all-zero logits and a difference of 0. Models past ~1.8 GB of weights export with external\n"
        "data (`model.onnx.data`). `size`: the first of 32/64/96/128/224 (then the model's own) it runs at. `left`\n"
        "counts calls left as they were, with the activations among them in brackets (the rest are LayerNorm,\n"
        "attention and functional BatchNorms, which have no global constants): `report.json` of a real run\n"
        "lists each with its reason. Regenerate with `python benchmarks/zoo_sweep.py` (about 40 minutes here).\n\n"
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}.\n\n"
        f"**{summary(results)}.**\n\n"
    )
    return header + activations_left(results) + markdown_table(results)


def activations_left(results: list[ZooResult]) -> str:
    """How many models leave no activation as it was, and which leave some."""
    keeping = [r for r in results if r.status == "ok" and r.activations_left]
    ok = sum(r.status == "ok" for r in results)
    text = f"{ok - len(keeping)} of the {ok} models that pass leave no activation as it was"
    if keeping:
        text += ": " + ", ".join(f"{r.model} ({r.activations_left})" for r in keeping) + " keep some"
    return (
        text + ". Before every activation family had a rule (2026-12-03), 38 of 80 torchvision and 35 of 58 "
        "timm models kept some or all of their activations; before blocks that fx keeps whole had their "
        "submodules converted (the same day), timm's vgg11_bn, mobilevit_xxs and nfnet_l0 kept 1, 3 and 12.\n\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="model names (torchvision:NAME / timm:NAME); default all")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per model (regnet_y_128gf takes ~370 s here)"
    )
    parser.add_argument("--output", default=str(ROOT / "docs" / "zoo.md"), help="markdown file, or - for stdout")
    parser.add_argument("--json", default=None, help="append one JSON line per model here")
    parser.add_argument("--rerun-failed", default=None, help="a --json file: rerun its failures, keep the rest")
    args = parser.parse_args()

    previous: dict[str, ZooResult] = {}
    if args.rerun_failed:
        for line in Path(args.rerun_failed).read_text().splitlines():
            result = ZooResult(**json.loads(line))
            previous[result.model] = result
    names = args.only or all_models()
    results = []
    for index, name in enumerate(names, 1):
        if name in previous and previous[name].status == "ok":
            result = previous[name]
        else:
            result = run_one(name, args.timeout)
        results.append(result)
        print(f"[{index}/{len(names)}] {name}: {result.status} {result.reason} ({result.seconds:.1f}s)", flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(result.to_dict()) + "\n")

    text = render(results)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: {summary(results)}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
