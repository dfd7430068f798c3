"""Every activation family: exact at its initial beta, derivatives, constants, export, the swish option."""

from __future__ import annotations

import math

import pytest
import timm.layers.activations as timm_acts
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lcnn_convert as lc
from lcnn_convert.conversion.activations import ACTIVATION_FAMILIES, family_of_module
from lcnn_convert.conversion.rules import KNOWN_RULES, default_rules
from lcnn_convert.layers import (
    CenteredSoftplus,
    ScaledActivation,
    SmoothActivation,
    SmoothHardswish,
    SmoothPiecewiseLinear,
)
from lcnn_convert.finetune import regularisers
from lcnn_convert.layers.inference import freeze_for_inference

from .conftest import randomize_batchnorms
from .test_properties import fast, log_uniform

# Originals the smooth families contain exactly, at the replacement's initial beta.
EXACT = {
    "SiLU": nn.SiLU(),
    "timm Swish": timm_acts.Swish(),
    "QuickGELU": timm_acts.QuickGELU(),
    "GELU": nn.GELU(),
    "GELU tanh": nn.GELU(approximate="tanh"),
    "timm GELUTanh": timm_acts.GELUTanh(),
    "timm GELU": timm_acts.GELU(),
    "Mish": nn.Mish(),
    "timm Mish": timm_acts.Mish(),
    "Sigmoid": nn.Sigmoid(),
    "timm Sigmoid": timm_acts.Sigmoid(),
    "Tanh": nn.Tanh(),
    "Softsign": nn.Softsign(),
    "ELU(0.7)": nn.ELU(0.7),
    "CELU(1.3)": nn.CELU(1.3),
    "SELU": nn.SELU(),
    "Softplus(2)": nn.Softplus(2.0),
}
# Piecewise-linear originals: their families reach them as beta grows.
PIECEWISE = {
    "ReLU": nn.ReLU(),
    "ReLU6": nn.ReLU6(),
    "LeakyReLU(0.1)": nn.LeakyReLU(0.1),
    "Hardtanh(-2, 3)": nn.Hardtanh(-2.0, 3.0),
    "Hardsigmoid": nn.Hardsigmoid(),
    "timm HardSigmoid": timm_acts.HardSigmoid(),
    "Hardswish": nn.Hardswish(),
    "timm HardSwish": timm_acts.HardSwish(),
}


def replacement(original: nn.Module, beta: float = 100.0, activation: str = "centered_softplus") -> nn.Module:
    family = family_of_module(original)
    assert family is not None, type(original).__name__
    return family.build(family.parameters_of_module(original), beta, activation)


def wide_inputs(dtype=torch.float32) -> torch.Tensor:
    return torch.cat([torch.linspace(-12, 12, 4801), torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 4])


@pytest.mark.parametrize("name", list(EXACT))
def test_smooth_families_are_exact_at_their_initial_beta(name):
    original = EXACT[name]
    layer = replacement(original)
    assert isinstance(layer, SmoothActivation) and not layer.calibrated
    x = wide_inputs()
    assert (layer(x) - original(x)).abs().max().item() <= 1e-6
    frozen = freeze_for_inference(layer)
    assert (frozen(x) - original(x)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("activation", ["centered_softplus", "swish"])
@pytest.mark.parametrize("name", list(PIECEWISE))
def test_piecewise_families_keep_f0_and_approach_the_original_as_beta_grows(name, activation):
    original = PIECEWISE[name]
    x = wide_inputs().double()
    errors = []
    for beta in (10.0, 100.0, 1000.0):
        layer = replacement(original, beta, activation).double()
        assert layer.calibrated
        assert layer(torch.zeros(1, dtype=torch.float64)).item() == pytest.approx(
            original(torch.zeros(1)).item(), abs=1e-12
        )
        errors.append((layer(x) - original(x.float()).double()).abs().max().item())
    # the error falls as 1/beta: at most sup|r - relu| / beta (log 2 or 0.28) per kink, times the
    # largest factor in front (|x| / 6 <= 1/2 at hardswish's kinks)
    assert errors[0] > errors[1] > errors[2]
    assert all(error <= 2 * math.log(2) / beta for error, beta in zip(errors, (10.0, 100.0, 1000.0))), errors


ALL_LAYERS = {
    **{f"exact {name}": (lambda original=original: replacement(original)) for name, original in EXACT.items()},
    **{
        f"{activation} {name}": (
            lambda original=original, activation=activation: replacement(original, 3.0, activation)
        )
        for name, original in PIECEWISE.items()
        for activation in ("centered_softplus", "swish")
    },
}


def derivatives(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    (curvature,) = torch.autograd.grad(slope.sum(), x)
    return slope.detach(), curvature


@pytest.mark.parametrize("name", list(ALL_LAYERS))
def test_float32_derivatives_match_float64_autograd_and_gradcheck_passes(name):
    layer32 = ALL_LAYERS[name]()
    layer64 = ALL_LAYERS[name]().double()
    with torch.no_grad():
        layer32.set_beta(1.7), layer64.set_beta(1.7)
    x = torch.linspace(-8, 8, 2001) + 1e-3
    slope32, curvature32 = derivatives(layer32, x)
    slope64, curvature64 = derivatives(layer64, x.double())
    torch.testing.assert_close(slope32.double(), slope64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(curvature32.double(), curvature64, atol=2e-4, rtol=1e-3)
    probe = torch.tensor([-2.3, -0.4, 0.3, 1.1, 4.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, log_beta: _with_log_beta(layer64, log_beta)(v), (probe, layer64.log_beta))
    assert torch.autograd.gradgradcheck(lambda v: layer64(v), (probe,))


def _with_log_beta(layer: SmoothActivation, log_beta: torch.Tensor):
    """The layer's function with log beta as an explicit input (for gradcheck over beta)."""

    def apply(v: torch.Tensor) -> torch.Tensor:
        saved = layer.log_beta
        del layer.log_beta
        layer.log_beta = log_beta
        try:
            return layer(v)
        finally:
            layer.log_beta = saved

    return apply


@fast(60)
@given(name=st.sampled_from(list(ALL_LAYERS)), beta=log_uniform(0.05, 2000.0), spread=st.floats(0.5, 60.0))
def test_slope_and_curvature_constants_bound_autograd_everywhere(name, beta, spread):
    layer = ALL_LAYERS[name]().double()
    layer.set_beta(beta)
    used = float(layer.beta.detach())
    # dense around every kink (at the kinks' own scale 1/beta) and wide
    centres = torch.tensor([0.0, -3.0, 3.0, 6.0, -2.0], dtype=torch.float64)
    near = (centres[:, None] + torch.linspace(-spread, spread, 2001, dtype=torch.float64)[None] / used).flatten()
    x = torch.cat([near, torch.linspace(-50, 50, 4001, dtype=torch.float64)])
    slope, curvature = derivatives(layer, x)
    assert slope.abs().max().item() <= layer.lipschitz_constant() * (1 + 1e-6) + 1e-12
    assert curvature.abs().max().item() <= layer.curvature_constant() * (1 + 1e-6) + 1e-12


def test_smooth_function_constants_are_tight():
    """The exact families' constants are the sup themselves (within 1e-4), not loose bounds."""
    x = torch.linspace(-30, 30, 600001, dtype=torch.float64)
    for name in ("SiLU", "GELU", "Mish", "Sigmoid", "Tanh", "ELU(0.7)", "SELU"):
        layer = replacement(EXACT[name]).double()
        slope, curvature = derivatives(layer, x)
        assert slope.abs().max().item() == pytest.approx(layer.lipschitz_constant(), rel=1e-4), name
        assert curvature.abs().max().item() == pytest.approx(layer.curvature_constant(), rel=1e-3), name


def test_constants_scale_with_beta_as_stated():
    silu = ScaledActivation("silu", 4.0)
    assert silu.curvature_constant() == pytest.approx(2.0) and silu.lipschitz_constant() == pytest.approx(1.09984)
    relu6 = SmoothPiecewiseLinear((0.0, 6.0), (1.0, -1.0), beta=8.0)
    assert relu6.lipschitz_constant() == 1.0 and relu6.curvature_constant() == pytest.approx(8.0 * 0.25 * 2)
    assert SmoothHardswish(1e4).lipschitz_constant() == pytest.approx(1.5, abs=1e-3)


class EveryActivation(nn.Module):
    """A small convnet calling every family, as a module and as a function."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(6) for _ in range(4))
        self.acts = nn.ModuleList([nn.SiLU(), nn.Hardswish(), nn.ReLU6(), nn.GELU()])
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        for conv, bn, act in zip(self.convs, self.bns, self.acts):
            x = act(bn(conv(x)))
        gate = torch.sigmoid(x.mean((2, 3), keepdim=True))  # a squeeze-excite gate
        x = F.leaky_relu(x * gate, 0.2) + F.elu(x) + F.mish(x)
        return self.fc(F.hardsigmoid(x).mean((2, 3)))


@pytest.mark.parametrize("activation", ["centered_softplus", "swish"])
def test_every_family_converts_exports_and_passes_parity(activation, tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorms(EveryActivation())
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    converted = lc.convert(model, images, activation=activation)
    report = converted.conversion_report
    assert report.skipped == [] and len(report.activations_replaced) == 9
    assert report.fidelity.top1_agreement >= 0.99
    calibrated = [m for m in converted.modules() if isinstance(m, SmoothActivation) and m.calibrated]
    assert len(calibrated) == 4  # ReLU6, Hardswish, leaky ReLU, hard sigmoid; the other five are exact
    lc.export_onnx(converted, tmp_path / "model.onnx", images[:2])
    parity = lc.verify_onnx(converted, tmp_path / "model.onnx", images)
    assert parity.passed, parity.failure()


def test_swish_turns_relus_into_calibrated_x_sigmoid_beta_x_and_rebuilds_from_its_rule_names():
    torch.manual_seed(0)
    model = randomize_batchnorms(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
    )
    images = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    converted = lc.convert(model, images, activation="swish")
    sites = [m for m in converted.modules() if isinstance(m, SmoothActivation)]
    assert len(sites) == 2 and all(
        isinstance(m, ScaledActivation) and m.function == "silu" and m.calibrated for m in sites
    )
    assert all(m.frozen_beta() > 1.0 for m in sites)
    assert converted.conversion_report.fidelity.top1_agreement >= 0.99
    rules = default_rules("swish")
    assert "relu-module@swish" in {rule.name for rule in rules} and all(rule.name in KNOWN_RULES for rule in rules)
    with pytest.raises(lc.LcnnError, match="activation must be one of"):
        lc.convert(model, images, activation="tanh")


def test_each_module_type_belongs_to_the_first_family_listing_it_and_no_other():
    for family in ACTIVATION_FAMILIES:
        assert family.modules or family.functions, family.name
        for module_type in family.modules:
            assert family_of_module(module_type.__new__(module_type)) is family
            assert [other.name for other in ACTIVATION_FAMILIES if module_type in other.modules] == [family.name]


def test_fine_tuning_penalises_every_learnable_activation_and_bn():
    # beta in the centered softplus's units: x sigmoid(2x) peaks at |f''| = 1, as the softplus at beta 4
    model = nn.Sequential(ScaledActivation("silu", 2.0), CenteredSoftplus(5.0), SmoothHardswish(3.0), nn.Linear(2, 2))
    beta_term, gamma_term = regularisers(model)
    assert beta_term.item() == pytest.approx(4.0 + 5.0 + 3.0, rel=1e-5) and gamma_term.item() == 0.0


@pytest.mark.parametrize("activation", ["centered_softplus", "swish"])
def test_the_beta_penalty_weighs_equal_peak_curvature_equally(activation):
    softplus_unit = CenteredSoftplus(1.0).curvature_constant()
    for name, original in {**EXACT, **PIECEWISE}.items():
        layer = replacement(original, beta=3.0, activation=activation)
        if isinstance(layer, SmoothHardswish) or (isinstance(layer, ScaledActivation) and layer._spec().saturating):
            continue  # their peak curvature is not beta times a constant
        assert layer.regulariser_term().item() == pytest.approx(layer.curvature_constant() / softplus_unit, rel=1e-5), (
            name
        )


def test_input_hessian_stand_ins_are_the_layers_inference_forms():
    from lcnn_convert.input_hessian import swap_for_input_hessian

    model = nn.Sequential(
        nn.Linear(4, 4), ScaledActivation("gelu", 0.7), SmoothPiecewiseLinear((0.0,), (1.0,), beta=4.0)
    )
    stand_in = torch.nn.Sequential(*[m for m in model]).eval()
    swapped = swap_for_input_hessian(stand_in)
    assert swapped == ["1", "2"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(stand_in(x), model.eval()(x))
