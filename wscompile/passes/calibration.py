"""Calibration statistics: one forward pass of the teacher over real inputs, observed by hooks.

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

Both come from the same single forward pass, run in eval mode without gradients; a module called
several times accumulates over its calls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

from wscompile import ir
from wscompile.errors import SelectionError
from wscompile.passes.activation import ChannelMeans

CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm)


@dataclass
class Statistics:
    """What the calibration pass observed."""

    channel_means: ChannelMeans = field(default_factory=dict)  # (module, side) -> mean |activation| per channel
    block_similarity: dict[str, float] = field(default_factory=dict)  # block path -> cos(input, output)
    samples: int = 0  # calibration samples in the batch


class Calibrator:
    """Runs the calibration pass once, when first asked, hooking what has been asked for by then.

    Layer policies ask for block similarities first (during alignment), selection asks for the
    channel means afterwards: both are answered by one forward pass.
    """

    def __init__(self, teacher: nn.Module, graph: nx.DiGraph, inputs: Mapping[str, torch.Tensor], *,
                 channels: bool, description: str) -> None:
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


def observe(teacher: nn.Module, graph: nx.DiGraph, inputs: Mapping[str, torch.Tensor], *, channels: bool,
            blocks: list[str]) -> Statistics:
    """One forward pass of ``teacher`` on ``inputs``; raises SelectionError if it has no weights."""
    if any(t.is_meta for t in [*teacher.parameters(), *teacher.buffers()]):
        raise SelectionError("calibration runs the teacher, but it was built on the meta device without weights; "
                             "build it on the CPU with its weights loaded")
    stats = Statistics(samples=_batch_size(inputs))
    sums: dict[tuple[str, str], torch.Tensor] = {}
    counts: dict[tuple[str, str], int] = {}
    similarity: dict[str, list[float]] = {block: [] for block in blocks}
    handles = []

    def layer_hook(path: str, widths: dict[str, int]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            for side, value in (("in", _first_tensor((args, kwargs))), ("out", _first_tensor(output))):
                if side not in widths or value is None or not value.is_floating_point():
                    continue
                dim = _channel_dim(module, value, widths[side])
                if dim is None:
                    continue
                moved = value.detach().abs().float().movedim(dim, -1).reshape(-1, widths[side])
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
            flat_x, flat_y = x.detach().float().reshape(x.shape[0], -1), y.detach().float().reshape(y.shape[0], -1)
            similarity[path].append(torch.nn.functional.cosine_similarity(flat_x, flat_y, dim=1).mean().item())
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
            teacher(**inputs)
    except Exception as e:
        raise SelectionError(f"the teacher's forward pass on the calibration inputs failed ({type(e).__name__}: "
                             f"{e}); pass inputs named like its forward arguments ({', '.join(inputs)} given)") from e
    finally:
        teacher.train(training)
        for handle in handles:
            handle.remove()
    stats.channel_means = {key: sums[key] / counts[key] for key in sums if counts[key]}
    stats.block_similarity = {b: (sum(v) / len(v) if v else -math.inf) for b, v in similarity.items()}
    return stats


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
