"""Pictures for the output dir: curvature before/after, robustness curves and the training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .io import atomic_file

if TYPE_CHECKING:
    from .finetune import EpochRecord
    from .measure import RobustnessCurve


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curvature(per_example: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Histogram of per-example normalized curvature (log scale) for each model."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    values = {name: np.asarray(v, dtype=float) for name, v in per_example.items() if len(v)}
    positive = np.concatenate([v[v > 0] for v in values.values()]) if values else np.array([1.0])
    low, high = np.log10(positive.min() if positive.size else 1e-3), np.log10(positive.max() if positive.size else 1)
    bins = np.logspace(low - 0.1, high + 0.1, 40)
    for name, data in values.items():
        axes.hist(np.clip(data, bins[0], None), bins=bins, alpha=0.55, label=f"{name} (mean {data.mean():.3g})")
    axes.set_xscale("log")
    axes.set_xlabel("normalized curvature ||∇²ₓL|| / ||∇ₓL|| per test example")
    axes.set_ylabel("examples")
    axes.legend()
    axes.set_title("Input curvature before and after")
    figure.tight_layout()
    return _save(plt, figure, path)


def plot_robustness(
    curves: Mapping[str, Mapping[str, RobustnessCurve]], headline: Mapping[str, float], path: str | Path
) -> Path:
    """PGD robust accuracy against the budget, L2 and L-inf side by side, one line per model;
    ``curves`` maps a model's name to its curve per norm."""
    from .measure import budget_text, norm_name

    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, norm in zip(axes, ("l2", "linf")):
        for name, by_norm in curves.items():
            curve = by_norm.get(norm)
            if curve:
                scale = 255 if norm == "linf" else 1
                axis.plot(
                    [eps * scale for eps in curve.epsilons],
                    [100 * a for a in curve.accuracies],
                    marker="o",
                    label=name,
                )
        if norm in headline:
            axis.axvline(
                headline[norm] * (255 if norm == "linf" else 1),
                color="grey",
                linestyle=":",
                label=f"headline ε {budget_text(norm, headline[norm])}",
            )
        axis.set_xlabel(f"PGD {norm_name(norm)} budget ε" + (" (×1/255)" if norm == "linf" else ""))
        axis.set_ylabel("robust accuracy (%)")
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
        axis.legend()
    examples = next((c.examples for by_norm in curves.values() for c in by_norm.values()), None)
    figure.suptitle(f"Robustness curves ({examples} test images)" if examples else "Robustness curves")
    figure.tight_layout()
    return _save(plt, figure, path)


def plot_training(step_log: Mapping[str, Sequence[float]], history: Sequence[EpochRecord], path: str | Path) -> Path:
    """Loss, mean beta, mean gamma per step, and test accuracy per epoch."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(9, 6))
    panels = (("loss", "training loss"), ("beta_mean", "mean β"), ("gamma_mean", "mean γ"))
    for axis, (key, title) in zip(axes.flat, panels):
        axis.plot(step_log.get(key, []))
        axis.set_title(title)
        axis.set_xlabel("step")
    epochs = [record.epoch for record in history]
    axes[1, 1].plot(epochs, [100 * record.test_accuracy for record in history], marker="o")
    axes[1, 1].set_title("test accuracy (%)")
    axes[1, 1].set_xlabel("epoch")
    figure.tight_layout()
    return _save(plt, figure, path)


def _save(plt: Any, figure: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
    return path
