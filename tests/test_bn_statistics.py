"""BatchNorm statistics: detecting untrained ones, re-estimating them, and why it matters."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from lcnn_convert import LipschitzBatchNorm, convert, recalibrate_batchnorm
from lcnn_convert.bn_statistics import has_untrained_batchnorm
from lcnn_convert.conversion.api import UNTRAINED_STATISTICS_NOTE

from .conftest import randomize_batchnorms


def _images(count: int = 64, size: int = 16, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = 2.0 + 3.0 * torch.randn(count, 3, size, size, generator=generator)
    return TensorDataset(images, torch.zeros(count, dtype=torch.long))


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_untrained_statistics_are_detected_and_estimated_as_population_averages():
    model = _small_net()
    assert has_untrained_batchnorm(model)
    assert not has_untrained_batchnorm(randomize_batchnorms(_small_net()))
    assert not has_untrained_batchnorm(nn.Sequential(nn.Linear(2, 2)))  # nothing to estimate

    data = _images()
    rng_before = torch.random.get_rng_state()
    used = recalibrate_batchnorm(model, data, batches=100, batch_size=16)
    assert used == 4  # 64 images in batches of 16: every batch, then the data ran out
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert model.training and not has_untrained_batchnorm(model)  # the caller's mode is restored
    assert model[1].momentum == 0.1 and int(model[1].num_batches_tracked) == 0

    # The first BN sees the conv output directly: its statistics are the mean of the four batch
    # statistics (each batch variance unbiased), whatever the order of the batches.
    with torch.no_grad():
        conv_out = model[0](data.tensors[0])
    batches = conv_out.split(16)
    expected_var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    expected_mean = conv_out.mean(dim=(0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, expected_var, rtol=2e-3, atol=1e-5)  # float32 averaging


def test_recalibration_keeps_dropout_off_and_is_deterministic():
    first, second = _small_net(), _small_net()
    recalibrate_batchnorm(first, _images(), batches=2, batch_size=16, seed=3)
    recalibrate_batchnorm(second, _images(), batches=2, batch_size=16, seed=3)
    assert torch.equal(first[5].running_var, second[5].running_var)
    # Dropout (p=0.5) in train mode would double the surviving activations and change what the
    # second BN sees; the second BN's statistics must match a dropout-free forward.
    third = _small_net()
    third[3] = nn.Identity()
    recalibrate_batchnorm(third, _images(), batches=2, batch_size=16, seed=3)
    torch.testing.assert_close(first[5].running_var, third[5].running_var)


def test_recalibrating_a_lipschitz_bn_keeps_its_train_mode_function_and_moves_gamma():
    layer = LipschitzBatchNorm.from_batchnorm(randomize_batchnorms(nn.BatchNorm2d(6)))
    with torch.no_grad():
        layer.log_gamma.fill_(-1.0)  # clipped: clip factor < 1
    clip_before = float(layer.clip_factor().detach())
    assert clip_before < 1
    images = _images(count=32, size=8).tensors[0][:, :1] * torch.linspace(0.5, 2, 6).view(1, 6, 1, 1)
    data = TensorDataset(images, torch.zeros(32, dtype=torch.long))
    batch = images[:16]
    layer.train()
    layer.momentum = 0.0  # a reference forward that leaves the running statistics alone
    with torch.no_grad():
        train_output = layer(batch)
    layer.momentum = 0.1
    recalibrate_batchnorm(layer, data, batches=10, batch_size=16)
    assert abs(float(layer.clip_factor().detach()) - clip_before) < 1e-5 * clip_before
    # gamma is again the eval-mode Lipschitz constant of the recalibrated layer
    assert abs(layer.lipschitz_constant() - float(layer.log_gamma.detach().exp())) < 1e-5 * layer.lipschitz_constant()
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(batch), train_output, rtol=1e-5, atol=1e-6)
    # the statistics did move (so gamma had to): otherwise this test would prove nothing
    assert abs(float(layer.log_gamma.detach()) + 1.0) > 0.05


def test_convert_notes_untrained_statistics():
    model = torchvision.models.resnet18(num_classes=4).eval()
    example = torch.randn(2, 3, 32, 32)
    assert UNTRAINED_STATISTICS_NOTE in convert(model, example, beta=10.0).conversion_report.notes
    randomize_batchnorms(model)
    assert convert(model, example, beta=10.0).conversion_report.notes == []
