"""Choose: one teacher index set per coupled dimension, by the selection method.

A dimension is a root of ``CoupledDimensions.linked`` (a fused q/k/v output is one with the
attention output projection's input: different channel spaces, the same heads) at one pair of
block sizes. The method sees every member of the dimension (importance methods score its units
from the members' teacher tensors or activations) and keeps ``s`` of ``t`` units::

    indices(dimension) = method.choose(Choice(t, s, key, seed, scores(members)))

Attention laid out by heads (``heads.py``) is chosen per head instead, for the axes it names.
Nothing is written into the plan here: the result is the chosen indices, read by ``settle.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wscompile.matching.coupling import UnionFind
from wscompile.passes.choice import Choice, Member, MethodSpec, Scorer
from wscompile.passes.collect import Pending
from wscompile.passes.heads import AttentionLayout, choose_heads

Dimension = tuple  # (linked root space, teacher units per block, student units per block)


@dataclass
class Chosen:
    """The indices every pending axis will read."""

    by_dimension: dict[Dimension, list[int]]  # flat dimensions
    by_head_axis: dict[tuple[int, str], list[int]]  # (student node, side) of head-structured attention axes
    notes: list[str] = field(default_factory=list)  # what the plan should say about how it chose


def dimension(linked: UnionFind, pending: Pending) -> Dimension:
    """The dimension a pending axis belongs to."""
    return linked.find(pending.space), pending.member.size, pending.student_block


def choose(
    pending: list[Pending],
    linked: UnionFind,
    layouts: list[AttentionLayout],
    method: MethodSpec,
    scorer: Scorer | None,
    *,
    seed: int,
    unobserved: list[str],
    whole_heads: bool,
) -> Chosen:
    """Indices per dimension, in order of first occurrence, and per head-structured axis.

    ``unobserved`` is where the scorer lists dimensions it ranked by fallback (``Evidence``);
    ``whole_heads`` is ``--heads whole``.
    """
    dimensions: dict[Dimension, list[Pending]] = {}
    for p in pending:
        if not p.structured and p.member.size > p.student_block:  # a larger student is grown (grow.py)
            dimensions.setdefault(dimension(linked, p), []).append(p)
    by_dimension: dict[Dimension, list[int]] = {}
    for key, members in dimensions.items():
        first = members[0]
        scores = None if scorer is None else (lambda m=members: scorer([p.member for p in m]))
        choice = Choice(first.member.size, first.student_block, f"{first.student}:{first.axis}", seed, scores)
        by_dimension[key] = _checked(method.choose(choice), choice, method.name)

    by_axis: dict[tuple[int, str], list[Member]] = {}
    for p in pending:
        if p.structured:
            by_axis.setdefault((p.space.node, p.space.side), []).append(p.member)
    channel_cache: dict[tuple[int, str], torch.Tensor | None] = {}

    def channel_scores(node: int, side: str) -> torch.Tensor | None:
        if (node, side) not in channel_cache:
            members = by_axis.get((node, side))
            channel_cache[(node, side)] = scorer(members) if scorer is not None and members else None
        return channel_cache[(node, side)]

    by_head_axis: dict[tuple[int, str], list[int]] = {}
    for attention in layouts:
        by_head_axis.update(choose_heads(attention, method.choose, channel_scores, seed))
    notes = []
    if unobserved:
        notes.append(
            f"activation: {len(unobserved)} dimension(s) read by no observed layer (loose parameters "
            f"only, e.g. {unobserved[0]}) were ranked by weight magnitude"
        )
    if whole_heads and not layouts:
        notes.append(
            "--heads whole: no attention with a known head layout was found; heads were selected as flat channels"
        )
    return Chosen(by_dimension, by_head_axis, notes)


def _checked(indices: list[int], choice: Choice, method: str) -> list[int]:
    assert len(indices) == choice.student_size and indices == sorted(set(indices)), (
        f"method {method} returned {len(indices)} indices for {choice.key}, expected {choice.student_size} ascending"
    )
    assert not indices or (indices[0] >= 0 and indices[-1] < choice.teacher_size), f"{method}: index out of range"
    return indices
