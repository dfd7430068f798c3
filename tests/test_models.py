"""Stage 1: model names, pretrained weights and local checkpoints."""

from __future__ import annotations

import random

import pytest
import torch
import timm.data
import torchvision
from safetensors.torch import save_file

from lcnn_convert import LcnnError, load_model
from lcnn_convert.models import (
    DataConfig,
    data_config,
    find_classifier,
    load_model_with_spec,
    read_state_dict,
    resolve_model_name,
)


def test_names_resolve_torchvision_first_then_timm():
    assert str(resolve_model_name("resnet18")) == "torchvision:resnet18"
    assert str(resolve_model_name("timm:resnet18")) == "timm:resnet18"
    assert str(resolve_model_name("efficientnet_b0")) == "torchvision:efficientnet_b0"
    assert str(resolve_model_name("resnet18d")) == "timm:resnet18d"


def test_unknown_name_lists_the_closest_names():
    with pytest.raises(LcnnError, match=r"unknown model 'resnt18'.*closest: resnet18"):
        resolve_model_name("resnt18")
    with pytest.raises(LcnnError, match="use torchvision:NAME or timm:NAME"):
        resolve_model_name("keras:resnet18")


def test_num_classes_builds_the_head_and_is_validated():
    model = load_model("torchvision:resnet18", pretrained=False, num_classes=7)
    assert find_classifier(model)[0] == "fc" and model.fc.out_features == 7
    timm_model = load_model("timm:resnet18", pretrained=False, num_classes=3)
    assert timm_model.num_classes == 3
    with pytest.raises(LcnnError, match="positive"):
        load_model("resnet18", pretrained=False, num_classes=-2)


def test_data_configs_follow_the_libraries():
    model, spec = load_model_with_spec("timm:efficientnet_b0", pretrained=False)
    config = data_config(model, spec)
    assert config.interpolation == "bicubic"
    # timm's own dict and ours say the same
    assert config == DataConfig.from_mapping(timm.data.resolve_data_config({}, model=model))
    assert DataConfig.from_mapping(config.to_dict()) == config
    model, spec = load_model_with_spec("inception_v3", pretrained=False, num_classes=10)
    assert data_config(model, spec).input_size == (3, 299, 299)
    with pytest.raises(LcnnError, match="input_size"):
        DataConfig.from_mapping({"input_size": (224, 224)})


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18"])
def test_pretrained_download_failure_is_one_actionable_line(name, offline):
    with pytest.raises(LcnnError) as caught:
        load_model(name, pretrained=True)
    message = str(caught.value)
    assert "--weights" in message and "--no-pretrained" in message and "\n" not in message
    assert "network is unreachable" in message


@pytest.fixture
def resnet10_state():
    return torchvision.models.resnet18(num_classes=10).state_dict()


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_local_weights_load_in_every_common_wrapping(tmp_path, resnet10_state, wrapper):
    payload = resnet10_state if wrapper is None else {wrapper: resnet10_state, "epoch": 3}
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    model = load_model("resnet18", weights=path)  # class count read from the checkpoint's head
    assert model.fc.out_features == 10
    assert torch.equal(model.fc.weight, resnet10_state["fc.weight"])


def test_safetensors_and_dataparallel_prefixes(tmp_path, resnet10_state):
    path = tmp_path / "weights.safetensors"
    save_file({f"module.{key}": value.contiguous() for key, value in resnet10_state.items()}, str(path))
    model = load_model("resnet18", weights=path, num_classes=10)
    assert torch.equal(model.conv1.weight, resnet10_state["conv1.weight"])


def test_class_count_conflict_and_mismatched_architecture(tmp_path, resnet10_state):
    path = tmp_path / "weights.pth"
    torch.save(resnet10_state, path)
    with pytest.raises(LcnnError, match="10-class head.*num_classes=5"):
        load_model("resnet18", weights=path, num_classes=5)
    with pytest.raises(LcnnError, match=r"does not match ResNet: \d+ missing \(e.g. 'layer1.2.conv1.weight'\)"):
        load_model("resnet34", weights=path)


def test_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(LcnnError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    # Random bytes break the unpickler in many ways (IndexError, KeyError, EOFError, ...): try many.
    generator = random.Random(0)
    for size in [1, 2, 7, 100, 1000] * 40:
        corrupt.write_bytes(generator.randbytes(size))
        with pytest.raises(LcnnError, match="not a PyTorch checkpoint"):
            read_state_dict(corrupt)
    for prefix in [b"\x80\x02", b"PK\x03\x04"]:
        for _ in range(50):
            corrupt.write_bytes(prefix + generator.randbytes(200))
            with pytest.raises(LcnnError, match="not a PyTorch checkpoint"):
                read_state_dict(corrupt)
    corrupt_safetensors = tmp_path / "corrupt.safetensors"
    corrupt_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LcnnError, match="not a valid safetensors"):
        read_state_dict(corrupt_safetensors)
    for size in [3, 8, 9, 100, 1000] * 20:
        corrupt_safetensors.write_bytes(generator.randbytes(size))
        with pytest.raises(LcnnError, match="not a valid safetensors"):
            read_state_dict(corrupt_safetensors)
    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(LcnnError, match="state dict"):
        read_state_dict(not_a_dict)


class _PlantsAFile:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": _PlantsAFile(str(marker))}, path)
    with pytest.raises(LcnnError, match="refusing to load .*it would import"):
        read_state_dict(path)
    assert not marker.exists()


def test_nan_weights_are_rejected(tmp_path, resnet10_state):
    resnet10_state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(resnet10_state, path)
    with pytest.raises(LcnnError, match="NaN or Inf"):
        read_state_dict(path)
