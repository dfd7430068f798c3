"""Data-parallel fine-tuning with torchrun and gloo on 2 CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from lcnn_convert import convert
from lcnn_convert.distributed import DistributedContext
from lcnn_convert.finetune import FinetuneConfig, finetune

from .conftest import snapshot

BIN = Path(sys.executable).parent
# Same global batch and seed in both runs; DistributedSampler gives the two ranks the halves of
# the single process's batches, so only the per-rank BatchNorm batch statistics differ.
SMALL = (
    "resnet18",
    "--no-pretrained",
    "--image-size",
    "16",
    "--batch-size",
    "64",
    "--epochs",
    "2",
    "--eval-examples",
    "8",
    "--json",
)
ACCURACY_TOLERANCE = 0.05  # absolute (measured: 0.56 pt, 95.56% vs 95.00%)
LOSS_TOLERANCE = 0.05  # relative, last epoch's mean training loss (measured: 1.3%)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [
        str(BIN / "torchrun"),
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "--no-python",
        str(BIN / "lcnn-convert"),
        *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _single(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(BIN / "lcnn-convert"), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.slow
def test_two_gloo_processes_match_a_single_process_run(tmp_path):
    ddp = _torchrun(*SMALL, "--finetune", "digits", "-o", tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = _single(*SMALL, "--finetune", "digits", "-o", tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]

    names = sorted(path.name for path in (tmp_path / "ddp").iterdir() if not path.name.startswith("."))
    assert names == [
        "checkpoint.pt",
        "curvature.png",
        "model.onnx",
        "model.safetensors",
        "report.json",
        "robustness.png",
        "training.png",
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ddp", "single"]  # no other rank wrote anything
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    reference = json.loads((tmp_path / "single" / "report.json").read_text())
    assert report["parity"]["passed"]
    assert report["finetune"]["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_rank": 32}
    assert report["finetune"]["steps"] == reference["finetune"]["steps"] == 46  # 2 x ceil(1437 / 64)
    # The metrics before fine-tuning come from the same code on the same weights: identical.
    assert report["metrics"]["original"] == reference["metrics"]["original"]
    assert report["metrics"]["converted"] == reference["metrics"]["converted"]
    accuracy, reference_accuracy = (r["metrics"]["finetuned"]["accuracy"] for r in (report, reference))
    assert reference_accuracy > 0.5  # the run learned something, so the comparison means something
    assert abs(accuracy - reference_accuracy) <= ACCURACY_TOLERANCE, (accuracy, reference_accuracy)
    loss, reference_loss = (r["finetune"]["history"][-1]["loss"] for r in (report, reference))
    assert abs(loss - reference_loss) <= LOSS_TOLERANCE * reference_loss, (loss, reference_loss)
    # One JSON report on stdout: rank 1 printed nothing.
    json.loads(ddp.stdout)


def _write_folder_dataset(root: Path, per_class: int = 150) -> None:
    generator = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 4)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = generator.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                pixels[..., 0] = 255 if label == "a" else 0
                Image.fromarray(pixels).save(folder / f"{index}.png")


@pytest.mark.slow
def test_a_failing_rank_stops_the_job_and_keeps_the_last_checkpoint(tmp_path):
    data = tmp_path / "data"
    _write_folder_dataset(data)
    out = tmp_path / "out"
    common = (
        "resnet18",
        "--no-pretrained",
        "--image-size",
        "16",
        "--batch-size",
        "8",
        "--eval-examples",
        "4",
        "--finetune",
        f"folder:{data}",
        "-o",
        out,
    )
    first = _torchrun(*common, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = (out / "checkpoint.pt").read_bytes()
    before = snapshot(out)

    # One unreadable image, the last of the 300 (past the 256 read for calibration): the rank
    # whose share holds it fails mid-epoch 2, and the other one loses its peer.
    (data / "train" / "b" / "99.png").write_bytes(b"not a png")
    second = _torchrun(*common, "--epochs", "2", "--resume")
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: rank ")]
    assert any("epoch 2 stopped: cannot read train example 299" in line for line in errors), second.stderr[-3000:]
    assert any("the last good checkpoint (epoch 1) is kept" in line for line in errors)
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert snapshot(out) == before  # the finished output is as it was; the resumed run's work is staged
    assert (out / ".lcnn-partial" / "checkpoint.pt").read_bytes() == checkpoint


def _rank_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(48, 3, 8, 8, generator=generator)
        labels = torch.randint(0, 3, (48,), generator=generator)
        data = TensorDataset(images, labels)
        torch.manual_seed(0)
        converted = convert(model.eval(), images[:8], beta=5.0)
        context = DistributedContext(rank, world_size, 0, "gloo", torch.device("cpu"))
        from rich.console import Console

        config = FinetuneConfig(epochs=2, batch_size=16, lr=0.05)
        finetune(converted, data, data, config, console=Console(quiet=True), distributed=context)
        torch.save(converted.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_end_with_identical_weights_and_rank_0_running_statistics(tmp_path):
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        # parameters: DDP averages the gradients, so every rank takes the same steps; buffers
        # (running statistics): rank 0's, broadcast before each forward and after each epoch.
        assert torch.equal(rank0[key], rank1[key]), key
