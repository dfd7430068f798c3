"""Fidelity figures: the converted model against the original, apart from ONNX parity."""

from __future__ import annotations

import math

import pytest
import torch

from lcnn_convert.fidelity import Fidelity, compare_logits, measure_fidelity, relative_logit_errors


def test_identical_logits_are_perfectly_faithful():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    fidelity = compare_logits(logits.clone(), logits, "test")
    assert (fidelity.top1_agreement, fidelity.max_relative_logit_error, fidelity.num_inputs) == (1.0, 0.0, 50)
    assert fidelity.kl_mean == pytest.approx(0.0, abs=1e-12)
    assert fidelity.holds(0.99) and fidelity.failure(0.99) is None


def test_relative_error_ignores_a_shift_of_all_logits_and_scales_with_the_change():
    reference = torch.tensor([[3.0, 1.0, -1.0], [0.0, 2.0, 4.0]])
    assert relative_logit_errors(reference + 5.0, reference).tolist() == [0.0, 0.0]  # softmax-invariant
    errors = relative_logit_errors(1.1 * reference, reference)
    assert errors.tolist() == pytest.approx([0.1, 0.1])
    # KL(original || converted) of a sharpened softmax, by hand
    fidelity = compare_logits(2.0 * reference[:1], reference[:1], "hand")
    p = torch.softmax(reference[0].double(), 0)
    q = torch.softmax(2.0 * reference[0].double(), 0)
    assert fidelity.kl_mean == pytest.approx(float((p * (p / q).log()).sum()))


def test_disagreement_fails_the_gate_with_one_line_saying_by_how_much():
    reference = torch.eye(4).repeat(25, 1) * 5.0  # 100 inputs, classes 0..3
    logits = reference.clone()
    logits[:3] = logits[:3].roll(1, dims=1)  # 3 of 100 now pick another class
    fidelity = compare_logits(logits, reference, "digits test")
    assert fidelity.top1_agreement == pytest.approx(0.97)
    assert not fidelity.holds(0.99) and fidelity.holds(0.97)
    line = fidelity.failure(0.99)
    assert "\n" not in line and "97.00%" in line and "99.00%" in line and "digits test" in line
    assert set(fidelity.to_dict()) == {field for field in Fidelity.__dataclass_fields__}


def test_measure_fidelity_runs_both_models_in_eval_mode_and_restores_their_modes():
    original = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.9), torch.nn.Linear(8, 3))
    converted = torch.nn.Sequential(*[layer for layer in original])
    original.train()
    inputs = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))
    fidelity = measure_fidelity(original, converted, inputs, "random")  # batched by FIDELITY_BATCH
    assert (
        fidelity.top1_agreement == 1.0
        and fidelity.num_inputs == 300
        and math.isclose(fidelity.kl_mean, 0, abs_tol=1e-12)
    )
    assert original.training
