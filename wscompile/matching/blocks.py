"""Layer structure: cut a model into loose components and stages of repeated blocks.

A *block* is a module that is repeated: consecutive sibling modules with equal exact subtree
hashes (same components, same shapes, same wiring) and at least two components each. A run of
such siblings is a *stage*. A module that only occurs once in a model still counts as a block
when its width-free hash equals a block of the other model (a one-block stage of a shallow
student). Everything else is expanded into its parts, so how the user nested their modules
(wrappers, ``nn.Sequential`` vs attributes) does not change the result; only execution order and
structure do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wscompile.matching.structure import Structure


@dataclass
class Component:
    """A loose component outside any repeated block."""

    node: int  # IR node id


@dataclass
class Stage:
    """A run of repeated blocks, in execution order."""

    blocks: list[str]  # module paths of the blocks
    first_node: int  # execution order of the stage's first component
    family_hash: str  # width-free hash of the first block
    parent: str  # module path holding the blocks
    index: int = 0  # position among the model's stages
    label: str = field(default="")

    def describe(self) -> str:
        return f"stage {self.index} ({self.parent or 'root'}, {len(self.blocks)} blocks)"


Element = Component | Stage


def segment(structure: Structure, other_block_hashes: frozenset[str] = frozenset()) -> list[Element]:
    """The model as a sequence of loose components and stages, in execution order."""
    elements = _segment(structure, "", other_block_hashes)
    stages = [e for e in elements if isinstance(e, Stage)]
    for i, stage in enumerate(stages):
        stage.index = i
        stage.label = stage.describe()
    return elements


def block_hashes(elements: list[Element]) -> frozenset[str]:
    return frozenset(e.family_hash for e in elements if isinstance(e, Stage))


def _segment(structure: Structure, path: str, others: frozenset[str]) -> list[Element]:
    comps = structure.components_in
    items: list[tuple[int, str, object]] = []
    for child in structure.tree.get(path, []):
        nodes = comps.get(child)
        # a module reached twice (shared) is counted where its components first run
        if nodes and all(structure.graph.nodes[n]["module"].startswith(child) for n in nodes[:1]):
            items.append((nodes[0], "module", child))
    for n in structure.direct_components(path):
        items.append((n, "component", n))
    items.sort(key=lambda item: item[0])
    seen: set[int] = set()
    out: list[Element] = []
    i = 0
    while i < len(items):
        order, kind, value = items[i]
        if kind == "component":
            if value not in seen:
                out.append(Component(value))
                seen.add(value)
            i += 1
            continue
        j = i
        run_hash = structure.subtree_hash(value)
        while j + 1 < len(items) and items[j + 1][1] == "module" and structure.subtree_hash(items[j + 1][2]) == run_hash:
            j += 1
        run = [items[k][2] for k in range(i, j + 1)]
        i = j + 1
        big_enough = len(comps[run[0]]) >= 2
        family_hash = structure.subtree_hash(run[0], "family")
        if big_enough and (len(run) >= 2 or family_hash in others):
            inner = _segment(structure, run[0], others)
            if not any(isinstance(e, Stage) for e in inner):
                out.append(Stage(blocks=run, first_node=order, family_hash=family_hash, parent=path))
                continue
        for member in run:
            out.extend(e for e in _segment(structure, member, others) if not (isinstance(e, Component) and e.node in seen))
            seen.update(e.node for e in out if isinstance(e, Component))
    return out
