"""Head-structured selection for attention whose layout a flat rule would break, or whose heads
the user wants kept whole.

A flat rule treats a projection's output as one axis. That is what the paper did for ViT, but
some layouts have structure a flat subsample tears apart:

- grouped-query attention: query head ``h`` attends with key/value head ``h // r`` (``r = H / H_kv``);
- rotary embeddings: dims ``i`` and ``i + d/2`` of a head are rotated together.

For those blocks (and for every attention block with ``--heads whole``) the out axis of q/k/v,
and the in axis of the output projection, is read as ``heads x head_dim`` and each factor is
chosen by the selection method (``pick``: uniform, consecutive, random, magnitude, ...)::

    kv heads:  K  = pick(H_kv_t -> H_kv_s)
    q heads:   Q  = [g * r_t + j  for g in K  for j in pick_g(r_t -> r_s)]     (GQA: per kv group g)
               Q  = K = pick(H_t -> H_s)                                      (otherwise)
    dims:      D  = pick(d_t -> d_s)                for v, the output projection, and q/k without rotary
               D  = P + [d_t/2 + i for i in P],  P = pick(d_t/2 -> d_s/2)    for rotary q/k
               D  = [0, ..., d_t - 1]               with --heads whole (d_s must equal d_t)
    indices = [h * d_t + i  for h in heads  for i in D]

so every student head is built from one teacher head, student query heads stay inside the kv
group they read, and rotary pairs stay pairs. Importance-based methods score a head by the
channels of every projection reading or writing it (a kv head also by its query heads) and a dim
by the kept heads' channels at that dim (a rotary pair by both of its dims).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import torch

from wscompile import ir
from wscompile.errors import SelectionError
from wscompile.matching.align import Alignment
from wscompile.passes.choice import Choice, Method

WHOLE = "whole"  # --heads whole: keep whole teacher heads
SPLIT = "split"  # --heads split (default): heads and head dims both shrink
HEAD_MODES = (SPLIT, WHOLE)

# Importance of every teacher channel (within one block) of a student projection's axis, None if unknown.
ChannelScores = Callable[[int, str], "torch.Tensor | None"]


def rule_name(method: str, heads: str) -> str:
    """The rule of head-structured axes: "uniform-heads", "magnitude-whole-heads", ..."""
    return f"{method}-whole-heads" if heads == WHOLE else f"{method}-heads"


@dataclass
class AttentionLayout:
    """One attention block read as heads x head_dim (student nodes; sizes as (teacher, student))."""

    key: str  # student module of its first query projection: names its decisions
    query: list[int]  # projections with the query heads (q; or q, k, v when all have as many heads)
    keys_values: list[int]  # projections with fewer (grouped) heads: k and v under GQA, else []
    outputs: list[int]  # output projections reading the attention output
    rotary: set[int]  # projections whose head dims rotate in pairs
    heads: tuple[int, int]  # query heads
    kv_heads: tuple[int, int]  # key/value heads (equal to ``heads`` without GQA)
    head_dim: tuple[int, int]
    whole: bool  # keep whole heads: every dim

    def axes(self) -> list[tuple[int, str]]:
        """(student node, side) of every axis this layout decides."""
        return [(n, "out") for n in self.query + self.keys_values] + [(n, "in") for n in self.outputs]


def _width(graph: nx.DiGraph, node: int, side: str, *, whole_axis: bool = False) -> int | None:
    """Channels of one logical block of a layer's weight along ``side`` (a fused q/k/v output: one
    third), or of the whole axis."""
    weight = next((s for s in graph.nodes[node][ir.TENSORS] if s.role == "weight"), None)
    if weight is None:
        return None
    axis = weight.out_axis if side == "out" else weight.in_axis
    if axis is None:
        return None
    return weight.shape[axis] // (1 if whole_axis else dict(weight.blocks).get(axis, 1))


def attention_layouts(
    alignment: Alignment, teacher: nx.DiGraph, student: nx.DiGraph, *, heads: str = SPLIT
) -> list[AttentionLayout]:
    """Attention blocks whose q/k/v/o axes are selected per head.

    With ``heads="split"`` only grouped-query or rotary blocks (the flat rule is exact for plain
    multi-head attention); with ``"whole"`` every block with a known head layout.

    Raises:
        SelectionError: ``"whole"`` with a student head_dim differing from its teacher's, or a student
            with more query heads per kv head than its teacher.
    """
    whole = heads == WHOLE
    by_block: dict[str, list[int]] = {}
    for s_node, t_node in alignment.pairs.items():
        # NOTE: split mode leaves fused q/k/v students and parts of fused teachers to the flat rule
        fused = _width(student, s_node, "out") != _width(student, s_node, "out", whole_axis=True)
        if (
            student.nodes[s_node][ir.HEADS]
            and teacher.nodes[t_node][ir.HEADS]
            and (whole or (s_node not in alignment.parts and not fused))
        ):
            by_block.setdefault(alignment.block_of.get(s_node, student.nodes[s_node][ir.MODULE]), []).append(s_node)
    layouts = []
    for projections in by_block.values():
        projections.sort()
        heads_of = {n: student.nodes[n][ir.HEADS] for n in projections}
        rotary = {n for n in projections if student.nodes[n][ir.ROTARY]}
        grouped = len(set(heads_of.values())) > 1
        if not (rotary or grouped or whole):
            continue  # plain multi-head attention: the flat rule keeps q, k, v and o consistent
        q_heads_s = max(heads_of.values())
        query = [n for n in projections if heads_of[n] == q_heads_s]
        keys_values = [n for n in projections if heads_of[n] != q_heads_s]
        sample = query[0]
        t_sample = alignment.pairs[sample]
        q_heads_t = teacher.nodes[t_sample][ir.HEADS]
        d_t = _width(teacher, t_sample, "out") // q_heads_t  # a fused teacher's part is one of its blocks
        d_s = _width(student, sample, "out") // q_heads_s
        kv_t, kv_s = q_heads_t, q_heads_s
        if keys_values:
            kv_s = student.nodes[keys_values[0]][ir.HEADS]
            kv_t = teacher.nodes[alignment.pairs[keys_values[0]]][ir.HEADS]
        key = student.nodes[sample][ir.MODULE]
        if q_heads_s > q_heads_t or kv_s > kv_t or d_s > d_t:
            continue  # a wider student: reported as larger than its teacher by the plan
        if q_heads_s // kv_s > q_heads_t // kv_t:
            raise SelectionError(
                f"student attention {key} has {q_heads_s // kv_s} query heads per key/value head, its teacher "
                f"{q_heads_t // kv_t}: a student query head would have no teacher head in its kv group; "
                f"give the student at most {q_heads_t // kv_t} query heads per kv head"
            )
        if whole and d_s != d_t:
            raise SelectionError(
                f"--heads whole keeps whole teacher heads, but student attention {key} has head_dim {d_s} "
                f"({q_heads_s} heads) and its teacher {d_t} ({q_heads_t} heads); give the student head_dim {d_t} "
                f"(hidden size {d_t} x heads) or use --heads split"
            )
        # the output projection reads the attention output: query heads x value dims
        outputs = sorted(
            {
                o
                for q in query
                for o in student.successors(q)
                if o in alignment.pairs and o not in projections and _width(student, o, "in") == q_heads_s * d_s
            }
        )
        layouts.append(
            AttentionLayout(
                key, query, keys_values, outputs, rotary, (q_heads_t, q_heads_s), (kv_t, kv_s), (d_t, d_s), whole
            )
        )
    return layouts


def choose_heads(
    layout: AttentionLayout, pick: Method, channel_scores: ChannelScores, seed: int = 0
) -> dict[tuple[int, str], list[int]]:
    """(student node, side) -> teacher indices within one block of that axis, by ``pick``."""
    (h_t, h_s), (kv_t, kv_s), (d_t, d_s) = layout.heads, layout.kv_heads, layout.head_dim
    r_t, r_s = h_t // kv_t, h_s // kv_s

    def heads_of_axis(node: int, side: str) -> int:
        return kv_t if side == "out" and node in layout.keys_values else h_t

    def per_head(nodes_sides: list[tuple[int, str]]) -> list[torch.Tensor]:
        """Channel scores of each of ``nodes_sides`` that has any, as (teacher heads, d_t)."""
        found = [(channel_scores(n, side), heads_of_axis(n, side)) for n, side in nodes_sides]
        return [scores.double().reshape(heads, d_t) for scores, heads in found if scores is not None]

    query_sides = [(n, "out") for n in layout.query] + [(n, "in") for n in layout.outputs]
    kv_sides = [(n, "out") for n in layout.keys_values]

    def query_head_scores() -> torch.Tensor:
        return sum((scores.sum(1) for scores in per_head(query_sides)), torch.zeros(h_t, dtype=torch.float64))

    def kv_head_scores() -> torch.Tensor:
        own = sum((scores.sum(1) for scores in per_head(kv_sides)), torch.zeros(kv_t, dtype=torch.float64))
        return own + query_head_scores().reshape(kv_t, r_t).sum(1)

    key = layout.key
    kv_heads = pick(Choice(kv_t, kv_s, f"{key}/heads", seed, kv_head_scores))
    if layout.keys_values:
        q_heads = []
        for g in kv_heads:
            within = pick(
                Choice(r_t, r_s, f"{key}/heads{g}", seed, lambda g=g: query_head_scores()[g * r_t : (g + 1) * r_t])
            )
            q_heads += [g * r_t + j for j in within]
    else:
        q_heads = kv_heads
    heads_of = {n: q_heads for n in layout.query} | {n: kv_heads for n in layout.keys_values}

    def dim_scores(nodes_sides: list[tuple[int, str]]) -> torch.Tensor:
        total = torch.zeros(d_t, dtype=torch.float64)
        for n, side in nodes_sides:
            scores = channel_scores(n, side)
            if scores is not None:
                chosen = q_heads if side == "in" else heads_of[n]
                total += scores.double().reshape(heads_of_axis(n, side), d_t)[chosen].sum(0)
        return total

    all_dims = list(range(d_t))
    plain = [(n, "out") for n in layout.query + layout.keys_values if n not in layout.rotary]
    plain += [(n, "in") for n in layout.outputs]
    rotating = [(n, "out") for n in layout.query + layout.keys_values if n in layout.rotary]
    value_dims = all_dims if layout.whole else pick(Choice(d_t, d_s, f"{key}/dims", seed, lambda: dim_scores(plain)))
    rotary_dims = value_dims
    if rotating and not layout.whole:
        if d_t % 2 == 0 and d_s % 2 == 0:
            half = d_t // 2
            pairs = pick(
                Choice(half, d_s // 2, f"{key}/rotary-dims", seed, lambda: dim_scores(rotating).reshape(2, half).sum(0))
            )
            rotary_dims = pairs + [half + i for i in pairs]
        else:
            rotary_dims = pick(Choice(d_t, d_s, f"{key}/rotary-dims", seed, lambda: dim_scores(rotating)))
    out: dict[tuple[int, str], list[int]] = {}
    for n in layout.query + layout.keys_values:
        dims = rotary_dims if n in layout.rotary else value_dims
        out[(n, "out")] = [h * d_t + i for h in heads_of[n] for i in dims]
    for o in layout.outputs:
        out[(o, "in")] = [h * d_t + i for h in q_heads for i in value_dims]
    return out
