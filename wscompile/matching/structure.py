"""Structural labels and hashes of IR components and module subtrees.

Two labels per component:

- ``family``: what the component *is*, independent of width, so a teacher and a narrower student
  agree. A Linear and a 1x1 convolution are both ``dense`` (timm's ``conv_mlp`` ConvNeXt uses 1x1
  convs where the reference uses Linear layers).
- ``exact``: family plus tensor shapes; equal exact labels inside one model mean "the same layer".

Module subtrees are hashed with Weisfeiler-Lehman over their components and internal edges
(networkx computes these in milliseconds), which finds repeated blocks without reading names.
"""

from __future__ import annotations

import warnings
from functools import cached_property

import networkx as nx

from wscompile import ir


def family(data: dict) -> str:
    kind, op = data[ir.KIND], data[ir.OP]
    weight = next((s for s in data[ir.TENSORS] if s.role == "weight"), None)
    if kind == ir.KIND_LINEAR:
        return "dense"
    if kind == ir.KIND_CONV and weight is not None:
        spatial = weight.shape[2:]
        groups = data.get(ir.CONV_GROUPS) or 1
        if all(k == 1 for k in spatial) and groups == 1 and not op.startswith("conv_transpose"):
            return "dense"
        depthwise = "-dw" if groups > 1 and weight.shape[1] == 1 else ("-grouped" if groups > 1 else "")
        return f"{op}{depthwise}"
    if kind == ir.KIND_NORM:
        return f"norm:{op}"
    if kind == ir.KIND_PARAM:
        return f"param:{len(data[ir.TENSORS][0].shape)}"
    return f"{kind}:{op}"


def exact(data: dict) -> str:
    shapes = ",".join(f"{s.role}{list(s.shape)}" for s in data[ir.TENSORS])
    return f"{family(data)}|{shapes}"


class Structure:
    """Per-model index: components by module path, labels and subtree hashes (memoized)."""

    def __init__(self, graph: nx.DiGraph) -> None:
        self.graph = graph
        self.tree: dict[str, list[str]] = graph.graph[ir.MODULES]
        self.family = {n: family(graph.nodes[n]) for n in graph.nodes}
        self.exact = {n: exact(graph.nodes[n]) for n in graph.nodes}
        self._hash_cache: dict[tuple[str, str], str] = {}
        self.head: set[int] = set()  # output layers (terminal dense components), set by the aligner

    @cached_property
    def components_in(self) -> dict[str, list[int]]:
        """Module path -> components of its subtree, in execution order."""
        index: dict[str, list[int]] = {}
        for n in sorted(self.graph.nodes):
            path = self.graph.nodes[n][ir.MODULE]
            parts = path.split(".") if path else []
            index.setdefault("", []).append(n)
            for i in range(1, len(parts) + 1):
                index.setdefault(".".join(parts[:i]), []).append(n)
        return index

    def direct_components(self, path: str) -> list[int]:
        return [n for n in self.components_in.get(path, []) if self.graph.nodes[n][ir.MODULE] == path]

    def subtree_hash(self, path: str, label: str = "exact") -> str:
        key = (path, label)
        if key not in self._hash_cache:
            self._hash_cache[key] = self.hash_of(self.components_in.get(path, []), label)
        return self._hash_cache[key]

    def subtree_hash_of_nodes(self, nodes: list[int]) -> str:
        return self.hash_of(nodes, "exact")

    def hash_of(self, nodes: list[int], label: str = "exact") -> str:
        labels = self.exact if label == "exact" else self.family
        sub = nx.DiGraph()
        for position, n in enumerate(nodes):
            # execution position inside the subtree separates otherwise symmetric branches
            sub.add_node(n, label=f"{labels[n]}#{position}")
        for a, b in self.graph.subgraph(nodes).edges:
            sub.add_edge(a, b, label=",".join(map(str, sorted(self.graph.edges[a, b][ir.ARG]))))
        with warnings.catch_warnings():
            # networkx >= 3.5 warns that directed hashes changed; we only compare hashes within one run
            warnings.simplefilter("ignore", UserWarning)
            return nx.weisfeiler_lehman_graph_hash(sub, node_attr="label", edge_attr="label", iterations=3)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two label sequences."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]
