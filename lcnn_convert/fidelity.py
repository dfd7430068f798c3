"""Fidelity: does the converted model compute what the original computes, on data?

ONNX parity (``verify``) says the exported file equals the converted PyTorch model. Fidelity says the
converted model equals the *original*: top-1 agreement, relative logit error and KL divergence on
inputs the conversion did not calibrate on, with a note of where those inputs came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FIDELITY_BATCH = 256


def first_tensor(output: object) -> torch.Tensor:
    """The logits of a model whose forward returns a tensor, a tuple or a dict."""
    if isinstance(output, torch.Tensor):
        return output
    values: Iterable[object] = ()
    if isinstance(output, dict):
        values = output.values()
    elif isinstance(output, Iterable):
        values = output
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"model output of type {type(output).__name__} holds no tensor")


@dataclass(frozen=True)
class Fidelity:
    """The converted model against the original on ``num_inputs`` inputs from ``source``.

    The relative logit error of one input is |c(z' - z)| / |c(z)|, with z the original's logits, z'
    the converted model's and c the removal of the mean over classes (a shift of all logits changes
    no probability). KL is KL(original || converted) of the softmax outputs, in nats.
    ``synthetic`` marks inputs that only stand in for data (synthesised from BatchNorm statistics):
    a figure on them is an estimate, not a measurement on real images.
    """

    top1_agreement: float
    mean_relative_logit_error: float
    max_relative_logit_error: float
    kl_mean: float
    num_inputs: int
    source: str
    synthetic: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def holds(self, min_agreement: float) -> bool:
        return self.top1_agreement >= min_agreement

    def failure(self, min_agreement: float) -> str | None:
        """One line saying by how much the agreement misses the gate, or None if it holds."""
        if self.holds(min_agreement):
            return None
        return (
            f"fidelity failed: the converted model agrees with the original on {self.top1_agreement:.2%} of "
            f"{self.num_inputs} inputs ({self.source}), below the {min_agreement:.2%} gate "
            f"(mean relative logit error {self.mean_relative_logit_error:.3g})"
        )

    def __str__(self) -> str:
        return (
            f"fidelity: top-1 agreement {self.top1_agreement:.2%}, relative logit error mean "
            f"{self.mean_relative_logit_error:.3g} / max {self.max_relative_logit_error:.3g}, KL {self.kl_mean:.3g} "
            f"over {self.num_inputs} inputs ({self.source})"
        )


def _centered(logits: torch.Tensor) -> torch.Tensor:
    return logits - logits.mean(-1, keepdim=True)


def relative_logit_errors(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per input: |c(logits - reference)| / |c(reference)| (see ``Fidelity``)."""
    logits, reference = logits.double(), reference.double()
    scale = _centered(reference).norm(dim=-1).clamp_min(1e-12)
    return _centered(logits - reference).norm(dim=-1) / scale


def compare_logits(logits: torch.Tensor, reference: torch.Tensor, source: str, synthetic: bool = False) -> Fidelity:
    """Fidelity of ``logits`` to ``reference`` (both N x classes)."""
    errors = relative_logit_errors(logits, reference)
    log_p, log_q = F.log_softmax(reference.double(), -1), F.log_softmax(logits.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return Fidelity(
        top1_agreement=float((logits.argmax(-1) == reference.argmax(-1)).double().mean()),
        mean_relative_logit_error=float(errors.mean()),
        max_relative_logit_error=float(errors.max()),
        kl_mean=float(kl.mean()),
        num_inputs=int(len(errors)),
        source=source,
        synthetic=synthetic,
    )


@torch.no_grad()
def logits_of(
    model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], batch_size: int = FIDELITY_BATCH
) -> torch.Tensor:
    """The model's eval-mode logits on ``inputs`` (a tensor, or a sequence of batches), on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    batches = inputs.split(batch_size) if isinstance(inputs, torch.Tensor) else inputs
    try:
        return torch.cat([first_tensor(model(batch.to(device))).float().cpu() for batch in batches])
    finally:
        model.train(was_training)


def measure_fidelity(
    original: nn.Module, converted: nn.Module, inputs: torch.Tensor, source: str, synthetic: bool = False
) -> Fidelity:
    """Compare ``converted`` with ``original`` on ``inputs`` (eval mode; both models are left as they were)."""
    return compare_logits(logits_of(converted, inputs), logits_of(original, inputs), source, synthetic)
