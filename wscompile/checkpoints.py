"""Checkpoints read as their library loads them, still lazily.

A Hugging Face folder written by ``save_pretrained`` holds the checkpoint's keys, not the module's:
transformers 5 renames keys when it loads them (DINOv2 ``attention.attention.query`` ->
``attention.q_proj``), fuses some (Mixtral's per-expert ``experts.3.w1.weight`` tensors are stacked
into one ``experts.gate_up_proj`` parameter) and adds or strips the base-model prefix
(``model.``). ``hf_checkpoint_source`` asks transformers' own conversion mapping
(``get_model_conversion_mapping``, ``rename_source_key``) which checkpoint tensors make each module
tensor and how, and presents the checkpoint under the module's keys without reading it.

Each module tensor is an expression over checkpoint tensors. The conversion operations that only move
data along one axis are evaluated lazily, so a read of some indices touches only the checkpoint
elements they come from::

    MergeModulelist(dim)  out = stack(parts, dim)     a read selects parts along dim (experts)
    Concatenate(dim)      out = cat(parts, dim)       indices along dim split into per-part ranges
    Chunk(dim) / Split    part_i = out[offset_i : offset_i + size_i] along dim

Any other operation (a rope permutation, a transpose) is run by transformers itself on the whole
input tensors when read; its output shape comes from running it on meta tensors.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from wscompile.weights import AxisIndex, TensorSource, take


class _Node:
    """A module tensor as an expression over checkpoint tensors."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self, index: Sequence[AxisIndex] | None) -> torch.Tensor:
        raise NotImplementedError

    def prefetch(self, index: Sequence[AxisIndex] | None) -> None:
        pass

    def leaves(self) -> Iterator[str]:
        raise NotImplementedError


def _full_index(index: Sequence[AxisIndex] | None, rank: int) -> list[AxisIndex]:
    out = list(index or [])
    return out + [None] * (rank - len(out))


@dataclass
class _Leaf(_Node):
    source: TensorSource
    key: str

    def __post_init__(self) -> None:
        self.shape = tuple(self.source.shape(self.key))
        self.dtype = self.source.dtype(self.key)

    def read(self, index):
        return self.source.read(self.key, index)

    def prefetch(self, index):
        self.source.prefetch(self.key, index)

    def leaves(self):
        yield self.key


@dataclass
class _Stack(_Node):
    parts: list[_Node]
    dim: int

    def __post_init__(self) -> None:
        first = self.parts[0].shape
        self.shape = (*first[: self.dim], len(self.parts), *first[self.dim :])
        self.dtype = self.parts[0].dtype

    def _split(self, index):
        full = _full_index(index, len(self.shape))
        chosen = full[self.dim]
        inner = full[: self.dim] + full[self.dim + 1 :]
        return (range(len(self.parts)) if chosen is None else chosen), inner

    def read(self, index):
        chosen, inner = self._split(index)
        return torch.stack([self.parts[i].read(inner) for i in chosen], dim=self.dim)

    def prefetch(self, index):
        chosen, inner = self._split(index)
        for i in chosen:
            self.parts[i].prefetch(inner)

    def leaves(self):
        for part in self.parts:
            yield from part.leaves()


@dataclass
class _Cat(_Node):
    parts: list[_Node]
    dim: int

    def __post_init__(self) -> None:
        first = self.parts[0].shape
        total = sum(part.shape[self.dim] for part in self.parts)
        self.shape = (*first[: self.dim], total, *first[self.dim + 1 :])
        self.dtype = self.parts[0].dtype

    def _plan(self, index) -> tuple[list[tuple[int, list[AxisIndex]]], torch.Tensor | None]:
        """Per part: (part, its index); and the order that puts the concatenated reads in place."""
        full = _full_index(index, len(self.shape))
        chosen = full[self.dim]
        if chosen is None:
            return [(i, full) for i in range(len(self.parts))], None
        starts = [0]
        for part in self.parts:
            starts.append(starts[-1] + part.shape[self.dim])
        local: dict[int, list[int]] = {}
        for position in chosen:
            i = next(j for j in range(len(self.parts)) if starts[j] <= position < starts[j + 1])
            local.setdefault(i, []).append(position - starts[i])
        reads, order_of = [], {}
        for i in sorted(local):
            positions = sorted(set(local[i]))
            for position in positions:
                order_of[starts[i] + position] = len(order_of)
            reads.append((i, full[: self.dim] + [positions] + full[self.dim + 1 :]))
        order = torch.tensor([order_of[p] for p in chosen], dtype=torch.long)
        return reads, None if order.tolist() == list(range(len(order_of))) else order

    def read(self, index):
        reads, order = self._plan(index)
        out = torch.cat([self.parts[i].read(sub) for i, sub in reads], dim=self.dim)
        return out if order is None else out.index_select(self.dim, order)

    def prefetch(self, index):
        for i, sub in self._plan(index)[0]:
            self.parts[i].prefetch(sub)

    def leaves(self):
        for part in self.parts:
            yield from part.leaves()


@dataclass
class _Narrow(_Node):
    inner: _Node
    dim: int
    start: int
    length: int

    def __post_init__(self) -> None:
        shape = list(self.inner.shape)
        shape[self.dim] = self.length
        self.shape = tuple(shape)
        self.dtype = self.inner.dtype

    def _inner_index(self, index):
        full = _full_index(index, len(self.shape))
        chosen = full[self.dim]
        full[self.dim] = (
            range(self.start, self.start + self.length) if chosen is None else [self.start + i for i in chosen]
        )
        return full

    def read(self, index):
        return self.inner.read(self._inner_index(index))

    def prefetch(self, index):
        self.inner.prefetch(self._inner_index(index))

    def leaves(self):
        yield from self.inner.leaves()


@dataclass
class _Eager(_Node):
    """The output ``target`` of a conversion op transformers runs itself, on whole input tensors."""

    op: object
    inputs: dict[str, list[_Node] | _Node]
    target: str
    kwargs: dict = field(repr=False)
    shape: tuple[int, ...]  # of the output, from running the op on meta tensors (``_apply``)
    dtype: torch.dtype

    def read(self, index):
        out = _single(_run_op(self.op, self.inputs, self.kwargs, lambda node: node.read(None))[self.target])
        return take(out, index) if index is not None else out

    def leaves(self):
        for nodes in self.inputs.values():
            for node in nodes if isinstance(nodes, list) else [nodes]:
                yield from node.leaves()


class ConvertedSource:
    """A checkpoint seen under its module's keys; ``nodes`` says how each module tensor is made."""

    def __init__(self, inner: TensorSource, nodes: dict[str, _Node], unexpected: list[str]) -> None:
        self.inner = inner
        self.nodes = nodes
        self.unexpected = unexpected  # checkpoint keys no module tensor is made from

    @property
    def bytes_read(self) -> int:
        return getattr(self.inner, "bytes_read", 0)

    def keys(self) -> Iterator[str]:
        return iter(self.nodes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.nodes[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.nodes[key].dtype

    def read(self, key: str, index: Sequence[AxisIndex] | None = None) -> torch.Tensor:
        return self.nodes[key].read(index)

    def prefetch(self, key: str, index: Sequence[AxisIndex] | None = None) -> None:
        self.nodes[key].prefetch(index)

    def origin(self, key: str) -> list[str]:
        """The checkpoint keys module tensor ``key`` is made from."""
        return list(self.nodes[key].leaves())


def is_transformers_model(module: nn.Module) -> bool:
    # NOTE: an instance of a transformers class means transformers is imported already; importing it
    # here just to say "no" would cost a timm or torchvision run seconds.
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def hf_checkpoint_source(module: nn.Module, source: TensorSource) -> ConvertedSource:
    """``source`` (a checkpoint as stored) under ``module``'s state_dict keys, as ``from_pretrained`` maps them.

    Keys go through transformers' conversion mapping for the model's class (renamings, then at most
    one converter) and its base-model prefix rule, in the order transformers processes them, so
    fused tensors list their parts as it stacks them. Nothing is read here.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    module_state = module.state_dict()
    mapping = get_model_conversion_mapping(module)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    prefix = module.base_model_prefix

    nodes: dict[str, _Node] = {}
    pending: dict[str, WeightConverter] = {}
    unexpected: list[str] = []
    for key in sorted(source.keys(), key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, module_state)
        if renamed not in module_state and key in module_state:
            renamed, pattern = rename_source_key(key, [], [], prefix, module_state)
        if renamed not in module_state:
            unexpected.append(key)
        elif pattern is None:
            nodes.setdefault(renamed, _Leaf(source, key))
        else:
            converter = pending.setdefault(renamed, copy.deepcopy(by_pattern[pattern]))
            converter.collected_tensors[pattern].append(_Leaf(source, key))
    for first_target, converter in pending.items():
        for target, node in _convert(converter, first_target, module).items():
            nodes.setdefault(target, node)
    return ConvertedSource(source, nodes, unexpected)


def _convert(converter, first_target: str, module: nn.Module) -> dict[str, _Node]:
    """Run ``converter``'s operations on expression nodes; returns full module keys -> nodes."""
    tensors: dict[str, list[_Node] | _Node] = {k: list(v) for k, v in converter.collected_tensors.items()}
    sources, targets = converter.source_patterns, converter.target_patterns
    kwargs = dict(
        source_patterns=sources,
        target_patterns=targets,
        full_layer_name=first_target,
        model=module,
        config=module.config,
    )
    for op in converter.operations:
        tensors = _apply(op, tensors, kwargs)
    # As WeightConverter.convert: target patterns become full keys around the first target's name.
    full_name = first_target.replace("*.", "0.") if "*." in first_target else first_target
    found = next((full_name.partition(k) for k in tensors if k in full_name), None)
    if found is None:
        return {k: v for k, v in tensors.items() if isinstance(v, _Node)}
    head, _, tail = found
    return {head + k + tail: v[0] if isinstance(v, list) else v for k, v in tensors.items()}


def _single(value):
    """The one item of a list, or ``value`` itself (ops hand over either)."""
    return value[0] if isinstance(value, list) else value


def _apply(op, tensors: dict[str, list[_Node] | _Node], kwargs: dict) -> dict[str, list[_Node] | _Node]:
    """One conversion op on nodes: lazily for the ops that move data along one axis, else eagerly."""
    from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, Split

    sources, targets = kwargs["source_patterns"], kwargs["target_patterns"]
    kind = type(op)
    if kind is MergeModulelist:
        return {
            op.get_target_pattern(len(tensors), pattern, targets): (
                value if isinstance(value, _Node) else _Stack(value, op.dim)
            )
            for pattern, value in tensors.items()
        }
    if kind is Concatenate:
        parts: list[_Node] = []
        for pattern in sources:
            if pattern in tensors:
                value = tensors[pattern]
                parts.extend(value if isinstance(value, list) else [value])
        return {op.get_target_pattern(targets): _Cat(parts, op.dim)}
    if kind in (Chunk, Split) and len(tensors) == 1:
        whole = _single(next(iter(tensors.values())))
        if kind is Chunk:
            names = op.get_target_patterns(targets, config=kwargs["config"])
            step = math.ceil(whole.shape[op.dim] / len(names))  # torch.chunk's sizes
            sizes = [max(0, min(step, whole.shape[op.dim] - i * step)) for i in range(len(names))]
        else:
            names = targets
            layer = kwargs["full_layer_name"]
            sizes = [kwargs["model"].get_parameter(layer.replace(targets[0], t)).shape[op.dim] for t in targets]
        out, start = {}, 0
        for name, size in zip(names, sizes, strict=True):
            out[name] = _Narrow(whole, op.dim, start, size)
            start += size
        return out
    # Anything else: transformers runs the op on real tensors when a target is read; run on meta
    # tensors here, it tells the targets and their shapes.
    meta = _run_op(op, tensors, kwargs, lambda node: torch.empty(node.shape, dtype=node.dtype, device="meta"))
    return {
        target: _Eager(op, dict(tensors), target, kwargs, tuple(_single(out).shape), _single(out).dtype)
        for target, out in meta.items()
    }


def _run_op(op, tensors: dict[str, list[_Node] | _Node], kwargs: dict, value) -> dict:
    """``op.convert`` on ``value(node)`` for every node of ``tensors`` (a fresh dict: ops pop their inputs)."""
    return op.convert(
        {k: [value(n) for n in v] if isinstance(v, list) else value(v) for k, v in tensors.items()}, **kwargs
    )
