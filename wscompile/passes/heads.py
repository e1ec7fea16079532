"""Head-structured selection for attention whose layout the flat rule would break.

The paper's rule treats a projection's output as one flat axis. That is exact for plain
multi-head attention (and is what the paper did for ViT), but two layouts have structure a flat
subsample tears apart:

- grouped-query attention: query head ``h`` attends with key/value head ``h // r`` (``r = H / H_kv``);
- rotary embeddings: dims ``i`` and ``i + d/2`` of a head are rotated together.

For those blocks the out axis of q/k/v (and the in axis of the output projection) is read as
``heads x head_dim`` and selected per factor with the same uniform rule::

    kv heads:  K  = uniform(H_kv_t, H_kv_s)
    q heads:   Q  = [g * r_t + j  for g in K  for j in uniform(r_t, r_s)]      (GQA)
               Q  = uniform(H_t, H_s)                                           (otherwise)
    dims:      D  = uniform(d_t, d_s), or for rotary q/k
               D  = P + [d_t/2 + i for i in P],  P = uniform(d_t/2, d_s/2)
    indices = [h * d_t + i  for h in heads  for i in D]

so every student head is built from one teacher head, student query heads stay inside the kv
group they read, and rotary pairs stay pairs. The output projection's input axis takes the query
heads with the value dims.
"""

from __future__ import annotations

import networkx as nx

from wscompile import ir
from wscompile.matching.align import Alignment
from wscompile.passes.uniform import uniform_indices

RULE = "uniform-heads"


def _width(graph: nx.DiGraph, node: int, side: str) -> int | None:
    weight = next((s for s in graph.nodes[node][ir.TENSORS] if s.role == "weight"), None)
    if weight is None:
        return None
    axis = weight.out_axis if side == "out" else weight.in_axis
    return None if axis is None else weight.shape[axis]


def _dims(t_dim: int, s_dim: int, rotary: bool) -> list[int]:
    if rotary and t_dim % 2 == 0 and s_dim % 2 == 0:
        half = uniform_indices(t_dim // 2, s_dim // 2)
        return half + [t_dim // 2 + i for i in half]
    return uniform_indices(t_dim, s_dim)


def head_layouts(alignment: Alignment, teacher: nx.DiGraph, student: nx.DiGraph) -> dict[tuple[int, str], list[int]]:
    """(student node, "out" | "in") -> teacher indices along that axis, for structured attention."""
    by_block: dict[str, list[int]] = {}
    for s_node, t_node in alignment.pairs.items():
        if student.nodes[s_node][ir.HEADS] and teacher.nodes[t_node][ir.HEADS] and s_node not in alignment.parts:
            by_block.setdefault(alignment.block_of.get(s_node, student.nodes[s_node][ir.MODULE]), []).append(s_node)
    layouts: dict[tuple[int, str], list[int]] = {}
    for projections in by_block.values():
        heads = {n: student.nodes[n][ir.HEADS] for n in projections}
        rotary = any(student.nodes[n][ir.ROTARY] for n in projections)
        grouped = len(set(heads.values())) > 1
        if not (rotary or grouped):
            continue  # plain multi-head attention: the paper's flat rule is exact
        q_heads_s = max(heads.values())
        query = [n for n in projections if heads[n] == q_heads_s]
        keys_values = [n for n in projections if heads[n] != q_heads_s]
        sample = query[0]
        t_sample = alignment.pairs[sample]
        t_q_heads = teacher.nodes[t_sample][ir.HEADS]
        d_t = _width(teacher, t_sample, "out") // t_q_heads
        d_s = _width(student, sample, "out") // q_heads_s
        if keys_values:
            kv_s = student.nodes[keys_values[0]][ir.HEADS]
            kv_t = teacher.nodes[alignment.pairs[keys_values[0]]][ir.HEADS]
            kv_heads = uniform_indices(kv_t, kv_s)
            r_t, r_s = t_q_heads // kv_t, q_heads_s // kv_s
            q_heads = [g * r_t + j for g in kv_heads for j in uniform_indices(r_t, r_s)]
        else:
            kv_heads = q_heads = uniform_indices(t_q_heads, q_heads_s)
        value_dims = _dims(d_t, d_s, rotary=False)
        for n in projections:
            head_set = q_heads if n in query else kv_heads
            dims = _dims(d_t, d_s, rotary=student.nodes[n][ir.ROTARY])
            layouts[(n, "out")] = [h * d_t + i for h in head_set for i in dims]
        # the output projection reads the attention output: query heads x value dims
        width = q_heads_s * d_s
        for q in query:
            for out_proj in student.successors(q):
                if out_proj in alignment.pairs and _width(student, out_proj, "in") == width and out_proj not in projections:
                    layouts[(out_proj, "in")] = [h * d_t + i for h in q_heads for i in value_dims]
    return layouts
