"""`pytest -m zoo`: convert -> forward -> export -> onnxruntime parity over a representative subset.

The subset covers each mechanism the pass meets: plain residual CNNs, depthwise/inverted residuals,
concatenation (DenseNet, Inception), channel shuffles, squeeze-excitation, BatchNormAct (timm),
LayerNorm/GELU models where only linears are normalized, and attention. docs/zoo.md has the sweep
over the whole zoo (benchmarks/zoo_sweep.py).
"""

from __future__ import annotations

import pytest

from lcnn_convert.zoo import check_model

REPRESENTATIVE = (
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
    "torchvision:squeezenet1_1",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:googlenet",
    "torchvision:regnet_x_400mf",
    "torchvision:efficientnet_b0",
    "torchvision:vit_b_32",
    "timm:dla34",
    "timm:ghostnet_100",
    "timm:rexnet_100",
    "timm:convnext_atto",
    "timm:vit_tiny_patch16_224",
    "timm:efficientnet_b0",
)


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_model_survives_conversion_export_and_parity(name):
    result = check_model(name)
    assert result.status == "ok", f"{name}: {result.reason} (at {result.stage})"
    assert result.parity_max_abs_diff is not None
    if result.parity_max_abs_diff > 1e-4:
        # Past the absolute gate only where float32 rounding already takes the original's own export
        # near it (random EfficientNet-B0: 1.8e-4 converted, ~1e-4 original, relative 2.9e-5 vs 1.6e-5).
        assert result.original_parity_max_abs_diff is not None and result.original_parity_max_abs_diff > 5e-5
    assert result.batchnorms + result.activations + result.normalized > 0
    # every activation of these models is in a family: only LayerNorm and attention may be left
    assert result.activations_left == 0, result.notes
