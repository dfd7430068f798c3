"""The LCNN building blocks, independent of the graph pass that inserts them."""

from .centered_softplus import BETA_MAX, BETA_MIN, CenteredSoftplus
from .lipschitz_batchnorm import LipschitzBatchNorm, LipschitzBatchNormAct
from .normalized_linear import NormalizedConv, NormalizedLinear

LCNN_LAYERS = (CenteredSoftplus, LipschitzBatchNorm, LipschitzBatchNormAct, NormalizedConv, NormalizedLinear)

__all__ = [
    "BETA_MAX",
    "BETA_MIN",
    "LCNN_LAYERS",
    "CenteredSoftplus",
    "LipschitzBatchNorm",
    "LipschitzBatchNormAct",
    "NormalizedConv",
    "NormalizedLinear",
]
