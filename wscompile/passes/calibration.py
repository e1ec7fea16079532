"""Calibration statistics: forward passes of the teacher over real inputs, observed by hooks.

For every teacher layer (a component of the teacher graph that is a module call, not a loose
parameter) the pass records the mean absolute value of each input and output channel::

    a(c) = (1 / N) * sum over samples and positions of |x[..., c, ...]|

The channel axis is the one whose size is the layer's channel count: axis 1 for convolutions and
channels-first layers (``BatchNorm2d``, ``LayerNorm2d``, ...), the last axis otherwise. These feed
the ``activation`` selection method (``activation.py``).

For every block of a stage it records how much the block changes its input, the cosine
similarity of the block's input ``x`` and output ``y``, each sample flattened::

    sim(block) = mean over samples of  <x, y> / (||x|| * ||y||)

A block with ``sim`` close to 1 passes its input through almost unchanged and is the first to
drop under the ``importance`` layer policy (``matching/layers.py``). A block whose output has
another shape than its input (a downsampling entry block) gets ``-inf``: it is never dropped.

Both come from the same pass over the inputs, run in eval mode without gradients, in batches of
``BATCH_SIZE`` samples over at most the first ``MAX_SAMPLES``: memory is bounded by one batch's
activations, however many samples are given. A module called several times accumulates over its
calls. When the inputs hold an ``attention_mask`` (batch, positions), padded positions (mask 0) are
left out of both statistics wherever a hooked tensor is laid out (batch, positions, ...).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

from wscompile import ir
from wscompile.choices import CALIB_BATCH_SIZE, CALIB_MAX_SAMPLES
from wscompile.errors import SelectionError
from wscompile.passes.activation import ChannelMeans

MAX_SAMPLES = CALIB_MAX_SAMPLES  # calibration samples used at most (the first ones)
BATCH_SIZE = CALIB_BATCH_SIZE  # samples per calibration forward
MASK_INPUT = "attention_mask"  # forward argument marking real (1) and padded (0) positions
CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass
class Statistics:
    """What the calibration pass observed."""

    channel_means: ChannelMeans = field(default_factory=dict)  # (module, side) -> mean |activation| per channel
    block_similarity: dict[str, float] = field(default_factory=dict)  # block path -> cos(input, output)
    samples: int = 0  # calibration samples used (at most MAX_SAMPLES)


class Calibrator:
    """Runs the calibration pass once, when first asked, hooking what has been asked for by then.

    Layer policies ask for block similarities first (during alignment), selection asks for the
    channel means afterwards: both are answered by one forward pass.
    """

    def __init__(
        self,
        teacher: nn.Module,
        graph: nx.DiGraph,
        inputs: Mapping[str, torch.Tensor],
        *,
        channels: bool,
        description: str,
    ) -> None:
        self.teacher, self.graph, self.inputs = teacher, graph, dict(inputs)
        self.channels = channels  # whether channel means are wanted
        self.description = description  # what the inputs are, for the plan ("32 images from photos/")
        self._statistics: Statistics | None = None

    def block_similarity(self, blocks: list[str]) -> dict[str, float]:
        return self._run(blocks).block_similarity

    def channel_means(self) -> ChannelMeans:
        return self._run([]).channel_means

    def _run(self, blocks: list[str]) -> Statistics:
        if self._statistics is None:
            self._statistics = observe(self.teacher, self.graph, self.inputs, channels=self.channels, blocks=blocks)
        assert set(blocks) <= set(self._statistics.block_similarity), "blocks asked for after the calibration pass"
        return self._statistics


def observe(
    teacher: nn.Module, graph: nx.DiGraph, inputs: Mapping[str, torch.Tensor], *, channels: bool, blocks: list[str]
) -> Statistics:
    """``teacher`` run on ``inputs`` batch by batch, observed; raises SelectionError if it has no weights."""
    if any(t.is_meta for t in [*teacher.parameters(), *teacher.buffers()]):
        raise SelectionError(
            "calibration runs the teacher, but it was built on the meta device without weights; "
            "build it on the CPU with its weights loaded"
        )
    total = _batch_size(inputs)
    stats = Statistics(samples=min(total, MAX_SAMPLES))
    sums: dict[tuple[str, str], torch.Tensor] = {}
    counts: dict[tuple[str, str], int] = {}
    similarity: dict[str, list[float]] = {block: [] for block in blocks}  # per sample
    handles = []
    mask: torch.Tensor | None = None  # the current batch's attention mask, as bools

    def layer_hook(path: str, widths: dict[str, int]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            for side, value in (("in", _first_tensor((args, kwargs))), ("out", _first_tensor(output))):
                if side not in widths or value is None or not value.is_floating_point():
                    continue
                dim = _channel_dim(module, value, widths[side])
                if dim is None:
                    continue
                moved = value.detach().abs().float().movedim(dim, -1)
                if dim >= 2 and _masks(mask, moved):  # the batch and position axes stay in front
                    moved = moved[mask]
                moved = moved.reshape(-1, widths[side])
                key = (path, side)
                sums[key] = sums.get(key, 0) + moved.sum(0)
                counts[key] = counts.get(key, 0) + moved.shape[0]

        return hook

    def block_hook(path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            x, y = _first_tensor((args, kwargs)), _first_tensor(output)
            if x is None or y is None or x.shape != y.shape or x.dim() == 0:
                similarity[path].append(-math.inf)
                return
            x, y = x.detach().float(), y.detach().float()
            if _masks(mask, x):  # padded positions zeroed in both: they add nothing to the cosine
                keep = mask.reshape(*mask.shape, *[1] * (x.dim() - mask.dim()))
                x, y = x * keep, y * keep
            flat_x, flat_y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
            similarity[path].extend(torch.nn.functional.cosine_similarity(flat_x, flat_y, dim=1).tolist())

        return hook

    for path, widths in (_layer_widths(graph) if channels else {}).items():
        module = _submodule(teacher, path)
        if module is not None:
            handles.append(module.register_forward_hook(layer_hook(path, widths), with_kwargs=True))
    for path in blocks:
        module = _submodule(teacher, path)
        if module is not None:
            handles.append(module.register_forward_hook(block_hook(path), with_kwargs=True))
    training = teacher.training
    try:
        teacher.eval()
        with torch.no_grad():
            for batch in _batches(inputs, total, stats.samples):
                given = batch.get(MASK_INPUT)
                mask = given.bool() if isinstance(given, torch.Tensor) and given.dim() == 2 else None
                teacher(**batch)
    except Exception as e:
        raise SelectionError(
            f"the teacher's forward pass on the calibration inputs failed ({type(e).__name__}: "
            f"{e}); pass inputs named like its forward arguments ({', '.join(inputs)} given)"
        ) from e
    finally:
        teacher.train(training)
        for handle in handles:
            handle.remove()
    stats.channel_means = {key: sums[key] / counts[key] for key in sums if counts[key]}
    stats.block_similarity = {b: (sum(v) / len(v) if v else -math.inf) for b, v in similarity.items()}
    return stats


def _batches(inputs: Mapping[str, torch.Tensor], total: int, samples: int) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``samples`` of ``inputs`` in batches of ``BATCH_SIZE`` (tensors without the batch axis whole)."""
    for start in range(0, samples, BATCH_SIZE):
        yield {
            name: value[start : start + BATCH_SIZE] if _batched(value, total) else value
            for name, value in inputs.items()
        }


def _batched(value: object, total: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total


def _masks(mask: torch.Tensor | None, value: torch.Tensor) -> bool:
    """Whether ``mask`` (batch, positions) lays over the leading axes of ``value``."""
    return mask is not None and value.dim() > mask.dim() and tuple(value.shape[: mask.dim()]) == tuple(mask.shape)


def describe(used: int, total: int, what: str, name: str) -> str:
    """The plan's calibration record: ``"512 of 20000 lines from c.txt (at most 512 samples, batches of 16)"``."""
    count = f"{used} of {total}" if used < total else f"{used}"
    return f"{count} {what} from {name} (at most {MAX_SAMPLES} samples, batches of {BATCH_SIZE})"


def _layer_widths(graph: nx.DiGraph) -> dict[str, dict[str, int]]:
    """Teacher module path -> {"out": output channels, "in": input channels} of its layers."""
    widths: dict[str, dict[str, int]] = {}
    for node in sorted(graph.nodes):
        data = graph.nodes[node]
        if data[ir.KIND] == ir.KIND_PARAM:
            continue
        for slot in data[ir.TENSORS]:
            for side, axis in (("out", slot.out_axis), ("in", slot.in_axis)):
                if axis is not None and slot.shape[axis] > 1:
                    widths.setdefault(data[ir.MODULE], {}).setdefault(side, slot.shape[axis])
    return widths


def _channel_dim(module: nn.Module, value: torch.Tensor, channels: int) -> int | None:
    if value.dim() < 2:
        return None
    channels_first = isinstance(module, CHANNELS_FIRST) or type(module).__name__.endswith(("1d", "2d", "3d"))
    preferred = 1 if channels_first else value.dim() - 1
    if value.shape[preferred] == channels:
        return preferred
    return next((d for d in range(value.dim() - 1, 0, -1) if value.shape[d] == channels), None)


def _first_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _batch_size(inputs: Mapping[str, torch.Tensor]) -> int:
    first = _first_tensor(dict(inputs))
    return int(first.shape[0]) if first is not None and first.dim() else 1
