"""What a conversion did, in a form that prints as a table and serialises to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..fidelity import Fidelity


@dataclass(frozen=True)
class Skipped:
    """A call the pass saw and left as it was, and why."""

    node: str
    kind: str
    reason: str


@dataclass
class BetaChoice:
    """How the activations' sharpness was chosen, and what it came to.

    ``mode`` is "auto" (calibrated on ``calibration_data``), "auto-default" (no data and no trained
    BatchNorm statistics to synthesise any: every site at ``value``) or "fixed" (``value`` asked for).
    For "auto", ``sharpness`` is the shared t of beta_k = t / std_k and the agreement and error are
    those on the calibration inputs, against ``logit_tolerance``.
    """

    mode: Literal["auto", "auto-default", "fixed"]
    value: float | None = None
    calibration_data: str | None = None
    sharpness: float | None = None
    top1_agreement: float | None = None
    mean_relative_logit_error: float | None = None
    logit_tolerance: float | None = None
    calibration_examples: int | None = None
    mean: float | None = None
    min: float | None = None
    max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class ConversionReport:
    method: Literal["fx", "module-swap"]
    activations_replaced: list[str] = field(default_factory=list)
    activation_kinds: dict[str, int] = field(default_factory=dict)  # label -> count, e.g. {"swish": 17}
    batchnorms_replaced: list[str] = field(default_factory=list)
    layers_normalized: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    curvature_bound: float | None = None
    lipschitz_bound: float | None = None
    bound_notes: list[str] = field(default_factory=list)
    beta: BetaChoice = field(default_factory=lambda: BetaChoice("fixed"))
    fidelity: Fidelity | None = None
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "activations_replaced": len(self.activations_replaced),
            "activation_kinds": dict(self.activation_kinds),
            "batchnorms_replaced": len(self.batchnorms_replaced),
            "layers_normalized": len(self.layers_normalized),
            "skipped": [asdict(item) for item in self.skipped],
            "method": self.method,
            "fallback_reason": self.fallback_reason,
            "notes": list(self.notes),
            "curvature_bound": self.curvature_bound,
            "lipschitz_bound": self.lipschitz_bound,
            "bound_notes": list(self.bound_notes),
            "beta": self.beta.to_dict(),
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
            "replaced": {
                "activations": list(self.activations_replaced),
                "batchnorms": list(self.batchnorms_replaced),
                "normalized": list(self.layers_normalized),
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionReport:
        """The inverse of ``to_dict`` (a fine-tuning checkpoint keeps the report in that form)."""
        replaced = data["replaced"]
        return cls(
            method=data["method"],
            activations_replaced=list(replaced["activations"]),
            activation_kinds=dict(data["activation_kinds"]),
            batchnorms_replaced=list(replaced["batchnorms"]),
            layers_normalized=list(replaced["normalized"]),
            skipped=[Skipped(**item) for item in data["skipped"]],
            curvature_bound=data["curvature_bound"],
            lipschitz_bound=data["lipschitz_bound"],
            bound_notes=list(data["bound_notes"]),
            beta=BetaChoice(**data["beta"]),
            fidelity=None if data["fidelity"] is None else Fidelity(**data["fidelity"]),
            fallback_reason=data["fallback_reason"],
            notes=list(data["notes"]),
        )

    def __str__(self) -> str:
        bound = "unbounded" if self.curvature_bound is None else f"{self.curvature_bound:.4g}"
        return (
            f"ConversionReport(method={self.method}, activations={len(self.activations_replaced)}, "
            f"batchnorms={len(self.batchnorms_replaced)}, normalized={len(self.layers_normalized)}, "
            f"skipped={len(self.skipped)}, curvature_bound={bound}, "
            f"fidelity={'not measured' if self.fidelity is None else f'{self.fidelity.top1_agreement:.2%} top-1'})"
        )
