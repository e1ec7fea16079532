"""Trace a run of identical blocks once: cut the run to a few blocks, trace, then copy one per block.

Tracing costs time per operation: torch.export spends about 0.1 s on each layer of a 7B Llama, most
of the whole run's fixed cost. The blocks of a ``ModuleList`` or ``Sequential`` built from one
config are the same computation on differently named tensors, so the IR of the whole run follows
from the IR of its first ``KEEP`` blocks: every block has the same components (``<run>.k.``
renamed) and inner edges; each reads the block before it in one way and every earlier block in
another (a residual stream contracted through its adds reaches all of them); blocks after the
first read the components before the run alike; what follows the run reads the last block in one
way and the others in another. ``KEEP = 4`` shows each of these at least twice, so the cut IR
says whether they hold.

The cut model is traced and expanded only when they do, else the caller traces the whole model:
the run's blocks share a signature (module types, ``extra_repr``, tensor names, shapes and
dtypes, no tensor shared between blocks), the cut blocks' components are the same after renaming
and their ids contiguous (nothing outside the run executes between them), and every pattern above
is the same wherever the cut IR shows it. ``tests/unit/test_repeated.py`` checks the expanded IR
against the whole model's, node for node and edge for edge, on the families it applies to and one
it does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx
from torch import nn

from wscompile import ir

# Blocks of a run the cut model keeps: enough to see twice what a block reads from the one before
# it and from earlier ones.
KEEP = 4
MIN_LENGTH = KEEP + 2  # shorter runs are traced whole: cutting them saves too little


@dataclass(frozen=True)
class Run:
    """A container of identical blocks named ``0, 1, ...``."""

    path: str  # module path of the container
    length: int  # its blocks in the whole model

    def block_prefix(self, index: int) -> str:
        return f"{self.path}.{index}." if self.path else f"{index}."


def repeated_runs(model: nn.Module) -> list[Run]:
    """The outermost containers of ``model`` holding at least ``MIN_LENGTH`` identical blocks."""
    runs: list[Run] = []
    for path, module in model.named_modules():
        if any(_inside(path, run.path) for run in runs):
            continue
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < MIN_LENGTH:
            continue
        names = list(module._modules)
        blocks = list(module._modules.values())
        if names != [str(i) for i in range(len(names))] or any(b is None for b in blocks):
            continue
        first = _signature(blocks[0])
        if all(_signature(b) == first for b in blocks[1:]) and _own_tensors(blocks):
            runs.append(Run(path, len(blocks)))
    return runs


def _inside(path: str, container: str) -> bool:
    return path != container and (not container or path.startswith(container + "."))


def _signature(block: nn.Module) -> tuple:
    modules = tuple(
        (name, type(m).__qualname__, m.extra_repr()) for name, m in block.named_modules(remove_duplicate=False)
    )
    tensors = tuple(
        (name, tuple(t.shape), t.dtype, isinstance(t, nn.Parameter))
        for name, t in [*block.named_parameters(remove_duplicate=False), *block.named_buffers(remove_duplicate=False)]
    )
    return modules, tensors


def _own_tensors(blocks: list[nn.Module]) -> bool:
    """No parameter or buffer belongs to two blocks (a shared one would not be renamed per block)."""
    seen: set[int] = set()
    for block in blocks:
        ids = {id(t) for t in [*block.parameters(), *block.buffers()]}
        if ids & seen:
            return False
        seen |= ids
    return True


@contextmanager
def cut(models: list[nn.Module], runs: list[Run]) -> Iterator[None]:
    """Within the block, every run of ``models`` holds its first ``KEEP`` blocks only."""
    saved: list[tuple[nn.Module, dict[str, Any]]] = []
    try:
        for model in models:
            for run in runs:
                container = model.get_submodule(run.path)
                saved.append((container, container._modules))
                object.__setattr__(container, "_modules", dict(list(container._modules.items())[:KEEP]))
        yield
    finally:
        for container, modules in reversed(saved):
            object.__setattr__(container, "_modules", modules)


def expand(graph: nx.DiGraph, runs: list[Run]) -> nx.DiGraph | None:
    """The IR of the whole model from the IR of its cut copy, or None when the pattern is not plain."""
    for run in runs:
        expanded = _expand_run(graph, run)
        if expanded is None:
            return None
        graph = expanded
    return graph


def _block_index(name: str, run: Run) -> int | None:
    """Which block of ``run`` a module path (with a trailing dot) or tensor name lies in, or None."""
    prefix = run.block_prefix(0)[:-2]  # "<run>." ("" at the root)
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _renamed(name: str, run: Run, old: int, new: int) -> str:
    prefix = run.block_prefix(old)
    return run.block_prefix(new) + name[len(prefix) :] if name.startswith(prefix) else name


def _node_block(data: dict[str, Any], run: Run) -> int | None | bool:
    """The block a component lies in (its module and every tensor), None outside the run, False if mixed."""
    where = {_block_index(data[ir.MODULE] + ".", run)} | {_block_index(s.name, run) for s in data[ir.TENSORS]}
    return where.pop() if len(where) == 1 else False


def _renamed_node(data: dict[str, Any], run: Run, old: int, new: int) -> dict[str, Any]:
    out = {key: value for key, value in data.items() if key != ir.ORDER}
    out[ir.MODULE] = _renamed(data[ir.MODULE] + ".", run, old, new)[:-1]
    out[ir.TENSORS] = [replace(s, name=_renamed(s.name, run, old, new)) for s in data[ir.TENSORS]]
    return out


def _all_equal(values: list) -> bool:
    return all(v == values[0] for v in values[1:])


def _expand_run(graph: nx.DiGraph, run: Run) -> nx.DiGraph | None:
    where = {n: _node_block(graph.nodes[n], run) for n in graph.nodes}
    if any(b is False or (b is not None and b >= KEEP) for b in where.values()):
        return None
    blocks = [sorted(n for n, b in where.items() if b == i) for i in range(KEEP)]
    size = len(blocks[0])
    if not size or any(len(b) != size for b in blocks):
        return None
    start, end = blocks[0][0], blocks[0][0] + KEEP * size  # the cut run occupies [start, end), nothing else
    if [n for b in blocks for n in b] != list(range(start, end)):
        return None
    template = [_renamed_node(graph.nodes[n], run, 0, 0) for n in blocks[0]]
    if any([_renamed_node(graph.nodes[n], run, i, 0) for n in blocks[i]] != template for i in range(1, KEEP)):
        return None

    def place(n: int) -> tuple[int, int] | None:
        """(block, offset) of a node of the cut run, None outside it."""
        return divmod(n - start, size) if start <= n < end else None

    # Edges by what they join: within a block, between two blocks, into a block from before the run,
    # from a block to after it; the rest (before/after the run only) are kept as they are.
    inner: list[set] = [set() for _ in range(KEEP)]
    between: dict[tuple[int, int], set] = {(i, j): set() for j in range(KEEP) for i in range(j)}
    into: list[set] = [set() for _ in range(KEEP)]
    out_of: list[set] = [set() for _ in range(KEEP)]
    kept = []
    for a, b, d in graph.edges(data=True):
        pa, pb, arg = place(a), place(b), d[ir.ARG]
        if pa and pb:
            (inner[pa[0]] if pa[0] == pb[0] else between[pa[0], pb[0]]).add((pa[1], pb[1], arg))
        elif pb:
            into[pb[0]].add((a, pb[1], arg))
        elif pa:
            out_of[pa[0]].add((pa[1], b, arg))
        else:
            kept.append((a, b, arg))
    inputs = [
        {n - start - i * size for n in graph.graph[ir.INPUT_NODES] if place(n) and place(n)[0] == i}
        for i in range(KEEP)
    ]
    outputs = [
        {n - start - i * size for n in graph.graph[ir.OUTPUT_NODES] if place(n) and place(n)[0] == i}
        for i in range(KEEP)
    ]
    next_block = [between[i, i + 1] for i in range(KEEP - 1)]
    farther = [between[i, j] for j in range(KEEP) for i in range(j - 1)]  # the residual stream, say
    # What a block reads from the block before it, from earlier ones, from before the run, and what
    # reads it after the run, must not depend on where it stands (block 0 and the last aside).
    if not (
        _all_equal(inner)
        and _all_equal(next_block)
        and _all_equal(farther)
        and _all_equal(into[1:])
        and _all_equal(inputs[1:])
        and _all_equal(out_of[:-1])
        and _all_equal(outputs[:-1])
    ):
        return None

    length, added = run.length, (run.length - KEEP) * size

    def node(block: int, offset: int) -> int:
        return start + block * size + offset

    def shifted(n: int) -> int:
        return n + added if n >= end else n

    out = nx.DiGraph()
    out.graph.update(graph.graph)
    for n in sorted(graph.nodes):
        if n < start:
            out.add_node(n, **graph.nodes[n])
        if n == start:
            for block in range(length):
                for offset, data in enumerate(template):
                    out.add_node(
                        node(block, offset), **_renamed_node(data, run, 0, block), **{ir.ORDER: node(block, offset)}
                    )
        if n >= end:
            out.add_node(shifted(n), **{**graph.nodes[n], ir.ORDER: shifted(n)})
    edges = [(shifted(a), shifted(b), arg) for a, b, arg in kept]
    for block in range(length):
        edges += [(node(block, a), node(block, b), arg) for a, b, arg in inner[0]]
        edges += [(a, node(block, b), arg) for a, b, arg in into[min(block, 1)]]
        for earlier in range(block):
            pattern = next_block[0] if earlier == block - 1 else farther[0]
            edges += [(node(earlier, a), node(block, b), arg) for a, b, arg in pattern]
        after = out_of[-1] if block == length - 1 else out_of[0]
        edges += [(node(block, a), shifted(b), arg) for a, b, arg in after]
    for a, b, arg in sorted(edges, key=lambda e: (e[1], e[0])):
        out.add_edge(a, b, **{ir.ARG: arg})
    blocks_in = [node(block, o) for block in range(length) for o in inputs[min(block, 1)]]
    blocks_out = [
        node(block, o) for block in range(length) for o in (outputs[-1] if block == length - 1 else outputs[0])
    ]
    out.graph[ir.INPUT_NODES] = sorted([shifted(n) for n in graph.graph[ir.INPUT_NODES] if not place(n)] + blocks_in)
    out.graph[ir.OUTPUT_NODES] = sorted([shifted(n) for n in graph.graph[ir.OUTPUT_NODES] if not place(n)] + blocks_out)
    return out
