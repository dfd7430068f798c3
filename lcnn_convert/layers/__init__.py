"""The LCNN building blocks, independent of the graph pass that inserts them.

Each LCNN layer states what the rest of the package asks of it: ``lipschitz_constant()`` and
``curvature_constant()`` (the data-free bound), ``regulariser`` and ``regulariser_term()`` (what
fine-tuning penalises), ``curvature_stand_in()`` (what curvature measurement runs instead) and, for
activations, ``inference_form()`` (the export form, beta a constant) and ``calibrated``.
"""

from .centered_softplus import CenteredSoftplus
from .lipschitz_batchnorm import LipschitzBatchNorm, LipschitzBatchNormAct
from .normalized_linear import NormalizedConv, NormalizedLinear, one_norm_per_step
from .smooth_activation import (
    BETA_MAX,
    BETA_MIN,
    SMOOTH_FUNCTIONS,
    SMOOTH_RELUS,
    ScaledActivation,
    SmoothActivation,
    SmoothHardswish,
    SmoothPiecewiseLinear,
)

LCNN_LAYERS = (SmoothActivation, LipschitzBatchNorm, LipschitzBatchNormAct, NormalizedConv, NormalizedLinear)

__all__ = [
    "BETA_MAX",
    "BETA_MIN",
    "LCNN_LAYERS",
    "SMOOTH_FUNCTIONS",
    "SMOOTH_RELUS",
    "CenteredSoftplus",
    "LipschitzBatchNorm",
    "LipschitzBatchNormAct",
    "NormalizedConv",
    "NormalizedLinear",
    "ScaledActivation",
    "SmoothActivation",
    "SmoothHardswish",
    "SmoothPiecewiseLinear",
    "one_norm_per_step",
]
