"""lcnn_convert: turn pretrained CNNs into low-curvature networks, export them, prove parity.

Pipeline: load_model -> convert -> fine-tune -> export_onnx -> verify_onnx -> measure/report.
"""

__version__ = "0.1.0"

from . import measure
from .artifacts import load
from .bn_statistics import recalibrate_batchnorm
from .conversion import DEFAULT_RULES, ConversionReport, ReplacementRule, RuleContext, convert
from .errors import LcnnError
from .export import export_onnx
from .layers import CenteredSoftplus, LipschitzBatchNorm, LipschitzBatchNormAct, NormalizedConv, NormalizedLinear
from .measure import adversarial_accuracy, estimate_curvature
from .models import load_model
from .verify import ParityResult, verify_onnx

__all__ = [
    "DEFAULT_RULES",
    "CenteredSoftplus",
    "ConversionReport",
    "LcnnError",
    "LipschitzBatchNorm",
    "LipschitzBatchNormAct",
    "NormalizedConv",
    "NormalizedLinear",
    "ParityResult",
    "ReplacementRule",
    "RuleContext",
    "adversarial_accuracy",
    "convert",
    "estimate_curvature",
    "export_onnx",
    "load",
    "load_model",
    "measure",
    "recalibrate_batchnorm",
    "verify_onnx",
]
