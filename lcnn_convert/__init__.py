"""lcnn_convert: turn pretrained CNNs into low-curvature networks, export them, prove parity.

Pipeline: create_model -> convert -> fine-tune -> export_onnx -> verify_onnx -> measure/report;
load_converted(DIR) rebuilds what the CLI wrote (``load_model`` and ``load`` are their earlier names).

The names below are imported on first use, so that ``import lcnn_convert`` (and the command
line's ``--help`` and usage errors) do not pay for importing torch, torchvision, timm and onnx.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# Intel MKL (torch's CPU BLAS) otherwise picks its code path by each buffer's memory alignment,
# so the same fine-tuning run in two processes can differ in the last bits and a --resume would
# not repeat an uninterrupted run exactly (a Linear layer's matmul with its operands 1 or 3
# floats off a 32-byte boundary gave other bits). "AUTO" keeps the fastest path for the CPU but makes it
# repeatable. MKL reads it at its first call (an import of torch before this one is fine), and a
# user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "DEFAULT_RULES": ".conversion",
    "ConversionReport": ".conversion",
    "ReplacementRule": ".conversion",
    "RuleContext": ".conversion",
    "convert": ".conversion",
    "conversion_report": ".conversion.api",
    "DataConfig": ".models",
    "data_config": ".models",
    "CenteredSoftplus": ".layers",
    "LipschitzBatchNorm": ".layers",
    "LipschitzBatchNormAct": ".layers",
    "NormalizedConv": ".layers",
    "NormalizedLinear": ".layers",
    "LcnnError": ".errors",
    "ParityResult": ".verify",
    "adversarial_accuracy": ".measure",
    "estimate_curvature": ".measure",
    "export_onnx": ".export",
    "load": ".artifacts",
    "load_converted": ".artifacts",
    "load_model": ".models",
    "create_model": ".models",
    "recalibrate_batchnorm": ".bn_statistics",
    "verify_onnx": ".verify",
}
_SUBMODULES = {"measure"}

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value: Any = importlib.import_module(f".{name}", __name__)
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from . import measure
    from .artifacts import load, load_converted
    from .bn_statistics import recalibrate_batchnorm
    from .conversion import DEFAULT_RULES, ConversionReport, ReplacementRule, RuleContext, convert
    from .conversion.api import conversion_report
    from .errors import LcnnError
    from .export import export_onnx
    from .layers import CenteredSoftplus, LipschitzBatchNorm, LipschitzBatchNormAct, NormalizedConv, NormalizedLinear
    from .measure import adversarial_accuracy, estimate_curvature
    from .models import DataConfig, create_model, data_config, load_model
    from .verify import ParityResult, verify_onnx
