"""Grow: fill a coupled dimension where the student has more units than its teacher.

Only under ``--allow-partial``, and only for grouped axes (channels, not kernels or tables). A
dimension growing from ``t`` to ``s`` units per block reads every teacher unit and fills the
``s - t`` extra ones by a rule:

- ``widen`` (Net2Net, Chen et al. 2016; bert2BERT): student unit ``j`` replicates teacher unit
  ``j mod t``. Every axis reading the dimension as input divides the unit it reads by that unit's
  replication count ``n(i)``, so a consumer computes what its teacher computed::

      y = sum_j  (W[:, j mod t] / n(j mod t)) * x[j mod t]  =  sum_i  W[:, i] * x[i]

  This holds through elementwise steps (activations, residual adds, a BatchNorm's per-channel
  statistics) and through a norm over the channels (LayerNorm, RMSNorm) when every unit is
  replicated equally (``s % t == 0``: mean and variance over the channels are unchanged). It does
  not hold through attention heads (softmax over a grown head dimension), a group norm or a grouped
  (not depthwise) convolution, or where a layer reads the grown outputs in another layout (a grouped
  convolution's input, a reshape into heads: it is then outside the dimension), so there
  the dimension falls back to ``init`` and its group says why;
- ``init``: the first ``t`` student units read the teacher's, the extra ones keep the student's own
  initialization.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import networkx as nx

from wscompile import ir
from wscompile.matching.coupling import Space, UnionFind, passes_through
from wscompile.passes.choose import Dimension, dimension
from wscompile.passes.collect import Pending
from wscompile.plan import GROW_INIT, GROW_WIDEN

# Norms over the channel axis whose statistics survive equal replication of every unit.
CHANNEL_NORMS = ("layer_norm", "rms_norm")


@dataclass(frozen=True)
class Growth:
    """How one growing dimension is filled."""

    rule: str  # GROW_WIDEN or GROW_INIT
    indices: list[int]  # teacher unit per student unit (widen: s of them), or the teacher part (init: t)
    replicas: list[int] | None  # widen: student units filled by each teacher unit
    note: str | None  # why widen fell back to init


def grow(pending: list[Pending], linked: UnionFind, student_graph: nx.DiGraph, *, rule: str) -> dict[Dimension, Growth]:
    """The filling of every dimension whose student block is larger than its teacher block."""
    dimensions: dict[Dimension, list[Pending]] = {}
    for p in pending:
        if p.student_block > p.member.size:
            dimensions.setdefault(dimension(linked, p), []).append(p)
    out = {}
    for key, members in dimensions.items():
        t, s = members[0].member.size, members[0].student_block
        obstacle = _not_preserving(members, student_graph, linked, t, s) if rule == GROW_WIDEN else None
        if rule == GROW_WIDEN and obstacle is None:
            indices = [j % t for j in range(s)]
            counts = Counter(indices)
            out[key] = Growth(GROW_WIDEN, indices, [counts[i] for i in range(t)], None)
            continue
        note = None if obstacle is None else f"widen would change the function ({obstacle}); extra units kept at init"
        out[key] = Growth(GROW_INIT, list(range(t)), None, note)
    return out


def _not_preserving(members: list[Pending], graph: nx.DiGraph, linked: UnionFind, t: int, s: int) -> str | None:
    """What in the dimension's graph stops replication from preserving the function, or None."""
    root = linked.find(members[0].space)
    for p in members:
        data = graph.nodes[p.space.node]
        if p.space.side == "out":
            # every reader of the grown outputs must read them as this dimension (and so be divided)
            stranger = next((b for b in graph.successors(p.space.node) if linked.find(Space(b, "in")) != root), None)
            if stranger is not None:
                return f"{graph.nodes[stranger][ir.MODULE]} reads {data[ir.MODULE]}'s outputs in another layout"
        if data.get(ir.HEADS) is not None or data[ir.KIND] == ir.KIND_ATTENTION or (data.get(ir.FUSED_BLOCKS) or 1) > 1:
            return f"attention heads in {data[ir.MODULE]}"
        if (data.get(ir.CONV_GROUPS) or 1) > 1 and not passes_through(data):
            return f"grouped convolution {data[ir.MODULE]}"
        if data[ir.KIND] == ir.KIND_NORM and data.get(ir.OP) != "batch_norm":
            if data.get(ir.OP) not in CHANNEL_NORMS:
                return f"{data[ir.OP]} {data[ir.MODULE]} mixes the channels"
            if s % t:
                return f"{data[ir.OP]} {data[ir.MODULE]} over {s} channels replicated unevenly from {t}"
    return None
