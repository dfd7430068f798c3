"""The sweep behind the fine-tuning defaults: the default run on the test suite's three digits models.

    python benchmarks/finetune_defaults.py                          # the defaults
    python benchmarks/finetune_defaults.py --set smoothness=0.5     # one FinetuneConfig field changed
    python benchmarks/finetune_defaults.py --set beta_lr=0.1 --only torchvision:resnet18

Trains torchvision resnet18, timm resnet18 and torchvision densenet121 on digits with the test
suite's recipe (tests/conftest.py, cached in --cache), then runs the whole pipeline
(``lcnn_convert.pipeline.run_conversion``: faithful conversion, 3 epochs of fine-tuning, the
measurements) and prints each model's figures against the bar of the LCNN-by-default issue:
accuracy within 1 point, mean curvature >= 10x lower, PGD L2 and L-inf accuracy at the headline
budgets not lower, ONNX parity passing. Run it alone: two CPU-heavy jobs slow each other down.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lcnn_convert.finetune import FinetuneConfig  # noqa: E402
from lcnn_convert.pipeline import ConversionJob, run_conversion  # noqa: E402
from tests.conftest import DIGITS_MODELS, SILU_DIGITS_MODELS, train_on_digits  # noqa: E402

MODELS = {**DIGITS_MODELS, **SILU_DIGITS_MODELS}


def config_from_settings(settings: list[str]) -> FinetuneConfig:
    types = {field.name: field.type for field in fields(FinetuneConfig)}
    values = {}
    for setting in settings:
        name, _, text = setting.partition("=")
        if name not in types:
            raise SystemExit(f"--set {setting}: FinetuneConfig has no field {name!r} ({', '.join(types)})")
        values[name] = (
            text.lower() in ("1", "true", "yes")
            if "bool" in str(types[name])
            else (int(text) if "int" in str(types[name]) and "." not in text else float(text))
        )
    return FinetuneConfig(**values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--only", nargs="*", default=list(MODELS), help=f"any of {', '.join(MODELS)}")
    parser.add_argument("--activation", default="centered_softplus", choices=("centered_softplus", "swish"))
    parser.add_argument("--cache", type=Path, default=Path("runs/defaults"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    quiet = Console(stderr=True, quiet=True)
    print(f"settings: {' '.join(args.set) or 'defaults'}, activation {args.activation}")
    print("| model | accuracy | curvature | PGD L2 | PGD L∞ | parity | fine-tuning | measuring | bar |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in args.only:
        size, epochs = MODELS[name]
        weights = args.cache / f"{name.replace(':', '_')}.pth"
        if not weights.is_file():
            train_on_digits(name, size, epochs, args.cache)
        with tempfile.TemporaryDirectory() as out:
            job = ConversionJob(
                model=name,
                weights=weights,
                num_classes=10,
                image_size=size,
                finetune="digits",
                output=Path(out) / "run",
                training=config_from_settings(args.set),
                activation=args.activation,
            )
            report = run_conversion(job, quiet)
        if report is None or report.finetune is None:
            raise SystemExit(f"{name}: the run returned no fine-tuning report")
        original, finetuned = report.metrics["original"], report.metrics["finetuned"]
        drop = 100 * (finetuned.accuracy - original.accuracy)
        ratio = original.curvature.curvature_mean / finetuned.curvature.curvature_mean
        pgd = {
            "l2": (original.pgd_l2_accuracy or 0.0, finetuned.pgd_l2_accuracy or 0.0),
            "linf": (original.pgd_linf_accuracy or 0.0, finetuned.pgd_linf_accuracy or 0.0),
        }
        timings = report.timings_s
        measuring = sum(timings.get(key, 0.0) for key in ("measure_original", "measure_converted", "measure_finetuned"))
        met = drop >= -1.0 and ratio >= 10 and all(after >= before for before, after in pgd.values())
        met = met and report.parity.passed
        tuned = report.finetune.result
        batch = tuned.config.batch_size if tuned.config is not None else None
        beta = tuned.history[-1].beta_mean if tuned.history else float("nan")
        print(
            f"| {name} {size}px | {original.accuracy:.2%} → {finetuned.accuracy:.2%} ({drop:+.2f} pt) "
            f"| ÷{ratio:.1f} | {pgd['l2'][0]:.1%} → {pgd['l2'][1]:.1%} | {pgd['linf'][0]:.1%} → {pgd['linf'][1]:.1%} "
            f"| {report.parity.max_abs_diff:.1e} | {tuned.steps} steps of "
            f"{batch}, {timings['finetune']:.0f} s, β̄ {beta:.2f} "
            f"| {measuring:.0f} s | {'met' if met else 'NOT met'} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
