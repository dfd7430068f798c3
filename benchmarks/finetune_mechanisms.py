"""Where the default fine-tune's curvature reduction comes from, and its spread over seeds.

    python benchmarks/finetune_mechanisms.py                                    # defaults, seeds 0 1 2
    python benchmarks/finetune_mechanisms.py --mechanism held-clip --seeds 0 1
    python benchmarks/finetune_mechanisms.py --set smoothness=0.5 --model timm:resnet18 --size 16

Trains MODEL on digits with the test suite's recipe (tests/conftest.py, cached in --cache), converts
it as the pipeline does (beta calibrated on 256 train images), fine-tunes it with
``lcnn_convert.finetune`` (teacher: the original, BatchNorm refresh on the calibration pool) and
prints the test accuracy, the mean normalized curvature on 128 test images, the fine-tuning time
and, per activation family, the median beta and beta x RMS of the site's input (256 test images)
before and after.

``--mechanism`` swaps one piece of the fine-tuning for an alternative that is *not* in the library,
to measure what each piece does (docs/finetuning.md, "efficientnet_b0: what moves the curvature"):

- ``defaults``: the library as it is.
- ``rms-penalty``: each activation's beta term is multiplied by the RMS of the site's input in the
  training batch (gradient included): a penalty on the dimensionless sharpness beta x RMS.
- ``channel-clip``: each Lipschitz BN clips every channel's gain at gamma on its own,
  min(|g_c|, gamma), instead of scaling all channels by gamma / max |g_c|.
- ``held-clip``: each Lipschitz BN's clip factor is a parameter of its own (log, learned at the beta
  learning rate), so running-variance updates do not move it; the gamma term is |log| of the layer's
  Lipschitz constant.
- ``scale-penalty``: the explicit slopes of convs and linears with no BN after them (squeeze-excite
  convs, the head) join the gamma term as |log scale|.
- ``frozen-bn``: the training steps normalise with the running statistics (BatchNorm as in eval
  mode, statistics not updated); the refresh after the last epoch still re-estimates them.
- ``tempered-teacher``: the soft targets are the original's logits divided by 4 (a less confident
  teacher; the student's logits are not divided).
- ``margin-penalty``: ``lambda_grad``'s penalty is the squared input gradient of the logit margin
  (true class minus the runner-up) instead of the cross-entropy's, which vanishes on confident
  examples.

Every row also splits the curvature: the softmax's Gauss-Newton part alone (``curvature_parts``)
and the mean logit margin.

Run it alone: two CPU-heavy jobs slow each other down.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.finetune_defaults import config_from_settings  # noqa: E402
from lcnn_convert import finetune as finetune_stage  # noqa: E402
from lcnn_convert.conversion.api import CalibrationData, ConvertOptions, convert_with_options  # noqa: E402
from lcnn_convert.conversion.rules import default_rules  # noqa: E402
from lcnn_convert.data import load_dataset  # noqa: E402
from lcnn_convert.layers import LipschitzBatchNorm, SmoothActivation  # noqa: E402
from lcnn_convert.layers.normalized_linear import _OperatorNormalized  # noqa: E402
from lcnn_convert.measure import (  # noqa: E402
    ScaledLogits,
    _lanczos,
    _nonzero,
    _per_example_norm,
    confidence_matching_scale,
    estimate_curvature,
    evaluate_accuracy,
    relu_stand_in,
)
from lcnn_convert.models import data_config, load_model_with_spec  # noqa: E402
from lcnn_convert.pipeline import _examples  # noqa: E402
from tests.conftest import DIGITS_MODELS, SILU_DIGITS_MODELS, train_on_digits  # noqa: E402

MODELS = {**DIGITS_MODELS, **SILU_DIGITS_MODELS}
CURVATURE_EXAMPLES = 128


@contextlib.contextmanager
def _patched(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def rms_penalty(model: nn.Module) -> Iterator[None]:
    input_rms: dict[int, torch.Tensor] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if module.training and torch.is_grad_enabled():
            input_rms[id(module)] = inputs[0].float().square().mean().sqrt()

    def regularisers(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        zero = next(net.parameters()).new_zeros(())
        betas, gammas = [], []
        for module in net.modules():
            if isinstance(module, SmoothActivation) and module.log_beta.requires_grad:
                betas.append(module.regulariser_term() * input_rms.get(id(module), 1.0))
            elif isinstance(module, LipschitzBatchNorm):
                gammas.append(module.regulariser_term())
        return (torch.stack(betas).sum() if betas else zero, torch.stack(gammas).sum() if gammas else zero)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, SmoothActivation)]
    try:
        with _patched(finetune_stage, "regularisers", regularisers):
            yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def channel_clip(model: nn.Module) -> Iterator[None]:
    def clip_factor(self: LipschitzBatchNorm) -> torch.Tensor:
        return torch.clamp(self.log_gamma.exp() / self.channel_gains().clamp_min(1e-12), max=1.0)

    @contextlib.contextmanager
    def no_hold(self: LipschitzBatchNorm) -> Iterator[None]:
        yield  # a per-channel clip cannot be held by one gamma: the refresh recomputes it

    with (
        _patched(LipschitzBatchNorm, "clip_factor", clip_factor),
        _patched(LipschitzBatchNorm, "holding_clip", no_hold),
    ):
        yield


@contextlib.contextmanager
def held_clip(model: nn.Module) -> Iterator[None]:
    norms = [m for m in model.modules() if isinstance(m, LipschitzBatchNorm)]
    for norm in norms:
        # named *log_beta so that the library's optimizer gives it the beta learning rate
        norm.register_parameter("clip_log_beta", nn.Parameter(norm.clip_factor().detach().log()))
        norm.log_gamma.requires_grad_(False)

    def clip_factor(self: LipschitzBatchNorm) -> torch.Tensor:
        return self.clip_log_beta.exp()

    def lipschitz_term(self: LipschitzBatchNorm) -> torch.Tensor:
        return (self.clip_log_beta + self.channel_gains().max().clamp_min(1e-12).log().detach()).abs()

    with (
        _patched(LipschitzBatchNorm, "clip_factor", clip_factor),
        _patched(LipschitzBatchNorm, "regulariser_term", lipschitz_term),
    ):
        yield


@contextlib.contextmanager
def scale_penalty(model: nn.Module) -> Iterator[None]:
    library = finetune_stage.regularisers
    scales = [m.scale for m in model.modules() if isinstance(m, _OperatorNormalized) and m.scale is not None]

    def regularisers(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        betas, gammas = library(net)
        return betas, gammas + torch.stack([scale.abs().log().abs() for scale in scales]).sum()

    with _patched(finetune_stage, "regularisers", regularisers):
        yield


@contextlib.contextmanager
def frozen_bn(model: nn.Module) -> Iterator[None]:
    library_forward = LipschitzBatchNorm.forward

    def forward(self: LipschitzBatchNorm, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # the refresh (under no_grad) re-estimates the statistics as usual
            return library_forward(self, x)
        weight = self.weight * self.clip_factor()
        return torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, weight, self.bias, False, 0.0, self.eps
        )

    with _patched(LipschitzBatchNorm, "forward", forward):
        yield


TEACHER_TEMPERATURE = 4.0


@contextlib.contextmanager
def tempered_teacher(model: nn.Module) -> Iterator[None]:
    library = finetune_stage.label_loss

    def label_loss(
        logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, distill: float
    ) -> torch.Tensor:
        softened = None if teacher_logits is None else teacher_logits / TEACHER_TEMPERATURE
        return library(logits, labels, softened, distill)

    with _patched(finetune_stage, "label_loss", label_loss):
        yield


@contextlib.contextmanager
def margin_penalty(model: nn.Module) -> Iterator[None]:
    def penalty(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        true = logits.gather(1, labels[:, None]).squeeze(1)
        runner_up = logits.masked_fill(nn.functional.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
        (input_gradient,) = torch.autograd.grad((true - runner_up).sum(), images, create_graph=True)
        return input_gradient.flatten(1).square().sum(1).mean()

    with _patched(finetune_stage, "_input_gradient_penalty", penalty):
        yield


MECHANISMS: dict[str, Callable[[nn.Module], contextlib.AbstractContextManager[None]]] = {
    "defaults": lambda model: contextlib.nullcontext(),
    "rms-penalty": rms_penalty,
    "channel-clip": channel_clip,
    "held-clip": held_clip,
    "scale-penalty": scale_penalty,
    "frozen-bn": frozen_bn,
    "tempered-teacher": tempered_teacher,
    "margin-penalty": margin_penalty,
}


def curvature_parts(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = 6
) -> tuple[float, float, float]:
    """(mean normalized curvature, the same of the softmax's Gauss-Newton part alone, mean logit margin).

    The input Hessian of the cross-entropy is J^T (diag p - p p^T) J + sum_k (p - y)_k * Hessian(z_k),
    with z the logits and J their input Jacobian. The first (Gauss-Newton) part is the softmax's
    curvature seen through the network; only the second needs the network itself to be curved. Both
    norms are read by Lanczos from the input gradient, as ``estimate_curvature`` does, on the same
    stand-in (ReLUs measured as softplus at beta 1000).
    """
    model = relu_stand_in(model)
    x = images.detach().clone().requires_grad_(True)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    (gradient,) = torch.autograd.grad(loss, x, create_graph=True)
    probe = torch.zeros_like(logits, requires_grad=True)
    (transposed,) = torch.autograd.grad(logits, x, grad_outputs=probe, create_graph=True)  # J^T probe
    p = logits.softmax(1).detach()

    def whole(direction: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(gradient, x, grad_outputs=direction, retain_graph=True)[0]

    def gauss_newton(direction: torch.Tensor) -> torch.Tensor:
        (forward,) = torch.autograd.grad(transposed, probe, grad_outputs=direction, retain_graph=True)  # J v
        curved = p * forward - p * (p * forward).sum(1, keepdim=True)
        return torch.autograd.grad(logits, x, grad_outputs=curved, retain_graph=True)[0]

    start = gradient.detach() / _nonzero(_per_example_norm(gradient.detach()))
    norm = gradient.detach().flatten(1).norm(dim=1) + 1e-12
    top_two = logits.detach().topk(2, dim=1).values
    return (
        float((_lanczos(whole, start, steps) / norm).mean()),
        float((_lanczos(gauss_newton, start, steps) / norm).mean()),
        float((top_two[:, 0] - top_two[:, 1]).mean()),
    )


def sharpness(model: nn.Module, images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Per activation family: median beta and median beta x RMS of the site's input."""
    rms: dict[str, float] = {}
    sites = {name: m for name, m in model.named_modules() if isinstance(m, SmoothActivation)}
    hooks = [
        module.register_forward_hook(
            lambda m, i, o, name=name: rms.__setitem__(name, float(i[0].square().mean().sqrt()))
        )
        for name, module in sites.items()
    ]
    with torch.no_grad():
        model.eval()(images)
    for hook in hooks:
        hook.remove()
    families: dict[str, list[tuple[float, float]]] = {}
    for name, module in sites.items():
        beta = module.frozen_beta()
        families.setdefault(module.label, []).append((beta, beta * rms[name]))
    return {label: tuple(float(np.median(column)) for column in zip(*values)) for label, values in families.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm:efficientnet_b0", choices=list(MODELS))
    parser.add_argument("--size", type=int, default=None, help="image size (default: the tests' for MODEL)")
    parser.add_argument(
        "--mechanism", nargs="+", default=["defaults"], choices=list(MECHANISMS), help="one or more, applied together"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[0, 1, 2], help="fine-tuning seeds (none: the original only)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--activation", default="centered_softplus", choices=("centered_softplus", "swish"))
    parser.add_argument(
        "--temperatures",
        type=float,
        nargs="*",
        default=[],
        help="first measure the original with its logits divided by each (predictions unchanged)",
    )
    parser.add_argument(
        "--matched-confidence",
        action="store_true",
        help="also measure each fine-tuned model with its logits scaled to the original's confidence",
    )
    parser.add_argument("--cache", type=Path, default=Path("runs/defaults"))
    args = parser.parse_args()
    size, epochs = MODELS[args.model]
    size = args.size or size
    args.cache.mkdir(parents=True, exist_ok=True)
    weights = args.cache / f"{args.model.replace(':', '_')}.pth"
    if not weights.is_file():
        train_on_digits(args.model, size, epochs, args.cache)
    torch.manual_seed(0)
    original, spec = load_model_with_spec(args.model, False, weights, 10)
    original.eval()
    splits = load_dataset("digits", None, data_config(original, spec), size)
    calibration, _ = _examples(splits.calibration_pool, 256, 0)
    held_out, _ = _examples(splits.test, 360, 1)
    accuracy = evaluate_accuracy(original, splits.test)
    curvature = estimate_curvature(original, splits.test, max_examples=CURVATURE_EXAMPLES).curvature_mean
    images, labels = next(iter(torch.utils.data.DataLoader(splits.test, batch_size=CURVATURE_EXAMPLES)))
    _, softmax_part, margin = curvature_parts(original, images, labels)
    with torch.no_grad():
        original_confidence = float(original(images).softmax(1).amax(1).mean())
    print(
        f"{args.model} {size}px, {' + '.join(args.mechanism)}, {' '.join(args.set) or 'default settings'}, "
        f"{args.activation}: "
        f"original {accuracy:.2%}, mean curvature {curvature:.3f} (softmax part {softmax_part:.3f}), "
        f"mean logit margin {margin:.1f}"
    )
    for temperature in args.temperatures:
        tempered = ScaledLogits(original, 1 / temperature).eval()
        tempered_curvature = estimate_curvature(tempered, splits.test, max_examples=CURVATURE_EXAMPLES).curvature_mean
        _, tempered_part, tempered_margin = curvature_parts(tempered, images, labels)
        print(
            f"original, logits / {temperature:g}: {evaluate_accuracy(tempered, splits.test):.2%}, "
            f"curvature ÷{curvature / tempered_curvature:.1f} (softmax part {tempered_part:.3f}), "
            f"mean logit margin {tempered_margin:.1f}"
        )
    print(f"original's mean top-1 probability on the curvature's images: {original_confidence:.2%}")
    print(
        "| seed | accuracy | curvature | softmax part | logit margin "
        + ("| curvature at the original's confidence " if args.matched_confidence else "")
        + "| fine-tuning "
        "| per family: median β, β × input RMS (before → after) |"
    )
    print("|---:|---:|---:|---:|---:|" + ("---:|" if args.matched_confidence else "") + "---:|---|")
    for seed in args.seeds:
        torch.manual_seed(0)
        options = ConvertOptions(beta="auto", rules=default_rules(args.activation), input_size=(3, size, size), seed=0)
        data = CalibrationData((calibration,), (held_out,), "digits train", held_out_source="digits test")
        converted = convert_with_options(original, data, options)
        before = sharpness(converted, held_out[:256])
        config = config_from_settings([*args.set, f"seed={seed}"])
        with contextlib.ExitStack() as mechanisms:
            for name in args.mechanism:
                mechanisms.enter_context(MECHANISMS[name](converted))
            result = finetune_stage.finetune(
                converted,
                splits.train,
                splits.test,
                config,
                console=Console(stderr=True, quiet=True),
                teacher=original,
                statistics_data=splits.calibration_pool,
            )
            tuned_accuracy = evaluate_accuracy(converted, splits.test)
            tuned = estimate_curvature(converted, splits.test, max_examples=CURVATURE_EXAMPLES).curvature_mean
            after = sharpness(converted, held_out[:256])
            _, softmax_part, margin = curvature_parts(converted, images, labels)
            matched = None
            if args.matched_confidence:
                # the fine-tuned model with its logits scaled to the original's confidence on the
                # curvature's images: the curvature a change of confidence alone does not explain
                with torch.no_grad():
                    scale = confidence_matching_scale(converted.eval()(images), original_confidence)
                rescaled = ScaledLogits(converted, scale).eval()
                matched_curvature = estimate_curvature(rescaled, splits.test, max_examples=CURVATURE_EXAMPLES)
                matched = (scale, curvature / matched_curvature.curvature_mean)
        families = "; ".join(
            f"{label} β {before[label][0]:.2f} → {after[label][0]:.2f}, β×RMS {before[label][1]:.2f} → {after[label][1]:.2f}"
            for label in before
        )
        print(
            f"| {seed} | {tuned_accuracy:.2%} ({100 * (tuned_accuracy - accuracy):+.2f} pt) | ÷{curvature / tuned:.1f} "
            f"| {softmax_part:.3f} | {margin:.1f} "
            + ("" if matched is None else f"| logits × {matched[0]:.2f}: ÷{matched[1]:.1f} ")
            + f"| {result.seconds:.0f} s, {result.steps} steps | {families} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
