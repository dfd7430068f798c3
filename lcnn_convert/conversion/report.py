"""What a conversion did, in a form that prints as a table and serialises to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Skipped:
    """A call the pass saw and left as it was, and why."""

    node: str
    kind: str
    reason: str


@dataclass
class ConversionReport:
    method: Literal["fx", "module-swap"]
    activations_replaced: list[str] = field(default_factory=list)
    batchnorms_replaced: list[str] = field(default_factory=list)
    layers_normalized: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    curvature_bound: float | None = None
    lipschitz_bound: float | None = None
    bound_notes: list[str] = field(default_factory=list)
    beta: dict[str, Any] = field(default_factory=dict)
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "activations_replaced": len(self.activations_replaced),
            "batchnorms_replaced": len(self.batchnorms_replaced),
            "layers_normalized": len(self.layers_normalized),
            "skipped": [asdict(item) for item in self.skipped],
            "method": self.method,
            "fallback_reason": self.fallback_reason,
            "notes": list(self.notes),
            "curvature_bound": self.curvature_bound,
            "lipschitz_bound": self.lipschitz_bound,
            "bound_notes": list(self.bound_notes),
            "beta": dict(self.beta),
            "replaced": {
                "activations": list(self.activations_replaced),
                "batchnorms": list(self.batchnorms_replaced),
                "normalized": list(self.layers_normalized),
            },
        }

    def __str__(self) -> str:
        bound = "unbounded" if self.curvature_bound is None else f"{self.curvature_bound:.4g}"
        return (
            f"ConversionReport(method={self.method}, activations={len(self.activations_replaced)}, "
            f"batchnorms={len(self.batchnorms_replaced)}, normalized={len(self.layers_normalized)}, "
            f"skipped={len(self.skipped)}, curvature_bound={bound})"
        )
