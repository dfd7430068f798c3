"""Which fine-tuning levers lower curvature from the faithful conversion in 3 epochs (LCNN-by-default issue).

    python benchmarks/finetune_levers.py                       # every variant
    python benchmarks/finetune_levers.py --only default beta-lr-b32-refresh

Trains torchvision's resnet18 on digits at 32x32 (6 epochs, one-cycle SGD; cached in --cache),
converts it with the default faithful calibration on 256 train images, then fine-tunes it for 3
epochs with each variant in a training loop of its own (CE + lambda_beta * sum(beta) +
0.01 * sum|log gamma|, SGD momentum 0.9 Nesterov, cosine, lr 0.01). Prints test accuracy and mean
normalized curvature on 128 test images, against the original's. One model and one seed: a scouting
tool, not the sweep that sets defaults (that one must cover several models, see docs/finetuning.md).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import lcnn_convert as lc
from lcnn_convert.bn_statistics import recalibrate_batchnorm
from lcnn_convert.data import load_dataset
from lcnn_convert.layers import CenteredSoftplus, LipschitzBatchNorm
from lcnn_convert.measure import estimate_curvature, evaluate_accuracy
from lcnn_convert.models import data_config, load_model_with_spec

BASELINE_EPOCHS = 6
CURVATURE_EXAMPLES = 128


@dataclass(frozen=True)
class Variant:
    beta_end: float | None = None  # anneal every log beta linearly to log(beta_end) (beta then not learned)
    ramp: float = 0.7  # share of the steps the annealing takes
    distill: float = 0.0  # weight of KL(teacher || student) against the original's logits
    beta_lr: float | None = None  # learning rate of log beta (default: the others')
    batch: int = 128
    refresh: bool = False  # re-estimate the BatchNorm statistics at the end


VARIANTS = {
    "default": Variant(),
    "beta-lr": Variant(beta_lr=0.1),
    "beta-lr-refresh": Variant(beta_lr=0.1, refresh=True),
    "beta-lr-b32": Variant(beta_lr=0.1, batch=32),
    "beta-lr-b32-refresh": Variant(beta_lr=0.1, batch=32, refresh=True),
    "anneal-2": Variant(beta_end=2.0),
    "anneal-2-refresh": Variant(beta_end=2.0, refresh=True),
    "anneal-2-distill": Variant(beta_end=2.0, distill=0.5),
    "anneal-2-b32": Variant(beta_end=2.0, batch=32),
    "anneal-2-b32-refresh": Variant(beta_end=2.0, batch=32, refresh=True),
    "anneal-2-b32-distill-refresh": Variant(beta_end=2.0, batch=32, distill=0.5, refresh=True),
    "anneal-1-b32-distill-refresh": Variant(beta_end=1.0, batch=32, distill=0.5, refresh=True),
    "anneal-1-b32-distill-refresh-ramp0.5": Variant(beta_end=1.0, batch=32, distill=0.5, refresh=True, ramp=0.5),
    "anneal-0.5-b32-distill-refresh": Variant(beta_end=0.5, batch=32, distill=0.5, refresh=True),
}


def baseline(cache: Path):
    torch.manual_seed(0)
    model, spec = load_model_with_spec("torchvision:resnet18", pretrained=False, num_classes=10)
    splits = load_dataset("digits", data_config=data_config(model, spec))
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval(), splits
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=BASELINE_EPOCHS * len(loader))
    for _ in range(BASELINE_EPOCHS):
        model.train()
        for images, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            schedule.step()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval(), splits


def finetune_variant(original, splits, calibration: torch.Tensor, variant: Variant, epochs: int = 3, lr: float = 0.01):
    torch.manual_seed(0)
    model = lc.convert(original, calibration)
    sites = [m for m in model.modules() if isinstance(m, CenteredSoftplus)]
    start = [float(m.log_beta.detach()) for m in sites]
    loader = DataLoader(
        splits.train, batch_size=variant.batch, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    total = epochs * len(loader)
    log_betas = {id(m.log_beta) for m in sites}
    others = [p for p in model.parameters() if id(p) not in log_betas and p.requires_grad]
    groups = [{"params": others, "lr": lr}]
    if variant.beta_end is None:
        groups.append({"params": [m.log_beta for m in sites], "lr": variant.beta_lr or lr})
    else:
        for site in sites:
            site.log_beta.requires_grad_(False)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    step = 0
    for _ in range(epochs):
        model.train()
        for images, labels in loader:
            if variant.beta_end is not None:
                share = min(1.0, (step + 1) / (variant.ramp * total))
                for site, begin in zip(sites, start):
                    site.log_beta.data.fill_(begin + share * (math.log(variant.beta_end) - begin))
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            if variant.distill:
                with torch.no_grad():
                    teacher = F.softmax(original(images), -1)
                distilled = F.kl_div(F.log_softmax(logits, -1), teacher, reduction="batchmean")
                loss = (1 - variant.distill) * loss + variant.distill * distilled
            if variant.beta_end is None:
                loss = loss + 0.01 * torch.stack([m.beta for m in sites]).sum()
            gammas = [m.log_gamma.abs() for m in model.modules() if isinstance(m, LipschitzBatchNorm)]
            loss = loss + 0.01 * torch.stack(gammas).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
    if variant.refresh:
        recalibrate_batchnorm(model, splits.calibration_pool, batches=20, batch_size=128)
    return model.eval(), sum(m.beta.item() for m in sites) / len(sites), sum(math.exp(b) for b in start) / len(start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--cache", type=Path, default=Path("runs/levers/resnet18_digits.pth"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    original, splits = baseline(args.cache)
    accuracy = evaluate_accuracy(original, splits.test)
    curvature = estimate_curvature(original, splits.test, max_examples=CURVATURE_EXAMPLES).curvature_mean
    print(f"original: accuracy {accuracy:.2%}, mean curvature {curvature:.4g}")
    calibration = torch.stack([splits.calibration_pool[index][0] for index in range(256)])
    print("| variant | accuracy | change | curvature | mean β (start) | seconds |\n|---|---:|---:|---:|---:|---:|")
    for name in args.only:
        started = time.perf_counter()
        model, beta, beta_start = finetune_variant(original, splits, calibration, VARIANTS[name])
        tuned = evaluate_accuracy(model, splits.test)
        tuned_curvature = estimate_curvature(model, splits.test, max_examples=CURVATURE_EXAMPLES).curvature_mean
        print(
            f"| {name} | {tuned:.2%} | {(tuned - accuracy) * 100:+.2f} pt | ÷{curvature / tuned_curvature:.1f} | "
            f"{beta:.3g} ({beta_start:.3g}) | {time.perf_counter() - started:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
