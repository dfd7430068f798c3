"""Curvature, accuracy and PGD measurements, checked against exact values and known behaviour."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import lcnn_convert as lc
from lcnn_convert import CenteredSoftplus
from lcnn_convert.measure import (
    PGD_DEFAULTS,
    ModelMetrics,
    ScaledLogits,
    accuracy_and_confidence,
    adversarial_accuracy,
    confidence_matching_scale,
    estimate_curvature,
    evaluate_accuracy,
    measure_model,
    pgd_attack,
    relu_stand_in,
)

from .conftest import SmallDigitsNet, randomize_batchnorms

# conftest's digits are pixel / 8 - 1, i.e. pixels in [0, 1] normalized with mean 0.5, std 0.5.
DIGITS_MEAN, DIGITS_STD = (0.5,), (0.5,)


class PairDataset(Dataset):
    """A map-style dataset yielding (tensor, int), the way torchvision datasets do."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def small_mlp(activation: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(18, 12), activation, nn.Linear(12, 5)).double()


def exact_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Largest |eigenvalue| of each example's full input Hessian, and the input-gradient norms."""
    hessian_norms, grad_norms = [], []
    for image, label in zip(images, labels):

        def loss(x: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x.unsqueeze(0)), label.unsqueeze(0))

        hessian = torch.autograd.functional.hessian(loss, image).reshape(image.numel(), image.numel())
        hessian_norms.append(float(torch.linalg.eigvalsh(hessian).abs().max()))
        grad_norms.append(float(torch.autograd.functional.jacobian(loss, image).norm()))
    return np.array(hessian_norms), np.array(grad_norms)


def small_conv_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, 10),
    )
    return randomize_batchnorms(model)


# beta = 1 keeps every example's top two |eigenvalues| apart (ratio <= 0.86), so 100 power
# iterations converge far below the 1e-3 tolerance; near-ties would only slow convergence down.
# Lanczos with 100 steps exhausts the 18-dimensional input space: its estimate is exact.
@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("activation", [nn.Softplus(beta=1.0), CenteredSoftplus(beta=1.0)], ids=["softplus", "lcnn"])
def test_curvature_matches_exact_hessian(activation, method):
    model = small_mlp(activation)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (6,), generator=generator)
    hessian_norms, grad_norms = exact_norms(model, images, labels)

    model.train()
    stats = estimate_curvature(model, (images, labels), iterations=100, batch_size=4, method=method)
    assert model.training and all(module.training for module in model.modules())
    assert stats.relu_stand_in_beta is None and stats.num_examples == 6

    # Batched power iteration gives each example its own Hessian norm, whatever the batch it shares.
    per_example = [
        estimate_curvature(model, (images[i : i + 1], labels[i : i + 1]), iterations=100, method=method)
        for i in range(6)
    ]
    estimated_hessian = np.array([single.hessian_norm_mean for single in per_example])
    np.testing.assert_allclose(estimated_hessian, hessian_norms, rtol=1e-3)
    np.testing.assert_allclose([single.grad_norm_mean for single in per_example], grad_norms, rtol=1e-10)
    np.testing.assert_allclose(stats.per_example_curvature, hessian_norms / grad_norms, rtol=1e-3)
    assert stats.hessian_norm_mean == pytest.approx(hessian_norms.mean(), rel=1e-3)
    assert stats.grad_norm_mean == pytest.approx(grad_norms.mean(), rel=1e-10)
    assert stats.grad_norm_std == pytest.approx(grad_norms.std(), rel=1e-8)
    assert stats.curvature_mean == pytest.approx(np.mean(stats.per_example_curvature), rel=1e-12)
    assert stats.curvature_std == pytest.approx(np.std(stats.per_example_curvature), rel=1e-12)

    summary = stats.to_dict()
    assert "per_example_curvature" not in summary and summary["num_examples"] == 6
    json.dumps(summary)


def test_relu_model_is_measured_through_softplus_stand_in(digits):
    images, labels = digits[0][:16], digits[1][:16]
    model = small_conv_net()
    before = {key: value.clone() for key, value in model.state_dict().items()}

    stats = estimate_curvature(model, (images, labels), iterations=5)
    assert estimate_curvature(model, (images, labels), iterations=5) == stats  # seeded: deterministic
    assert stats.relu_stand_in_beta == 1000.0
    assert stats.curvature_mean > 0 and stats.hessian_norm_mean > 0

    stand_in = relu_stand_in(model)
    assert not any(isinstance(module, nn.ReLU) for module in stand_in.modules())
    softplus = [module for module in stand_in.modules() if isinstance(module, CenteredSoftplus)]
    assert len(softplus) == 2
    assert all(float(module.beta) == pytest.approx(1000.0) for module in softplus)
    assert not any(parameter.requires_grad for module in softplus for parameter in module.parameters())
    with torch.no_grad():
        torch.testing.assert_close(stand_in(images), model(images), atol=1e-2, rtol=0)

    # The original is untouched: same modules, same values.
    assert sum(isinstance(module, nn.ReLU) for module in model.modules()) == 2
    assert not any(isinstance(module, CenteredSoftplus) for module in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_functional_and_inplace_relus_get_the_stand_in(digits):
    images, labels = digits[0][:8], digits[1][:8]
    model = randomize_batchnorms(SmallDigitsNet())  # nn.ReLU(inplace=True) and torch.relu
    stand_in = relu_stand_in(model, beta=500.0)
    graph_targets = [node.target for node in stand_in.graph.nodes]
    assert torch.relu not in graph_targets
    assert sum(isinstance(module, CenteredSoftplus) for module in stand_in.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(stand_in(images), model(images), atol=1e-2, rtol=0)
    assert estimate_curvature(model, (images, labels), iterations=3, relu_beta=500.0).relu_stand_in_beta == 500.0


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the stand-in swaps modules."""

    def __init__(self) -> None:
        super().__init__()
        self.body = small_conv_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            return self.body(x)
        return -self.body(x)


def test_untraceable_relu_model_falls_back_to_module_swap(digits):
    images, labels = digits[0][:8], digits[1][:8]
    model = Untraceable().eval()
    stand_in = relu_stand_in(model)
    assert isinstance(stand_in, Untraceable)
    assert sum(isinstance(module, CenteredSoftplus) for module in stand_in.modules()) == 2
    stats = estimate_curvature(model, (images, labels), iterations=3)
    assert stats.relu_stand_in_beta == 1000.0 and stats.curvature_mean > 0


def test_relu_inside_leaf_norm_act_module_gets_the_stand_in():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(1, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU), nn.Flatten(), nn.Linear(36, 3))
    stand_in = relu_stand_in(randomize_batchnorms(model))
    assert not any(isinstance(module, nn.ReLU) for module in stand_in.modules())
    assert sum(isinstance(module, CenteredSoftplus) for module in stand_in.modules()) == 1


def test_six_lanczos_steps_measure_what_ten_power_steps_do(digits):
    """The default estimator (6 Lanczos steps from the gradient) against the reference (10 power
    steps from a random vector) and against both run to convergence, on a converted conv net."""
    images, labels = digits[0][:32], digits[1][:32]
    converted = lc.convert(small_conv_net(), images[:8], beta=20.0)
    default = estimate_curvature(converted, (images, labels))
    reference = estimate_curvature(converted, (images, labels), iterations=10, method="power")
    converged = estimate_curvature(converted, (images, labels), iterations=40)
    assert default.curvature_mean == pytest.approx(reference.curvature_mean, rel=0.05)
    # Neither over-estimates the norm it approaches from below.
    assert default.curvature_mean <= converged.curvature_mean * (1 + 1e-6)
    assert reference.curvature_mean <= converged.curvature_mean * (1 + 1e-6)
    with pytest.raises(ValueError, match="method"):
        estimate_curvature(converted, (images, labels), method="exact")


def test_converted_model_is_measured_as_is(digits):
    images, labels = digits[0][:16], digits[1][:16]
    converted = lc.convert(small_conv_net(), images[:8], beta=20.0)
    stats = estimate_curvature(converted, (images, labels), iterations=5)
    assert stats.relu_stand_in_beta is None
    assert stats.curvature_mean > 0


def test_lower_beta_gives_lower_curvature(digits):
    images, labels = digits[0][:32], digits[1][:32]
    converted = lc.convert(small_conv_net(), images[:8], beta=100.0)
    sites = [module for module in converted.modules() if isinstance(module, CenteredSoftplus)]
    assert len(sites) == 2

    def mean_curvature(beta: float) -> float:
        for site in sites:
            site.set_beta(beta)
        return estimate_curvature(converted, (images, labels), iterations=10).curvature_mean

    assert mean_curvature(1.0) < mean_curvature(100.0)


def pixels(images: torch.Tensor) -> torch.Tensor:
    return images * DIGITS_STD[0] + DIGITS_MEAN[0]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_budget_and_in_image_range(norm, digits, trained_digits_net):
    images, labels = digits[0][1400:1464], digits[1][1400:1464]
    eps = 0.1 if norm == "linf" else 1.0
    adversarial = pgd_attack(trained_digits_net, images, labels, norm, eps, 5, None, DIGITS_MEAN, DIGITS_STD)
    assert adversarial.shape == images.shape
    perturbation = (pixels(adversarial) - pixels(images)).flatten(1)
    if norm == "linf":
        assert perturbation.abs().max() <= eps + 1e-6
        assert perturbation.abs().max() >= 0.9 * eps  # the attack moves; the sign steps reach the boundary
    else:
        assert perturbation.norm(dim=1).max() <= eps + 1e-5
        assert perturbation.norm(dim=1).max() >= 0.5 * eps
    assert pixels(adversarial).min() >= -1e-6 and pixels(adversarial).max() <= 1 + 1e-6

    again = pgd_attack(trained_digits_net, images, labels, norm, eps, 5, None, DIGITS_MEAN, DIGITS_STD)
    assert torch.equal(adversarial, again)


def test_pgd_lowers_accuracy_and_eps_zero_changes_nothing(digits, trained_digits_net):
    test_set = (digits[0][1400:], digits[1][1400:])
    in_train_mode = copy.deepcopy(trained_digits_net).train()
    clean = evaluate_accuracy(in_train_mode, test_set, max_examples=128)
    assert in_train_mode.training and clean == evaluate_accuracy(trained_digits_net, test_set, max_examples=128)
    options = dict(mean=DIGITS_MEAN, std=DIGITS_STD, max_examples=128, batch_size=128)

    assert adversarial_accuracy(trained_digits_net, test_set, "linf", eps=0.0, steps=3, **options) == clean
    assert adversarial_accuracy(trained_digits_net, test_set, "l2", eps=0.0, steps=3, **options) == clean
    strong_linf = adversarial_accuracy(trained_digits_net, test_set, "linf", eps=0.3, steps=10, **options)
    strong_l2 = adversarial_accuracy(trained_digits_net, test_set, "l2", eps=3.0, steps=10, **options)
    assert strong_linf < clean - 0.3 and strong_l2 < clean - 0.3, (clean, strong_linf, strong_l2)

    defaults = adversarial_accuracy(trained_digits_net, test_set, "linf", **options)
    explicit = adversarial_accuracy(trained_digits_net, test_set, "linf", **PGD_DEFAULTS["linf"], **options)
    assert defaults == explicit <= clean


def test_evaluate_accuracy_on_tensors_and_datasets(digits, trained_digits_net):
    images, labels = digits[0][1400:1500], digits[1][1400:1500]
    with torch.no_grad():
        correct = (trained_digits_net(images).argmax(1) == labels).float()
    on_tensors = evaluate_accuracy(trained_digits_net, (images, labels), batch_size=32)
    assert on_tensors == pytest.approx(float(correct.mean()))
    assert evaluate_accuracy(trained_digits_net, TensorDataset(images, labels), batch_size=32) == on_tensors
    assert evaluate_accuracy(trained_digits_net, PairDataset(images, labels)) == on_tensors
    first_ten = evaluate_accuracy(trained_digits_net, PairDataset(images, labels), max_examples=10, batch_size=3)
    assert first_ten == pytest.approx(float(correct[:10].mean()))
    with pytest.raises(ValueError, match="no examples"):
        evaluate_accuracy(trained_digits_net, (images[:0], labels[:0]))


def test_a_models_metrics_round_trip_through_their_dict(digits, trained_digits_net):
    """report.json's and the checkpoint's form of ModelMetrics; the per-example curvatures travel apart."""
    images, labels = digits[0][1400:1432], digits[1][1400:1432]
    metrics = measure_model(
        trained_digits_net, (images, labels), 8, {"l2": 0.5, "linf": 8 / 255}, mean=(0.5,), std=(0.5,)
    )
    assert len(metrics.curvature.per_example_curvature) == 8 and set(metrics.robustness) == {"l2", "linf"}
    assert metrics.pgd_l2_accuracy == metrics.robustness["l2"].at(0.5) is not None
    data = json.loads(json.dumps(metrics.to_dict()))
    assert "per_example_curvature" not in data and data["curvature_examples"] == 8
    assert ModelMetrics.from_dict(data, metrics.curvature.per_example_curvature) == metrics
    # a checkpoint written before the confidence was measured still loads
    del data["confidence"]
    assert ModelMetrics.from_dict(data, metrics.curvature.per_example_curvature).confidence is None


def test_confidence_is_the_mean_top1_probability(digits, trained_digits_net):
    images, labels = digits[0][1400:1464], digits[1][1400:1464]
    with torch.no_grad():
        expected = float(trained_digits_net.eval()(images).softmax(1).amax(1).mean())
    accuracy, confidence = accuracy_and_confidence(trained_digits_net, (images, labels), batch_size=24)
    assert confidence == pytest.approx(expected, rel=1e-5)
    assert accuracy == evaluate_accuracy(trained_digits_net, (images, labels))


def test_confidence_matching_scale_reaches_the_target():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0)) * 3
    for target in (0.15, 0.5, 0.99):
        scale = confidence_matching_scale(logits, target)
        assert float((logits * scale).softmax(1).amax(1).mean()) == pytest.approx(target, abs=1e-6)


def test_a_less_confident_model_has_the_originals_curvature_at_the_originals_confidence(digits, trained_digits_net):
    """The same predictions, less sure: the curvature falls, and scaling the logits back to the
    original's confidence gives the original's curvature again, which is why the report shows it."""
    data = (digits[0][1400:1464], digits[1][1400:1464])
    budgets = {"l2": 0.5, "linf": 8 / 255}
    original = measure_model(trained_digits_net, data, 16, budgets, mean=(0.5,), std=(0.5,))
    assert original.curvature_at_original_confidence == original.curvature.curvature_mean
    unsure = measure_model(
        ScaledLogits(trained_digits_net, 0.25),
        data,
        16,
        budgets,
        mean=(0.5,),
        std=(0.5,),
        original_confidence=original.confidence,
    )
    assert unsure.accuracy == original.accuracy and unsure.confidence < original.confidence - 0.1
    assert unsure.curvature.curvature_mean < 0.8 * original.curvature.curvature_mean
    assert unsure.curvature_at_original_confidence == pytest.approx(original.curvature.curvature_mean, rel=1e-3)
