"""The lcnn-convert command end to end, and every bad input the Core issue names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

import lcnn_convert as lc

from .conftest import assert_one_line_error, fake_earlier_output, run_console_script, snapshot

SMALL = ("--no-pretrained", "--num-classes", "10", "--image-size", "32")


def assert_nothing_written(parent: Path, name: str) -> None:
    leftovers = [path.name for path in parent.iterdir() if name in path.name]
    assert leftovers == [], leftovers


@pytest.mark.slow
def test_convert_writes_a_complete_output_dir_that_loads_back(tmp_path):
    out = tmp_path / "out"
    result = run_console_script("torchvision:resnet18", *SMALL, "--output", out)
    assert result.returncode == 0, result.stderr
    assert "ONNX parity" in result.stdout and "passed" in result.stdout
    assert sorted(path.name for path in out.iterdir()) == [
        ".lcnn-convert",
        ".lcnn-convert.lock",
        "model.onnx",
        "model.safetensors",
        "report.json",
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "torchvision:resnet18" and report["source"] == "torchvision"
    conversion = report["conversion"]
    assert (conversion["activations_replaced"], conversion["batchnorms_replaced"], conversion["layers_normalized"]) == (
        17,
        20,
        21,
    )
    assert conversion["method"] == "fx" and conversion["skipped"] == [] and conversion["curvature_bound"] > 0
    parity = report["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= parity["atol"] == 1e-4 and parity["top1_agreement"] == 1.0
    assert parity["num_inputs"] == 16 and 0 <= parity["max_rel_diff"] < 1e-4
    assert isinstance(parity["near_ties"], int) and 0 <= parity["near_ties"] <= parity["num_inputs"]
    model = lc.load(out)
    x = torch.randn(2, 3, 32, 32)
    result = lc.verify_onnx(model, out / "model.onnx", x)
    assert result.passed and result.max_abs_diff <= 1e-4
    assert not list(tmp_path.glob(".*"))


@pytest.mark.slow
def test_timm_model_with_weights_json_output_and_overwrite(tmp_path, cli):
    state = torchvision.models.resnet18(num_classes=4).state_dict()
    weights = tmp_path / "mine.pth"
    torch.save({"state_dict": state}, weights)
    out = tmp_path / "out"
    fake_earlier_output(out, extra={"training.png": b"an earlier fine-tuning run's plot"})
    (out / "notes.txt").write_text("the user's own notes")
    result = cli(
        "resnet18", "--weights", weights, "--image-size", "32", "--beta", "20", "-o", out, "--overwrite", "--json"
    )
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["num_classes"] == 4 and report["weights"] == str(weights) and not report["pretrained"]
    assert report["conversion"]["beta"]["mode"] == "fixed" and report["conversion"]["beta"]["mean"] == pytest.approx(
        20, rel=1e-5
    )
    # the earlier output's files are replaced or gone; what lcnn-convert did not write stays
    assert not (out / "training.png").exists() and (out / "model.onnx").stat().st_size > 1000
    assert (out / "notes.txt").read_text() == "the user's own notes"
    assert json.loads((out / ".lcnn-convert").read_text())["files"] == [
        "model.onnx",
        "model.safetensors",
        "report.json",
    ]
    result = cli("timm:resnet18", *SMALL, "-o", tmp_path / "timm")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "timm" / "report.json").read_text())["source"] == "timm"


@pytest.mark.slow
def test_verify_subcommand_passes_then_catches_tampering(tmp_path, cli):
    out = tmp_path / "out"
    assert cli("resnet18", *SMALL, "-o", out).code == 0
    result = cli("verify", out)
    assert result.code == 0 and "parity passed" in result.out and "(onnxruntime)" in result.out
    # the same file and gates in a second, independent runtime
    result = cli("verify", out, "--runtime", "openvino")
    assert result.code == 0 and "parity passed" in result.out and "(openvino)" in result.out, result.err
    onnx_bytes = (out / "model.onnx").read_bytes()
    (out / "model.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    assert_one_line_error(cli("verify", out), "model.onnx")
    (out / "model.onnx").write_bytes(onnx_bytes)
    weights = bytearray((out / "model.safetensors").read_bytes())
    weights[-4000:] = bytes(4000)  # zero the last tensor's values
    (out / "model.safetensors").write_bytes(bytes(weights))
    assert_one_line_error(cli("verify", out), "model.safetensors has changed since lcnn-convert wrote it")
    # With the checksum recorded anew (an edited report), parity itself still catches the change.
    from lcnn_convert.artifacts import checksum

    report = json.loads((out / "report.json").read_text())
    report["checksums"]["model.safetensors"] = checksum(out / "model.safetensors")
    (out / "report.json").write_text(json.dumps(report))
    assert_one_line_error(cli("verify", out), "ONNX parity failed in onnxruntime")
    assert_one_line_error(cli("verify", out, "--runtime", "openvino"), "ONNX parity failed in openvino")


def test_verify_checks_its_arguments(tmp_path, cli):
    assert_one_line_error(cli("verify", tmp_path / "missing"), "does not exist")
    (tmp_path / "file").write_text("")
    assert_one_line_error(cli("verify", tmp_path / "file"), "is a file")
    assert_one_line_error(cli("verify", tmp_path, "--num-inputs", "0"), "greater than or equal to 1")
    assert_one_line_error(cli("verify", tmp_path, "--num-inputs", "10001"), "less than or equal to 10000")
    assert_one_line_error(cli("verify", tmp_path, "--runtime", "tensorrt"), "'tensorrt' is not one of")


def test_verify_in_a_runtime_that_is_not_installed_says_what_to_install(tmp_path, cli, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name, *a)
    )
    assert_one_line_error(cli("verify", tmp_path, "--runtime", "openvino"), 'pip install "lcnn-convert[openvino]"')


def test_help_explains_the_main_form():
    result = run_console_script("--help")
    assert result.returncode == 0 and "lcnn-convert MODEL [OPTIONS]" in result.stdout
    result = run_console_script("convert", "--help")
    assert result.returncode == 0
    for option in (
        "--weights",
        "--no-pretrained",
        "--num-classes",
        "--beta",
        "--image-size",
        "--output",
        "--overwrite",
        "--opset",
        "--device",
        "--calibrate",
        "--calibration-examples",
        "--min-agreement",
        "--mean",
        "--std",
        "--interpolation",
    ):
        assert option in result.stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["-o", "{out}", "--no-pretrained", "--image-size", "32", "resnt18"], ["unknown model 'resnt18'"]),
        (
            ["--no-pretrained", "--beta", "0", "-o", "{out}", "resnet18", "--image-size", "32"],
            ["--beta must be 'auto'"],
        ),
        (["--frobnicate", "resnet18"], ["No such option: --frobnicate"]),
    ],
    ids=["all options first", "options on both sides", "unknown option first"],
)
def test_options_may_come_before_the_model(args, fragments, cli, tmp_path):
    out = tmp_path / "out"
    result = cli(*[arg.format(out=out) for arg in args])
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_help_and_usage_errors_import_no_torch():
    """--help and a usage error answer without importing torch (3 s of a cold start on 2 cores)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from lcnn_convert.cli import main\n"
        "codes = [main(['--help']), main(['convert', '--help']), main(['resnet18', '--frobnicate'])]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 2] False"


def test_every_module_imports_first():
    """Any module of the package can be the first one a user imports (a cycle such as fidelity ->
    conversion -> fidelity only fails when the cycle's other end is imported first)."""
    import subprocess
    import sys

    probe = (
        "import importlib, pkgutil, sys, torch, lcnn_convert\n"
        "names = [m.name for m in pkgutil.walk_packages(lcnn_convert.__path__, 'lcnn_convert.')]\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [key for key in sys.modules if key.startswith('lcnn_convert.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as error:\n"
        "        failed.append(f'{name}: {error}')\n"
        "print(len(names), failed)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    count, failed = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) >= 30 and failed == "[]", result.stdout


def test_the_cli_defaults_are_the_library_defaults():
    import typer

    from lcnn_convert import cli
    from lcnn_convert.finetune import FinetuneConfig
    from lcnn_convert.pipeline import ConversionJob

    command = typer.main.get_command(cli.app).commands["convert"]
    defaults = {parameter.name: parameter.default for parameter in command.params}
    job, training = ConversionJob(model="resnet18"), FinetuneConfig()
    for name in ("opset", "atol", "seed", "calibration_examples", "min_agreement", "logit_tolerance", "eval_examples"):
        assert defaults[name] == getattr(job, name), name
    options = {"grad_norm": "lambda_grad", "refresh_bn": "refresh_batchnorm"}
    for name in (
        "epochs",
        "lr",
        "weight_decay",
        "smoothness",
        "lambda_gamma",
        "grad_norm",
        "grad_norm_share",
        "distill",
        "refresh_bn",
    ):
        assert defaults[name] == getattr(training, options.get(name, name)), name
    assert defaults["optimizer"] in (training.optimizer, cli.Optimizer(training.optimizer))
    assert defaults["device"] in (job.device, cli.Device(job.device))


def test_every_training_setting_has_the_option_its_errors_name():
    from dataclasses import fields

    from lcnn_convert.cli import option_of
    from lcnn_convert.finetune import FinetuneConfig

    result = run_console_script("convert", "--help")
    assert result.returncode == 0
    for setting in fields(FinetuneConfig):
        assert option_of(setting.name) in result.stdout, setting.name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("checkpoints")
    good = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), good)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip" * 20)
    mismatched = tmp_path / "vgg.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), mismatched)
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    variants = {
        "int8": {**state, "conv1.weight": state["conv1.weight"].to(torch.int8)},
        "bool": {**state, "layer1.0.bn1.weight": state["layer1.0.bn1.weight"].bool()},
        "complex": {**state, "fc.weight": state["fc.weight"].to(torch.complex64)},
        "scalar_head": {**state, "fc.weight": torch.tensor(1.0)},
        "empty_head": {**state, "fc.weight": torch.zeros(0, 512), "fc.bias": torch.zeros(0)},
    }
    paths = {}
    for name, variant in variants.items():
        paths[name] = tmp_path / f"{name}.pth"
        torch.save(variant, paths[name])
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": _Payload(str(tmp_path / "pwned"))}, evil)
    return {"good": good, "corrupt": corrupt, "mismatched": mismatched, "evil": evil, **paths}


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


BAD_INPUTS = {
    "unknown model": (["resnt18", "--no-pretrained"], ["unknown model 'resnt18'", "closest: resnet18"]),
    "missing weights": (["resnet18", "--weights", "{tmp}/nope.pth"], ["weights file not found"]),
    "corrupt weights": (["resnet18", "--weights", "{corrupt}"], ["not a PyTorch checkpoint"]),
    "mismatched weights": (["resnet18", "--weights", "{mismatched}"], ["does not match ResNet"]),
    "pickle with code": (["resnet18", "--weights", "{evil}"], ["refusing to load", "weights_only=True"]),
    "negative classes": (
        ["resnet18", "--no-pretrained", "--num-classes", "-3"],
        ["--num-classes must be a positive integer"],
    ),
    "zero beta": (
        ["resnet18", "--no-pretrained", "--beta", "0"],
        ["--beta must be 'auto' or a number in [0.001, 10000]"],
    ),
    "negative beta": (
        ["resnet18", "--no-pretrained", "--beta=-2"],
        ["--beta must be 'auto' or a number in [0.001, 10000]"],
    ),
    "word beta": (
        ["resnet18", "--no-pretrained", "--beta", "sharp"],
        ["--beta must be 'auto' or a number in [0.001, 10000]"],
    ),
    "classes not a number": (["resnet18", "--num-classes", "ten"], ["--num-classes", "integer"]),
    "old opset": (["resnet18", "--no-pretrained", "--opset", "11"], ["opset must lie in [17, 23]"]),
    "future opset": (["resnet18", "--no-pretrained", "--opset", "99"], ["opset must lie in [17, 23]"]),
    "tiny beta": (["resnet18", "--no-pretrained", "--beta", "1e-30"], ["--beta must be 'auto' or a number in"]),
    "infinite beta": (["resnet18", "--no-pretrained", "--beta", "inf"], ["--beta must be 'auto' or a number in"]),
    "nan beta": (["resnet18", "--no-pretrained", "--beta", "nan"], ["--beta must be 'auto' or a number in"]),
    "huge image size": (
        ["resnet18", "--no-pretrained", "--image-size", "100000"],
        ["--image-size must lie in [8, 4096]"],
    ),
    "huge class count": (
        ["resnet18", "--no-pretrained", "--num-classes", str(10**12)],
        ["--num-classes must be at most"],
    ),
    "seed past 64 bits": (["resnet18", "--no-pretrained", "--seed", str(2**70)], ["--seed must lie in [0, 2**32 - 1]"]),
    "negative seed": (["resnet18", "--no-pretrained", "--seed", "-1"], ["--seed must lie in"]),
    "int8 weights": (["resnet18", "--weights", "{int8}"], ["non-float tensors", "torch.int8"]),
    "bool weights": (["resnet18", "--weights", "{bool}"], ["non-float tensors", "torch.bool"]),
    "complex weights": (["resnet18", "--weights", "{complex}"], ["non-float tensors", "torch.complex64"]),
    "0-d head weight": (["resnet18", "--weights", "{scalar_head}"], ["head weight 'fc.weight'", "shape []"]),
    "head with 0 rows": (["resnet18", "--weights", "{empty_head}"], ["head weight 'fc.weight'", "shape [0, 512]"]),
    "model too small for the size": (
        ["torchvision:alexnet", "--no-pretrained", "--num-classes", "10"],
        ["does not run at 32x32"],
    ),
    "vit at another size": (
        ["timm:vit_tiny_patch16_224", "--no-pretrained", "--num-classes", "10"],
        ["does not run at 32x32"],
    ),
    "pretrained offline": (["resnet18", "--num-classes", "10"], ["--weights", "--no-pretrained"]),
    "unknown option": (["resnet18", "--frobnicate"], ["No such option"]),
    "unknown device": (
        ["resnet18", "--no-pretrained", "--device", "tpu"],
        ["--device", "'tpu' is not one of 'auto', 'cpu', 'cuda'"],
    ),
    "unknown optimizer": (
        ["resnet18", "--no-pretrained", "--optimizer", "adam"],
        ["--optimizer", "'adam' is not one of"],
    ),
    "unknown schedule": (["resnet18", "--no-pretrained", "--schedule", "step"], ["--schedule", "'step' is not one of"]),
    "mean of two values": (["resnet18", "--no-pretrained", "--mean", "0.5", "0.5"], ["--mean"]),
    "zero std": (["resnet18", "--no-pretrained", "--std", "0", "1", "1"], ["--std values must be > 0"]),
    "unknown interpolation": (
        ["resnet18", "--no-pretrained", "--interpolation", "cubic"],
        ["--interpolation must be one of"],
    ),
    "two datasets": (
        ["resnet18", "--no-pretrained", "--calibrate", "digits", "--eval", "svhn"],
        ["name different datasets"],
    ),
    "agreement above 1": (
        ["resnet18", "--no-pretrained", "--min-agreement", "2"],
        ["--min-agreement must lie in [0, 1]"],
    ),
    "one calibration example": (
        ["resnet18", "--no-pretrained", "--calibration-examples", "1"],
        ["--calibration-examples must be >= 2"],
    ),
    "zero logit tolerance": (
        ["resnet18", "--no-pretrained", "--logit-tolerance", "0"],
        ["--logit-tolerance must lie in (0, 1)"],
    ),
    "unknown calibration dataset": (
        ["resnet18", "--no-pretrained", "--calibrate", "mnist"],
        ["unknown dataset 'mnist'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, cli, tmp_path, checkpoints, offline):
    args, fragments = BAD_INPUTS[case]
    paths = {"tmp": tmp_path, **checkpoints}
    out = tmp_path / "out"
    model, *rest = [arg.format(**paths) for arg in args]
    result = cli(model, "--image-size", "32", *rest, "-o", out)  # the case's own --image-size comes later and wins
    assert_one_line_error(result, *fragments)
    assert not out.exists()
    assert_nothing_written(tmp_path, "out")
    assert not (checkpoints["evil"].parent / "pwned").exists()


def test_unwritable_output_dirs(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_one_line_error(cli("resnet18", *SMALL, "-o", blocker / "out"), "cannot write output dir")
    assert_one_line_error(cli("resnet18", *SMALL, "-o", blocker), "exists and is not a directory")
    assert_one_line_error(cli("resnet18", *SMALL, "-o", "/proc/lcnn-out"), "cannot write output dir")
    assert blocker.read_text() == "x"


def test_existing_output_dir_is_left_alone_without_overwrite(cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("not written by lcnn-convert")
    for extra in ((), ("--overwrite",)):
        assert_one_line_error(cli("resnet18", *SMALL, "-o", out, *extra), "lcnn-convert did not write", "model.onnx")
        assert [path.name for path in out.iterdir()] == ["model.onnx"]
        assert (out / "model.onnx").read_text() == "not written by lcnn-convert"
    assert_nothing_written(tmp_path, ".out")


def test_failure_after_staging_leaves_an_earlier_output_as_it_was(cli, tmp_path, checkpoints):
    out = tmp_path / "out"
    earlier = fake_earlier_output(out)
    assert_one_line_error(cli("resnet18", *SMALL, "-o", out), "holds an earlier lcnn-convert output", "--overwrite")
    # Fails while loading weights, after the run has claimed the dir: the earlier output must survive.
    result = cli("resnet18", "--weights", checkpoints["mismatched"], "-o", out, "--overwrite")
    assert_one_line_error(result, "does not match")
    assert snapshot(out) == earlier
    assert_nothing_written(tmp_path, ".out")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["convert_and_verify.py", "custom_rule.py"])
def test_examples_run(script):
    import subprocess
    import sys

    path = Path(__file__).parent.parent / "examples" / script
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "ConversionReport(method=fx" in result.stdout


@pytest.mark.slow
def test_models_past_the_protobuf_limit_export_with_external_data(tmp_path, cli, monkeypatch):
    """Models with more than ~1.8 GB of weights (torchvision's regnet_y_128gf, vit_h_14) cannot be
    one protobuf; the same code path runs here on a small model with the threshold lowered."""
    import lcnn_convert.export

    monkeypatch.setattr(lcnn_convert.export, "EXTERNAL_DATA_THRESHOLD", 1_000_000)
    out = tmp_path / "out"
    result = cli("resnet18", *SMALL, "-o", out)
    assert result.code == 0, result.err
    names = sorted(path.name for path in out.iterdir() if not path.name.startswith("."))
    assert names == ["model.onnx", "model.onnx.data", "model.safetensors", "report.json"]
    graph, data = out / "model.onnx", out / "model.onnx.data"
    assert graph.stat().st_size < 100_000 < 40_000_000 < data.stat().st_size
    report = json.loads((out / "report.json").read_text())
    assert report["files"]["onnx_data"] == "model.onnx.data" and report["parity"]["passed"]
    assert cli("verify", out).code == 0
    # The pair is checked as a pair: a truncated data file fails in one line.
    weights = data.read_bytes()
    data.write_bytes(weights[: len(weights) // 2])
    assert_one_line_error(cli("verify", out), "model.onnx")
    # Below the threshold again, a re-export into the same dir leaves no stale data file.
    monkeypatch.setattr(lcnn_convert.export, "EXTERNAL_DATA_THRESHOLD", 10**12)
    assert cli("resnet18", *SMALL, "-o", out, "--overwrite").code == 0
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".")) == [
        "model.onnx",
        "model.safetensors",
        "report.json",
    ]
