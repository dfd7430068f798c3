"""Extend the replacement table: also turn GELU into a centered softplus.

    python examples/custom_rule.py

Rules are tried in order and the first match wins, so a user rule placed before the defaults
can also override them.
"""

from __future__ import annotations

import torch
from torch import nn

import lcnn_convert as lc
from lcnn_convert.conversion import ReplacementRule, match_function, match_module

GELU_RULES = (
    ReplacementRule("gelu-module", "activation", match_module(nn.GELU), lambda ctx: lc.CenteredSoftplus(ctx.beta)),
    ReplacementRule(
        "gelu-function", "activation", match_function(nn.functional.gelu), lambda ctx: lc.CenteredSoftplus(ctx.beta)
    ),
)


def main() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    batch = torch.randn(8, 3, 32, 32)
    default = lc.convert(model, batch)
    extended = lc.convert(model, batch, rules=(*GELU_RULES, *lc.DEFAULT_RULES))
    print("default rules: ", default.conversion_report)
    print("with GELU rule:", extended.conversion_report)


if __name__ == "__main__":
    main()
