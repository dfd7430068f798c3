"""The input-Hessian stand-ins: same values, gradients and Hessian-vector products as the layers
they replace, with fewer convolutions per product."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lcnn_convert as lc
from lcnn_convert import CenteredSoftplus, LipschitzBatchNorm, NormalizedConv
from lcnn_convert.input_hessian import ChannelAffine, FixedBetaSoftplus, InputGradientConv, swap_for_input_hessian
from lcnn_convert.measure import estimate_curvature

from .conftest import randomize_batchnorms
from .test_measure import exact_norms, small_conv_net


def input_hessian_products(model: nn.Module, x: torch.Tensor, direction: torch.Tensor):
    """(output, input gradient of a fixed scalar function, its product with ``direction``)."""
    x = x.detach().clone().requires_grad_(True)
    output = model(x)
    scalar = (output.tanh() * torch.linspace(-1, 1, output.numel(), dtype=x.dtype).view_as(output)).sum()
    (gradient,) = torch.autograd.grad(scalar, x, create_graph=True)
    (product,) = torch.autograd.grad(gradient, x, grad_outputs=direction)
    return output.detach(), gradient.detach(), product


CONVS = {
    "3x3 padded": (nn.Conv2d, dict(kernel_size=3, padding=1), (9, 9)),
    "strided, odd size": (nn.Conv2d, dict(kernel_size=3, stride=2, padding=1), (9, 9)),
    "strided, even size": (nn.Conv2d, dict(kernel_size=3, stride=2, padding=1), (8, 10)),
    "dilated, grouped, biased": (nn.Conv2d, dict(kernel_size=3, padding=2, dilation=2, groups=2, bias=True), (7, 8)),
    "same, even kernel": (nn.Conv2d, dict(kernel_size=4, padding="same"), (6, 7)),
    "valid, stride 3": (nn.Conv2d, dict(kernel_size=2, stride=3, padding="valid"), (10, 11)),
    "1d": (nn.Conv1d, dict(kernel_size=5, stride=2, padding=2), (13,)),
    "3d": (nn.Conv3d, dict(kernel_size=3, padding=1, stride=(1, 2, 1)), (4, 5, 3)),
    "one-pixel input": (nn.Conv2d, dict(kernel_size=3, padding=1), (1, 1)),
}


@pytest.mark.parametrize("name", CONVS)
def test_conv_stand_in_matches_the_conv_through_second_order(name):
    layer_type, options, spatial = CONVS[name]
    options = {"bias": False, **options}
    torch.manual_seed(0)
    conv = layer_type(4, 6, **options).double()
    stand_in = InputGradientConv.from_conv(conv)
    x = torch.randn(3, 4, *spatial, dtype=torch.float64)
    direction = torch.randn_like(x)
    for expected, actual in zip(
        input_hessian_products(conv, x, direction), input_hessian_products(stand_in, x, direction)
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    # The stand-in's own backward is differentiable twice (float64 finite differences).
    probe = torch.randn(1, 4, *spatial, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stand_in, (probe,))
    assert torch.autograd.gradgradcheck(stand_in, (probe,))


def test_normalized_conv_stand_in_uses_its_normalized_weight_and_scale():
    torch.manual_seed(1)
    normalized, _ = NormalizedConv.from_conv(nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True), (3, 8, 8), True)
    with torch.no_grad():
        normalized.scale.fill_(1.7)
    normalized.eval()
    stand_in = InputGradientConv.from_conv(normalized)
    x, direction = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for expected, actual in zip(
        input_hessian_products(normalized, x, direction), input_hessian_products(stand_in, x, direction)
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lipschitz", [False, True], ids=["batchnorm", "lipschitz"])
def test_batchnorm_stand_in_is_its_eval_affine_map(lipschitz):
    bn = randomize_batchnorms(nn.BatchNorm2d(5)).eval()
    if lipschitz:
        bn = LipschitzBatchNorm.from_batchnorm(bn).eval()
        with torch.no_grad():
            bn.weight.mul_(4.0)  # above the bound: the clip factor takes part
        assert float(bn.clip_factor().detach().min()) < 1
    stand_in = ChannelAffine.from_batchnorm(bn)
    x = torch.randn(4, 5, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(stand_in(x), bn(x), rtol=1e-6, atol=1e-6)
    assert ChannelAffine.from_batchnorm(nn.BatchNorm2d(5, track_running_stats=False)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_stand_in_matches_the_layer_through_second_order(dtype):
    layer = CenteredSoftplus(beta=2.5, shift=0.3).to(dtype)
    stand_in = layer.curvature_stand_in()
    assert isinstance(stand_in, FixedBetaSoftplus)
    # across 0 (the curvature's peak, beta / 4) and past the threshold (beta x > 20)
    x = torch.cat([torch.linspace(-12, 12, 241), torch.randn(40) * 1e-3]).to(dtype).view(1, -1)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    for expected, actual in zip(
        input_hessian_products(layer, x, direction), input_hessian_products(stand_in, x, direction)
    ):
        torch.testing.assert_close(actual, expected, **tolerance)


def test_swap_replaces_exact_types_only_and_needs_eval_mode():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        Conv2dSame(4, 4, 3, stride=2),  # pads dynamically in its own forward
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.BatchNorm2d(4, track_running_stats=False),
    )
    with pytest.raises(ValueError, match="eval mode"):
        swap_for_input_hessian(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    assert swap_for_input_hessian(model) == ["0", "1"]
    assert isinstance(model[0], InputGradientConv) and isinstance(model[1], ChannelAffine)
    assert isinstance(model[2], Conv2dSame) and isinstance(model[3], nn.Conv2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


class CountConvolutions(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "convolution" in func.__name__:
            self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def test_hessian_vector_product_takes_two_convolutions_per_layer_instead_of_three():
    torch.manual_seed(0)
    model = randomize_batchnorms(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            CenteredSoftplus(beta=2.0),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            CenteredSoftplus(beta=2.0),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 5),
        )
    ).eval()
    fast = copy.deepcopy(model)
    assert len(swap_for_input_hessian(fast)) == 6
    x, direction = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)

    def count(module: nn.Module) -> tuple[dict[str, int], torch.Tensor]:
        x_ = x.clone().requires_grad_(True)
        loss = F.cross_entropy(module(x_), torch.arange(4))
        (gradient,) = torch.autograd.grad(loss, x_, create_graph=True)
        with CountConvolutions() as mode:
            (product,) = torch.autograd.grad(gradient, x_, grad_outputs=direction)
        return dict(mode.counts), product

    plain_counts, plain_product = count(model)
    fast_counts, fast_product = count(fast)
    assert sum(plain_counts.values()) == 6  # per layer: direction forward, weight gradient, gradient back
    assert sum(fast_counts.values()) == 4
    torch.testing.assert_close(fast_product, plain_product, rtol=1e-4, atol=1e-6)


def test_curvature_through_the_stand_ins_is_the_exact_hessian_norm():
    """Lanczos with more steps than input dimensions is exact: the stand-ins' products are right."""
    torch.manual_seed(0)
    model = randomize_batchnorms(
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            CenteredSoftplus(beta=1.5),
            nn.Conv2d(3, 2, 3, stride=2, padding=1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
    ).double()
    images = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2, 3])
    hessian_norms, grad_norms = exact_norms(model.eval(), images, labels)
    for input_only in (True, False):
        per_example = [
            estimate_curvature(
                model, (images[i : i + 1], labels[i : i + 1]), iterations=40, input_only_products=input_only
            )
            for i in range(3)
        ]
        torch.testing.assert_close(
            torch.tensor([stats.hessian_norm_mean for stats in per_example], dtype=torch.float64),
            torch.from_numpy(hessian_norms),
            rtol=1e-6,
            atol=0,
        )


def test_converted_model_curvature_is_the_same_with_or_without_the_stand_ins(digits):
    images, labels = digits[0][:16], digits[1][:16]
    converted = lc.convert(small_conv_net(), images[:8], beta=20.0)
    assert any(isinstance(module, NormalizedConv) for module in converted.modules())
    fast = estimate_curvature(converted, (images, labels))
    plain = estimate_curvature(converted, (images, labels), input_only_products=False)
    assert fast.curvature_mean == pytest.approx(plain.curvature_mean, rel=1e-4)
