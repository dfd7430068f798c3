from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from lcnn_convert.cli import main


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine weights, as a trained model would have."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
                if module.affine:
                    module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                    module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def offline(monkeypatch):
    """Weight downloads fail as they do without a network, whether or not this machine has one
    or a cache of the weights: torchvision's and timm's fetches raise URLError."""
    import urllib.error

    import timm.models._builder
    import torchvision.models._api

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (a test's offline fixture)")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", unreachable)
    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        # raising=False: a timm that no longer has one of these fetches the weights another way
        # (test_models.py's timm case then says so by not failing as offline)
        monkeypatch.setattr(timm.models._builder, name, unreachable, raising=False)


@pytest.fixture
def cli(capsys):
    """Run lcnn-convert in-process, the way the console script does."""

    def run(*args: str) -> CliResult:
        code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_console_script(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "lcnn-convert"
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def fake_earlier_output(directory: Path, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """What an earlier lcnn-convert run leaves (its marker names its files), without running one."""
    import json

    files = {
        "model.onnx": b"earlier onnx",
        "model.safetensors": b"earlier weights",
        "report.json": b'{"lcnn_convert_version": "0.1.0"}',
        **(extra or {}),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    (directory / ".lcnn-convert").write_text(json.dumps({"written_by": "lcnn-convert", "files": sorted(files)}))
    return snapshot(directory)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every visible file under ``directory`` and its bytes."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    }


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    assert result.code != 0
    assert "Traceback" not in result.err
    lines = [line for line in result.error_lines if line.startswith("error:")]
    assert len(lines) == 1, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


class SmallDigitsNet(nn.Module):
    """A conv-BN-ReLU classifier small enough to train on 8x8 digits in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.tensor(data.target)


@pytest.fixture(scope="session")
def trained_digits_net(digits) -> SmallDigitsNet:
    images, labels = digits
    torch.manual_seed(0)
    model = SmallDigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(6):
        for batch in torch.randperm(1400).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[1400:]).argmax(1) == labels[1400:]).float().mean().item()
    assert accuracy > 0.9, accuracy
    return model


# Real architectures trained on digits the way the pipeline feeds them (its own preprocessing), as
# stand-ins for downloaded pretrained models: name -> (image size, epochs). densenet121 needs 32x32.
DIGITS_MODELS = {"torchvision:resnet18": (16, 10), "timm:resnet18": (16, 6), "torchvision:densenet121": (32, 5)}
# A model without ReLUs (SiLU everywhere, sigmoid squeeze-excite gates): 98.06% after 20 epochs, 205 s here.
SILU_DIGITS_MODELS = {"timm:efficientnet_b0": (32, 20)}


@dataclass
class TrainedDigitsModel:
    name: str
    model: nn.Module
    weights: Path
    image_size: int
    train_images: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    accuracy: float


def train_on_digits(name: str, image_size: int, epochs: int, directory: Path, seed: int = 0) -> TrainedDigitsModel:
    """Plain cross-entropy training of a randomly initialised NAME, saved as a state dict."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from lcnn_convert.data import load_dataset
    from lcnn_convert.models import data_config, load_model_with_spec

    torch.manual_seed(seed)
    model, spec = load_model_with_spec(name, pretrained=False, num_classes=10)
    splits = load_dataset("digits", data_config=data_config(model, spec), image_size=image_size)
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for images, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    test_images = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    test_labels = torch.tensor(splits.test.targets)
    with torch.no_grad():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    weights = directory / f"{name.replace(':', '_')}.pth"
    torch.save(model.state_dict(), weights)
    train_images = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    return TrainedDigitsModel(name, model, weights, image_size, train_images, test_images, test_labels, accuracy)


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory) -> dict[str, TrainedDigitsModel]:
    """torchvision resnet18, timm resnet18 and densenet121 trained on digits (~3 min on 2 cores), each >= 97%."""
    directory = tmp_path_factory.mktemp("digits-models")
    trained = {name: train_on_digits(name, size, epochs, directory) for name, (size, epochs) in DIGITS_MODELS.items()}
    for entry in trained.values():
        assert entry.accuracy >= 0.97, (entry.name, entry.accuracy)
    return trained
