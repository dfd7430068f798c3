"""How images are fed to the model: its data config, or what the user says it was trained with.

timm's train.py names: ``--mean R G B``, ``--std R G B``, ``--interpolation``. A model trained without
ImageNet normalisation and fed with it scores far below what it can (a digits ResNet-18 trained on raw
[0, 1] inputs: 99.5% measured as 56.9%), so the pipeline also scores the original under the usual
alternatives and warns when one of them fits much better.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from .fidelity import first_tensor
from .errors import LcnnError
from .models import IMAGENET_MEAN, IMAGENET_STD, DataConfig

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# Normalisations pretrained models commonly expect (ImageNet's; Inception's [-1, 1]; raw [0, 1]).
COMMON_NORMALISATIONS = {
    "ImageNet mean/std": (IMAGENET_MEAN, IMAGENET_STD),
    "--mean 0.5 0.5 0.5 --std 0.5 0.5 0.5": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "--mean 0 0 0 --std 1 1 1": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@dataclass(frozen=True)
class Preprocessing:
    """Normalisation and resizing applied to every image (calibration, fine-tuning, evaluation)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    image_size: int | None
    source: str  # "the model's data config" or the options that overrode it

    def applied_to(self, config: DataConfig) -> DataConfig:
        """The model's data config with this normalisation and interpolation."""
        return replace(config, mean=self.mean, std=self.std, interpolation=self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"mean {_numbers(self.mean)}, std {_numbers(self.std)}"


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{value:.3g}" for value in values) + ")"


def check_overrides(mean: Sequence[float] | None, std: Sequence[float] | None, interpolation: str | None) -> None:
    """One line for a bad --mean/--std/--interpolation, before any work starts."""
    for name, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) != 3:
            raise LcnnError(f"{name} takes 3 numbers (R G B), got {len(values)}")
    if std is not None and min(std) <= 0:
        raise LcnnError(f"--std values must be > 0, got {' '.join(f'{value:g}' for value in std)}")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise LcnnError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got '{interpolation}'")


def preprocessing_for(
    config: DataConfig,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    image_size: int | None = None,
) -> Preprocessing:
    """The model's data config with the user's overrides applied."""
    check_overrides(mean, std, interpolation)
    given = [name for name, value in (("--mean", mean), ("--std", std), ("--interpolation", interpolation)) if value]
    return Preprocessing(
        mean=tuple(float(value) for value in (mean or config.mean)),
        std=tuple(float(value) for value in (std or config.std)),
        interpolation=interpolation or config.interpolation,
        image_size=image_size,
        source=", ".join(given) if given else "the model's data config",
    )


def _renormalize(
    images: torch.Tensor, used: Preprocessing, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    view = (1, -1, 1, 1)
    pixels = images * torch.tensor(used.std).view(view) + torch.tensor(used.mean).view(view)
    return (pixels - torch.tensor(mean).view(view)) / torch.tensor(std).view(view)


@torch.no_grad()
def preprocessing_candidates(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, used: Preprocessing
) -> list[tuple[str, float]]:
    """The model's accuracy on ``images`` (normalised as ``used``) as given, then under each common
    normalisation that differs from ``used``; the first entry is ``used``'s own."""
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    try:

        def accuracy(batch: torch.Tensor) -> float:
            predictions = torch.cat(
                [first_tensor(model(part.to(device))).argmax(-1).cpu() for part in batch.split(128)]
            )
            return float((predictions == labels).float().mean())

        scored = [(used.describe(), accuracy(images))]
        for name, (mean, std) in COMMON_NORMALISATIONS.items():
            if (tuple(mean), tuple(std)) != (tuple(used.mean), tuple(used.std)):
                scored.append((name, accuracy(_renormalize(images, used, mean, std))))
        return scored
    finally:
        model.train(was_training)
