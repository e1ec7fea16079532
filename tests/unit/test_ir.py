"""IR invariants: a frontend's graph that breaks one is a TraceError naming the node, and the next frontend is tried."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

from wscompile import frontend, ir
from wscompile.errors import TraceError


def _graph(edges: list[tuple[int, int]]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for node in range(3):
        slot = ir.TensorSlot(role="weight", name=f"layer{node}.weight", shape=(4, 4), out_axis=0, in_axis=1)
        graph.add_node(node, **{ir.KIND: ir.KIND_LINEAR, ir.OP: "linear", ir.TENSORS: [slot],
                                ir.MODULE: f"layer{node}", ir.ORDER: node})
    graph.add_edges_from(edges, **{ir.ARG: frozenset({0})})
    graph.graph.update({ir.MODULES: {}, ir.INPUT_NODES: [0], ir.OUTPUT_NODES: [2], ir.FRONTEND: "test"})
    return graph


def test_a_back_edge_names_both_nodes_and_their_modules() -> None:
    ir.verify(_graph([(0, 1), (1, 2)]))
    with pytest.raises(TraceError, match=r"edge from node 2 \(linear in layer2\) to node 1 \(linear in layer1\)"):
        ir.verify(_graph([(0, 1), (2, 1)]))


def test_trace_tries_the_next_frontend_when_a_graph_breaks_an_invariant(monkeypatch) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    good = frontend.FRONTENDS["torch.export"]
    monkeypatch.setattr(frontend, "FRONTENDS", {"broken": lambda *args: _graph([(2, 1)]), "torch.export": good})
    graph = frontend.trace(model, {"input": torch.randn(1, 4)})
    assert graph.graph[ir.FRONTEND] == "torch.export"
    monkeypatch.setattr(frontend, "FRONTENDS", {"broken": lambda *args: _graph([(2, 1)])})
    with pytest.raises(TraceError, match=r"cannot trace model: broken: IR edge from node 2"):
        frontend.trace(model, {"input": torch.randn(1, 4)})
