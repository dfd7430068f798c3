"""Convert a timm model from Python, export it to ONNX and check parity in onnxruntime.

    python examples/convert_and_verify.py [MODEL]

Uses random weights so that it runs offline; pass pretrained=True to load_model when online.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import lcnn_convert as lc


def main(model_name: str = "timm:efficientnet_b0") -> int:
    model = lc.create_model(model_name, pretrained=False, num_classes=10)
    batch = torch.randn(16, 3, 96, 96, generator=torch.Generator().manual_seed(0))

    lcnn = lc.convert(model, example_inputs=batch)
    print(lcnn.conversion_report)
    for item in lcnn.conversion_report.skipped[:3]:
        print(f"  left as is: {item.node} ({item.reason})")

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "lcnn.onnx"
        lc.export_onnx(lcnn, path, batch[:2])
        result = lc.verify_onnx(lcnn, path, batch)
    print(result)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
