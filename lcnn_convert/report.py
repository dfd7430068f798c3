"""Stage 6, report: one dict for report.json and the same facts as a terminal table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .io import atomic_file

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


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    return path


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


METRIC_ROWS = (
    ("accuracy", "accuracy", "{:.2%}"),
    ("curvature_mean", "curvature (mean)", "{:.4g}"),
    ("curvature_std", "curvature (std)", "{:.4g}"),
    ("hessian_norm_mean", "Hessian norm (mean)", "{:.4g}"),
    ("grad_norm_mean", "gradient norm (mean)", "{:.4g}"),
    ("pgd_l2_accuracy", "PGD L2 accuracy", "{:.2%}"),
    ("pgd_linf_accuracy", "PGD L∞ accuracy", "{:.2%}"),
)


def _change(before: float | None, after: float | None, key: str) -> str:
    if before is None or after is None:
        return "—"
    if "accuracy" in key:
        return f"{100 * (after - before):+.2f} pt"
    if before > 0 and after > 0:
        return f"÷{before / after:.3g}" if after < before else f"×{after / before:.3g}"
    return "—"


def metrics_table(metrics: dict[str, dict[str, Any]], finetune: dict[str, Any] | None = None) -> Table:
    """original / converted / fine-tuned side by side, with the change from the original."""
    columns = [name for name in ("original", "converted", "finetuned") if name in metrics]
    table = Table(title="accuracy, curvature and robustness (test set)")
    table.add_column("metric", style="bold")
    for name in columns:
        table.add_column(name, justify="right")
        if name != "original" and "original" in metrics:
            table.add_column("change", justify="right", style="cyan")
    for key, label, fmt in METRIC_ROWS:
        row = [label]
        for name in columns:
            value = metrics[name].get(key)
            row.append("—" if value is None else fmt.format(value))
            if name != "original" and "original" in metrics:
                row.append(_change(metrics["original"].get(key), value, key))
        table.add_row(*row)
    if finetune:
        table.caption = (
            f"fine-tuned {finetune['epochs']} epochs / {finetune['steps']} steps in {finetune['seconds']:.0f}s; "
            f"mean β {finetune['beta_mean']:.3g}, mean BN Lipschitz {finetune['lipschitz_mean']:.3g}"
        )
    return table


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the conversion, parity and skipped-call sections of a report as tables."""
    console = console or Console()
    conversion = report["conversion"]
    table = Table(title=f"lcnn-convert: {report['model']} ({report['source']})", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("method", conversion["method"])
    table.add_row("activations → centered softplus", str(conversion["activations_replaced"]))
    table.add_row("BatchNorms → Lipschitz BN", str(conversion["batchnorms_replaced"]))
    table.add_row("convs/linears normalized", str(conversion["layers_normalized"]))
    table.add_row("left as is", str(len(conversion["skipped"])))
    beta = conversion.get("beta", {})
    if "mean" in beta:
        table.add_row("beta (mean, min–max)", f"{beta['mean']:.3g} ({beta['min']:.3g}–{beta['max']:.3g}), {beta['mode']}")
    table.add_row("curvature bound (data-free)", _number(conversion["curvature_bound"]))
    for note in conversion.get("bound_notes", []):
        table.add_row("", f"[dim]{note}[/dim]")
    if report.get("batchnorm_statistics"):
        table.add_row("BatchNorm statistics", report["batchnorm_statistics"])
    for note in conversion.get("notes", []):
        table.add_row("note", f"[yellow]{note}[/yellow]")
    parity = report.get("parity")
    if parity:
        verdict = "[green]passed[/green]" if parity["passed"] else "[red]FAILED[/red]"
        table.add_row("ONNX parity", verdict)
        table.add_row("  max abs diff", f"{_number(parity['max_abs_diff'], 3)} (atol {parity['atol']:g})")
        table.add_row("  max rel diff", _number(parity["max_rel_diff"], 3))
        ties = f", {parity['near_ties']} near-ties set apart" if parity.get("near_ties") else ""
        table.add_row("  top-1 agreement", f"{parity['top1_agreement']:.2%} over {parity['num_inputs']} inputs{ties}")
    console.print(table)
    if report.get("metrics"):
        console.print(metrics_table(report["metrics"], report.get("finetune")))
    skipped = conversion["skipped"]
    if skipped:
        kept = Table(title="left as is", show_lines=False)
        for column in ("node", "kind", "reason"):
            kept.add_column(column)
        for item in skipped[:MAX_SKIPPED_SHOWN]:
            kept.add_row(item["node"], item["kind"], item["reason"])
        if len(skipped) > MAX_SKIPPED_SHOWN:
            kept.add_row(f"… {len(skipped) - MAX_SKIPPED_SHOWN} more in report.json", "", "")
        console.print(kept)
