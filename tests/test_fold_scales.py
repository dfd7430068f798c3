"""Export: beta, 1/beta and the log 2 shift of each frozen centered softplus folded into its neighbours."""

from __future__ import annotations

import collections
import math

import onnx
import pytest
import torch
import torchvision
from torch import nn

import lcnn_convert as lc
from lcnn_convert.fold_scales import FoldSummary, fold_activation_scales
from lcnn_convert.layers.inference import FrozenCenteredSoftplus, freeze_for_inference


class Neighbours(nn.Module):
    """One activation for each case: read by an unpadded conv, by a padded conv, and by an add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)  # unpadded: takes 1/beta and the shift
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)  # zero padding: takes 1/beta only
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))  # its producer is the conv itself
        x = x + x.mean()  # read by other ops: its 1/beta stays
        return self.head(x.mean((2, 3)))


def _converted(model: nn.Module, size: int = 12) -> nn.Module:
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # trained-looking statistics
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    converted = lc.convert(model.eval(), torch.randn(8, 3, size, size), beta=5.0).eval()
    with torch.no_grad():  # a different beta at each site, as fine-tuning leaves them
        for index, activation in enumerate(m for m in converted.modules() if isinstance(m, lc.CenteredSoftplus)):
            activation.log_beta.fill_(math.log((3.0, 7.0, 20.0)[index % 3]))
    return converted


def test_each_fold_is_made_where_it_is_exact_and_the_function_is_kept():
    converted = _converted(Neighbours())
    images = torch.randn(16, 3, 12, 12)
    reference = freeze_for_inference(converted)(images)
    folded, summary = fold_activation_scales(freeze_for_inference(converted))
    assert summary == FoldSummary(activations=3, input_scales=3, output_scales=2, shifts=1)
    torch.testing.assert_close(folded(images), reference, rtol=1e-5, atol=1e-5)
    activations = [m for m in folded.modules() if isinstance(m, FrozenCenteredSoftplus)]
    assert [(a.input_scale, a.output_scale == 1.0, a.offset == 0.0) for a in activations] == [
        (1.0, True, True),
        (1.0, True, False),
        (1.0, False, False),
    ]


def test_a_layer_called_twice_is_left_alone():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.relu(self.conv(x)))

    converted = lc.convert(Shared().eval(), torch.randn(4, 4, 6, 6), beta=5.0).eval()
    images = torch.randn(3, 4, 6, 6)
    reference = freeze_for_inference(converted)(images)
    folded, summary = fold_activation_scales(freeze_for_inference(converted))
    assert summary == FoldSummary(activations=1, input_scales=0, output_scales=0, shifts=0)
    torch.testing.assert_close(folded(images), reference, rtol=0, atol=0)


def _ops(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_exported_resnet_carries_fewer_elementwise_ops_and_keeps_parity(name, tmp_path):
    converted = _converted(getattr(torchvision.models, name)(num_classes=10), size=32)
    images = torch.randn(2, 3, 32, 32)
    unfolded = _ops(lc.export_onnx(converted, tmp_path / "unfolded.onnx", images[:1], fold=False))
    path = lc.export_onnx(converted, tmp_path / "model.onnx", images[:1])
    folded = _ops(path)
    _, summary = fold_activation_scales(freeze_for_inference(converted))
    # every fold removes one constant op from the exported graph; the function's five ops stay
    assert folded["Mul"] == unfolded["Mul"] - summary.input_scales - summary.output_scales
    assert folded["Add"] == unfolded["Add"] - summary.shifts
    activations = summary.activations
    assert all(folded[op] == unfolded[op] == activations for op in ("Relu", "Abs", "Sigmoid", "Log", "Sub"))
    assert summary.input_scales >= activations // 2 and summary.output_scales >= activations // 2
    assert lc.verify_onnx(converted, path, images, num_random=2).passed


def test_a_plain_module_is_traced_and_left_unchanged_itself():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), FrozenCenteredSoftplus(5.0), nn.Conv2d(4, 2, 1)
    ).eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    images = torch.randn(2, 3, 6, 6)
    folded, summary = fold_activation_scales(model, images)
    assert summary == FoldSummary(activations=1, input_scales=1, output_scales=1, shifts=1)
    torch.testing.assert_close(folded(images), model(images), rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model[2].input_scale == 5.0 and model[2].offset != 0


def test_a_fold_that_changes_the_output_is_not_kept(monkeypatch):
    from lcnn_convert import fold_scales

    def wrong(reader: nn.Module, scale: float, offset: float) -> None:
        reader.get_parameter("weight").data.mul_(2 * scale)

    monkeypatch.setattr(fold_scales, "_absorb_input_map", wrong)
    model = freeze_for_inference(_converted(Neighbours()))
    images = torch.randn(2, 3, 12, 12)
    folded, summary = fold_activation_scales(model, images)
    assert folded is model and summary == FoldSummary(activations=3, input_scales=0, output_scales=0, shifts=0)
    assert fold_activation_scales(model)[1].output_scales == 2  # unchecked, the wrong fold goes through


def test_the_shift_folds_into_a_reflect_padded_conv_and_not_a_zero_padded_one():
    for padding_mode, shifts in (("reflect", 1), ("zeros", 0)):
        model = nn.Sequential(
            nn.Conv2d(3, 4, 1), FrozenCenteredSoftplus(5.0), nn.Conv2d(4, 2, 3, padding=1, padding_mode=padding_mode)
        ).eval()
        images = torch.randn(2, 3, 6, 6)
        folded, summary = fold_activation_scales(model, images)
        assert summary == FoldSummary(activations=1, input_scales=1, output_scales=1, shifts=shifts)
        torch.testing.assert_close(folded(images), model(images), rtol=1e-5, atol=1e-6)
