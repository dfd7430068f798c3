"""Add an activation family in one rule, convert with it, save, and load the model back.

    python examples/custom_rule.py

The default table already converts GELU exactly (x Phi(beta x) at beta = 1). Here a user's rule,
placed before the defaults so that it wins, replaces every GELU of a timm ConvNeXt by
x sigmoid(1.702 beta x) (the "quick GELU" that onnxruntime fuses) instead: not exact, so it is
marked ``calibrated`` and conversion calibrates its beta like the centered softplus'. The saved
model records the rules' names; ``load_converted`` rebuilds it when given the same rules.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from timm.layers.activations import GELU
from torch import nn

import lcnn_convert as lc
from lcnn_convert.artifacts import save
from lcnn_convert.conversion import ReplacementRule, match_module
from lcnn_convert.layers import ScaledActivation
from lcnn_convert.models import load_model_with_spec

QUICK_GELU = ReplacementRule(
    "gelu-as-quick-gelu",
    "activation",
    match_module(nn.GELU, GELU),  # torch's and timm's (timm models use their own)
    # x sigmoid(1.702 x) = silu(1.702 x) / 1.702: the SiLU family from beta = 1.702, calibrated from there
    lambda ctx: ScaledActivation("silu", beta=1.702, calibrated=True),
)
RULES = (QUICK_GELU, *lc.DEFAULT_RULES)


def main() -> None:
    torch.manual_seed(0)
    model, spec = load_model_with_spec("timm:convnext_atto", pretrained=False, num_classes=10)
    images = torch.randn(16, 3, 64, 64)
    converted = lc.convert(model.eval(), images, rules=RULES)
    print(converted.conversion_report)
    print("activations:", converted.conversion_report.activation_kinds)
    with tempfile.TemporaryDirectory() as folder:
        save(converted, Path(folder), spec, rules=RULES)
        loaded = lc.load_converted(folder, rules=RULES)
    with torch.no_grad():
        difference = (loaded(images) - converted.eval()(images)).abs().max().item()
    print(f"reloaded with the same rules: max abs difference {difference:.2e}")


if __name__ == "__main__":
    main()
