"""The graph pass on real architectures: coverage, function preservation, calibration, report."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lcnn_convert as lc
from lcnn_convert import CenteredSoftplus, LipschitzBatchNorm, NormalizedConv, NormalizedLinear
from lcnn_convert.conversion import DEFAULT_BETA, ConversionReport, ReplacementRule, match_module
from lcnn_convert.conversion.api import NO_DATA_NOTE
from lcnn_convert.conversion.calibrate import DEFAULT_LOGIT_TOLERANCE
from lcnn_convert.fidelity import relative_logit_errors
from lcnn_convert.conversion.activations import family_of_module
from lcnn_convert.layers import LipschitzBatchNormAct, ScaledActivation, SmoothActivation

from .conftest import randomize_batchnorms

ARCHITECTURES = {
    "tv-resnet18": (lambda: torchvision.models.resnet18(num_classes=10), dict(act=17, bn=20, lin=21)),
    "tv-densenet121": (lambda: torchvision.models.densenet121(num_classes=10), dict(act=121, bn=121, lin=121)),
    "tv-mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        dict(act=42, bn=34, lin=54),
    ),
    "timm-resnet18": (lambda: timm.create_model("resnet18", num_classes=10), dict(act=17, bn=20, lin=21)),
    "timm-efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), dict(act=65, bn=49, lin=82)),
    "timm-regnetx_002": (lambda: timm.create_model("regnetx_002", num_classes=10), dict(act=40, bn=44, lin=45)),
    "timm-convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), dict(act=12, bn=0, lin=41)),
}


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_pass_covers_architecture_and_preserves_function(name, images):
    build, expected = ARCHITECTURES[name]
    torch.manual_seed(0)  # the weights, so that the 8-image agreement does not depend on the tests run before
    model = randomize_batchnorms(build())
    before = {key: value.clone() for key, value in model.state_dict().items()}
    module_types = [type(m) for m in model.modules()]

    parameterised = lc.convert(model, images, replace_activations=False)
    report = parameterised.conversion_report
    assert report.method == "fx"
    assert (len(report.activations_replaced), len(report.batchnorms_replaced)) == (0, expected["bn"])
    assert len(report.layers_normalized) == expected["lin"]
    with torch.no_grad():
        assert relative_error(parameterised(images), model(images)) <= 1e-5

    converted = lc.convert(model, images)
    report = converted.conversion_report
    assert len(report.activations_replaced) == expected["act"]
    assert len(report.batchnorms_replaced) == expected["bn"]
    assert sum(isinstance(m, SmoothActivation) for m in converted.modules()) == expected["act"]
    assert sum(isinstance(m, LipschitzBatchNorm) for m in converted.modules()) == expected["bn"]
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in converted.modules())
    kept = [m for m in converted.modules() if family_of_module(m) is not None]
    assert kept == [], f"activations left in place: {sorted({type(m).__name__ for m in kept})}"
    with torch.no_grad():
        agreement = (converted(images).argmax(1) == model(images).argmax(1)).float().mean().item()
    assert agreement >= 0.99
    # The original is untouched.
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert [type(m) for m in model.modules()] == module_types


def test_transformer_gets_exact_gelus_and_lists_only_layernorm_and_attention_as_left(images, tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64).eval()
    converted = lc.convert(model, images)
    report = converted.conversion_report
    assert report.method == "fx"
    assert len(report.activations_replaced) == 12 and report.batchnorms_replaced == []
    assert {m.function for m in converted.modules() if isinstance(m, ScaledActivation)} == {"gelu"}
    assert report.curvature_bound is None and "layer_norm" in report.bound_notes[0]
    assert {item.kind for item in report.skipped} == {"norm", "attention"}
    assert all("no global" in item.reason for item in report.skipped)
    with torch.no_grad():
        assert relative_error(converted(images), model(images)) <= 1e-5
    lc.export_onnx(converted, tmp_path / "vit.onnx", images[:2])
    assert lc.verify_onnx(converted, tmp_path / "vit.onnx", images).passed


def _agreement(model: nn.Module, converted: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return (converted(images).argmax(1) == model(images).argmax(1)).float().mean().item()


def test_auto_beta_calibrated_on_training_images_holds_on_held_out_ones(trained_digits_net, digits):
    """The net was trained on images[:1400]; the agreement edge of those does not transfer, the logit error does."""
    images, _ = digits
    calibration, held_out = images[:256], images[1400:]
    converted = lc.convert(trained_digits_net, calibration)
    report = converted.conversion_report
    assert report.beta.mode == "auto" and report.beta.calibration_data == "user calibration data"
    assert report.beta.calibration_examples == 192  # a quarter held out for the report's fidelity
    assert report.beta.mean_relative_logit_error <= report.beta.logit_tolerance == DEFAULT_LOGIT_TOLERANCE
    assert _agreement(trained_digits_net, converted, held_out) >= 0.99
    fidelity = report.fidelity
    assert fidelity.source == "user calibration data (held-out part)" and fidelity.num_inputs == 64
    assert fidelity.mean_relative_logit_error <= 1.5 * DEFAULT_LOGIT_TOLERANCE and not fidelity.synthetic
    sites = [m for m in converted.modules() if isinstance(m, CenteredSoftplus)]
    assert len(sites) == 2 and max(m.beta.item() for m in sites) < 1e3
    # The smoothest passing sharpness, to within the search's precision: 10% smoother misses the tolerance.
    for site in sites:
        site.set_beta(site.beta.item() / 1.1)
    with torch.no_grad():
        error = relative_logit_errors(converted(calibration[:192]), trained_digits_net(calibration[:192])).mean()
    assert error > DEFAULT_LOGIT_TOLERANCE


def test_auto_beta_search_takes_a_few_forward_passes(trained_digits_net, digits, monkeypatch):
    """The secant on log error over log sharpness replaces a 16-step bisection: count the model's passes."""
    from lcnn_convert.conversion import calibrate

    passes = []
    original = calibrate.first_tensor
    monkeypatch.setattr(calibrate, "first_tensor", lambda output: passes.append(1) or original(output))
    images, _ = digits
    converted = lc.convert(trained_digits_net, images[1400:1600])
    assert converted.conversion_report.beta.mean_relative_logit_error <= DEFAULT_LOGIT_TOLERANCE
    # the sharp pass, then the search (bisection: 17 passes)
    assert 3 <= len(passes) <= 7, len(passes)
    assert converted.conversion_report.beta.top1_agreement >= 0.99


def test_without_data_beta_is_calibrated_on_inputs_synthesised_from_batchnorm_statistics(trained_digits_net, digits):
    images, _ = digits
    held_out = images[1400:]
    data_free = lc.convert(trained_digits_net, input_size=(1, 8, 8))
    report = data_free.conversion_report
    assert report.beta.mode == "auto" and report.beta.calibration_data == "synthetic from BatchNorm statistics"
    assert report.fidelity.synthetic and report.fidelity.source.startswith("synthetic from BatchNorm statistics")
    assert _agreement(trained_digits_net, data_free, held_out) >= 0.99
    # as smooth as a calibration on real held-out images, within 2x
    real = lc.convert(trained_digits_net, held_out).conversion_report.beta
    assert report.beta.mean <= 2 * real.mean
    with torch.no_grad():
        drift = relative_logit_errors(data_free(held_out), trained_digits_net(held_out)).mean().item()
    assert drift <= 1.5 * DEFAULT_LOGIT_TOLERANCE


def test_the_report_round_trips_through_its_dict(trained_digits_net, digits):
    """A fine-tuning checkpoint keeps the conversion report as a dict; --resume rebuilds it."""
    images, _ = digits
    report = lc.conversion_report(lc.convert(trained_digits_net, images[1400:1464]))
    assert report.fidelity is not None and report.activations_replaced and report.beta.mean is not None
    assert ConversionReport.from_dict(report.to_dict()) == report
    with pytest.raises(lc.LcnnError, match="no conversion report"):
        lc.conversion_report(trained_digits_net)


def test_fixed_beta_and_default_beta_without_inputs(trained_digits_net):
    fixed = lc.convert(trained_digits_net, torch.randn(4, 1, 8, 8), beta=7.0)
    assert {round(m.beta.item(), 4) for m in fixed.modules() if isinstance(m, CenteredSoftplus)} == {7.0}
    assert fixed.conversion_report.fidelity.source == "user example inputs"
    assert fixed.conversion_report.fidelity.num_inputs == 4
    with pytest.raises(lc.LcnnError, match="beta"):
        lc.convert(trained_digits_net, beta=0.0)
    with pytest.raises(lc.LcnnError, match="beta"):
        lc.convert(trained_digits_net, beta="sharp")
    with pytest.raises(lc.LcnnError, match="logit_tolerance"):
        lc.convert(trained_digits_net, logit_tolerance=0.0)


def test_default_input_size_comes_from_the_data_config():
    model = timm.create_model("resnet18", num_classes=3).eval()
    converted = lc.convert(model)  # no example inputs and untrained BN statistics: timm's 224x224, default beta
    report = converted.conversion_report
    assert (report.beta.mode, report.beta.value) == ("auto-default", DEFAULT_BETA)
    assert report.beta.mean == pytest.approx(100.0, rel=1e-5) and report.fidelity is None
    assert NO_DATA_NOTE in report.notes
    assert converted.get_submodule("conv1").input_shape.tolist() == [3, 224, 224]


def test_each_call_site_of_a_shared_relu_gets_its_own_beta(images):
    model = randomize_batchnorms(torchvision.models.resnet18(num_classes=10))
    converted = lc.convert(model, images)
    first, second = converted.get_submodule("layer1.0.relu"), converted.get_submodule("layer1.0.relu_1")
    assert isinstance(first, CenteredSoftplus) and isinstance(second, CenteredSoftplus) and first is not second
    parameters = {id(p) for m in converted.modules() if isinstance(m, CenteredSoftplus) for p in m.parameters()}
    assert len(parameters) == 17


class InplaceNet(nn.Module):
    """Reads the tensor that in-place ReLUs mutated, not their return values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x.relu_()
        y = x * 2
        F.relu(y, inplace=True)
        self.act(y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y - 1.0, 1), 1))


def test_inplace_relus_are_replaced_with_their_readers_rewired():
    model = randomize_batchnorms(InplaceNet())
    x = torch.randn(4, 3, 16, 16)
    converted = lc.convert(model, x, beta=1e4)
    assert len(converted.conversion_report.activations_replaced) == 3
    with torch.no_grad():
        reference = model(x.clone())
        assert (converted(x) - reference).abs().max().item() < 5e-3
        # Without rewiring the readers would see the pre-activation values: a large difference.
        model_without_relu = InplaceNet()
        model_without_relu.load_state_dict(model.state_dict())
        assert (converted(x) - reference).abs().max() < (
            model_without_relu.eval().fc(torch.zeros(4, 8)) - reference
        ).abs().max()


class FunctionalBatchNormNet(nn.Module):
    """What timm's BatchNormAct2d looks like when traced through: F.batch_norm on attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.register_buffer("mean", torch.randn(6) * 0.1)
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.shift = nn.Parameter(torch.randn(6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.mean, self.var, self.scale, self.shift, False, 0.1, 1e-5)
        return self.fc(F.relu(x).mean((2, 3)))


def test_functional_batch_norm_on_attributes_is_replaced():
    model = FunctionalBatchNormNet().eval()
    x = torch.randn(4, 3, 10, 10)
    converted = lc.convert(model, x, replace_activations=False)
    report = converted.conversion_report
    assert len(report.batchnorms_replaced) == 1 and report.skipped[0].reason.startswith("relu kept")
    assert isinstance(converted.get_submodule("conv"), NormalizedConv)
    assert converted.get_submodule("conv").scale is None  # its slope went into the new BN
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) <= 1e-5


def test_timm_batchnorm_act_keeps_its_drop_layer_and_converts_its_activation_by_the_rules(images):
    regnet = lc.convert(randomize_batchnorms(timm.create_model("regnetx_002", num_classes=10)), images)
    block = regnet.get_submodule("stem.bn")
    assert isinstance(block, LipschitzBatchNormAct) and isinstance(block.act, CenteredSoftplus)
    model = randomize_batchnorms(timm.create_model("efficientnet_b0", num_classes=10))
    effnet = lc.convert(model, images)
    block = effnet.get_submodule("bn1")
    assert isinstance(block, LipschitzBatchNormAct) and isinstance(block.act, ScaledActivation)
    assert block.act.function == "silu" and not block.act.calibrated
    assert isinstance(block.drop, nn.Identity)
    assert effnet.conversion_report.skipped == []
    # A user's rule reaches the activations inside norm-act blocks too (33 of efficientnet_b0's 49 SiLUs).
    mine = ReplacementRule("silu-as-softplus", "activation", match_module(nn.SiLU), lambda ctx: CenteredSoftplus(7.0))
    custom = lc.convert(model, images, rules=(mine, *lc.DEFAULT_RULES), beta=7.0)
    assert sum(isinstance(m, CenteredSoftplus) for m in custom.modules()) == 49


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = F.relu(x - 0.1)
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_module_swap(images):
    model = randomize_batchnorms(Untraceable())
    x = images[:, :, :16, :16]
    converted = lc.convert(model, x, replace_activations=False)
    report = converted.conversion_report
    assert report.method == "module-swap" and "TraceError" in report.fallback_reason
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) <= 1e-5
    converted = lc.convert(model, x)
    report = converted.conversion_report
    assert report.activations_replaced == ["act"] and report.batchnorms_replaced == ["bn"]
    assert report.layers_normalized == ["conv", "fc"]
    assert [(item.node, item.kind) for item in report.skipped] == [("<root>:relu", "activation")]
    assert report.curvature_bound is None and "module swap" in report.bound_notes[0]


@timm.layers.register_notrace_module
class GatedBlock(nn.Module):
    """A block fx keeps whole (timm's no-trace registry, like MobileVitBlock or NormFreeBlock)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.SiLU()
        self.gate = nn.Sigmoid()

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        return x + y * self.gate(y.mean((2, 3), keepdim=True))


def test_activations_and_batchnorms_inside_blocks_fx_keeps_whole_are_swapped_exactly(images):
    model = randomize_batchnorms(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), GatedBlock(8), GatedBlock(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
        )
    ).eval()
    x = images[:, :, :16, :16]
    converted = lc.convert(model, x)
    report = converted.conversion_report
    assert report.method == "fx"
    assert sorted(report.activations_replaced) == ["1.act", "1.gate", "2.act", "2.gate"]
    assert sorted(report.batchnorms_replaced) == ["1.bn", "2.bn"]
    assert report.skipped == []
    assert isinstance(converted.get_submodule("1.act"), ScaledActivation)
    assert isinstance(converted.get_submodule("2.bn"), LipschitzBatchNorm)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5
    # a user's rules reach inside too
    mine = ReplacementRule("silu-as-softplus", "activation", match_module(nn.SiLU), lambda ctx: CenteredSoftplus(7.0))
    custom = lc.convert(model, x, rules=(mine, *lc.DEFAULT_RULES), beta=7.0)
    assert isinstance(custom.get_submodule("2.act"), CenteredSoftplus)


def test_users_extend_the_rule_table():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    model = randomize_batchnorms(model)
    gelu_rule = ReplacementRule("gelu", "activation", match_module(nn.GELU), lambda ctx: CenteredSoftplus(ctx.beta))
    converted = lc.convert(model, torch.randn(4, 3, 8, 8), rules=(gelu_rule, *lc.DEFAULT_RULES), beta=3.0)
    assert isinstance(converted.get_submodule("2"), CenteredSoftplus)
    assert converted.conversion_report.activations_replaced == ["2"]
    assert isinstance(converted.get_submodule("4"), NormalizedLinear)
    default = lc.convert(model, torch.randn(4, 3, 8, 8))
    assert isinstance(default.get_submodule("2"), ScaledActivation)


def test_converted_timm_model_keeps_config_and_head_api(images):
    model = randomize_batchnorms(timm.create_model("resnet18", num_classes=10))
    converted = lc.convert(model, images)
    assert converted.pretrained_cfg == model.pretrained_cfg and converted.default_cfg == model.default_cfg
    assert converted.num_classes == 10
    assert isinstance(converted.get_classifier(), NormalizedLinear)
    converted.reset_classifier(4)
    assert converted.num_classes == 4
    with torch.no_grad():
        assert converted(images).shape == (8, 4)
    torchvision_model = lc.convert(torchvision.models.resnet18(num_classes=10), images)
    assert torchvision_model.classifier_path == "fc"
    torchvision_model.reset_classifier(3)
    assert torchvision_model(images).shape == (8, 3)


def test_curvature_bound_is_finite_for_resnets_and_explained_otherwise(images):
    resnet = lc.convert(randomize_batchnorms(torchvision.models.resnet18(num_classes=10)), images)
    report = resnet.conversion_report
    assert report.curvature_bound is not None and math.isfinite(report.curvature_bound) and report.curvature_bound > 0
    assert report.bound_notes == []
    mobilenet = lc.convert(randomize_batchnorms(torchvision.models.mobilenet_v3_small(num_classes=10)), images)
    # squeeze-excite multiplies features by a gate computed from them: no global constant
    assert mobilenet.conversion_report.curvature_bound is None
    assert "mul" in mobilenet.conversion_report.bound_notes[0]
    as_dict = report.to_dict()
    assert set(as_dict) >= {
        "activations_replaced",
        "batchnorms_replaced",
        "layers_normalized",
        "skipped",
        "method",
        "curvature_bound",
    }


def _hessian_norm(model: nn.Module, x: torch.Tensor, direction: torch.Tensor, iterations: int = 30) -> float:
    """||Hessian of <direction, model(x)>|| w.r.t. x by power iteration on Hessian-vector products."""
    vector = torch.randn_like(x)
    vector /= vector.norm()
    norm = 0.0
    for _ in range(iterations):
        point = x.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad((model(point) * direction).sum(), point, create_graph=True)
        (product,) = torch.autograd.grad((gradient * vector).sum(), point)
        norm = product.norm().item()
        vector = product / product.norm()
    return norm


def test_data_free_bound_is_above_measured_curvature():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 3),
    )
    model = randomize_batchnorms(model).double()
    converted = lc.convert(model, torch.randn(2, 2, 6, 6, dtype=torch.float64), beta=4.0).double().eval()
    bound = converted.conversion_report.curvature_bound
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 2, 6, 6, generator=generator, dtype=torch.float64)
        direction = torch.randn(1, 3, generator=generator, dtype=torch.float64)
        direction /= direction.norm()
        measured = _hessian_norm(converted, x, direction)
        assert 0 < measured <= bound


def test_softplus_sync_and_frozen_batchnorms_are_converted_exactly():
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(4)
    with torch.no_grad():
        frozen.running_var.uniform_(0.5, 2.0)
        frozen.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.SyncBatchNorm(4),
        nn.Softplus(beta=2.0),
        nn.Conv2d(4, 4, 3),
        frozen,
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    model = randomize_batchnorms(model)
    x = torch.randn(4, 3, 8, 8)
    converted = lc.convert(model, x, beta=1e4)
    report = converted.conversion_report
    assert len(report.batchnorms_replaced) == 2 and len(report.activations_replaced) == 2
    softplus = converted.get_submodule("2")
    assert isinstance(softplus, CenteredSoftplus) and softplus.beta.item() == pytest.approx(2.0)
    frozen_lcnn = converted.get_submodule("4")
    assert isinstance(frozen_lcnn, LipschitzBatchNorm) and not frozen_lcnn.use_batch_stats
    assert not frozen_lcnn.weight.requires_grad
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) <= 1e-3  # the ReLU became a beta=1e4 softplus
    exact = lc.convert(model, x, replace_activations=False)
    with torch.no_grad():
        assert relative_error(exact(x), model(x)) <= 1e-5


def test_deepcopy_keeps_the_head_api_config_and_report(images):
    import copy

    converted = lc.convert(timm.create_model("resnet18", num_classes=10).eval(), images)
    duplicate = copy.deepcopy(converted)
    assert duplicate.classifier_path == "fc" and isinstance(duplicate.get_classifier(), NormalizedLinear)
    assert duplicate.pretrained_cfg == converted.pretrained_cfg
    assert duplicate.conversion_report.to_dict() == converted.conversion_report.to_dict()


class SharedNorm(nn.Module):
    """One BatchNorm and one ReLU module, each called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        return self.act(self.bn(x)).mean((2, 3))


def test_a_shared_batchnorm_stays_shared_while_each_relu_site_gets_its_own_beta():
    model = randomize_batchnorms(SharedNorm())
    x = torch.randn(4, 3, 8, 8)
    converted = lc.convert(model, x, beta=1e4)
    report = converted.conversion_report
    assert report.batchnorms_replaced == ["bn"] and report.activations_replaced == ["act", "act_1"]
    calls = [node.target for node in converted.graph.nodes if node.op == "call_module"]
    assert calls.count("bn") == 2
    assert (
        isinstance(converted.get_submodule("conv"), NormalizedConv)
        and converted.get_submodule("conv").scale is not None
    )
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) <= 1e-3


def test_pooling_lipschitz_constants_count_overlapping_windows():
    from lcnn_convert.conversion.bound import pool_lipschitz

    assert pool_lipschitz("max", 2, 2, 2) == 1.0  # disjoint windows
    assert pool_lipschitz("max", 2, 3, 2) == 2.0  # ResNet's stem: each input in up to 2x2 windows
    assert pool_lipschitz("max", 2, 3, 1) == 3.0
    assert pool_lipschitz("avg", 2, 2, 2) == 0.5  # the mean of 4 disjoint elements: 1/sqrt(4)
    assert pool_lipschitz("avg", 2, 3, 1) == 1.0  # a constant image is its own 3x3/1 average
    assert pool_lipschitz("avg", 2, 3, 1, padding=1, count_include_pad=False) == 3.0  # border windows average fewer
    assert pool_lipschitz("adaptive", 2, output_size=1) == pool_lipschitz("adaptive", 2, output_size=(1, 1)) == 1.0
    assert pool_lipschitz("adaptive", 2, output_size=(7, 7)) == 2.0


def _operator_norm(function, shape: tuple[int, ...], steps: int = 300) -> float:
    """||J|| of ``function`` at 0 by power iteration on J^T J (float64; exact for a linear map)."""
    vector = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        vector = vector.requires_grad_(True)
        output = function(vector)
        (product,) = torch.autograd.grad(output, vector, output)
        vector = (product / product.norm()).detach()
    return float(function(vector).norm() / vector.norm())


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(2, 2),
        nn.AvgPool2d(3, 1, 1),
        nn.AvgPool2d(3, 2, 1),
        nn.AvgPool2d(3, 1, 1, count_include_pad=False),
        nn.AvgPool2d(2, 1),
        nn.MaxPool2d(3, 2, 1),
        nn.MaxPool2d(3, 1, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.AdaptiveAvgPool2d(5),
    ],
    ids=str,
)
def test_a_pooling_constant_is_never_below_the_operators_norm(pool):
    """The stated constant bounds the measured norm (max pooling at a point with distinct values,
    where it is locally a selection). Average pools are linear: the norm is the Lipschitz constant."""
    from lcnn_convert.conversion.bound import _pool_module_lipschitz

    stated = _pool_module_lipschitz(pool)
    if isinstance(pool, nn.MaxPool2d):
        at = torch.randn(1, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        measured = _operator_norm(lambda delta: (pool(at + 1e-9 * delta) - pool(at)) / 1e-9, (1, 1, 12, 12))
    else:
        measured = _operator_norm(pool, (1, 1, 12, 12))
    assert measured <= stated * (1 + 1e-6), (measured, stated)  # finite differences at 1e-9 in float64
    if isinstance(pool, nn.AvgPool2d) and pool.count_include_pad:
        assert stated <= 1.5 * measured, (measured, stated)  # and not loose where the windows are regular


def test_a_bound_past_the_float_range_is_infinite_not_an_error():
    from lcnn_convert.conversion.bound import INFINITE, _compose

    assert _compose((1.0, 1.0), (1e200, 0.0)) == INFINITE  # DenseNet-161's curvature bound overflowed here


class _SharedConvAtTwoSizes(nn.Module):
    """One conv applied to a 4x4 thumbnail first, then to the 16x16 image (a shared head over two scales)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        small = self.conv(F.avg_pool2d(x, 4)).mean((2, 3))
        large = self.conv(x).mean((2, 3))
        return self.head(torch.cat([small, large], 1))


def test_a_conv_called_at_two_sizes_is_normalized_at_both():
    from lcnn_convert.conversion.graph_pass import capture_input_shapes
    from lcnn_convert.conversion.tracing import trace

    torch.manual_seed(0)
    model = _SharedConvAtTwoSizes().eval()
    x = torch.randn(2, 3, 16, 16)
    assert capture_input_shapes(trace(model), (x,))["conv"] == [(3, 4, 4), (3, 16, 16)]
    assert capture_input_shapes(model, (x,))["conv"] == [(3, 4, 4), (3, 16, 16)]  # untraced: hooks
    converted = lc.convert(model, x, beta=10.0).eval()
    layer = converted.get_submodule("conv")
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    sigmas = {size: NormalizedConv.from_conv(model.conv, (3, size, size), explicit_scale=True)[1] for size in (4, 16)}
    assert sigmas[16] > sigmas[4]  # the first call's size alone would leave the conv steeper than 1 at 16x16
    assert float(layer.sigma) == pytest.approx(max(sigmas.values()), rel=1e-6)


def test_an_adaptive_pool_at_a_known_size_gets_its_exact_window_constant():
    from lcnn_convert.conversion.bound import adaptive_pool_lipschitz

    assert adaptive_pool_lipschitz(True, (8, 8), 1) == pytest.approx(1 / 8)  # a global mean over 64 elements
    for average in (True, False):
        for length, out in ((12, 5), (7, 3), (5, 5), (3, 7)):
            pool = (lambda t: F.adaptive_avg_pool2d(t, out)) if average else (lambda t: F.adaptive_max_pool2d(t, out))
            if average:
                measured = _operator_norm(pool, (1, 1, length, length))
            else:
                at = torch.randn(1, 1, length, length, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
                measured = _operator_norm(lambda d: (pool(at + 1e-9 * d) - pool(at)) / 1e-9, (1, 1, length, length))
            assert measured <= adaptive_pool_lipschitz(average, (length, length), out) * (1 + 1e-6)
    # in a converted graph the bound reads the pool's input size from shape propagation
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    converted = lc.convert(model.eval(), torch.randn(2, 3, 8, 8), beta=10.0)
    scales = [float(m.scale.detach()) for m in converted.modules() if isinstance(m, (NormalizedConv, NormalizedLinear))]
    assert converted.conversion_report.lipschitz_bound == pytest.approx(scales[0] * scales[1] / 8, rel=1e-6)
