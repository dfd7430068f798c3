"""Measure what an LCNN is for: normalized input curvature, clean accuracy and PGD robustness.

Curvature follows the paper's protocol (../shared/LCNN_NOTES.md): per example, the spectral norm of
the input Hessian of the cross-entropy by power iteration on Hessian-vector products, divided by
the input-gradient norm. Models with ReLUs (or ReLU6, leaky ReLU, hardswish, ...) are measured
through smooth stand-ins at beta = 1000 (a softplus for ReLU, as the paper's baselines were): a
piecewise-linear activation's second derivative is zero almost everywhere.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .fidelity import first_tensor
from .conversion.graph_pass import apply_rules
from .conversion.module_swap import swap_modules
from .conversion.rules import PIECEWISE_LINEAR_RULES
from .conversion.tracing import trace
from .input_hessian import swap_for_input_hessian
from .models import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

Norm = Literal["l2", "linf"]
# A Dataset of (image, label) pairs, or an (images, labels) pair of tensors.
Data = Dataset | tuple[torch.Tensor, torch.Tensor]

# The usual benchmark budgets for images in [0, 1]. The default step size, 2.5 * eps / steps
# (Madry et al.), lets PGD reach the ball's boundary from any starting point within its steps.
PGD_DEFAULTS: dict[str, dict[str, float]] = {"linf": {"eps": 8 / 255, "steps": 10}, "l2": {"eps": 0.5, "steps": 10}}
CURVATURE_METHOD = "lanczos"
CURVATURE_STEPS = 6
RELU_STAND_IN_BETA = 1000.0
HESSIAN_NORM_NAMES = {"lanczos": "Lanczos", "power": "power iteration"}


@dataclass(frozen=True)
class CurvatureStats:
    """Normalized curvature C(x) = ||H(x)|| / (||g(x)|| + eps) and its parts, over the measured examples.

    Standard deviations are population ones (numpy's default). ``relu_stand_in_beta`` is the
    softplus beta that stood in for the model's ReLUs, or None when the model was measured as is.
    """

    curvature_mean: float
    curvature_std: float
    hessian_norm_mean: float
    hessian_norm_std: float
    grad_norm_mean: float
    grad_norm_std: float
    num_examples: int
    per_example_curvature: tuple[float, ...]
    relu_stand_in_beta: float | None

    def to_dict(self) -> dict[str, Any]:
        """The summary without the per-example values (those are for histograms, not reports)."""
        summary = {field.name: getattr(self, field.name) for field in fields(self)}
        del summary["per_example_curvature"]
        return summary


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then every submodule's own previous mode (they may differ)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensors = [*model.parameters(), *model.buffers()]
    floating = next((tensor for tensor in tensors if tensor.is_floating_point()), None)
    if floating is None:
        return torch.device("cpu"), torch.float32
    return floating.device, floating.dtype


def _batches(
    data: Data, max_examples: int | None, batch_size: int, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``max_examples`` examples in order, in batches on the model's device and dtype."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(data, Sized):
        raise TypeError(f"{type(data).__name__} has no length: a map-style dataset (with __len__) is needed")
    is_tensor_pair = isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(d) for d in data)
    total = len(data[0]) if is_tensor_pair else len(data)
    count = total if max_examples is None else min(total, max_examples)
    if count < 1:
        raise ValueError("no examples to measure: the data is empty or max_examples < 1")
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        if is_tensor_pair:
            images, labels = data[0][start:stop], torch.as_tensor(data[1][start:stop])
        else:
            pairs = [data[index] for index in range(start, stop)]
            images = torch.stack([torch.as_tensor(image) for image, _ in pairs])
            labels = torch.as_tensor([int(label) for _, label in pairs])
        yield images.to(device=device, dtype=dtype), labels.to(device=device, dtype=torch.long)


def _per_example_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped to broadcast against the batch."""
    return tensor.flatten(1).norm(dim=1).view(-1, *[1] * (tensor.dim() - 1))


def _nonzero(norm: torch.Tensor) -> torch.Tensor:
    """A norm safe to divide by: an all-zero Hessian product or gradient then stays zero."""
    return norm.clamp_min(torch.finfo(norm.dtype).tiny)


def _relu_stand_in(model: nn.Module, beta: float) -> tuple[nn.Module, list[str]]:
    """The stand-in and the paths of the smooth layers that replaced piecewise-linear activations
    (empty: there were none)."""
    stand_in = copy.deepcopy(model).eval()
    replaced: list[str] = []
    try:
        stand_in = trace(stand_in)
    except Exception as error:  # tracing fails in many ways (TraceError, TypeError, ...)
        reason = type(error).__name__
        logger.warning("fx tracing failed (%s); functional relu calls cannot get a softplus stand-in", reason)
    else:
        replaced, _ = apply_rules(stand_in, PIECEWISE_LINEAR_RULES, beta=beta, replace_activations=True)
    # ReLU modules inside leaf modules (timm's BatchNormAct2d.act) are not graph nodes; after a
    # failed trace, no ReLU module is. Functional relus of an untraceable model stay ReLUs.
    swapped, _ = swap_modules(stand_in, PIECEWISE_LINEAR_RULES, beta, replace_activations=True)
    replaced += swapped
    for path in replaced:
        stand_in.get_submodule(path).requires_grad_(False)
    return stand_in.eval(), replaced


def relu_stand_in(model: nn.Module, beta: float = 1000.0) -> nn.Module:
    """A copy of ``model`` in eval mode with every ReLU call (and every other piecewise-linear
    activation) replaced by its fixed-beta smooth version (a centered softplus for ReLU).

    Everything else is unchanged, so the copy computes nearly the same function (each activation
    moves by at most log(2)/beta) but has a second derivative autograd can see.
    """
    return _relu_stand_in(model, beta)[0]


def _power_iteration(hvp: Callable[[torch.Tensor], torch.Tensor], vector: torch.Tensor, steps: int) -> torch.Tensor:
    """||H v|| after ``steps`` steps of v <- H v / ||H v||, per example."""
    for _ in range(steps):
        product = hvp(vector)
        hessian_norm = _per_example_norm(product)
        vector = product / _nonzero(hessian_norm)
    return hessian_norm.flatten()


def _lanczos(hvp: Callable[[torch.Tensor], torch.Tensor], vector: torch.Tensor, steps: int) -> torch.Tensor:
    """max |Ritz value| after ``steps`` Lanczos steps (full reorthogonalisation), per example.

    The Hessian is indefinite and its norm is its largest |eigenvalue|: Lanczos finds both ends of
    the spectrum at once, and from the same start gets closer to them in k steps than power
    iteration does in 2k (its estimate is the Rayleigh quotient of a best polynomial in H of degree
    k-1, power iteration's of one fixed polynomial).
    """
    shape = vector.shape
    basis = [(vector / _nonzero(_per_example_norm(vector))).flatten(1)]
    diagonal: list[torch.Tensor] = []
    links: list[torch.Tensor] = []
    for step in range(steps):
        image = hvp(basis[-1].view(shape)).flatten(1)
        diagonal.append((basis[-1] * image).sum(1))
        before = image.norm(dim=1)
        stacked = torch.stack(basis, 1)
        for _ in range(2):  # orthogonal to working precision
            image = image - torch.einsum("bk,bkn->bn", torch.einsum("bkn,bn->bk", stacked, image), stacked)
        if step + 1 < steps:
            link = image.norm(dim=1)
            # What is left after orthogonalisation at rounding level means the Krylov space is
            # exhausted (the extreme eigenvalues are already exact): stop that example's basis
            # instead of normalising rounding noise into a spurious direction.
            link = torch.where(link > 1e-5 * before, link, torch.zeros_like(link))
            links.append(link)
            basis.append(image * (link > 0).unsqueeze(1) / _nonzero(link).unsqueeze(1))
    tridiagonal = torch.diag_embed(torch.stack(diagonal, 1).double())
    if links:
        off = torch.stack(links, 1).double()
        tridiagonal = tridiagonal + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    return torch.linalg.eigvalsh(tridiagonal).abs().amax(1).to(vector.dtype)


HESSIAN_NORM_METHODS = {"power": _power_iteration, "lanczos": _lanczos}


def _curvature_of_batch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    first_index: int,
    iterations: int,
    eps: float,
    method: str = "lanczos",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example curvature, Hessian norm and gradient norm of one batch.

    In eval mode the examples do not interact, so the Hessian of the summed loss is block diagonal
    and one Hessian-vector product of the batch holds every example's own product.
    """
    x = images.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(first_tensor(model(x)), labels, reduction="sum")
    (gradient,) = torch.autograd.grad(loss, x, create_graph=True)
    # One seed per example index: an example's estimate does not depend on batch_size or its neighbours.
    starts = [
        torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(first_index + offset), dtype=x.dtype)
        for offset in range(len(x))
    ]
    vector = torch.stack(starts).to(x.device)
    vector = vector / _nonzero(_per_example_norm(vector))
    if method == "lanczos":
        # The input gradient leans towards the top curvature directions: starting there, 6 Lanczos
        # steps read within 5% of 10 power steps from a random start (docs/benchmarks.md); a
        # little of the random vector keeps a zero gradient's start non-zero.
        direction = gradient.detach()
        vector = direction / _nonzero(_per_example_norm(direction)) + 1e-3 * vector
        vector = vector / _nonzero(_per_example_norm(vector))

    def hvp(direction: torch.Tensor) -> torch.Tensor:
        (product,) = torch.autograd.grad(gradient, x, grad_outputs=direction, retain_graph=True)
        return product

    hessian_norm = HESSIAN_NORM_METHODS[method](hvp, vector, iterations)
    grad_norm = gradient.detach().flatten(1).norm(dim=1)
    return hessian_norm / (grad_norm + eps), hessian_norm, grad_norm


def estimate_curvature(
    model: nn.Module,
    data: Data,
    iterations: int = CURVATURE_STEPS,
    max_examples: int = 256,
    batch_size: int = 64,
    relu_beta: float = RELU_STAND_IN_BETA,
    eps: float = 1e-12,
    method: str = CURVATURE_METHOD,
    input_only_products: bool = True,
) -> CurvatureStats:
    """Normalized input curvature of ``model`` on the first ``max_examples`` examples of ``data``.

    The Hessian norm takes ``iterations`` Hessian-vector products (reverse over reverse) from a
    seeded start, so the result is deterministic: Lanczos by default, or ``method="power"`` for
    plain power iteration from a random vector (the paper's estimator; 6 Lanczos steps read within
    5% of 10 power steps, see docs/benchmarks.md). The products run on a measurement copy whose
    convolutions, BatchNorms and centered softplus layers are stand-ins with cheaper double
    backward (``lcnn_convert.input_hessian``; ``input_only_products=False`` differentiates the
    layers as they are; same values up to rounding). A model with ReLUs is measured through
    ``relu_stand_in(model, relu_beta)``; ``relu_stand_in_beta`` in the result says so.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if method not in HESSIAN_NORM_METHODS:
        raise ValueError(f"method must be one of {', '.join(HESSIAN_NORM_METHODS)}, got {method!r}")
    stand_in, replaced = _relu_stand_in(model, relu_beta)
    if input_only_products:
        swap_for_input_hessian(stand_in)
    device, dtype = _device_and_dtype(stand_in)
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.enable_grad():
        first_index = 0
        for images, labels in _batches(data, max_examples, batch_size, device, dtype):
            batch = _curvature_of_batch(stand_in, images, labels, first_index, iterations, eps, method)
            parts.append(tuple(values.detach().double().cpu() for values in batch))
            first_index += len(images)
    curvature, hessian_norm, grad_norm = (torch.cat(values).numpy() for values in zip(*parts))
    return CurvatureStats(
        curvature_mean=float(np.mean(curvature)),
        curvature_std=float(np.std(curvature)),
        hessian_norm_mean=float(np.mean(hessian_norm)),
        hessian_norm_std=float(np.std(hessian_norm)),
        grad_norm_mean=float(np.mean(grad_norm)),
        grad_norm_std=float(np.std(grad_norm)),
        num_examples=len(curvature),
        per_example_curvature=tuple(float(value) for value in curvature),
        relu_stand_in_beta=float(relu_beta) if replaced else None,
    )


def evaluate_accuracy(model: nn.Module, data: Data, max_examples: int | None = None, batch_size: int = 256) -> float:
    """Top-1 accuracy on the first ``max_examples`` examples of ``data`` (all when None)."""
    return accuracy_and_confidence(model, data, max_examples, batch_size)[0]


def _logits_and_labels(
    model: nn.Module, data: Data, max_examples: int | None, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    device, dtype = _device_and_dtype(model)
    logits, labels = [], []
    with _eval_mode(model), torch.no_grad():
        for images, batch_labels in _batches(data, max_examples, batch_size, device, dtype):
            logits.append(first_tensor(model(images)).float().cpu())
            labels.append(batch_labels.cpu())
    return torch.cat(logits), torch.cat(labels)


def _mean_confidence(logits: torch.Tensor) -> float:
    return float(logits.softmax(-1).amax(-1).mean())


def accuracy_and_confidence(
    model: nn.Module, data: Data, max_examples: int | None = None, batch_size: int = 256
) -> tuple[float, float]:
    """Top-1 accuracy and mean top-1 softmax probability on the first ``max_examples`` examples.

    The confidence stands beside the curvature because the loss's curvature falls with it: most of
    a confident model's normalized curvature is the softmax's, seen through the network
    (docs/finetuning.md, "Where the curvature is"), so a model that is merely less sure of itself
    also measures flatter.
    """
    logits, labels = _logits_and_labels(model, data, max_examples, batch_size)
    return float((logits.argmax(-1) == labels).float().mean()), _mean_confidence(logits)


def confidence_matching_scale(logits: torch.Tensor, confidence: float) -> float:
    """The factor s > 0 for which softmax(s * logits) has mean top-1 probability ``confidence``.

    The mean top-1 probability grows with s (from 1/classes at s = 0), so bisection on log s finds
    it; a target out of reach gives the nearest end of [1e-6, 1e6].
    """
    low, high = math.log(1e-6), math.log(1e6)
    for _ in range(60):
        middle = (low + high) / 2
        if _mean_confidence(logits * math.exp(middle)) < confidence:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)


class ScaledLogits(nn.Module):
    """``model`` with its logits multiplied by a fixed factor: the same predictions, another confidence."""

    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model = model
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.factor


def pgd_attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    norm: Norm,
    eps: float,
    steps: int,
    step_size: float | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Normalized adversarial images: PGD with a random start, maximizing cross-entropy.

    The budget is in pixel space (images in [0, 1]), where eps values are conventionally stated:
    the perturbation is built on p = x * std + mean and kept in the eps-ball and in [0, 1].
    ``step_size`` None means 2.5 * eps / steps. The random start is seeded, so the attack is
    deterministic.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if eps < 0 or steps < 0:
        raise ValueError(f"eps and steps must be >= 0, got eps={eps}, steps={steps}")
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    images = images.detach()
    shape = (1, -1, *[1] * (images.dim() - 2))
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    pixels = images * std_t + mean_t

    def within_budget(delta: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            delta = delta * (eps / _nonzero(_per_example_norm(delta))).clamp(max=1.0)
        # Clamping each pixel to [0, 1] only shrinks |delta_i|, so the ball constraint still holds.
        return (pixels + delta).clamp(0.0, 1.0) - pixels

    generator = torch.Generator().manual_seed(0)
    if norm == "linf":
        start = (2 * torch.rand(images.shape, generator=generator, dtype=images.dtype) - 1) * eps
    else:
        direction = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        radius = eps * torch.rand((len(images), *[1] * (images.dim() - 1)), generator=generator, dtype=images.dtype)
        start = direction / _nonzero(_per_example_norm(direction)) * radius
    delta = within_budget(start.to(images.device))
    with _eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            # Adding delta / std to the inputs, rather than renormalizing the pixels, leaves them
            # bit-exact where delta is zero (eps = 0 reproduces the clean predictions).
            logits = first_tensor(model(images + delta / std_t))
            (gradient,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), delta)
            with torch.no_grad():
                if norm == "linf":
                    step = gradient.sign()
                else:
                    step = gradient / _nonzero(_per_example_norm(gradient))
                delta = within_budget(delta + step_size * step)
    return (images + delta / std_t).detach()


def adversarial_accuracy(
    model: nn.Module,
    data: Data,
    norm: Norm,
    eps: float | None = None,
    steps: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_examples: int = 256,
    batch_size: int = 64,
) -> float:
    """Accuracy under ``pgd_attack`` on the first ``max_examples`` examples; PGD_DEFAULTS fill eps/steps."""
    if norm not in PGD_DEFAULTS:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    eps = PGD_DEFAULTS[norm]["eps"] if eps is None else eps
    steps = int(PGD_DEFAULTS[norm]["steps"]) if steps is None else steps
    device, dtype = _device_and_dtype(model)
    correct = total = 0
    with _eval_mode(model):
        for images, labels in _batches(data, max_examples, batch_size, device, dtype):
            adversarial = pgd_attack(model, images, labels, norm, eps, steps, None, mean, std)
            with torch.no_grad():
                correct += int((first_tensor(model(adversarial)).argmax(-1) == labels).sum())
            total += len(labels)
    return correct / total


# The headline budgets per dataset, reported in the table: informative ones, where a plain model
# is neither untouched nor broken. On digits (8x8 images upscaled, wide margins) a resnet18 keeps
# 90% at L-inf 8/255 and 67% at 16/255; CIFAR's and SVHN's are the benchmarks' usual ones.
HEADLINE_BUDGETS: dict[str, dict[str, float]] = {
    "digits": {"linf": 16 / 255, "l2": 1.0},
    "cifar10": {"linf": 8 / 255, "l2": 0.5},
    "cifar100": {"linf": 8 / 255, "l2": 0.5},
    "svhn": {"linf": 8 / 255, "l2": 0.5},
}
# A curve runs 0, h/2, h, 2h, 4h, ... (h the headline budget) until the original's robust accuracy
# falls below CURVE_STOP_BELOW (at h or beyond), at most CURVE_DOUBLINGS doublings past h.
CURVE_STOP_BELOW = 0.2
CURVE_DOUBLINGS = 6
ATTACK_BATCH_SIZE = 128


def headline_budgets(dataset: str | None) -> dict[str, float]:
    """The L2 and L-inf budgets the table reports for ``dataset`` (PGD_DEFAULTS for other datasets)."""
    default = {norm: budget["eps"] for norm, budget in PGD_DEFAULTS.items()}
    return dict(HEADLINE_BUDGETS.get(dataset or "", default))


def curve_budgets(norm: Norm, headline: float) -> list[float]:
    """0, headline/2, headline, then doublings (L-inf ones up to 1, the whole pixel range)."""
    budgets = [0.0, headline / 2, headline]
    for _ in range(CURVE_DOUBLINGS):
        following = budgets[-1] * 2
        if norm == "linf" and following > 1.0:
            if budgets[-1] < 1.0:
                budgets.append(1.0)
            break
        budgets.append(following)
    return budgets


@dataclass(frozen=True)
class RobustnessCurve:
    """PGD robust accuracy at increasing budgets, on the same ``examples`` test images.

    An example broken at a budget counts as broken at every larger one (a perturbation inside
    the smaller ball is inside the larger), so the curve never rises.
    """

    norm: str
    epsilons: tuple[float, ...]
    accuracies: tuple[float, ...]
    examples: int

    def at(self, eps: float) -> float | None:
        """The accuracy at budget ``eps`` (None when the curve did not reach it)."""
        for budget, accuracy in zip(self.epsilons, self.accuracies):
            if math.isclose(budget, eps, rel_tol=1e-9, abs_tol=1e-12):
                return accuracy
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "norm": self.norm,
            "epsilons": list(self.epsilons),
            "accuracies": list(self.accuracies),
            "examples": self.examples,
        }


def _attack_copy(model: nn.Module) -> nn.Module:
    """An eval copy that needs no parameter gradients, with the input-Hessian stand-ins (their
    cheaper backward gives the same input gradients; 10.5 s instead of 16.5 s of PGD on densenet121).

    The weights of a 2-d conv net are laid out channels-last: oneDNN's convolutions run faster
    on them (a PGD step of resnet18 at 32x32, batch 128, on 2 CPU cores: 173 ms instead of 279 ms;
    the logits agree to 4e-6). Inputs stay as they are.
    """
    attacked = copy.deepcopy(model).eval()
    swap_for_input_hessian(attacked)
    dims = {tensor.dim() for tensor in [*attacked.parameters(), *attacked.buffers()]}
    if 4 in dims and 5 not in dims:
        attacked = attacked.to(memory_format=torch.channels_last)
    return attacked.requires_grad_(False)


def _unbroken_by_pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    norm: Norm,
    eps: float,
    steps: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Which examples PGD (``pgd_attack``'s, from the same seeded start) does not break.

    An example is broken as soon as one iterate is misclassified, and leaves the batch then: the
    attack is at least as strong as judging the last iterate, and cheaper once examples fall.
    """
    step_size = 2.5 * eps / max(steps, 1)
    shape = (1, -1, *[1] * (images.dim() - 2))
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    pixels = images * std_t + mean_t

    def within_budget(delta: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            delta = delta * (eps / _nonzero(_per_example_norm(delta))).clamp(max=1.0)
        return (pixels[active] + delta).clamp(0.0, 1.0) - pixels[active]

    generator = torch.Generator().manual_seed(0)
    if norm == "linf":
        start = (2 * torch.rand(images.shape, generator=generator, dtype=images.dtype) - 1) * eps
    else:
        direction = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        radius = eps * torch.rand((len(images), *[1] * (images.dim() - 1)), generator=generator, dtype=images.dtype)
        start = direction / _nonzero(_per_example_norm(direction)) * radius
    unbroken = torch.ones(len(images), dtype=torch.bool, device=images.device)
    active = torch.arange(len(images), device=images.device)
    delta = within_budget(start.to(images.device), active)
    with torch.enable_grad():
        for step in range(steps + 1):
            delta.requires_grad_(step < steps)
            logits = first_tensor(model(images[active] + delta / std_t))
            correct = logits.argmax(-1) == labels[active]
            unbroken[active[~correct]] = False
            if step == steps or not bool(correct.any()):
                break
            (gradient,) = torch.autograd.grad(F.cross_entropy(logits, labels[active], reduction="sum"), delta)
            with torch.no_grad():
                gradient, delta, active = gradient[correct], delta[correct].detach(), active[correct]
                direction = gradient.sign() if norm == "linf" else gradient / _nonzero(_per_example_norm(gradient))
                delta = within_budget(delta + step_size * direction, active)
    return unbroken


def robustness_curve(
    model: nn.Module,
    data: Data,
    norm: Norm,
    epsilons: Sequence[float],
    steps: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_examples: int = 128,
    batch_size: int = ATTACK_BATCH_SIZE,
    stop_below: float | None = None,
    stop_from: float = 0.0,
) -> RobustnessCurve:
    """Robust accuracy under PGD at each budget of ``epsilons`` (increasing; 0 is clean accuracy).

    Each budget attacks only the examples no smaller budget broke. With ``stop_below``, the curve
    ends at the first budget >= ``stop_from`` where the accuracy is below it.
    """
    if norm not in PGD_DEFAULTS:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if list(epsilons) != sorted(epsilons) or not epsilons or epsilons[0] < 0:
        raise ValueError(f"epsilons must be increasing and >= 0, got {list(epsilons)}")
    steps = int(PGD_DEFAULTS[norm]["steps"]) if steps is None else steps
    attacked = _attack_copy(model)
    device, dtype = _device_and_dtype(attacked)
    batches = list(_batches(data, max_examples, batch_size, device, dtype))
    count = sum(len(labels) for _, labels in batches)
    with torch.no_grad():
        standing = [first_tensor(attacked(images)).argmax(-1) == labels for images, labels in batches]
    used: list[float] = []
    accuracies: list[float] = []
    for eps in epsilons:
        if eps > 0:
            for index, (images, labels) in enumerate(batches):
                alive = standing[index].nonzero().flatten()
                if len(alive):
                    unbroken = _unbroken_by_pgd(attacked, images[alive], labels[alive], norm, eps, steps, mean, std)
                    standing[index][alive[~unbroken]] = False
        used.append(float(eps))
        accuracies.append(sum(int(mask.sum()) for mask in standing) / count)
        if stop_below is not None and eps >= stop_from and accuracies[-1] < stop_below:
            break
    return RobustnessCurve(norm, tuple(used), tuple(accuracies), count)


def measurement_protocol(budgets: dict[str, float] | None = None) -> dict[str, str]:
    """What ``estimate_curvature`` and the robustness curves measure, in words; ``budgets`` are the
    headline ones (PGD_DEFAULTS' when None)."""
    budgets = budgets or {norm: budget["eps"] for norm, budget in PGD_DEFAULTS.items()}
    pgd = " and ".join(f"{norm_name(norm)} eps {budget_text(norm, eps)}" for norm, eps in sorted(budgets.items()))
    steps = {int(budget["steps"]) for budget in PGD_DEFAULTS.values()}
    return {
        "curvature": (
            f"{HESSIAN_NORM_NAMES[CURVATURE_METHOD]} ({CURVATURE_STEPS} steps) on input Hessian-vector products of the "
            "cross-entropy, divided by the input-gradient norm"
        ),
        "relu_models": (
            f"measured through a softplus(beta={RELU_STAND_IN_BETA:g}) stand-in for ReLU, as the LCNN paper's baselines"
        ),
        "pgd": (
            f"headline {pgd} in [0,1] pixel space, {'/'.join(map(str, sorted(steps)))} steps, step 2.5*eps/steps, "
            "random start; an example counts as broken once any iterate is misclassified"
        ),
        "robustness_curves": (
            f"budgets 0, h/2, h, 2h, ... (h the headline) until the original falls below {CURVE_STOP_BELOW:.0%} "
            "robust accuracy; the converted and fine-tuned models at the original's budgets; an example broken at "
            "a budget counts as broken at every larger one"
        ),
    }


def norm_name(norm: str) -> str:
    return "L2" if norm == "l2" else "Linf"


def budget_text(norm: str, eps: float) -> str:
    """L-inf budgets in 1/255ths, as they are usually quoted; L2 ones as numbers."""
    if norm == "linf":
        steps = eps * 255
        return f"{round(steps)}/255" if math.isclose(steps, round(steps), abs_tol=1e-6) else f"{eps:.3g}"
    return f"{eps:g}"


@dataclass(frozen=True)
class ModelMetrics:
    """What a run measures of one model on the test set: accuracy, curvature, robustness curves, and
    the curves' accuracy at the headline budgets."""

    accuracy: float
    curvature: CurvatureStats
    robustness: dict[str, RobustnessCurve]  # norm -> curve
    pgd_l2_accuracy: float | None
    pgd_linf_accuracy: float | None
    # None in checkpoints of older releases:
    confidence: float | None = None  # mean top-1 softmax probability
    # mean curvature with the logits scaled to the original's confidence (the original's own curvature
    # for the original): the curvature a change of confidence alone does not explain
    curvature_at_original_confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """report.json's form; the per-example curvatures are kept apart (``curvature.per_example_curvature``)."""
        summary = self.curvature.to_dict()
        return {
            "accuracy": self.accuracy,
            "confidence": self.confidence,
            "curvature_at_original_confidence": self.curvature_at_original_confidence,
            **{key: value for key, value in summary.items() if key != "num_examples"},
            "curvature_examples": summary["num_examples"],
            "pgd_l2_accuracy": self.pgd_l2_accuracy,
            "pgd_linf_accuracy": self.pgd_linf_accuracy,
            "robustness": {norm: curve.to_dict() for norm, curve in self.robustness.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], per_example_curvature: Sequence[float]) -> ModelMetrics:
        """The inverse of ``to_dict`` (a fine-tuning checkpoint keeps the metrics in that form)."""
        curvature = CurvatureStats(
            curvature_mean=data["curvature_mean"],
            curvature_std=data["curvature_std"],
            hessian_norm_mean=data["hessian_norm_mean"],
            hessian_norm_std=data["hessian_norm_std"],
            grad_norm_mean=data["grad_norm_mean"],
            grad_norm_std=data["grad_norm_std"],
            num_examples=data["curvature_examples"],
            per_example_curvature=tuple(per_example_curvature),
            relu_stand_in_beta=data["relu_stand_in_beta"],
        )
        robustness = {
            norm: RobustnessCurve(
                curve["norm"], tuple(curve["epsilons"]), tuple(curve["accuracies"]), curve["examples"]
            )
            for norm, curve in data["robustness"].items()
        }
        return cls(
            data["accuracy"],
            curvature,
            robustness,
            data["pgd_l2_accuracy"],
            data["pgd_linf_accuracy"],
            data.get("confidence"),
            data.get("curvature_at_original_confidence"),
        )


@dataclass(frozen=True)
class MeasurementSettings:
    """How a run's metrics were measured: on how many test images, at which headline PGD budgets."""

    examples: int
    headline_eps: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "headline_eps": dict(self.headline_eps),
            **measurement_protocol(self.headline_eps),
        }


def measure_model(
    model: nn.Module,
    test: Data,
    examples: int,
    budgets: dict[str, float],
    epsilons: dict[str, list[float]] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    original_confidence: float | None = None,
) -> ModelMetrics:
    """Accuracy, confidence, curvature and the L2 and L-inf robustness curves on the first ``examples`` test images.

    ``original_confidence`` is the original's mean top-1 probability on ``test``: the curvature is
    measured once more with ``model``'s logits scaled to that confidence (``ScaledLogits``). None
    means ``model`` is the original, whose curvature at its own confidence is its curvature.

    ``budgets`` are the headline ones (``pgd_*_accuracy``); ``epsilons`` the budgets of each curve,
    or None to run each from 0 until this model falls below CURVE_STOP_BELOW (the original's).
    ``mean``/``std`` are the normalisation of ``test``'s images (the attacks work in pixel space).
    """
    curvature = estimate_curvature(model, test, max_examples=examples)
    curves = {
        norm: robustness_curve(
            model,
            test,
            norm,
            epsilons[norm] if epsilons else curve_budgets(norm, budgets[norm]),
            mean=mean,
            std=std,
            max_examples=examples,
            stop_below=None if epsilons else CURVE_STOP_BELOW,
            stop_from=budgets[norm],
        )
        for norm in ("l2", "linf")
    }
    logits, labels = _logits_and_labels(model, test, None, 256)
    at_original_confidence = curvature.curvature_mean
    if original_confidence is not None:
        rescaled = ScaledLogits(model, confidence_matching_scale(logits, original_confidence))
        at_original_confidence = estimate_curvature(rescaled, test, max_examples=examples).curvature_mean
    return ModelMetrics(
        accuracy=float((logits.argmax(-1) == labels).float().mean()),
        confidence=_mean_confidence(logits),
        curvature_at_original_confidence=at_original_confidence,
        curvature=curvature,
        robustness=dict(curves),
        pgd_l2_accuracy=curves["l2"].at(budgets["l2"]),
        pgd_linf_accuracy=curves["linf"].at(budgets["linf"]),
    )
