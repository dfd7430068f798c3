"""The settings of a fine-tuning run (stage 3), importable without torch: the CLI's defaults are
FinetuneConfig's, and ``lcnn-convert --help`` shows them without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from .errors import InvalidSetting

# The automatic batch size: the largest of these that gives an epoch MIN_STEPS_PER_EPOCH steps
# (digits' 1,437 training images: 32, 135 steps in 3 epochs; CIFAR: 128).
AUTO_BATCH_SIZES = (128, 64, 32, 16)
MIN_STEPS_PER_EPOCH = 40
BETA_LR_FACTOR = 10.0
# --smoothness 1 puts this weight on sum(c * beta), c each family's sharpness_per_beta.
LAMBDA_BETA_PER_SMOOTHNESS = 1e-2
# The gradient-norm penalty's double backward costs about twice a training step for every image it
# covers (each conv runs six times instead of three): computed on this share of each batch, a step
# with it costs under 2x one without (docs/benchmarks.md; the curvature it reaches: docs/finetuning.md).
GRAD_NORM_SHARE = 0.125


def auto_batch_size(train_examples: int, world_size: int = 1) -> int:
    """The largest of AUTO_BATCH_SIZES with at least MIN_STEPS_PER_EPOCH steps an epoch (the
    smallest when none has), a multiple of ``world_size``."""
    for size in AUTO_BATCH_SIZES:
        if math.ceil(train_examples / size) >= MIN_STEPS_PER_EPOCH and size % world_size == 0:
            return size
    smallest = AUTO_BATCH_SIZES[-1]
    return smallest if smallest % world_size == 0 else world_size * max(1, smallest // world_size)


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run. ``batch_size`` and ``beta_lr`` None mean automatic
    (``resolved`` fills them in); ``smoothness`` is the one knob of the accuracy/curvature trade-off."""

    epochs: int = 3
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float = 0.01
    beta_lr: float | None = None
    optimizer: Literal["sgd", "adamw"] = "sgd"
    schedule: Literal["cosine", "onecycle"] = "cosine"
    weight_decay: float = 5e-4
    smoothness: float = 1.0
    lambda_gamma: float = 1e-2
    lambda_grad: float = 0.0
    grad_norm_share: float = GRAD_NORM_SHARE
    distill: float = 0.5
    refresh_batchnorm: bool = True
    seed: int = 0

    @property
    def lambda_beta(self) -> float:
        """The weight of sum(c * beta) in the loss."""
        return LAMBDA_BETA_PER_SMOOTHNESS * self.smoothness

    def resolved(self, train_examples: int, world_size: int = 1) -> FinetuneConfig:
        """This config with the automatic values filled in for a train split of ``train_examples``."""
        return replace(
            self,
            batch_size=self.batch_size if self.batch_size is not None else auto_batch_size(train_examples, world_size),
            beta_lr=self.beta_lr if self.beta_lr is not None else BETA_LR_FACTOR * self.lr,
        )

    def validate(self) -> None:
        """Raise InvalidSetting for the first field out of its range."""
        checks = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size is None or self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("beta_lr", self.beta_lr is None or self.beta_lr > 0, "must be > 0"),
            ("optimizer", self.optimizer in ("sgd", "adamw"), "must be sgd or adamw"),
            ("schedule", self.schedule in ("cosine", "onecycle"), "must be cosine or onecycle"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("smoothness", self.smoothness >= 0, "must be >= 0"),
            ("lambda_gamma", self.lambda_gamma >= 0, "must be >= 0"),
            ("lambda_grad", self.lambda_grad >= 0, "must be >= 0"),
            ("grad_norm_share", 0 < self.grad_norm_share <= 1, "must lie in (0, 1]"),
            ("distill", 0 <= self.distill <= 1, "must lie in [0, 1]"),
        ]
        for setting, ok, requirement in checks:
            if not ok:
                raise InvalidSetting(setting, requirement, getattr(self, setting))
