"""Stage 3: fine-tuning with the LCNN regularisers, checkpoints, resume and failure handling."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import lcnn_convert as lc
from lcnn_convert.errors import InvalidSetting
from lcnn_convert.bn_statistics import normalising_with_running_statistics
from lcnn_convert.finetune import (
    BETA_LR_FACTOR,
    FinetuneConfig,
    _input_gradient_penalty,
    _parameter_groups,
    cross_entropy_and_grad_penalty,
    finetune,
    load_checkpoint,
    penalty_examples,
    regularisers,
)
from lcnn_convert.layers import one_norm_per_step

from .conftest import SmallDigitsNet


@pytest.fixture(scope="module")
def digit_tensors(digits):
    images, labels = digits
    return TensorDataset(images[:512], labels[:512]), TensorDataset(images[1500:], labels[1500:])


def converted_net(digits, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lc.convert(SmallDigitsNet().eval(), digits[0][:64], beta=20.0)


def test_regularisers_sum_beta_and_abs_log_gamma(digits):
    model = converted_net(digits)
    beta_sum, gamma_sum = regularisers(model)
    betas = [m.beta for m in model.modules() if isinstance(m, lc.CenteredSoftplus)]
    gammas = [m.log_gamma for m in model.modules() if isinstance(m, lc.LipschitzBatchNorm)]
    assert beta_sum.item() == pytest.approx(sum(b.item() for b in betas)) == pytest.approx(40.0, rel=1e-5)
    assert gamma_sum.item() == pytest.approx(sum(abs(g.item()) for g in gammas))
    groups = _parameter_groups(model, FinetuneConfig(weight_decay=5e-4).resolved(1000))
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    assert all(id(m.log_gamma) in no_decay for m in model.modules() if isinstance(m, lc.LipschitzBatchNorm))
    assert all(p.ndim > 1 for p in groups[0]["params"])
    # log beta in a group of its own, at BETA_LR_FACTOR x lr and without decay
    log_betas = {id(m.log_beta) for m in model.modules() if isinstance(m, lc.CenteredSoftplus)}
    assert {id(p) for p in groups[2]["params"]} == log_betas
    assert groups[2]["lr"] == pytest.approx(BETA_LR_FACTOR * groups[0]["lr"]) and groups[2]["weight_decay"] == 0.0


def test_finetuning_learns_and_the_beta_penalty_lowers_beta(digits, digit_tensors):
    train, test = digit_tensors
    model = converted_net(digits)
    config = FinetuneConfig(epochs=2, batch_size=64, lr=0.05, smoothness=5.0)
    result = finetune(model, train, test, config)
    assert [record.epoch for record in result.history] == [1, 2] and result.steps == 16
    assert result.history[-1].test_accuracy > 0.7
    assert result.history[-1].beta_mean < 20.0
    assert result.history[-1].loss < result.history[0].loss
    assert not model.training
    for record in result.history:
        assert record.loss == pytest.approx(
            record.label_loss + record.beta_term + record.gamma_term + record.grad_term, rel=1e-5
        )
    with_penalty = finetune(
        converted_net(digits), train, test, FinetuneConfig(epochs=1, batch_size=64, lambda_grad=1.0)
    )
    assert with_penalty.history[0].grad_term > 0


def test_penalty_examples_are_a_share_of_the_batch_rounded_up():
    assert [penalty_examples(batch, 0.125) for batch in (1, 2, 3, 16, 17, 64, 128)] == [1, 1, 1, 2, 3, 8, 16]
    assert penalty_examples(64, 1.0) == 64 and penalty_examples(64, 0.5) == 32


def _norm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items() if "running" in key or "tracked" in key}


def test_penalty_on_part_of_the_batch_is_that_part_s_penalty_and_counts_the_batch_once(digits):
    images, labels = digits[0][:64], digits[1][:64]
    model = converted_net(digits).train()
    reference = copy.deepcopy(model)
    label_term, penalty = cross_entropy_and_grad_penalty(model, images, labels, 1.0, share=0.125)
    (label_term + penalty).backward()

    # the same two passes, one at a time, on a copy: the first updates the running statistics,
    # the second (eight images, the penalty's) normalises with them and leaves them alone
    with one_norm_per_step(reference):
        expected_label = F.cross_entropy(reference(images), labels)
        after_first_pass = _norm_buffers(reference)
        part = images[:8].clone().requires_grad_(True)
        with normalising_with_running_statistics(reference):
            expected_penalty = _input_gradient_penalty(reference(part), labels[:8], part)
    (expected_label + expected_penalty).backward()
    assert _norm_buffers(reference).keys() == after_first_pass.keys() and after_first_pass
    for key, value in _norm_buffers(reference).items():
        assert torch.equal(value, after_first_pass[key]), key
        assert torch.equal(value, _norm_buffers(model)[key]), key
    assert label_term.item() == pytest.approx(expected_label.item(), rel=1e-6)
    assert penalty.item() == pytest.approx(expected_penalty.item(), rel=1e-5) and penalty.item() > 0
    gradients = dict(model.named_parameters())
    for name, parameter in reference.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(gradients[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_one_norm_per_step_takes_one_power_step_for_two_passes(digits):
    images = digits[0][:16]
    model = converted_net(digits).train()
    normalized = [m for m in model.modules() if isinstance(m, lc.NormalizedConv)]
    assert normalized
    model(images)
    vectors = [m._power_vector.clone() for m in normalized]
    twice = copy.deepcopy(model)
    model(images)
    once_more = [m._power_vector.clone() for m in normalized]
    with one_norm_per_step(twice):
        twice(images)
        twice(images[:4])
    for layer, before, after in zip(
        (m for m in twice.modules() if isinstance(m, lc.NormalizedConv)), vectors, once_more
    ):
        assert not torch.equal(before, after)  # a pass outside moves the vector one step
        torch.testing.assert_close(layer._power_vector, after, rtol=0, atol=0)
        assert layer._step_sigma is None and not layer._sharing_sigma


def test_resumed_run_ends_in_the_same_state(digits, digit_tensors, tmp_path):
    train, test = digit_tensors
    config = FinetuneConfig(epochs=3, batch_size=64, lr=0.05)
    straight = converted_net(digits)
    finetune(straight, train, test, config, checkpoint_path=tmp_path / "straight.pt")

    class Interrupted(Exception):
        pass

    def stop_after_first(record):
        if record.epoch == 1:
            raise Interrupted

    interrupted = converted_net(digits)
    with pytest.raises(Interrupted):
        finetune(interrupted, train, test, config, checkpoint_path=tmp_path / "ckpt.pt", on_epoch_end=stop_after_first)
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert state["epoch"] == 1
    resumed = converted_net(digits, seed=123)  # different initial weights: all state must come from the file
    result = finetune(resumed, train, test, config, checkpoint_path=tmp_path / "ckpt.pt", resume=state)
    assert result.epochs == 3 and len(result.history) == 3
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(digits, digit_tensors, tmp_path):
    train, test = digit_tensors
    model = converted_net(digits)
    checkpoint = tmp_path / "ckpt.pt"

    def poison(record):
        with torch.no_grad():
            model.get_submodule("fc").weight.fill_(float("nan"))

    config = FinetuneConfig(epochs=3, batch_size=64)
    with pytest.raises(
        lc.LcnnError, match=r"loss became nan at epoch 2, step 9; stopped, the last good checkpoint \(epoch 1\)"
    ):
        finetune(model, train, test, config, checkpoint_path=checkpoint, on_epoch_end=poison)
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 1
    assert torch.isfinite(state["model"]["fc.weight"]).all()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("epochs", 0, "epochs must be >= 1, got 0"),
        ("smoothness", -1.0, "smoothness must be >= 0, got -1.0"),
        ("beta_lr", 0.0, "beta_lr must be > 0"),
        ("distill", 1.5, re.escape("distill must lie in [0, 1]")),
        ("lambda_gamma", -0.1, "lambda_gamma must be >= 0"),
        ("lambda_grad", -2.0, "lambda_grad must be >= 0"),
        ("grad_norm_share", 0.0, re.escape("grad_norm_share must lie in (0, 1]")),
        ("lr", 0.0, "lr must be > 0"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("optimizer", "adam", "optimizer must be sgd or adamw, got adam"),
    ],
)
def test_invalid_training_options_are_named_as_the_fields_they_are(field, value, message):
    """The library speaks of its own fields; the CLI names its options (tests/test_cli_finetune.py)."""
    with pytest.raises(InvalidSetting, match=f"^{message}") as caught:
        FinetuneConfig(**{field: value}).validate()
    assert caught.value.setting == field and "--" not in str(caught.value)
