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
        graph.add_node(
            node,
            **{ir.KIND: ir.KIND_LINEAR, ir.OP: "linear", ir.TENSORS: [slot], ir.MODULE: f"layer{node}", ir.ORDER: node},
        )
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


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.embed(ids).mean(1)))


def test_the_meta_twin_shares_structure_and_ties_but_no_storage() -> None:
    model = _Tied()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    twin = frontend.meta_twin(model)
    assert twin is not None and twin is not model
    assert all(t.is_meta for t in twin.state_dict().values())
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert twin.out.weight is twin.embed.weight  # tied stays tied
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())  # model untouched
    assert not any(t.is_meta for t in model.state_dict().values())
    assert frontend.meta_twin(twin) is None  # on meta already: traced as it is


def test_a_model_is_traced_as_its_meta_twin_with_the_same_ir(monkeypatch) -> None:
    model = _Tied()
    inputs = {"ids": torch.randint(0, 10, (2, 3))}
    seen: list[bool] = []
    fx_trace = frontend.FRONTENDS["fx"]

    def recording(module, given, tree):
        seen.append(all(t.is_meta for t in module.state_dict().values()))
        return fx_trace(module, given, tree)

    monkeypatch.setattr(frontend, "FRONTENDS", {"fx": recording})
    graph = frontend.trace(model, inputs)
    assert seen == [True]  # one trace, on meta: no forward computed anything

    # The same IR as the model traced with its data (tracing the twin of a meta model is the model itself).
    def on_cpu(module, given, tree):
        return fx_trace(model, inputs, tree)

    monkeypatch.setattr(frontend, "FRONTENDS", {"fx": on_cpu})
    reference = frontend.trace(model, inputs)
    assert nx.utils.graphs_equal(graph, reference)


def test_a_frontend_that_fails_on_the_twin_runs_on_the_model_itself(monkeypatch) -> None:
    model = _Tied()
    fx_trace = frontend.FRONTENDS["fx"]
    seen: list[bool] = []

    def reads_values(module, given, tree):  # a forward that needs data (``.item()``, say)
        on_meta = all(t.is_meta for t in module.state_dict().values())
        seen.append(on_meta)
        if on_meta:
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
        return fx_trace(module, given, tree)

    monkeypatch.setattr(frontend, "FRONTENDS", {"fx": reads_values})
    graph = frontend.trace(model, {"ids": torch.randint(0, 10, (2, 3))})
    assert seen == [True, False] and graph.graph[ir.FRONTEND] == "fx"
