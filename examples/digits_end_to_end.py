"""The fine-tuning bar on the offline `digits` data, end to end.

    python examples/digits_end_to_end.py [--model torchvision:resnet18] [--out runs/digits]

1. trains MODEL normally on digits (our stand-in for a downloaded pretrained model) to >= 97%,
2. saves it as a plain state dict,
3. runs `lcnn-convert MODEL --weights that.pth --num-classes 10 --finetune digits` with the
   default options (a faithful conversion, then 3 short epochs with the LCNN regularisers),
4. checks the bar: fine-tuned accuracy within 1 point of the original, mean normalized curvature
   at least 10x below the original's, PGD L2 and L-inf accuracy at the headline budgets not lower
   than the original's, ONNX parity passing. Exits 1 if any of it fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import lcnn_convert as lc
from lcnn_convert.cli import main as lcnn_convert_main
from lcnn_convert.data import load_dataset
from lcnn_convert.models import data_config, load_model_with_spec

TARGET_ACCURACY = 0.97


def train_baseline(model_name: str, epochs: int, seed: int) -> tuple[torch.nn.Module, float]:
    """Plain cross-entropy training of a randomly initialised MODEL on digits."""
    torch.manual_seed(seed)
    model, spec = load_model_with_spec(model_name, pretrained=False, num_classes=10)
    splits = load_dataset("digits", data_config=data_config(model, spec))
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        model.train()
        for images, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            scheduler.step()
        accuracy = lc.measure.evaluate_accuracy(model.eval(), splits.test)
        print(f"baseline epoch {epoch + 1}/{epochs}: test accuracy {accuracy:.2%}")
    return model.eval(), accuracy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
    parser.add_argument("--baseline-epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("lcnn_args", nargs="*", help="extra lcnn-convert options, after --")
    args = parser.parse_args()

    name = args.model.replace(":", "_")
    weights = args.out / f"{name}_digits.pth"
    args.out.mkdir(parents=True, exist_ok=True)
    model, accuracy = train_baseline(args.model, args.baseline_epochs, args.seed)
    if accuracy < TARGET_ACCURACY:
        print(f"baseline reached only {accuracy:.2%} (< {TARGET_ACCURACY:.0%}); train longer", file=sys.stderr)
        return 1
    torch.save(model.state_dict(), weights)

    output = args.out / f"{name}_lcnn"
    code = lcnn_convert_main(
        [
            args.model,
            "--weights",
            str(weights),
            "--num-classes",
            "10",
            "--finetune",
            "digits",
            "--output",
            str(output),
            "--overwrite",
            "--seed",
            str(args.seed),
            *args.lcnn_args,
        ]
    )
    if code != 0:
        return code
    report = json.loads((output / "report.json").read_text())
    original, finetuned = report["metrics"]["original"], report["metrics"]["finetuned"]
    accuracy_drop = 100 * (original["accuracy"] - finetuned["accuracy"])
    curvature_ratio = original["curvature_mean"] / finetuned["curvature_mean"]
    checks = {
        f"accuracy within 1 point (drop {accuracy_drop:+.2f} pt)": accuracy_drop <= 1.0,
        f"curvature at least 10x lower (÷{curvature_ratio:.1f})": curvature_ratio >= 10,
        "ONNX parity passed": report["parity"]["passed"],
    }
    budgets = report["measurement"]["headline_eps"]
    for norm, name in (("l2", "L2"), ("linf", "L∞")):
        before, after = original[f"pgd_{norm}_accuracy"], finetuned[f"pgd_{norm}_accuracy"]
        eps = budgets[norm] * (255 if norm == "linf" else 1)
        checks[f"PGD {name} (ε {eps:g}{'/255' if norm == 'linf' else ''}) not lower ({before:.2%} → {after:.2%})"] = (
            after >= before
        )
    for check, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {check}")
    # Not part of the bar: how much of the curvature's fall the lower confidence alone explains.
    matched = original["curvature_mean"] / finetuned["curvature_at_original_confidence"]
    change = f"÷{matched:.1f}" if matched >= 1 else f"×{1 / matched:.2f}"
    print(
        f"note  mean top-1 probability {original['confidence']:.2%} → {finetuned['confidence']:.2%}; "
        f"at the original's confidence the curvature is {change} (docs/finetuning.md, "
        '"Where the curvature is")'
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
