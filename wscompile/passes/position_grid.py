"""Rewrite rule: a position table on a patch grid is resampled, not subsampled; the graph must show the grid.

Pattern: a rank-3 loose parameter ``P`` of shape ``(1, p + g*g, D)`` whose values meet, in one
consumer, the output of a convolution with ``D`` output channels on a ``g x g`` grid: a patch
embedding whose tokens ``P`` is added to (``x = cat(prefix, flatten(conv(img))) + P``)::

    P --+
        +--> consumer            conv.out_shape = (B, D, g, g),  P.rows = p + g*g,  0 <= p <= 8
 conv --+

Check: the pattern holds in the student graph and, for its matched teacher parameter, in the
teacher graph, with the same ``p`` and a different ``g``. Replacement: the token axis is read whole
and resized ``g_t x g_t -> g_s x g_s`` (``interpolate.py``).

A table whose length only happens to be a few tokens plus a square (a learned latent array of 64
rows read as queries) has no such conv beside it and keeps the ordinary axis rules.
"""

from __future__ import annotations

import networkx as nx

from wscompile import ir
from wscompile.matching.align import Alignment
from wscompile.passes.interpolate import grid_split


def token_grid(graph: nx.DiGraph, node: int) -> tuple[int, int] | None:
    """(prefix tokens, grid side) of a loose parameter the graph shows added to a patch grid, else None."""
    data = graph.nodes[node]
    if data[ir.KIND] != ir.KIND_PARAM or len(data[ir.TENSORS]) != 1 or len(data[ir.TENSORS][0].shape) != 3:
        return None
    _, rows, channels = data[ir.TENSORS][0].shape
    for consumer in graph.successors(node):
        for producer in graph.predecessors(consumer):
            shape = graph.nodes[producer].get(ir.OUT_SHAPE)
            if (
                graph.nodes[producer][ir.KIND] != ir.KIND_CONV
                or shape is None
                or len(shape) != 4
                or shape[1] != channels
                or shape[2] != shape[3]
            ):
                continue
            side = shape[2]
            if grid_split(rows) == (rows - side * side, side):
                return rows - side * side, side
    return None


def position_grids(alignment: Alignment, teacher_graph: nx.DiGraph, student_graph: nx.DiGraph) -> set[int]:
    """Student parameter nodes whose token axis is resampled: both tables on patch grids, prefixes
    equal, grids different."""
    found = set()
    for s_node, t_node in alignment.pairs.items():
        student_grid = token_grid(student_graph, s_node)
        teacher_grid = token_grid(teacher_graph, t_node) if student_grid else None
        if teacher_grid and teacher_grid[0] == student_grid[0] and teacher_grid[1] != student_grid[1]:
            found.add(s_node)
    return found
