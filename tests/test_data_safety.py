"""Nothing a user owns is ever lost, and no input ends in a traceback (the data-safety issue).

Each test stands for a class of inputs or faults, met where the user meets it: through the CLI,
with real subprocesses for signals, locks and file size limits.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lcnn_convert as lc
from lcnn_convert.io import LOCK_FILE, MARKER_FILE, STAGING_DIR, OutputDirectory

from .conftest import assert_one_line_error, fake_earlier_output, snapshot

TINY = ("resnet18", "--no-pretrained", "--num-classes", "10", "--image-size", "16")
FAST = ("resnet18", "--no-pretrained", "--image-size", "16", "--batch-size", "256", "--eval-examples", "16")
OUTPUTS = ["model.onnx", "model.safetensors", "report.json"]


def console_script(*args) -> list[str]:
    return [str(Path(sys.executable).parent / "lcnn-convert"), *map(str, args)]


def visible(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if not path.name.startswith("."))


# --- 1. data loss and races ------------------------------------------------------------------


def test_overwrite_refuses_directories_lcnn_convert_did_not_write(cli, tmp_path, monkeypatch):
    project = tmp_path / "myproject"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("print('my code')")
    (project / "notes.md").write_text("my notes")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    for output, directory in ((".", project), ("~", home), (str(project / "src"), project / "src")):
        before = {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()}
        result = cli(*TINY, "-o", output, "--overwrite")
        assert_one_line_error(result, "lcnn-convert did not write", "choose another -o")
        assert {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()} == before
        assert not (directory / LOCK_FILE).exists() and not (directory / STAGING_DIR).exists()


def test_an_earlier_output_is_replaced_only_by_a_complete_one_and_the_users_files_stay(cli, tmp_path):
    out = tmp_path / "out"
    earlier = fake_earlier_output(out, extra={"curvature.png": b"earlier plot"})
    (out / "my-notes.txt").write_text("about the earlier run")
    # NaN at the first steps: the run fails after claiming the dir; the earlier output stays whole.
    result = cli(*FAST, "--finetune", "digits", "--lr", "1e9", "-o", out, "--overwrite")
    assert_one_line_error(result, "loss became")
    assert snapshot(out) == {**earlier, "my-notes.txt": b"about the earlier run"}
    assert not (out / STAGING_DIR).exists()  # no checkpoint was written, so nothing to keep for --resume
    result = cli(*TINY, "-o", out, "--overwrite")
    assert result.code == 0, result.err
    assert visible(out) == ["model.onnx", "model.safetensors", "my-notes.txt", "report.json"]  # the old plot is gone
    assert json.loads((out / MARKER_FILE).read_text())["files"] == OUTPUTS


def test_an_interrupted_fine_tuning_run_is_not_replaced_without_overwrite(cli, tmp_path):
    out = tmp_path / "out"
    (out / STAGING_DIR).mkdir(parents=True)
    (out / STAGING_DIR / "checkpoint.pt").write_bytes(b"an interrupted run's checkpoint")
    for args in (TINY, (*FAST, "--finetune", "digits")):
        assert_one_line_error(cli(*args, "-o", out), "holds an interrupted fine-tuning run", "--resume", "--overwrite")
        assert (out / STAGING_DIR / "checkpoint.pt").read_bytes() == b"an interrupted run's checkpoint"
    assert_one_line_error(cli(*TINY, "-o", out, "--resume"), "--resume continues a --finetune run")


HOLDER = textwrap.dedent(
    """
    import json, sys
    from lcnn_convert.io import OutputDirectory
    directory = OutputDirectory.open(sys.argv[1], resumable=True, resume_file="checkpoint.pt")
    (directory.staging / "checkpoint.pt").write_bytes(b"live run's checkpoint")
    if len(sys.argv) > 2:  # pretend to be a run in another container / on another host
        lock = directory.path / ".lcnn-convert.lock"
        lock.write_text(json.dumps({"pid": 999999999, "host": sys.argv[2], "started": "then", "command": "theirs"}))
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes stdin
    """
)


@pytest.mark.parametrize("elsewhere", [None, "other-container"], ids=["same host", "another PID namespace"])
def test_a_second_run_refuses_while_another_holds_the_directory(cli, tmp_path, elsewhere):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), *([elsewhere] if elsewhere else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        for extra in ((), ("--overwrite",)):
            result = cli(*TINY, "-o", out, *extra)
            assert_one_line_error(result, "in use by another lcnn-convert run", elsewhere or f"pid {holder.pid}")
        result = cli(*FAST, "--finetune", "digits", "-o", out, "--resume")
        assert_one_line_error(result, "in use by another lcnn-convert run")
        # The live run's work was not taken for stale: its pid means nothing here, its lock does.
        assert (out / STAGING_DIR / "checkpoint.pt").read_bytes() == b"live run's checkpoint"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    # Once the holder is gone its lock is gone with it, whatever its pid was: the dir can be claimed.
    with OutputDirectory.open(out, overwrite=True, resumable=True, resume_file="checkpoint.pt") as claimed:
        assert claimed.staging.is_dir()


@pytest.mark.slow
def test_two_runs_started_together_one_wins_one_refuses(tmp_path):
    out = tmp_path / "out"
    runs = [
        subprocess.Popen(console_script(*TINY, "-o", out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "in use by another lcnn-convert run" in loser and "Traceback" not in loser
    assert visible(out) == OUTPUTS


def test_symlinked_output_and_mount_point_are_written_where_they_point(cli, tmp_path, monkeypatch):
    target = tmp_path / "volume"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    result = cli(*TINY, "-o", link)
    assert result.code == 0, result.err
    assert link.is_symlink() and visible(target) == OUTPUTS
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link", "volume"]  # nothing left beside

    # A mount point cannot be renamed or removed (EBUSY): the run must never try. Where the test
    # may mount a tmpfs it is real; elsewhere every rename/rmdir of the directory itself fails.
    mount = tmp_path / "mount"
    mount.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount)], capture_output=True).returncode == 0
    )
    try:
        if not mounted:

            def busy_if_mount(function):
                def guarded(*paths, **kwargs):
                    if any(Path(path) == mount for path in paths):
                        raise OSError(16, "Device or resource busy", str(mount))
                    return function(*paths, **kwargs)

                return guarded

            for name in ("rename", "replace", "rmdir"):
                monkeypatch.setattr(os, name, busy_if_mount(getattr(os, name)))
        inode = mount.stat().st_ino
        result = cli(*TINY, "-o", mount)
        assert result.code == 0, result.err
        assert mount.stat().st_ino == inode and visible(mount) == OUTPUTS
        result = cli(*TINY, "-o", mount, "--overwrite")
        assert result.code == 0, result.err
        assert mount.stat().st_ino == inode and visible(mount) == OUTPUTS
    finally:
        monkeypatch.undo()
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link", "mount", "volume"]


@pytest.mark.slow
def test_resume_refuses_other_settings_and_continues_with_the_same(cli, tmp_path):
    out = tmp_path / "out"
    args = (*FAST, "--finetune", "digits", "--epochs", "1", "--max-steps", "2", "-o", out)
    assert cli(*args).code == 0
    finished = snapshot(out)
    changes = [
        (("--image-size", "32"), ["--image-size 16 then, 32 now"]),
        (("--lr", "0.5"), ["--lr 0.01 then, 0.5 now"]),
        (("--beta", "2"), ["--beta 'auto' then, 2.0 now"]),
        (("--mean", "0.5", "0.5", "0.5"), ["--mean"]),
        (("--eval-examples", "32"), ["--eval-examples 16 then, 32 now"]),
        (("--grad-norm", "0.1"), ["--grad-norm 0.0 then, 0.1 now"]),
        (("--seed", "3"), ["--seed 0 then, 3 now"]),
    ]
    for extra, fragments in changes:
        result = cli(*args, *extra, "--resume")
        assert_one_line_error(result, "cannot resume", *fragments)
        assert snapshot(out) == finished, extra
    resumed = cli(*args, "--resume", "--json")  # a finished run: re-measured, the same result
    assert resumed.code == 0, resumed.err
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"] == json.loads(finished["report.json"])["metrics"]
    assert (out / "model.safetensors").read_bytes() == finished["model.safetensors"]


# --- 2. tracebacks that become one line -------------------------------------------------------


def test_batches_of_one_image_train(tmp_path):
    from torch.utils.data import TensorDataset

    from lcnn_convert.finetune import FinetuneConfig, finetune

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(5, 3, 16, 16, generator=generator), torch.tensor([0, 1, 2, 3, 4]))
    # a BatchNorm on a 1x1 feature map, as at the end of a resnet at small sizes
    original = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.BatchNorm2d(8),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()
    model = lc.convert(original, beta=5.0)
    for batch_size in (4, 1):  # 5 = 4 + 1: a last batch of one; and batch size 1 throughout
        result = finetune(model, data, data, FinetuneConfig(epochs=1, batch_size=batch_size, lr=1e-3))
        assert result.steps == (2 if batch_size == 4 else 5)
        assert all(np.isfinite(loss) for loss in result.step_log["loss"])


@pytest.mark.slow
def test_batch_size_one_through_the_cli(cli, tmp_path):
    result = cli(*FAST, "--finetune", "digits", "--batch-size", "1", "--max-steps", "3", "-o", tmp_path / "out")
    assert result.code == 0, result.err


def test_models_that_cannot_take_the_datasets_size_fail_before_any_work(cli, tmp_path):
    result = cli("torchvision:alexnet", "--no-pretrained", "--finetune", "digits", "-o", tmp_path / "out")
    assert_one_line_error(result, "does not run at 32x32", "--image-size")
    assert "measure the original" not in result.err and not (tmp_path / "out").exists()


def test_out_of_memory_anywhere_is_one_line(cli, tmp_path, monkeypatch):
    import lcnn_convert.pipeline

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(lcnn_convert.pipeline, "_measure", exhausted)
    result = cli(*FAST, "--eval", "digits", "-o", tmp_path / "out")
    assert_one_line_error(result, "out of memory", "Tried to allocate 20.00 GiB", "--batch-size")
    assert not (tmp_path / "out").exists()


def write_limited(args, limit_bytes: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run the console script with a file size limit: every write past it fails with EFBIG, as on a full disk."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(console_script(*args), capture_output=True, text=True, cwd=cwd, preexec_fn=limit, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("finetune", [False, True], ids=["export", "first checkpoint"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, finetune):
    out = tmp_path / "out"
    args = (*FAST, "--finetune", "digits", "--max-steps", "1") if finetune else TINY
    result = write_limited((*args, "-o", out), 4 << 20, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0], result.stderr
    assert not out.exists() or not visible(out)
    assert not (out / STAGING_DIR).exists() or not any((out / STAGING_DIR).iterdir())


def test_damaged_lcnn_metadata_and_checkpoints_are_one_line(cli, tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    for metadata, message in (
        ("{not json", "not JSON"),
        (json.dumps({"format": 1, "name": "resnet18", "num_classes": 10, "replace_activations": True}), "'source'"),
        (json.dumps([1, 2]), "not a JSON object"),
    ):
        save_file({"x": torch.zeros(1)}, str(weights), metadata={"lcnn_convert": metadata})
        with pytest.raises(lc.LcnnError, match=message):
            lc.load(weights)
    out = tmp_path / "out"
    (out / STAGING_DIR).mkdir(parents=True)
    for content, message in (
        (torch.zeros(3), "holds a Tensor, not a training checkpoint"),
        ({"model": {}}, "not a training checkpoint of lcnn-convert"),
    ):
        torch.save(content, out / STAGING_DIR / "checkpoint.pt")
        assert_one_line_error(
            cli(*FAST, "--finetune", "digits", "-o", out, "--resume"), "cannot read checkpoint", message
        )


def test_ctrl_c_while_importing_is_one_line(tmp_path):
    for delay in (0.3, 1.0, 2.0):
        process = subprocess.Popen(console_script(*TINY, "-o", tmp_path / "out"), stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)"), err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_signal_during_the_stage_imports_waits_for_them_then_ends_in_one_line(number):
    """A KeyboardInterrupt inside a native extension's import can abort the process (pybind11):
    the signal is held until the imports are done, then the run stops as usual."""
    import os

    from lcnn_convert.cli import _imports_held
    from lcnn_convert.errors import Interrupted

    before = signal.getsignal(number)
    finished = False
    with pytest.raises(Interrupted) as caught:
        with _imports_held():
            os.kill(os.getpid(), number)
            time.sleep(0.05)  # a signal's handler runs between bytecodes: it has run by now
            finished = True
    assert finished and caught.value.exit_code == 128 + number
    assert str(caught.value).startswith("interrupted (Ctrl-C)" if number == signal.SIGINT else "terminated (SIGTERM)")
    assert signal.getsignal(number) is before


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_stopped_finetune_says_what_is_kept_and_resumes(tmp_path, stop):
    out = tmp_path / "out"
    args = (*FAST, "--finetune", "digits", "--epochs", "3", "-o", out)
    # A job started in the background by a non-interactive shell inherits SIGINT ignored, and Python
    # then keeps it ignored: give the child the default disposition, as a terminal would.
    process = subprocess.Popen(
        console_script(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("epoch 1:"):  # printed right before the epoch's checkpoint is written
            time.sleep(0.5)
            process.send_signal(stop)
            break
    lines += process.stderr.readlines()
    process.wait(timeout=120)
    err = "".join(lines)
    assert process.returncode == 128 + stop and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    expected = "interrupted (Ctrl-C)" if stop == signal.SIGINT else "terminated (SIGTERM)"
    assert last.startswith(expected) and re.search(r"\(epoch [12]\)", last) and "--resume" in last, last
    assert not visible(out) and (out / STAGING_DIR / "checkpoint.pt").is_file()
    resumed = subprocess.run(console_script(*args, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr and not (out / STAGING_DIR).exists()


# --- 3. silent corruption and silent changes ---------------------------------------------------


def image_folder(root: Path, images: dict[str, list[Image.Image]]) -> Path:
    for split in ("train", "val"):
        for label, pictures in images.items():
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for index, picture in enumerate(pictures):
                picture.save(root / split / label / f"{index}.png")
    return root


def test_sixteen_bit_images_are_decoded_not_clipped(tmp_path):
    from lcnn_convert.data import read_image

    values = np.array([[0, 257 * 50], [257 * 128, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    decoded = np.asarray(read_image(str(path)))
    assert decoded.shape == (2, 2, 3) and decoded[..., 0].tolist() == [[0, 50], [128, 255]]


def test_decompression_bombs_are_refused_in_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32)  # the same check as for a 13500x13500 PNG, small
    root = image_folder(
        tmp_path / "data",
        {label: [Image.new("RGB", (16, 16), label_colour)] for label, label_colour in (("a", "red"), ("b", "blue"))},
    )
    Image.new("L", (200, 200)).save(root / "val" / "a" / "bomb.png")
    result = cli(*FAST, "--eval", f"folder:{root}", "-o", tmp_path / "out")
    assert_one_line_error(result, "bomb.png", "decompression bomb")
    assert not (tmp_path / "out").exists()


def test_a_directory_loop_is_not_followed(tmp_path):
    from lcnn_convert.data import load_dataset

    root = image_folder(
        tmp_path / "data",
        {label: [Image.new("RGB", (8, 8), colour)] * 3 for label, colour in (("a", "red"), ("b", "blue"))},
    )
    (root / "train" / "a" / "loop").symlink_to(root / "train" / "a", target_is_directory=True)
    (root / "train" / "b" / "up").symlink_to(root / "train", target_is_directory=True)
    splits = load_dataset(f"folder:{root}", image_size=8)
    assert len(splits.train) == 6 + 3  # b/up/a holds a's three images once, b/up/b is b itself again


def test_a_single_class_dataset_is_refused(tmp_path):
    from lcnn_convert.data import load_dataset

    root = image_folder(tmp_path / "data", {"only": [Image.new("RGB", (8, 8))] * 2})
    with pytest.raises(lc.LcnnError, match="has 1 class.*at least 2"):
        load_dataset(f"folder:{root}", image_size=8)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    from lcnn_convert.cli import main

    out = tmp_path_factory.mktemp("written") / "out"
    old = os.umask(0o022)
    try:
        assert main([*TINY, "-o", str(out)]) == 0
    finally:
        os.umask(old)
    return out


def copy_of(written: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(written, tmp_path / "copy"))


def test_every_output_respects_the_umask(written, tmp_path):
    modes = {path.name: path.stat().st_mode & 0o777 for path in written.iterdir() if path.is_file()}
    assert set(modes.values()) == {0o644}, modes
    from lcnn_convert.io import atomic_file

    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "x.bin") as temporary:
            temporary.write_bytes(b"x")
            os.chmod(temporary, 0o600)  # whatever the writer does
    finally:
        os.umask(old)
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o640


def test_verify_checks_report_json_and_catches_flipped_bits(cli, written, tmp_path):
    assert cli("verify", written).code == 0
    out = copy_of(written, tmp_path)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for offset in range(header, header + 200 * 4, 4):  # the lowest mantissa bit of 200 float32 weights
        data[offset] ^= 1
    weights.write_bytes(bytes(data))
    assert_one_line_error(cli("verify", out), "model.safetensors has changed")
    (out / "report.json").write_text('{"checksums": ')
    assert_one_line_error(cli("verify", out), "report.json is unreadable or damaged")
    (out / "report.json").unlink()
    assert_one_line_error(cli("verify", out), "no report.json")
    assert_one_line_error(cli("verify", out, "--num-inputs", str(10**9)), "--num-inputs", "less than or equal to 10000")


# --- 4. the Python API checks its arguments ----------------------------------------------------


def test_convert_checks_its_arguments():
    model = lc.load_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(
        TypeError, match=r"nn.Module, got str; load one by name with lcnn_convert.load_model\('resnet18'\)"
    ):
        lc.convert("resnet18")
    with pytest.raises(TypeError, match="torch.Tensor.*numpy.ndarray; convert it with torch.from_numpy"):
        lc.convert(model, np.zeros((4, 3, 16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        lc.convert(model, torch.zeros(0, 3, 16, 16))
    with pytest.raises(TypeError, match="must hold torch.Tensors"):
        lc.convert(model, [torch.zeros(2, 3, 16, 16), "x"])
    with pytest.raises(lc.LcnnError, match="beta must be"):
        lc.convert(model, beta=float("inf"))

    class Segmenter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(self.conv(x)))

    with pytest.raises(ValueError, match=r"returns \[4, 4, 16, 16\], not \[batch, classes\] logits"):
        lc.convert(Segmenter().eval(), torch.randn(4, 3, 16, 16))
    assert lc.convert(Segmenter().eval(), torch.randn(4, 3, 16, 16), beta=10.0) is not None
