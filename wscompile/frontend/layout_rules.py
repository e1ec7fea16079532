"""Layout rules: the structure of a projection's output axis, read off the ops consuming it.

To the IR a linear projection's output is one axis of width ``W``. How the model goes on to use
that output can say the axis has structure a selection must keep together:

- ``fused_split``: the output is chunked/split into k equal parts, each used on its own
  (fused gate/up, GPT-2's ``c_attn``): k logical blocks;
- ``fused_reshape``: the output is reshaped to ``[..., k, H, d]`` and the k axis is then indexed,
  unbound or split (timm's fused ``qkv``): k blocks of H heads;
- ``head_reshape``: the output is reshaped to ``[..., H, d]``: H attention heads;
- ``rotary``: the heads' dims are rotated in pairs ``(i, i + d/2)`` by ``rotate_half``
  (``x * cos + rotate_half(x) * sin``).

Each rule names the graph evidence it requires in its docstring; none concludes from a shape
alone. Between a projection and the op a rule looks for, data may pass through any number of
layout-only ops (permutes, transposes, casts, reshapes that keep the axis in question whole);
``views`` follows them and tracks where that axis goes. ``projection_layout`` applies the rules in
data-flow order and is what the builder calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx

if TYPE_CHECKING:
    from wscompile.frontend.builder import Source

RESHAPES = {"reshape", "view", "unflatten", "_unsafe_view", "view_as"}
SPLITS = {"chunk", "split", "unbind", "split_with_sizes", "tensor_split"}
# Ops whose output is their input's data in the same layout (dtype or memory format aside).
SAME_LAYOUT = {"contiguous", "to", "type_as", "float", "clone", "_to_copy"}
PERMUTES = {"permute", "transpose"}
HALF_SLICES = {"slice", "getitem", "narrow"}


@dataclass(frozen=True)
class Layout:
    """What the rules found for one projection's output axis."""

    blocks: int = 1  # logical blocks stacked along the axis (fused q/k/v: 3)
    heads: int | None = None  # attention heads per block, None if not read as heads
    rotary: bool = False  # head dims rotate in pairs (i, i + d/2)


def projection_layout(node: torch.fx.Node, src: Source) -> Layout:
    """The layout of ``node``'s last axis (a projection's output), from the first rule whose evidence
    is found along the data flow: a split into parts ends the search, a head reshape adds rotary."""
    shape = src.shape(node)
    if not shape:
        return Layout()
    width = shape[-1]
    for view, axis in views(node, len(shape) - 1, src):
        if axis != len(src.shape(view)) - 1:  # the features are not the last axis here
            continue
        for user in view.users:
            parts = fused_split(user, view, width, src)
            if parts:
                return Layout(blocks=parts)
            found = fused_reshape(user, width, src) or head_reshape(user, width, src)
            if found:
                blocks, heads = found
                return Layout(blocks, heads, rotary(user, src))
    return Layout()


def fused_split(user: torch.fx.Node, data: torch.fx.Node, width: int, src: Source) -> int | None:
    """k when ``user`` cuts the last axis of ``data`` (of size ``width``) into k >= 2 equal parts and
    all k parts are used on their own.

    Evidence: a ``chunk``/``split``/``split_with_sizes``/``tensor_split`` along the last axis whose
    sizes are equal and add up to ``width``, and one ``getitem`` user, itself used, for each of
    the k parts (a split whose parts are not all used says nothing about blocks).
    """
    name = src.op_name(user) or ""
    if name not in SPLITS or name == "unbind" or _arg(user, 0, "input") is not data:
        return None
    rank = len(src.shape(data))
    if _dim(_arg(user, 2, "dim", 0), rank) != rank - 1:
        return None
    how = _arg(user, 1, "split_size_or_sections", None)
    if how is None:
        how = next(
            (user.kwargs[k] for k in ("chunks", "split_size", "sections", "indices_or_sections") if k in user.kwargs),
            None,
        )
    if isinstance(how, (list, tuple)):
        sizes = list(how)
        parts = len(sizes) if len(set(sizes)) == 1 and sum(sizes) == width else None
    elif isinstance(how, int) and how > 0:
        if name in ("chunk", "tensor_split"):
            parts = how if width % how == 0 else None
        else:
            parts = width // how if width % how == 0 else None
    else:
        parts = None
    if not parts or parts < 2:
        return None
    taken = {
        u.args[1] for u in user.users if (src.op_name(u) or "") == "getitem" and isinstance(u.args[1], int) and u.users
    }
    return parts if taken == set(range(parts)) else None


def fused_reshape(user: torch.fx.Node, width: int, src: Source) -> tuple[int, int] | None:
    """(k, H) when ``user`` reshapes ``width`` features into ``[..., k, H, d]`` with k >= 2 and the k
    axis is then taken apart.

    Evidence: after the reshape, and any permutes, transposes or casts (which may move the k axis),
    a ``select`` or integer index, ``unbind``, ``split`` or ``chunk`` along the k axis: the k parts
    are used as separate tensors. A reshape that only looks like it (``[B, T, H, d]`` of a
    projection with no sequence axis) is not fused.
    """
    shape = src.shape(user)
    if (src.op_name(user) or "") not in RESHAPES or not shape or len(shape) <= 3:
        return None
    k, heads, dim = shape[-3:]
    if k < 2 or heads * dim < 2 or k * heads * dim != width:
        return None
    for view, axis in views(user, len(shape) - 3, src, reshapes=False):
        rank = len(src.shape(view))
        for consumer in view.users:
            if _arg(consumer, 0, "input") is view and _takes_apart(consumer, axis, rank, src):
                return k, heads
    return None


def head_reshape(user: torch.fx.Node, width: int, src: Source) -> tuple[int, int] | None:
    """(1, H) when ``user`` reshapes ``width`` features into ``[..., H, d]`` with H, d > 1.

    Evidence: the reshape itself, splitting the whole feature axis into its last two axes.
    """
    shape = src.shape(user)
    if (src.op_name(user) or "") not in RESHAPES or not shape or len(shape) <= 2:
        return None
    heads, dim = shape[-2:]
    if heads > 1 and dim > 1 and heads * dim == width:
        return 1, heads
    return None


def rotary(reshape: torch.fx.Node, src: Source) -> bool:
    """True when the head dim of ``reshape``'s output (its last axis) is rotated by ``rotate_half``.

    Evidence, following the data from the head reshape through layout-only ops (any number of
    them): a tensor ``x`` whose last axis is the head dim ``d`` is cut at ``d/2`` (two slices or
    narrows, or a chunk/split into 2), the halves are concatenated back with one of them negated
    (``cat(-x2, x1)``), and that rotated tensor times one factor is added to ``x`` times another
    (``x * cos + rotate_half(x) * sin``). A slice at ``d/2`` alone is not rotary.
    """
    shape = src.shape(reshape)
    if not shape or shape[-1] < 2 or shape[-1] % 2:
        return False
    reached = dict(views(reshape, len(shape) - 1, src))
    for x, axis in reached.items():
        if axis != len(src.shape(x)) - 1:
            continue
        for rotated in _rotated_halves(x, src):
            if _mixed_with(rotated, set(reached), src):
                return True
    return False


def views(node: torch.fx.Node, axis: int, src: Source, *, reshapes: bool = True) -> Iterator[tuple[torch.fx.Node, int]]:
    """``node`` and every node computing its data rearranged by layout-only ops, each with the
    position ``axis`` has there, breadth first: permutes and transposes move the axis, casts keep
    it, and (with ``reshapes``) a reshape keeping it as the last axis, of the same size, passes it on.
    """
    seen = {node}
    queue = deque([(node, axis)])
    while queue:
        current, at = queue.popleft()
        yield current, at
        for user in current.users:
            if user in seen:
                continue
            moved = _moved_axis(user, current, at, src, reshapes)
            if moved is not None:
                seen.add(user)
                queue.append((user, moved))


def _moved_axis(user: torch.fx.Node, data: torch.fx.Node, axis: int, src: Source, reshapes: bool) -> int | None:
    """Where ``axis`` of ``data`` is in ``user``'s output, None if ``user`` is not layout-only."""
    name = src.op_name(user) or ""
    before, after = src.shape(data), src.shape(user)
    if _arg(user, 0, "input") is not data or not before or not after:
        return None
    if name in SAME_LAYOUT:
        return axis if len(after) == len(before) else None
    if name == "permute":
        dims = list(user.args[1:]) or [user.kwargs.get("dims")]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = list(dims[0])
        if len(dims) != len(before) or not all(isinstance(d, int) for d in dims):
            return None
        return [_dim(d, len(before)) for d in dims].index(axis)
    if name == "transpose":
        first, second = _arg(user, 1, "dim0"), _arg(user, 2, "dim1")
        if not isinstance(first, int) or not isinstance(second, int):
            return None
        swap = {_dim(first, len(before)): _dim(second, len(before))}
        swap.update({v: k for k, v in swap.items()})
        return swap.get(axis, axis)
    if reshapes and name in RESHAPES and axis == len(before) - 1 and after[-1] == before[-1]:
        return len(after) - 1
    return None


def _takes_apart(user: torch.fx.Node, axis: int, rank: int, src: Source) -> bool:
    """``user`` indexes, unbinds or splits its input along ``axis``."""
    name = src.op_name(user) or ""
    if name == "select":
        return _dim(_arg(user, 1, "dim"), rank) == axis
    if name == "unbind":
        return _dim(_arg(user, 1, "dim", 0), rank) == axis
    if name in SPLITS:
        return _dim(_arg(user, 2, "dim", 0), rank) == axis
    if name == "getitem":
        return _indexed_axis(user.args[1] if len(user.args) > 1 else None) == axis
    return False


def _indexed_axis(index: Any) -> int | None:
    """The axis an integer in a ``x[...]`` index selects (only when no ``...`` or ``None`` shifts axes)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis or i is None for i in items):
        return None
    return next((at for at, i in enumerate(items) if isinstance(i, int) and not isinstance(i, bool)), None)


def _rotated_halves(x: torch.fx.Node, src: Source) -> Iterator[torch.fx.Node]:
    """``cat`` nodes joining the two halves of ``x``'s last axis back to ``x``'s shape, one half negated."""
    halves = _halves(x, src)
    for half in halves:
        for h in _same_data(half, src):
            for negated in h.users:
                if not _is_negation(negated, src):
                    continue
                for cat in _users_named(negated, "cat", src):
                    parts = _arg(cat, 0, "tensors")
                    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or src.shape(cat) != src.shape(x):
                        continue
                    stripped = [_back_through_casts(p, src) for p in parts]
                    if negated in stripped and any(p in halves and p is not half for p in stripped):
                        yield cat


def _halves(x: torch.fx.Node, src: Source) -> set[torch.fx.Node]:
    """Nodes holding ``x[..., :d/2]`` or ``x[..., d/2:]``: slices/narrows of the last axis to half its
    size, or the parts of a chunk/split of it into two."""
    shape = src.shape(x)
    half = (*shape[:-1], shape[-1] // 2)
    found = set()
    for user in x.users:
        name = src.op_name(user) or ""
        if _arg(user, 0, "input") is not x:
            continue
        if name in HALF_SLICES and src.shape(user) == half:
            found.add(user)
        if name in SPLITS and name != "unbind":
            parts = [u for u in user.users if (src.op_name(u) or "") == "getitem" and src.shape(u) == half]
            if len(parts) == 2:
                found.update(parts)
    return found


def _is_negation(node: torch.fx.Node, src: Source) -> bool:
    name = src.op_name(node) or ""
    if name == "neg":
        return True
    return name == "mul" and any(isinstance(a, (int, float)) and a == -1 for a in node.args)


def _mixed_with(rotated: torch.fx.Node, unrotated: set[torch.fx.Node], src: Source) -> bool:
    """``rotated * a + x * b`` for some ``x`` in ``unrotated`` (casts aside)."""
    for product in _users_named(rotated, "mul", src):
        for total in _users_named(product, "add", src):
            for other in total.args:
                other = _back_through_casts(other, src)
                if not isinstance(other, torch.fx.Node) or other is product or src.op_name(other) != "mul":
                    continue
                factors = [a for a in other.args if isinstance(a, torch.fx.Node)]
                if any(a in unrotated or _back_through_casts(a, src) in unrotated for a in factors):
                    return True
    return False


def _users_named(node: torch.fx.Node, name: str, src: Source) -> Iterator[torch.fx.Node]:
    """The ``name`` ops reading ``node`` or a cast of it."""
    for same in _same_data(node, src):
        for user in same.users:
            if src.op_name(user) == name:
                yield user


def _same_data(node: torch.fx.Node, src: Source) -> Iterator[torch.fx.Node]:
    """``node`` and the casts of it (recursively)."""
    yield node
    for user in node.users:
        if (src.op_name(user) or "") in SAME_LAYOUT and user.args and user.args[0] is node:
            yield from _same_data(user, src)


def _back_through_casts(node: Any, src: Source) -> Any:
    while isinstance(node, torch.fx.Node) and (src.op_name(node) or "") in SAME_LAYOUT and node.args:
        node = node.args[0]
    return node


def _arg(node: torch.fx.Node, position: int, name: str, default: Any = None) -> Any:
    """Argument ``position`` of a call, or its keyword ``name``."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _dim(dim: Any, rank: int) -> int | None:
    """A dim argument as a non-negative axis."""
    if not isinstance(dim, int) or isinstance(dim, bool) or not -rank <= dim < rank:
        return None
    return dim % rank
