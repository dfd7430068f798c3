"""Stages 4-5: ONNX export with standard ops only, and parity in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torchvision

import lcnn_convert as lc
from lcnn_convert.artifacts import load, save
from lcnn_convert.export import export_onnx
from lcnn_convert.models import ModelSpec
from lcnn_convert.verify import verify_onnx

from .conftest import randomize_batchnorms


@pytest.fixture(scope="module")
def converted_resnet():
    torch.manual_seed(0)
    model = randomize_batchnorms(torchvision.models.resnet18(num_classes=10))
    return lc.convert(model, torch.randn(8, 3, 64, 64))


def test_export_uses_standard_ops_with_a_dynamic_batch(tmp_path, converted_resnet):
    path = export_onnx(converted_resnet, tmp_path / "model.onnx", torch.randn(2, 3, 64, 64), opset=18)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) == 18
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 64, 64)
        out = session.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(out, converted_resnet(x).detach().numpy(), atol=1e-4)
    assert not list(tmp_path.glob(".*partial"))


def test_the_inference_export_carries_folded_constants(tmp_path, converted_resnet):
    """Each Lipschitz BN's clip and each conv's 1/sigma are constants in the file: Conv -> activation."""
    path = export_onnx(converted_resnet, tmp_path / "model.onnx", torch.randn(2, 3, 64, 64))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"ReduceMax", "Exp", "Clip", "Div"}, ops
    assert "Conv" in ops and "Sigmoid" in ops
    assert verify_onnx(converted_resnet, path, torch.randn(4, 3, 64, 64)).passed
    learnable = export_onnx(converted_resnet, tmp_path / "learnable.onnx", torch.randn(2, 3, 64, 64), frozen=False)
    assert {"Exp", "Clip"} <= {node.op_type for node in onnx.load(str(learnable)).graph.node}


def test_export_rejects_old_opsets(tmp_path, converted_resnet):
    with pytest.raises(lc.LcnnError, match="opset"):
        export_onnx(converted_resnet, tmp_path / "m.onnx", torch.randn(1, 3, 64, 64), opset=13)
    assert not (tmp_path / "m.onnx").exists()


def test_centered_softplus_exports_in_a_stable_form(tmp_path):
    layer = torch.nn.Sequential(lc.CenteredSoftplus(1e4), lc.CenteredSoftplus(1e-3)).eval()
    path = export_onnx(layer, tmp_path / "act.onnx", torch.randn(2, 4))
    x = torch.tensor([[-1e4, -1.0, 0.0, 1e4], [-30.0, 1e-3, 5.0, 1e3]])
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, layer(x).detach().numpy(), rtol=1e-5, atol=1e-4)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    # beta is a constant: no Clip/Exp of log beta at run time, and no Softplus (slow in onnxruntime)
    assert ops == {"Abs", "Add", "Mul", "Sigmoid", "Log", "Sub", "Relu", "Constant"}
    learnable = export_onnx(layer, tmp_path / "learnable.onnx", torch.randn(2, 4), frozen=False)
    out = ort.InferenceSession(str(learnable), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, layer(x).detach().numpy(), rtol=1e-5, atol=1e-4)
    assert "Clip" in {node.op_type for node in onnx.load(str(learnable)).graph.node}


def test_verify_reports_parity_and_catches_a_different_model(tmp_path, converted_resnet):
    path = export_onnx(converted_resnet, tmp_path / "model.onnx", torch.randn(2, 3, 64, 64))
    real = torch.randn(4, 3, 64, 64)
    result = lc.verify_onnx(converted_resnet, path, real)
    assert result.passed and result.num_inputs == 20 and result.max_abs_diff <= 1e-4
    assert result.top1_agreement == 1.0 and result.failure() is None
    other = lc.convert(randomize_batchnorms(torchvision.models.resnet18(num_classes=10), seed=5), real, beta=50.0)
    mismatch = verify_onnx(other, path, real)
    assert not mismatch.passed and "max abs diff" in mismatch.failure()


@pytest.mark.parametrize("runtime_name", ["onnxruntime", "openvino"])
def test_verify_reads_the_input_shape_from_the_file_it_loads_once(tmp_path, converted_resnet, runtime_name):
    import openvino

    path = export_onnx(converted_resnet, tmp_path / "model.onnx", torch.randn(2, 3, 64, 64))
    reads: list[str] = []
    session, read_model = ort.InferenceSession, openvino.Core.read_model

    class CountedSession(session):
        def __init__(self, *args, **kwargs):
            reads.append("onnxruntime")
            super().__init__(*args, **kwargs)

    def counted_read_model(self, *args, **kwargs):
        reads.append("openvino")
        return read_model(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ort, "InferenceSession", CountedSession)
        patch.setattr(openvino.Core, "read_model", counted_read_model)
        result = verify_onnx(converted_resnet, path, num_random=3, runtime_name=runtime_name)
    assert result.passed and result.num_inputs == 3
    assert reads == [runtime_name]


def test_openvino_runs_the_same_file_with_the_same_gates(tmp_path, converted_resnet):
    path = export_onnx(converted_resnet, tmp_path / "model.onnx", torch.randn(2, 3, 64, 64))
    real = torch.randn(4, 3, 64, 64)
    in_onnxruntime = verify_onnx(converted_resnet, path, real)
    in_openvino = verify_onnx(converted_resnet, path, real, runtime_name="openvino")
    assert in_openvino.passed and in_openvino.runtime == "openvino" and in_onnxruntime.runtime == "onnxruntime"
    assert in_openvino.num_inputs == in_onnxruntime.num_inputs == 20 and in_openvino.max_abs_diff <= 1e-4
    assert "(openvino)" in str(in_openvino)
    other = lc.convert(randomize_batchnorms(torchvision.models.resnet18(num_classes=10), seed=5), real, beta=50.0)
    mismatch = verify_onnx(other, path, real, runtime_name="openvino")
    assert not mismatch.passed and mismatch.failure().startswith("ONNX parity failed in openvino: max abs diff")
    (tmp_path / "broken.onnx").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(lc.LcnnError, match="OpenVINO cannot load"):
        verify_onnx(converted_resnet, tmp_path / "broken.onnx", real, runtime_name="openvino")
    with pytest.raises(lc.LcnnError, match="unknown runtime 'tvm'"):
        verify_onnx(converted_resnet, path, real, runtime_name="tvm")


def test_efficientnet_round_trip_from_the_issue_example(tmp_path):
    batch = torch.randn(4, 3, 64, 64)
    lcnn = lc.convert(randomize_batchnorms(timm.create_model("efficientnet_b0", num_classes=10)), example_inputs=batch)
    lc.export_onnx(lcnn, tmp_path / "effnet_lcnn.onnx", batch[:2])
    result = lc.verify_onnx(lcnn, tmp_path / "effnet_lcnn.onnx", batch)
    assert result.passed, str(result)


def test_save_and_load_rebuild_the_same_model(tmp_path, converted_resnet):
    assert lc.load is lc.load_converted and lc.load_model is lc.create_model  # the earlier names, kept
    save(converted_resnet, tmp_path, ModelSpec("torchvision", "resnet18"))
    restored = lc.load_converted(tmp_path)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(x), converted_resnet(x))
    assert type(restored).__name__ == "ResNet"
    assert restored.conversion_report.method == "fx"


def _rewrite_metadata(path, change) -> None:
    """Rewrite model.safetensors' lcnn_convert metadata with ``change(metadata)``, tensors untouched."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lcnn_convert"])
    save_file(load_file(str(path)), str(path), metadata={"lcnn_convert": json.dumps(change(metadata))})


def test_the_metadata_records_the_version_and_rules_and_the_previous_format_loads(tmp_path, converted_resnet):
    from lcnn_convert.artifacts import FORMAT_VERSION, read_metadata

    weights = save(converted_resnet, tmp_path, ModelSpec("torchvision", "resnet18"))
    metadata = read_metadata(weights)
    assert metadata["format"] == FORMAT_VERSION == 2 and metadata["lcnn_convert_version"] == lc.__version__
    assert metadata["rules"] == [rule.name for rule in lc.DEFAULT_RULES]
    x = torch.randn(2, 3, 64, 64)
    # format 1, as lcnn_convert 0.1.0 wrote it before rules and versions were recorded
    first_keys = ("source", "name", "num_classes", "replace_activations", "pretrained_cfg")
    _rewrite_metadata(weights, lambda old: {"format": 1, **{key: old[key] for key in first_keys}})
    with torch.no_grad():
        assert torch.equal(load(tmp_path)(x), converted_resnet(x))
    _rewrite_metadata(weights, lambda old: {**old, "format": 3, "lcnn_convert_version": "9.9"})
    with pytest.raises(lc.LcnnError, match=r"has format 3 \(written by lcnn_convert 9.9\); .* reads formats 1, 2"):
        load(tmp_path)


def test_a_model_converted_with_its_own_rules_loads_back_with_them(tmp_path):
    from lcnn_convert.conversion import ReplacementRule, match_module

    mine = ReplacementRule("my-relu", "activation", match_module(torch.nn.ReLU), lambda ctx: lc.CenteredSoftplus(3.0))
    rules = (mine, *lc.DEFAULT_RULES)
    torch.manual_seed(0)
    model = randomize_batchnorms(torchvision.models.resnet18(num_classes=10))
    converted = lc.convert(model, beta=3.0, rules=rules)
    save(converted, tmp_path, ModelSpec("torchvision", "resnet18"), rules=rules)
    with pytest.raises(lc.LcnnError, match=r"not lcnn_convert's defaults \(my-relu\); pass the same rules"):
        load(tmp_path)
    with pytest.raises(lc.LcnnError, match="the rules given are"):
        load(tmp_path, rules=lc.DEFAULT_RULES)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load(tmp_path, rules=rules)(x), converted(x))


def test_top1_gate_tolerates_near_ties_but_not_real_flips(tmp_path):
    class Fixed(torch.nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("logits", logits)

        def forward(self, x):
            return self.logits + 0 * x.sum()

    tied = torch.tensor([[1.0, 1.0 + 1e-6, 0.0], [2.0, 1.0, 0.0]])
    path = export_onnx(Fixed(tied), tmp_path / "tied.onnx", torch.zeros(1, 2))
    # PyTorch breaks the near-tie the other way: not counted as a disagreement.
    near = verify_onnx(
        Fixed(torch.tensor([[1.0 + 2e-6, 1.0, 0.0], [2.0, 1.0, 0.0]])), path, torch.zeros(2, 2), num_random=0
    )
    assert near.passed and near.near_ties == 1 and near.top1_agreement == 1.0 and near.top1_exact_agreement == 0.5
    # A flip with a real margin fails the top-1 gate even though it is within atol.
    flipped = Fixed(torch.tensor([[1.0 + 5e-5, 1.0, 0.0], [2.0, 1.0, 0.0]]))
    far = verify_onnx(flipped, path, torch.zeros(2, 2), num_random=0)
    assert far.max_abs_diff <= far.atol and far.near_ties == 0
    assert not far.passed and far.top1_agreement == 0.5 and "top-1 agreement" in far.failure()


def test_exporter_fallback_prints_nothing(tmp_path, capfd):
    """The TorchScript exporter prints its whole IR from C++ (to fd 1) when it gives up on a graph
    such as an adaptive pool to a size that does not divide its input; the fallback exports it."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.AdaptiveAvgPool2d(6), torch.nn.Flatten()
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    path = export_onnx(model, tmp_path / "pool.onnx", x[:1])
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert lc.verify_onnx(model, path, x, num_random=0).passed
