"""Coupled dimensions: axes of different tensors that index the same channels.

Every component reads its input channels on one axis of its weights and writes its output
channels on another. Data flow couples them: when component ``a`` feeds component ``b``, ``a``'s
output channels are ``b``'s input channels, so whatever teacher channels the student keeps must be
the same on both sides. A residual stream couples every writer and reader of it; a norm or a
depthwise convolution passes its channels through. Channel spaces are merged with union-find over
the student graph; an edge couples only when the two sizes agree (a fused q/k/v output does not
couple with the attention output projection's input).

A fused projection's blocks are then linked with the layer reading one block's width (a fused
q/k/v output with the attention output projection's input): different channel spaces, but the
same heads, so a selection method chooses them together (``CoupledDimensions.linked``).

A selection method then picks one index set per group; uniform selection gets the same indices
anyway (they depend only on the sizes), importance-based methods rely on the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from wscompile import ir


@dataclass(frozen=True)
class Space:
    """A channel space: the output or input channels of one component."""

    node: int
    side: str  # "out" or "in"


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Space, Space] = {}

    def find(self, x: Space) -> Space:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: Space, b: Space) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the earlier component names the group, so group ids follow execution order
            if (rb.node, rb.side) < (ra.node, ra.side):
                ra, rb = rb, ra
            self.parent[rb] = ra


def space_size(graph: nx.DiGraph, node: int, side: str) -> int | None:
    for slot in graph.nodes[node][ir.TENSORS]:
        axis = slot.out_axis if side == "out" else slot.in_axis
        if axis is not None and slot.shape[axis] > 1:
            return slot.shape[axis]
    return None


def passes_through(data: dict) -> bool:
    """Output channels are the input channels (norms, depthwise convolutions)."""
    if data[ir.KIND] == ir.KIND_NORM:
        return True
    groups = data.get(ir.CONV_GROUPS) or 1
    weight = next((s for s in data[ir.TENSORS] if s.role == "weight"), None)
    return data[ir.KIND] == ir.KIND_CONV and groups > 1 and weight is not None and weight.shape[1] == 1


def coupled_spaces(graph: nx.DiGraph) -> UnionFind:
    """Union-find over the channel spaces of ``graph``'s components."""
    uf = UnionFind()
    for n in graph.nodes:
        uf.find(Space(n, "out"))
        uf.find(Space(n, "in"))
        if passes_through(graph.nodes[n]):
            uf.union(Space(n, "out"), Space(n, "in"))
    for a, b in graph.edges:
        out_size, in_size = space_size(graph, a, "out"), space_size(graph, b, "in")
        if passes_through(graph.nodes[b]) or graph.nodes[b][ir.KIND] == ir.KIND_PARAM:
            in_size = space_size(graph, b, "out")
        if out_size is not None and out_size == in_size:
            uf.union(Space(a, "out"), Space(b, "in"))
    return uf


def link_fused_parts(spaces: UnionFind, graph: nx.DiGraph) -> UnionFind:
    """Couple each block of a fused projection's output with the layer reading the blocks' width
    (a fused q/k/v output with the attention output projection's input)."""
    for a, b in graph.edges:
        weight = next((s for s in graph.nodes[a][ir.TENSORS] if s.role == "weight"), None)
        k = weight.blocks_on(weight.out_axis) if weight is not None and weight.out_axis is not None else 1
        out_size, in_size = space_size(graph, a, "out"), space_size(graph, b, "in")
        if k > 1 and out_size is not None and out_size == k * (in_size or 0):
            spaces.union(Space(a, "out"), Space(b, "in"))
    return spaces


@dataclass
class CoupledDimensions:
    """The coupled channel spaces of one graph, the only analysis of them selection reads."""

    spaces: UnionFind  # coupled by data flow: each root is one group of the plan
    linked: UnionFind  # ``spaces`` plus fused blocks linked with their reader: each root is one choice


def coupled_dimensions(graph: nx.DiGraph) -> CoupledDimensions:
    """Group and choice union-finds over ``graph``'s channel spaces."""
    return CoupledDimensions(coupled_spaces(graph), link_fused_parts(coupled_spaces(graph), graph))
