"""The layers' math: values, derivatives, the bounds from the notes, numerical stability."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcnn_convert import CenteredSoftplus, LipschitzBatchNorm, NormalizedConv, NormalizedLinear


def reference_softplus(x: torch.Tensor, beta: float) -> torch.Tensor:
    x = x.double()
    return (F.softplus(beta * x) - math.log(2.0)) / beta


@pytest.mark.parametrize("beta", [0.5, 1.0, 5.0, 100.0])
def test_centered_softplus_matches_definition(beta):
    x = torch.linspace(-20, 20, 2001)
    layer = CenteredSoftplus(beta)
    torch.testing.assert_close(layer(x).double(), reference_softplus(x, beta), atol=2e-6, rtol=1e-5)


def test_centered_softplus_is_zero_at_zero_for_every_beta_and_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for beta in (1e-3, 0.1, 1.0, 37.0, 1e4):
            layer = CenteredSoftplus(beta).to(dtype)
            assert layer(torch.zeros(4, dtype=dtype)).abs().max().item() == 0.0


def test_slope_is_sigmoid_and_curvature_peaks_at_beta_over_4():
    layer = CenteredSoftplus(3.0).double()
    beta = layer.beta.item()
    x = torch.linspace(-4, 4, 801, dtype=torch.float64).requires_grad_(True)
    (slope,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    torch.testing.assert_close(slope, torch.sigmoid(beta * x))
    (curvature,) = torch.autograd.grad(slope.sum(), x)
    expected = beta * torch.sigmoid(beta * x) * (1 - torch.sigmoid(beta * x))
    torch.testing.assert_close(curvature, expected.detach())
    assert curvature.max().item() <= beta / 4 + 1e-12
    assert curvature.max().item() == pytest.approx(beta / 4, rel=1e-3)
    # The autograd slope at exactly 0 is the true one (1/2), not relu's 0.
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (slope_at_zero,) = torch.autograd.grad(layer(zero).sum(), zero)
    assert slope_at_zero.item() == pytest.approx(0.5)


def test_limits_relu_for_large_beta_and_half_identity_for_small_beta():
    x = torch.linspace(-3, 3, 61)
    torch.testing.assert_close(CenteredSoftplus(1e4)(x), torch.relu(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(CenteredSoftplus(1e-3)(x), x / 2, atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta", [1e-3, 1.0, 1e4])
def test_values_and_gradients_stay_finite(dtype, beta):
    layer = CenteredSoftplus(beta).to(dtype)
    x = torch.tensor([-1e4, -300.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 300.0, 1e4], dtype=dtype, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.log_beta.grad).all()
    assert (x.grad >= 0).all() and (x.grad <= 1).all()
    # Far from 0 the layer is the identity (x > 0) or flat (x < 0), up to log(2)/beta.
    assert abs(y[-1].float().item() - 1e4) <= 1e4 * 1e-2 + math.log(2) / beta
    assert abs(y[0].float().item()) <= math.log(2) / beta * 1.01 + 1e-2


def test_beta_is_learnable_in_log_space_and_clamped():
    layer = CenteredSoftplus(5.0)
    assert isinstance(layer.log_beta, nn.Parameter)
    assert layer.beta.item() == pytest.approx(5.0)
    layer.set_beta(1e9)
    assert layer.beta.item() == pytest.approx(1e4)
    assert CenteredSoftplus(5.0, learnable=False).log_beta.requires_grad is False
    with pytest.raises(ValueError):
        CenteredSoftplus(0.0)


def _trained_bn(kind=nn.BatchNorm2d, channels=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    bn = kind(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=generator))
        bn.running_var.copy_(0.1 + 2 * torch.rand(channels, generator=generator))
        bn.weight.copy_(torch.randn(channels, generator=generator))
        bn.bias.copy_(torch.randn(channels, generator=generator))
    return bn


@pytest.mark.parametrize(
    "kind,shape", [(nn.BatchNorm1d, (5, 6)), (nn.BatchNorm2d, (5, 6, 7, 7)), (nn.BatchNorm3d, (5, 6, 3, 4, 4))]
)
def test_lipschitz_bn_equals_original_exactly_in_eval(kind, shape):
    bn = _trained_bn(kind).eval()
    layer = LipschitzBatchNorm.from_batchnorm(bn).eval()
    x = torch.randn(shape)
    assert layer.clip_factor().item() == 1.0
    assert torch.equal(layer(x), bn(x))
    gains = bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)
    assert layer.lipschitz_constant() == pytest.approx(gains.max().item())
    assert layer.eps == bn.eps and layer.momentum == bn.momentum


def test_lipschitz_bn_train_mode_uses_batch_statistics_like_bn():
    bn = _trained_bn().train()
    layer = LipschitzBatchNorm.from_batchnorm(bn).train()
    x = 3 * torch.randn(16, 6, 5, 5) + 1
    torch.testing.assert_close(layer(x), bn(x))
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert layer.num_batches_tracked.item() == bn.num_batches_tracked.item()


def test_gamma_bounds_the_gain_and_keeps_channel_ratios():
    bn = _trained_bn().eval()
    layer = LipschitzBatchNorm.from_batchnorm(bn).eval()
    gains = layer.channel_gains().detach()
    with torch.no_grad():
        layer.log_gamma.fill_(math.log(0.25 * gains.max().item()))
    assert layer.lipschitz_constant() == pytest.approx(0.25 * gains.max().item(), rel=1e-5)
    # Empirical slope per channel: (y(x + d) - y(x)) / d.
    x = torch.randn(2, 6, 3, 3)
    slope = (layer(x + 1.0) - layer(x))[0, :, 0, 0].abs()
    torch.testing.assert_close(slope, 0.25 * gains, rtol=1e-4, atol=1e-6)
    # gamma is learnable and gets a gradient once it binds.
    layer(x).sum().backward()
    assert layer.log_gamma.grad is not None and layer.log_gamma.grad.abs().item() > 0


def test_absorbing_a_scale_keeps_the_function():
    bn = _trained_bn().eval()
    layer = LipschitzBatchNorm.from_batchnorm(bn).eval()
    layer.absorb_input_scale(7.5)
    x = torch.randn(4, 6, 3, 3)
    torch.testing.assert_close(layer(x / 7.5), bn(x), rtol=1e-5, atol=1e-5)
    assert layer.clip_factor().item() == 1.0
    restored = LipschitzBatchNorm(6)
    restored.load_state_dict(layer.state_dict())
    assert restored.eps == layer.eps


def conv_operator_norm(conv: nn.Conv2d, input_shape) -> float:
    """Exact operator norm: the largest singular value of the conv's dense matrix."""
    size = math.prod(input_shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *input_shape)
    columns = F.conv2d(basis, conv.weight.double(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return torch.linalg.matrix_norm(columns.reshape(size, -1), ord=2).item()


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (3, 6, 6)),
        (dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1), (4, 7, 7)),
        (dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2, groups=4), (4, 6, 6)),
        (dict(in_channels=2, out_channels=3, kernel_size=1), (2, 5, 5)),
    ],
)
def test_normalized_conv_has_unit_operator_norm_at_its_input_size(kwargs, shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs)
    layer, sigma = NormalizedConv.from_conv(conv, shape, explicit_scale=True)
    exact = conv_operator_norm(conv, shape)
    assert sigma == pytest.approx(exact, rel=1e-3)
    normalized = nn.Conv2d(**kwargs, bias=False)
    normalized.weight.data = layer.normalized_weight().detach()
    assert conv_operator_norm(normalized, shape) == pytest.approx(1.0, rel=1e-3)
    layer.eval()
    x = torch.randn(3, *shape)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    assert layer.lipschitz_constant() == pytest.approx(exact, rel=1e-3)


def test_normalized_linear_uses_the_spectral_norm():
    torch.manual_seed(0)
    linear = nn.Linear(20, 7)
    layer, sigma = NormalizedLinear.from_linear(linear, explicit_scale=True)
    assert sigma == pytest.approx(torch.linalg.matrix_norm(linear.weight.double(), ord=2).item(), rel=1e-4)
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer.eval()(x), linear(x), rtol=1e-5, atol=1e-5)


def test_normalized_conv_trains_with_a_differentiable_sigma():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer, sigma = NormalizedConv.from_conv(conv, (3, 8, 8), explicit_scale=False)
    layer.train()
    x = torch.randn(2, 3, 8, 8)
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert layer.sigma.item() == pytest.approx(sigma, rel=1e-3)
    # A new input size restarts the power iteration at that size.
    layer(torch.randn(2, 3, 4, 4)).sum().backward()
    assert layer.input_shape.tolist() == [3, 4, 4]


def test_a_zero_initialised_layer_normalizes_to_finite_values_and_recovers_in_training():
    # torchvision's ViT (and several timm models) start their head at zero weight: sigma = 0.
    linear = nn.Linear(6, 3)
    with torch.no_grad():
        linear.weight.zero_()
    layer, sigma = NormalizedLinear.from_linear(linear, explicit_scale=True)
    assert sigma == 1.0
    x = torch.randn(4, 6)
    assert torch.equal(layer.eval()(x), linear(x))
    layer.train()
    target = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    weight = layer.normalized_weight()
    assert all(math.isfinite(value) for value in losses) and losses[-1] < 0.5 * losses[0]
    assert layer.weight.abs().max() > 0  # it left zero ...
    assert abs(float(torch.linalg.matrix_norm(weight.detach(), ord=2)) - 1) < 0.05  # ... and is normalized


# --- the fast paths (fused forward, derivatives from the output, output-side 1/sigma) ---------


@pytest.mark.parametrize("beta", [1e-3, 0.3, 10.0, 1e4])
def test_fused_cpu_forward_matches_the_stable_formula(beta):
    from lcnn_convert.layers.centered_softplus import _centered_softplus, _fused_centered_softplus

    x = torch.cat([torch.linspace(-50, 50, 20001), torch.randn(2000) * 1e-3])
    reference = reference_softplus(x, beta)
    fused = _fused_centered_softplus(x, beta)
    formula = _centered_softplus(x, torch.tensor(beta))
    # within float32 rounding of the largest term (log(2)/beta is subtracted last)
    scale = reference.abs().max().item() + math.log(2.0) / beta
    assert (fused.double() - reference).abs().max() <= 2e-7 * scale + 1e-6
    assert (formula.double() - reference).abs().max() <= 2e-7 * scale + 1e-6
    layer = CenteredSoftplus(beta)
    with torch.no_grad():  # eval and no-grad use it, with the stored beta
        torch.testing.assert_close(layer(x), _fused_centered_softplus(x, float(layer.beta)), rtol=0, atol=0)
    # float64 keeps the formula: the exp(-20) cut-off would spoil its precision
    x64, layer64 = x.double(), CenteredSoftplus(beta).double()
    beta64 = float(layer64.beta.detach())
    reference64 = (torch.logaddexp(beta64 * x64, torch.zeros(())) - math.log(2.0)) / beta64  # no cut-off
    torch.testing.assert_close(layer64(x64), reference64, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("log_beta", [-3.0, 0.0, 2.3, 6.0])
def test_derivatives_from_the_output_pass_gradcheck_in_both_modes(log_beta):
    from lcnn_convert.layers.centered_softplus import _CenteredSoftplusFunction

    x = (torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_(True)
    beta = torch.tensor(log_beta, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_CenteredSoftplusFunction.apply, (x, beta))
    assert torch.autograd.gradcheck(
        _CenteredSoftplusFunction.apply,
        (x, beta),
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
        check_batched_grad=False,
    )
    assert torch.autograd.gradgradcheck(_CenteredSoftplusFunction.apply, (x, beta))


@pytest.mark.parametrize("beta", [1e-3, 1.0, 10.0, 1e4])
def test_in_place_backward_equals_the_differentiable_one(beta):
    from lcnn_convert.layers.centered_softplus import _CenteredSoftplusFunction

    x = torch.cat([torch.linspace(-50, 50, 10001), torch.randn(1000) * 1e-3]).requires_grad_(True)
    log_beta = torch.tensor(math.log(beta), requires_grad=True)
    y = _CenteredSoftplusFunction.apply(x, log_beta)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    plain = torch.autograd.grad(y, (x, log_beta), grad, retain_graph=True)  # no graph: the in-place path
    graphed = torch.autograd.grad(y, (x, log_beta), grad, create_graph=True)
    torch.testing.assert_close(plain[0], graphed[0], rtol=0, atol=0)
    torch.testing.assert_close(plain[1], graphed[1].detach(), rtol=1e-3, atol=1e-6)  # float32 sums of 1e4 terms
    # and both match float64 autograd through the definition
    x64 = x.detach().double().requires_grad_(True)
    beta64 = log_beta.detach().double().requires_grad_(True)
    ((F.softplus(beta64.exp() * x64) - math.log(2.0)) / beta64.exp()).backward(grad.double())
    torch.testing.assert_close(plain[0].double(), x64.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain[1].double(), beta64.grad, rtol=1e-3, atol=1e-6)


def test_input_gradient_pass_skips_log_beta_and_the_penalty_gradient_is_exact():
    """The gradient-norm penalty's first pass asks for the input gradient only; log beta's
    gradient of the penalty, through the second pass, must still be exact (finite differences)."""
    x0 = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def objective(log_beta: float) -> tuple[float, float]:
        layer = CenteredSoftplus(1.0).double()
        layer.log_beta.data.fill_(log_beta)
        x = x0.clone().requires_grad_(True)
        loss = (layer(x) * weights).sum() ** 2
        (input_gradient,) = torch.autograd.grad(loss, x, create_graph=True)
        assert layer.log_beta.grad is None
        total = input_gradient.square().sum() + loss
        total.backward()
        return float(total.detach()), float(layer.log_beta.grad)

    _, analytic = objective(0.3)
    step = 1e-6
    numeric = (objective(0.3 + step)[0] - objective(0.3 - step)[0]) / (2 * step)
    assert analytic == pytest.approx(numeric, rel=1e-6)


def test_output_side_division_by_sigma_matches_the_normalized_weight():
    from lcnn_convert.layers.normalized_linear import _DivideBySigma

    y = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_DivideBySigma.apply, (y, sigma))
    assert torch.autograd.gradgradcheck(_DivideBySigma.apply, (y, sigma))

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    layer, _ = NormalizedConv.from_conv(conv, (3, 9, 9), explicit_scale=False)
    layer.train()
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    output = layer(x)
    output.square().sum().backward()
    # the same step written with the normalized weight, from the same power-iteration state
    reference = NormalizedConv(conv, (3, 9, 9), explicit_scale=False).train()
    reference.load_state_dict(layer.state_dict())
    reference._power_vector = layer._power_vector.clone()
    weight = reference.weight
    sigma = reference._operator(reference._power_vector, weight).square().sum().sqrt()
    x_ref = x.detach().clone().requires_grad_(True)
    expected = F.conv2d(x_ref, weight / sigma, reference.bias, stride=2, padding=1)
    expected.square().sum().backward()
    torch.testing.assert_close(output, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, groups",
    [
        (3, 1, 1, 1, 1),
        (3, 2, 1, 1, 2),
        (5, 1, 2, 1, 1),
        (5, 1, 4, 2, 1),
        (3, 1, 2, 2, 2),
        (1, 1, 0, 1, 1),
    ],
)
def test_a_conv_on_a_one_pixel_input_runs_as_its_single_tap(kernel, stride, padding, dilation, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    layer, sigma = NormalizedConv.from_conv(conv, (4, 1, 1), explicit_scale=True)
    assert layer._single_tap((1, 1)) is not None
    x = torch.randn(3, 4, 1, 1, requires_grad=True)
    torch.testing.assert_close(layer.eval()(x), conv(x), rtol=1e-5, atol=1e-6)
    # the norm is exact: the dense matrix of the conv at this input size
    basis = torch.eye(4, dtype=torch.float64).reshape(4, 4, 1, 1)
    dense = F.conv2d(basis, conv.weight.detach().double(), None, stride, padding, dilation, groups).reshape(4, -1)
    assert sigma == pytest.approx(torch.linalg.matrix_norm(dense, 2).item(), rel=1e-6)
    # training: the same output and gradients as the padded conv with the normalized weight
    layer.train()
    output = layer(x)
    (grad_x,) = torch.autograd.grad(output.square().sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    weight = layer.weight / layer.sigma * layer.scale
    expected = F.conv2d(x_ref, weight, layer.bias, stride, padding, dilation, groups)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x_ref)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, expected_grad, rtol=1e-5, atol=1e-6)
    # larger inputs take the ordinary path
    assert layer._single_tap((2, 2)) is None
