"""Model-zoo checks: does a model survive convert -> forward -> export -> onnxruntime parity?

``check_model("torchvision:resnet18")`` builds the model with random weights (no download),
gives its BatchNorms realistic statistics, converts it, exports it and compares onnxruntime with
PyTorch, and returns a ``ZooResult`` saying how far it got and why it stopped. The sweep over the
whole zoo (``benchmarks/zoo_sweep.py``) and the ``zoo`` tests are loops over this function.
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .bn_statistics import recalibrate_batchnorm
from .conversion import convert
from .conversion.api import conversion_report
from .errors import first_line
from .export import export_onnx
from .models import data_config, load_model_with_spec
from .verify import DEFAULT_ATOL, verify_onnx

# Input sizes tried in order. Small ones keep the sweep short (each Lanczos step of the
# conversion costs convolutions at the real input size); a model that does not run at one (too
# small for its pooling, or fixed-size like torchvision's ViTs) is tried at the next.
DEFAULT_SIZES = (32, 64, 96, 128, 224)
ZOO_BETA = 10.0
PARITY_INPUTS = 4
BASELINE_FACTOR = 2.0

# torchvision classification models; list_models(module=torchvision.models) also holds these.
# timm models across the families the issue names (plus a few more), small variants where a
# family has them: the sweep exercises the pass, not the FLOPs.
TIMM_ZOO = (
    "resnet18",
    "resnet50d",
    "resnet26t",
    "seresnext26d_32x4d",
    "resnetv2_50",
    "resnetv2_50x1_bit",
    "resnext26ts",
    "regnetx_002",
    "regnety_004",
    "regnetz_b16",
    "efficientnet_b0",
    "efficientnet_lite0",
    "tf_efficientnetv2_b0",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "mobilenetv3_large_100",
    "mobilenetv4_conv_small",
    "densenet121",
    "dla34",
    "dla46_c",
    "dpn48b",
    "ghostnet_100",
    "ghostnetv2_100",
    "hrnet_w18_small",
    "rexnet_100",
    "vgg11_bn",
    "inception_v3",
    "inception_v4",
    "xception41",
    "legacy_xception",
    "cspresnet50",
    "cspdarknet53",
    "cs3darknet_s",
    "convnext_atto",
    "convnextv2_atto",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "mixnet_s",
    "mnasnet_050",
    "fbnetc_100",
    "res2net50_14w_8s",
    "selecsls42b",
    "tinynet_e",
    "lcnet_050",
    "repvgg_a0",
    "darknet17",
    "gernet_s",
    "skresnet18",
    "botnet26t_256",
    "levit_128s",
    "efficientformer_l1",
    "mobilevit_xxs",
    "poolformer_s12",
    "coat_tiny",
    "nfnet_l0",
    "halonet26t",
    "edgenext_xx_small",
)


@dataclass
class ZooResult:
    model: str
    status: str = "fail"  # "ok" or "fail"
    reason: str = ""
    method: str | None = None
    input_size: int | None = None
    activations: int = 0
    batchnorms: int = 0
    normalized: int = 0
    skipped: int = 0
    activations_left: int = 0  # of ``skipped``, the activations (the rest: LayerNorm, attention, ...)
    parity_max_abs_diff: float | None = None
    original_parity_max_abs_diff: float | None = None
    seconds: float = 0.0
    stage: str = "build"
    params_millions: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _estimate_statistics(model: nn.Module, size: int, seed: int) -> None:
    """Random-weight BNs have mean 0 / variance 1 statistics, under which deep nets blow up in eval
    mode (logits of 1e10 make any parity tolerance meaningless): estimate them on random images."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(16, 3, size, size, generator=generator)
    recalibrate_batchnorm(model, TensorDataset(images, torch.zeros(16, dtype=torch.long)), batches=2, batch_size=8)


def _first_working_size(model: nn.Module, sizes: Sequence[int]) -> tuple[int, str]:
    errors = []
    for size in sizes:
        try:
            with torch.no_grad():
                model(torch.zeros(2, 3, size, size))
            return size, ""
        except Exception as error:  # any shape complaint: try the next size
            errors.append(f"{size}: {first_line(error, 120)}")
    return -1, "; ".join(errors)


def _original_parity(model: nn.Module, example: torch.Tensor, seed: int):
    with tempfile.TemporaryDirectory(prefix="lcnn-zoo-") as folder:
        path = Path(folder) / "original.onnx"
        export_onnx(model, path, example[:1])
        return verify_onnx(model, path, example, num_random=PARITY_INPUTS, atol=math.inf, seed=seed)


def _nothing_to_convert(result: ZooResult) -> bool:
    return result.activations == 0 and result.batchnorms == 0


def check_model(
    name: str, sizes: Sequence[int] = DEFAULT_SIZES, atol: float = DEFAULT_ATOL, seed: int = 0
) -> ZooResult:
    """Build ``name`` with random weights and run it through convert, forward, export and parity."""
    result = ZooResult(model=name)
    started = time.perf_counter()
    try:
        torch.manual_seed(seed)
        model, spec = load_model_with_spec(name, pretrained=False, weights=None, num_classes=None)
        model.eval()
        result.params_millions = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        result.stage = "forward (original)"
        native = int(data_config(model, spec).input_size[-1])
        size, errors = _first_working_size(model, [*sizes, *([native] if native not in sizes else [])])
        if size < 0:
            result.reason = f"the original does not run at any size tried: {errors}"
            return result
        result.input_size = size
        _estimate_statistics(model, size, seed)
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))

        result.stage = "convert"
        converted = convert(model, example, beta=ZOO_BETA)
        report = conversion_report(converted)
        result.method = report.method
        result.activations = len(report.activations_replaced)
        result.batchnorms = len(report.batchnorms_replaced)
        result.normalized = len(report.layers_normalized)
        result.skipped = len(report.skipped)
        result.activations_left = sum(item.kind == "activation" for item in report.skipped)
        kinds = sorted({item.reason for item in report.skipped})
        result.notes = kinds[:3]

        result.stage = "forward (converted)"
        with torch.no_grad():
            output = converted.eval()(example)
        output = output[0] if isinstance(output, (tuple, list)) else output
        if not torch.isfinite(output).all():
            result.reason = "converted model gives non-finite outputs"
            return result

        result.stage = "export"
        with tempfile.TemporaryDirectory(prefix="lcnn-zoo-") as folder:
            path = Path(folder) / "model.onnx"
            export_onnx(converted, path, example[:1])
            result.stage = "parity"
            parity = verify_onnx(converted, path, example, num_random=PARITY_INPUTS, atol=atol, seed=seed)
        result.parity_max_abs_diff = parity.max_abs_diff
        if not parity.passed:
            # Random weights can give logits in the hundreds, where float32 rounding alone exceeds
            # atol; a fixed beta also changes the logits' scale (random-weight RepVGG: 1.4 before,
            # 555 after). Then the original, exported the same way, is the yardstick: the
            # conversion passes if its error relative to its own logits (max |diff| / max |logit|)
            # is at most BASELINE_FACTOR times the original's.
            result.stage = "parity (original)"
            baseline = _original_parity(model, example, seed)
            result.original_parity_max_abs_diff = baseline.max_abs_diff
            relative = f"relative {parity.max_rel_diff:.2g} vs the original's {baseline.max_rel_diff:.2g}"
            if not (parity.max_rel_diff <= BASELINE_FACTOR * baseline.max_rel_diff and parity.top1_agreement == 1.0):
                own = f"the original's own export: max abs diff {baseline.max_abs_diff:.3g}"
                result.reason = f"{parity.failure()}; {own}; {relative}"
                return result
            result.notes.append(
                f"logits up to {parity.max_abs_diff / max(parity.max_rel_diff, 1e-30):.3g}: parity judged "
                f"against the original's export ({relative})"
            )
        result.stage = "done"
        result.status = "ok"
        if _nothing_to_convert(result):
            result.reason = (
                f"no BatchNorm and no activation: only the {result.normalized} convs/linears were normalized"
            )
        elif result.skipped:
            result.reason = "left: " + "; ".join(kinds[:2])
        return result
    except Exception as error:  # the sweep records every failure and goes on
        result.reason = f"{type(error).__name__}: {first_line(error, 240)}"
        return result
    finally:
        result.seconds = round(time.perf_counter() - started, 2)
        gc.collect()


def markdown_table(results: Iterable[ZooResult]) -> str:
    lines = [
        "| model | method | size | activations | BNs | normalized | left (activations) | parity max abs diff "
        "(original's) | status | reason | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        diff = "—" if r.parity_max_abs_diff is None else f"{r.parity_max_abs_diff:.1e}"
        if r.original_parity_max_abs_diff is not None:
            diff += f" ({r.original_parity_max_abs_diff:.1e})"
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        status = r.status if r.status == "ok" else f"**{r.status}** at {r.stage}"
        lines.append(
            f"| {r.model} | {r.method or '—'} | {r.input_size or '—'} | {r.activations} | {r.batchnorms} | "
            f"{r.normalized} | {r.skipped} ({r.activations_left}) | {diff} | {status} | {reason} | {r.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"
