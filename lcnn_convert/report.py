"""Stage 6, report: one dict for report.json and the same facts as a terminal table."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from .io import atomic_file

if TYPE_CHECKING:
    from .conversion.report import ConversionReport
    from .distributed import DistributedContext
    from .fidelity import Fidelity
    from .finetune import FinetuneResult
    from .measure import MeasurementSettings, ModelMetrics
    from .preprocessing import Preprocessing
    from .verify import ParityResult

MAX_SKIPPED_SHOWN = 8


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_report(path: str | Path, report: RunReport) -> Path:
    """report.json: ``report.to_dict()``, atomically (a reader never sees half of it)."""
    path = Path(path)
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(_finite(report.to_dict()), indent=2, allow_nan=False) + "\n")
    return path


@dataclass(frozen=True)
class FidelityGate:
    """The least top-1 agreement with the original a run accepts. ``gated`` is False where a shortfall
    only warns: fidelity measured on synthetic inputs, or a fine-tuning run (whose model is meant
    to move away from the original)."""

    min_agreement: float
    gated: bool


@dataclass(frozen=True)
class FinetuneOutcome:
    """A fine-tuning run: its result, the tuned model's fidelity to the original (not gated: it is
    meant to move away), whether the original's predictions were soft targets, and the ranks it ran on."""

    result: FinetuneResult
    fidelity: Fidelity | None
    distilled_from_original: bool
    distributed: DistributedContext | None = None

    def to_dict(self) -> dict[str, Any]:
        summary = self.result.summary()
        if self.distributed is not None:
            batch = None if self.result.config is None else self.result.config.batch_size
            summary["distributed"] = {
                "world_size": self.distributed.world_size,
                "backend": self.distributed.backend,
                "batch_per_rank": None if batch is None else batch // self.distributed.world_size,
            }
        summary["fidelity"] = None if self.fidelity is None else self.fidelity.to_dict()
        summary["distilled_from_original"] = self.distilled_from_original
        return summary

    def caption(self) -> str:
        """One line under the metrics table: how long, how many steps, where beta and the BNs ended."""
        result, last = self.result, self.result.history[-1] if self.result.history else None
        batch = f" of {result.config.batch_size}" if result.config is not None and result.config.batch_size else ""
        text = f"fine-tuned {result.epochs} epochs / {result.steps} steps{batch} in {result.seconds:.0f}s"
        if last is not None:
            text += f"; mean β {last.beta_mean:.3g}, mean BN Lipschitz {last.lipschitz_mean:.3g}"
        return text


@dataclass
class RunReport:
    """Everything one ``lcnn-convert`` run did and measured; report.json is ``to_dict()``."""

    model: str
    source: str
    name: str
    num_classes: int | None
    input_size: list[int]
    pretrained: bool
    weights: str | None
    dataset: str | None
    preprocessing: Preprocessing | None
    conversion: ConversionReport
    fidelity_gate: FidelityGate
    batchnorm_statistics: str | None
    parity: ParityResult
    files: dict[str, str]
    timings_s: dict[str, float]
    lcnn_convert_version: str
    metrics: dict[str, ModelMetrics] = field(default_factory=dict)  # "original", "converted", "finetuned"
    measurement: MeasurementSettings | None = None
    finetune: FinetuneOutcome | None = None
    warnings: list[str] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> "sha256:<hex>", for `verify`
    output_dir: str | None = None

    @property
    def fidelity(self) -> Fidelity | None:
        """The conversion's fidelity to the original, on held-out inputs."""
        return self.conversion.fidelity

    @property
    def fidelity_passed(self) -> bool | None:
        if self.fidelity is None:
            return None
        return self.fidelity.holds(self.fidelity_gate.min_agreement)

    def failures(self) -> list[str]:
        """One line per failed gate: ONNX parity, then fidelity where it is gated."""
        lines = []
        if not self.parity.passed:
            lines.append(f"{self.parity.failure()}; outputs kept for inspection")
        if self.fidelity is not None and self.fidelity_gate.gated and not self.fidelity_passed:
            lines.append(f"{self.fidelity.failure(self.fidelity_gate.min_agreement)}; outputs kept for inspection")
        return lines

    def to_dict(self) -> dict[str, Any]:
        fidelity = None
        if self.fidelity is not None:
            fidelity = {
                **self.fidelity.to_dict(),
                "min_agreement": self.fidelity_gate.min_agreement,
                "gated": self.fidelity_gate.gated,
                "passed": self.fidelity_passed,
            }
        report: dict[str, Any] = {
            "model": self.model,
            "source": self.source,
            "name": self.name,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "pretrained": self.pretrained,
            "weights": self.weights,
            "dataset": self.dataset,
            "preprocessing": None if self.preprocessing is None else self.preprocessing.to_dict(),
            "conversion": self.conversion.to_dict(),
            "fidelity": fidelity,
            "batchnorm_statistics": self.batchnorm_statistics,
            "parity": self.parity.to_dict(),
            "files": self.files,
            "checksums": self.checksums,
            "timings_s": self.timings_s,
            "warnings": list(self.warnings),
            "lcnn_convert_version": self.lcnn_convert_version,
        }
        if self.metrics:
            report["metrics"] = {name: metrics.to_dict() for name, metrics in self.metrics.items()}
            report["measurement"] = None if self.measurement is None else self.measurement.to_dict()
        if self.finetune is not None:
            report["finetune"] = self.finetune.to_dict()
        if self.output_dir is not None:
            report["output_dir"] = self.output_dir
        return report


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


# (label, format, the value of a model's metrics)
METRIC_ROWS: tuple[tuple[str, str, Callable[[ModelMetrics], float | None]], ...] = (
    ("accuracy", "{:.2%}", lambda metrics: metrics.accuracy),
    ("confidence (mean top-1 probability)", "{:.2%}", lambda metrics: metrics.confidence),
    ("curvature (mean)", "{:.4g}", lambda metrics: metrics.curvature.curvature_mean),
    (
        "curvature at the original's confidence",
        "{:.4g}",
        lambda metrics: metrics.curvature_at_original_confidence,
    ),
    ("curvature (std)", "{:.4g}", lambda metrics: metrics.curvature.curvature_std),
    ("Hessian norm (mean)", "{:.4g}", lambda metrics: metrics.curvature.hessian_norm_mean),
    ("gradient norm (mean)", "{:.4g}", lambda metrics: metrics.curvature.grad_norm_mean),
    ("PGD L2 accuracy", "{:.2%}", lambda metrics: metrics.pgd_l2_accuracy),
    ("PGD L∞ accuracy", "{:.2%}", lambda metrics: metrics.pgd_linf_accuracy),
)
# the rows that state a headline PGD budget, by label
PGD_ROW_NORMS = {"PGD L2 accuracy": "l2", "PGD L∞ accuracy": "linf"}


def _change(before: float | None, after: float | None, format: str) -> str:
    if before is None or after is None:
        return "—"
    if format.endswith("%}"):
        return f"{100 * (after - before):+.2f} pt"
    if before > 0 and after > 0:
        return f"÷{before / after:.3g}" if after < before else f"×{after / before:.3g}"
    return "—"


def _row_label(label: str, budgets: dict[str, float] | None) -> str:
    norm = PGD_ROW_NORMS.get(label)
    if norm is None or not budgets or norm not in budgets:
        return label
    from .measure import budget_text

    return f"{label} (ε {budget_text(norm, budgets[norm])})"


def metrics_table(
    metrics: dict[str, ModelMetrics], finetune: FinetuneOutcome | None = None, budgets: dict[str, float] | None = None
) -> Table:
    """original / converted / fine-tuned side by side, with the change from the original;
    ``budgets`` label the PGD rows with their headline budget."""
    columns = [name for name in ("original", "converted", "finetuned") if name in metrics]
    original = metrics.get("original")
    table = Table(title="accuracy, curvature and robustness (test set)")
    table.add_column("metric", style="bold")
    for name in columns:
        table.add_column(name, justify="right")
        if name != "original" and original is not None:
            table.add_column("change", justify="right", style="cyan")
    for label, format, value_of in METRIC_ROWS:
        row = [_row_label(label, budgets)]
        for name in columns:
            value = value_of(metrics[name])
            row.append("—" if value is None else format.format(value))
            if name != "original" and original is not None:
                row.append(_change(value_of(original), value, format))
        table.add_row(*row)
    if finetune is not None:
        table.caption = finetune.caption()
    return table


def print_report(report: RunReport, console: Console | None = None) -> None:
    """Print the conversion, fidelity, parity and skipped-call sections of a run as tables."""
    console = console or Console()
    conversion = report.conversion
    table = Table(title=f"lcnn-convert: {report.model} ({report.source})", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("method", conversion.method)
    kinds = ", ".join(f"{label} {count}" for label, count in conversion.activation_kinds.items())
    replaced = str(len(conversion.activations_replaced))
    table.add_row("activations → LCNN", replaced + (f" ({kinds})" if kinds else ""))
    table.add_row("BatchNorms → Lipschitz BN", str(len(conversion.batchnorms_replaced)))
    table.add_row("convs/linears normalized", str(len(conversion.layers_normalized)))
    table.add_row("left as is", str(len(conversion.skipped)))
    beta = conversion.beta
    if beta.mean is not None and beta.min is not None and beta.max is not None:
        where = f", on {beta.calibration_data}" if beta.calibration_data else ""
        table.add_row("beta (mean, min–max)", f"{beta.mean:.3g} ({beta.min:.3g}–{beta.max:.3g}), {beta.mode}{where}")
    table.add_row("curvature bound (data-free)", _number(conversion.curvature_bound))
    for note in conversion.bound_notes:
        table.add_row("", f"[dim]{note}[/dim]")
    if report.preprocessing is not None:
        table.add_row("preprocessing", f"{report.preprocessing.describe()} ({report.preprocessing.source})")
    if report.batchnorm_statistics:
        table.add_row("BatchNorm statistics", report.batchnorm_statistics)
    for note in conversion.notes:
        table.add_row("note", f"[yellow]{note}[/yellow]")
    fidelity = report.fidelity
    if fidelity is None:
        table.add_row("fidelity to the original", "[yellow]not measured[/yellow]")
    else:
        gate = report.fidelity_gate
        if report.fidelity_passed:
            verdict = "[green]passed[/green]"
        else:
            verdict = "[red]FAILED[/red]" if gate.gated else "[yellow]below the gate (warning only)[/yellow]"
        table.add_row("fidelity to the original", f"{verdict} (gate {gate.min_agreement:.0%} top-1 agreement)")
        table.add_row(
            "  top-1 agreement", f"{fidelity.top1_agreement:.2%} over {fidelity.num_inputs} inputs ({fidelity.source})"
        )
        table.add_row(
            "  relative logit error",
            f"mean {_number(fidelity.mean_relative_logit_error, 3)}, max {_number(fidelity.max_relative_logit_error, 3)}",
        )
        table.add_row("  KL(original ‖ converted)", _number(fidelity.kl_mean, 3))
    tuned = None if report.finetune is None else report.finetune.fidelity
    if tuned is not None:
        table.add_row(
            "  after fine-tuning (not gated)",
            f"{tuned.top1_agreement:.2%} top-1 agreement, mean relative logit error "
            f"{_number(tuned.mean_relative_logit_error, 3)}",
        )
    parity = report.parity
    verdict = "[green]passed[/green]" if parity.passed else "[red]FAILED[/red]"
    table.add_row("ONNX parity", verdict)
    table.add_row("  max abs diff", f"{_number(parity.max_abs_diff, 3)} (atol {parity.atol:g})")
    table.add_row("  max rel diff", _number(parity.max_rel_diff, 3))
    ties = f", {parity.near_ties} near-ties set apart" if parity.near_ties else ""
    table.add_row("  top-1 agreement", f"{parity.top1_agreement:.2%} over {parity.num_inputs} inputs{ties}")
    console.print(table)
    if report.metrics:
        budgets = None if report.measurement is None else report.measurement.headline_eps
        console.print(metrics_table(report.metrics, report.finetune, budgets))
    skipped = conversion.skipped
    if skipped:
        kept = Table(title="left as is", show_lines=False)
        for column in ("node", "kind", "reason"):
            kept.add_column(column)
        for item in skipped[:MAX_SKIPPED_SHOWN]:
            kept.add_row(item.node, item.kind, item.reason)
        if len(skipped) > MAX_SKIPPED_SHOWN:
            kept.add_row(f"… {len(skipped) - MAX_SKIPPED_SHOWN} more in report.json", "", "")
        console.print(kept)
