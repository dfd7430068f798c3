"""Export stage, before tracing to ONNX: fold each frozen centered softplus's beta, 1/beta and log 2
shift into the layers around it, where that is exact.

A frozen centered softplus exports as eight elementwise ops: t = beta x, then Relu(t) -
(Log(Sigmoid(|t|)) + log 2), then times 1/beta. Five of them (softplus(t) = Relu(t) -
Log(Sigmoid(|t|))) are the function; the other three are linear maps that a neighbouring layer can
carry in its constants:

- beta, on the input side, into the layer that produces x when that layer is a per-channel affine
  map (a conv, a linear layer or an eval-mode BatchNorm) and this activation is its only reader:
  its weight and bias times beta give t directly;
- 1/beta, on the output side, into the weights of the layers that read the activation when every
  one of them is a conv or a linear layer;
- the log 2 shift as well, when none of those readers pads its input with zeros (a padded conv
  would see zeros where the shifted output has -log 2 / beta): their bias absorbs it.

Each fold rescales constants only, so the folded model computes the same function up to float
rounding. Given an example input, the folded model's output is compared with the unfolded one's and
the unfolded model is kept if they differ by more than rounding (a tracer that reads a model
differently from its eager forward); parity in onnxruntime is checked on the export as always. A
model that cannot be traced, or a layer called at more than one place, is left as it is.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from .fidelity import first_tensor
from .layers.inference import FrozenCenteredSoftplus
from .layers.lipschitz_batchnorm import FrozenLipschitzBatchNorm

# Layers whose output is a per-channel affine map of their input, with a weight and a bias to
# scale: producers that can take beta.
_AFFINE_PRODUCERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    FrozenLipschitzBatchNorm,
    nn.modules.batchnorm._BatchNorm,
)
_LINEAR_READERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# How far (relative to the largest output, at least 1) the folded model's output may be from the
# unfolded one's: rounding from rescaled constants is ~1e-6 (resnet50: 1.6e-6).
FOLD_TOLERANCE = 1e-4


@dataclass(frozen=True)
class FoldSummary:
    """How many activations had each of their three linear maps folded away, out of ``activations``."""

    activations: int
    input_scales: int
    output_scales: int
    shifts: int


def fold_activation_scales(model: nn.Module, example: torch.Tensor | None = None) -> tuple[nn.Module, FoldSummary]:
    """A copy of ``model`` (frozen for inference, eval mode) with every exact fold applied, and what
    was folded; ``model`` itself where nothing could be, or where the copy's output on ``example``
    is not ``model``'s."""
    unfolded = FoldSummary(_count_activations(model), 0, 0, 0)
    if not unfolded.activations:
        return model, unfolded
    try:
        copied = copy.deepcopy(model)  # a traced module shares its layers with the model it traced
        graph_module = copied if isinstance(copied, fx.GraphModule) else _trace(copied)
    except Exception:  # an untraceable model exports unfolded; tracing raises many types
        return model, unfolded
    summary = _fold(graph_module)
    if example is not None and not _same_outputs(model, graph_module, example):
        return model, unfolded
    return graph_module, summary


@torch.no_grad()
def _same_outputs(model: nn.Module, folded: nn.Module, example: torch.Tensor) -> bool:
    expected, got = first_tensor(model(example)), first_tensor(folded(example))
    if expected.shape != got.shape:
        return False
    tolerance = FOLD_TOLERANCE * max(1.0, float(expected.abs().max()))
    return bool((expected - got).abs().max() <= tolerance)


def _fold(graph_module: fx.GraphModule) -> FoldSummary:
    calls = Counter(node.target for node in graph_module.graph.nodes if node.op == "call_module")
    modules: dict[str, nn.Module] = dict(graph_module.named_modules())

    def called_once(node: fx.Node, types: tuple[type, ...]) -> nn.Module | None:
        if node.op != "call_module" or calls[node.target] != 1:
            return None
        module = modules[str(node.target)]
        return module if isinstance(module, types) else None

    activations = input_scales = output_scales = shifts = 0
    for node in list(graph_module.graph.nodes):
        activation = called_once(node, (FrozenCenteredSoftplus,))
        if not isinstance(activation, FrozenCenteredSoftplus):
            continue
        activations += 1
        producer_node = node.args[0] if node.args else None
        if isinstance(producer_node, fx.Node) and len(producer_node.users) == 1:
            producer = called_once(producer_node, _AFFINE_PRODUCERS)
            if producer is not None and _scale_output(producer, activation.input_scale):
                activation.input_scale = 1.0
                input_scales += 1
        readers = [called_once(user, _LINEAR_READERS) for user in node.users]
        feeds_only_linear = all(
            reader is not None and user.args[0] is node and len(user.args) == 1 and not user.kwargs
            for reader, user in zip(readers, node.users)
        )
        if not readers or not feeds_only_linear:
            continue
        linear_readers = [reader for reader in readers if reader is not None]
        fold_offset = all(not _pads_with_zeros(reader) for reader in linear_readers)
        offset = activation.offset if fold_offset else 0.0
        for reader in linear_readers:
            _absorb_input_map(reader, activation.output_scale, offset)
        activation.output_scale = 1.0
        output_scales += 1
        if fold_offset:
            activation.offset = 0.0
            shifts += 1
    graph_module.recompile()
    return FoldSummary(activations, input_scales, output_scales, shifts)


def _trace(model: nn.Module) -> fx.GraphModule:
    from .conversion.tracing import trace

    return trace(model, extra_leaf_types=(FrozenCenteredSoftplus, FrozenLipschitzBatchNorm))


def _count_activations(model: nn.Module) -> int:
    return sum(isinstance(module, FrozenCenteredSoftplus) for module in model.modules())


@torch.no_grad()
def _scale_output(layer: nn.Module, factor: float) -> bool:
    """Multiply ``layer``'s output by ``factor`` through its constants; False where it cannot."""
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if not isinstance(weight, torch.Tensor):
        return False
    if isinstance(layer, nn.modules.batchnorm._BatchNorm) and (layer.training or not layer.track_running_stats):
        return False  # normalised by its batch's statistics, it would undo any scale
    weight.mul_(factor)
    if isinstance(bias, torch.Tensor):
        bias.mul_(factor)
    return True


def _pads_with_zeros(layer: nn.Module) -> bool:
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        return False  # reflect, replicate and circular padding shift with the values they copy
    padding = getattr(layer, "padding", 0)
    if isinstance(padding, str):
        return padding == "same"
    return any(int(p) != 0 for p in (padding if isinstance(padding, tuple) else (padding,)))


@torch.no_grad()
def _absorb_input_map(reader: nn.Module, scale: float, offset: float) -> None:
    """Make a conv or linear layer read ``v`` where it read ``scale * (v - offset)``: weight times
    scale, and bias minus scale * offset * (sum of each output's weights), exact without zero padding."""
    weight = reader.get_parameter("weight")
    if offset:
        per_output = weight.sum(dim=tuple(range(1, weight.dim())))
        if reader.bias is None:
            reader.bias = nn.Parameter(torch.zeros_like(per_output))
        reader.get_parameter("bias").sub_(scale * offset * per_output)
    weight.mul_(scale)
