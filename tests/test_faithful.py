"""Faithful conversion on real trained models, judged on held-out digits the conversion never saw."""

from __future__ import annotations

import json

import pytest
import torch

import lcnn_convert as lc
from lcnn_convert.fidelity import measure_fidelity

from .conftest import DIGITS_MODELS, TrainedDigitsModel, assert_one_line_error

pytestmark = pytest.mark.slow


def _held_out_agreement(entry: TrainedDigitsModel, converted: torch.nn.Module) -> float:
    return measure_fidelity(entry.model, converted, entry.test_images, "digits test").top1_agreement


@pytest.mark.parametrize("name", list(DIGITS_MODELS))
def test_calibrated_on_training_images_the_conversion_agrees_on_held_out_ones(digits_models, name):
    entry = digits_models[name]
    converted = lc.convert(entry.model, entry.train_images[:128])
    assert _held_out_agreement(entry, converted) >= 0.99
    report = converted.conversion_report
    assert report.fidelity.source == "user calibration data (held-out part)" and report.fidelity.top1_agreement >= 0.99


@pytest.mark.parametrize("name", list(DIGITS_MODELS))
def test_data_free_conversion_is_faithful_and_about_as_smooth_as_real_calibration(digits_models, name):
    entry = digits_models[name]
    size = (3, entry.image_size, entry.image_size)
    data_free = lc.convert(entry.model, input_size=size)
    assert data_free.conversion_report.beta.calibration_data == "synthetic from BatchNorm statistics"
    assert _held_out_agreement(entry, data_free) >= 0.99
    on_held_out = lc.convert(entry.model, entry.test_images).conversion_report.beta
    assert data_free.conversion_report.beta.mean <= 2 * on_held_out.mean


def _convert_cli(cli, entry: TrainedDigitsModel, out, *options: str):
    result = cli(
        entry.name,
        "--weights",
        entry.weights,
        "--num-classes",
        "10",
        "--image-size",
        str(entry.image_size),
        "-o",
        out,
        "--overwrite",
        *options,
    )
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return result, report


def test_cli_calibrates_on_the_dataset_and_measures_fidelity_on_its_test_split(digits_models, cli, tmp_path):
    entry = digits_models["torchvision:resnet18"]
    result, report = _convert_cli(
        cli, entry, tmp_path / "out", "--calibrate", "digits", "--calibration-examples", "128"
    )
    assert result.code == 0, result.err
    fidelity = report["fidelity"]
    assert fidelity["source"] == "digits test" and fidelity["num_inputs"] == 360 and not fidelity["synthetic"]
    assert fidelity["top1_agreement"] >= 0.99 and fidelity["gated"] and fidelity["passed"]
    beta = report["conversion"]["beta"]
    assert (beta["calibration_data"], beta["calibration_examples"]) == ("digits train", 128)
    assert report["preprocessing"]["source"] == "the model's data config" and report["warnings"] == []
    assert "fidelity to the original" in result.out and "ONNX parity" in result.out


def test_cli_without_data_calibrates_on_synthetic_inputs_and_says_so(digits_models, cli, tmp_path):
    entry = digits_models["torchvision:resnet18"]
    result, report = _convert_cli(cli, entry, tmp_path / "out")
    assert result.code == 0, result.err
    assert report["conversion"]["beta"]["calibration_data"] == "synthetic from BatchNorm statistics"
    assert report["fidelity"]["synthetic"] and not report["fidelity"]["gated"]
    warnings = [line for line in result.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "synthetic inputs only" in warnings[0] and "--calibrate" in warnings[0]
    # and the model it wrote is faithful on real held-out images
    restored = lc.load(tmp_path / "out")
    assert _held_out_agreement(entry, restored) >= 0.99


def test_an_unfaithful_conversion_fails_the_fidelity_gate_and_keeps_its_outputs(digits_models, cli, tmp_path):
    entry = digits_models["torchvision:resnet18"]
    out = tmp_path / "out"
    result, report = _convert_cli(cli, entry, out, "--calibrate", "digits", "--beta", "0.5")
    assert_one_line_error(result, "fidelity failed", "below the 99.00% gate", "outputs kept")
    assert not report["fidelity"]["passed"] and report["parity"]["passed"]
    assert {"model.onnx", "model.safetensors", "report.json"} <= {path.name for path in out.iterdir()}
    # a looser gate accepts the same conversion
    result, _ = _convert_cli(cli, entry, out, "--calibrate", "digits", "--beta", "0.5", "--min-agreement", "0.05")
    assert result.code == 0, result.err


def test_mean_and_std_change_what_the_original_scores_and_a_wrong_pair_is_caught(digits_models, cli, tmp_path):
    entry = digits_models["torchvision:resnet18"]
    options = ("--eval", "digits", "--eval-examples", "16")
    result, right = _convert_cli(cli, entry, tmp_path / "right", *options)
    assert result.code == 0, result.err
    result, wrong = _convert_cli(
        cli, entry, tmp_path / "wrong", *options, "--mean", "0", "0", "0", "--std", "1", "1", "1"
    )
    assert wrong["preprocessing"]["mean"] == [0, 0, 0] and wrong["preprocessing"]["source"] == "--mean, --std"
    assert wrong["metrics"]["original"]["accuracy"] < right["metrics"]["original"]["accuracy"] - 0.3
    warnings = [line for line in result.err.splitlines() if line.startswith("warning:")]
    assert any("preprocessing is probably wrong" in line and "ImageNet mean/std" in line for line in warnings), (
        result.err
    )


def test_a_head_in_another_label_order_scores_near_chance_and_is_warned_about(digits_models, cli, tmp_path):
    entry = digits_models["torchvision:resnet18"]
    state = torch.load(entry.weights, weights_only=True)
    order = torch.tensor([3, 7, 0, 9, 1, 5, 8, 2, 6, 4])
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][order], state["fc.bias"][order]
    shuffled = tmp_path / "shuffled.pth"
    torch.save(state, shuffled)
    result = cli(
        entry.name, "--weights", shuffled, "--calibrate", "digits", "--image-size", "16", "-o", tmp_path / "out"
    )
    warnings = [line for line in result.err.splitlines() if line.startswith("warning:")]
    assert any("near chance" in line and "label order" in line for line in warnings), result.err
