"""lcnn_convert: turn pretrained CNNs into low-curvature networks, export them, prove parity.

Pipeline: load_model -> convert -> (fine-tune) -> export_onnx -> verify_onnx -> report.
"""

from .conversion import DEFAULT_RULES, ConversionReport, ReplacementRule, RuleContext, convert
from .errors import LcnnError
from .layers import CenteredSoftplus, LipschitzBatchNorm, LipschitzBatchNormAct, NormalizedConv, NormalizedLinear
from .artifacts import load
from .export import export_onnx
from .models import load_model
from . import measure
from .verify import ParityResult, verify_onnx

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RULES",
    "CenteredSoftplus",
    "ConversionReport",
    "LcnnError",
    "LipschitzBatchNorm",
    "LipschitzBatchNormAct",
    "NormalizedConv",
    "NormalizedLinear",
    "ReplacementRule",
    "RuleContext",
    "ParityResult",
    "convert",
    "export_onnx",
    "load",
    "load_model",
    "verify_onnx",
]
