"""Layer structure: cut a model into loose components and stages of repeated blocks.

A *block* is a module that is repeated: consecutive sibling modules with equal width-free subtree
hashes (same components and wiring; widths and kernel sizes may change along a stage), each
reading the previous one's output, and
either three or more of them or two of at least three components (two conv + norm pairs in a row
are just nesting). A run of such siblings is a *stage*; it may open with an *entry block*
of the same structure plus a few layers (a ResNet block with its downsample shortcut). A module that only occurs once in a model still counts as a block
when its width-free hash equals a block of the other model (a one-block stage of a shallow
student), and a run of blocks that the other model has but never repeats, each writing its own
width, is a run of such one-block stages (a ResNet of depth 1 per stage). Everything else is expanded into its parts, so how the user nested their modules
(wrappers, ``nn.Sequential`` vs attributes) does not change the result; only execution order and
structure do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wscompile.matching.structure import Structure, lcs_length


@dataclass
class Component:
    """A loose component outside any repeated block."""

    node: int  # IR node id


@dataclass
class Stage:
    """A run of repeated blocks, in execution order."""

    blocks: list[str]  # module paths of the blocks
    first_node: int  # execution order of the stage's first component
    family_hash: str  # width-free hash of the repeated block (the entry block's may differ)
    parent: str  # module path holding the blocks
    index: int = 0  # position among the model's stages
    label: str = field(default="")
    block_hashes: tuple[str, ...] = ()  # width-free hashes of the distinct blocks, entry block first
    repeated: tuple[str, ...] = ()  # those of blocks that occur more than once (not a lone entry block)

    def describe(self) -> str:
        return f"stage {self.index} ({self.parent or 'root'}, {len(self.blocks)} blocks)"


Element = Component | Stage


@dataclass(frozen=True)
class Evidence:
    """What the other model's segmentation says about blocks (width-free hashes)."""

    blocks: frozenset[str] = frozenset()  # every block of every stage, entry blocks included
    repeated: frozenset[str] = frozenset()  # blocks that occur more than once in one of its stages
    own_repeated: frozenset[str] = frozenset()  # the same of the receiving model's previous segmentation


def segment(structure: Structure, other: Evidence = Evidence()) -> list[Element]:
    """The model as a sequence of loose components and stages, in execution order."""
    elements = _segment(structure, "", other)
    stages = [e for e in elements if isinstance(e, Stage)]
    for i, stage in enumerate(stages):
        stage.index = i
        stage.label = stage.describe()
    return elements


def evidence(elements: list[Element], own: list[Element] | tuple[()] = ()) -> Evidence:
    """What a segmentation tells the other model's: which blocks it has, which it repeats; ``own``
    is the receiving model's previous segmentation (its repeated blocks are never entry blocks)."""

    def repeated(segmentation: list[Element] | tuple[()]) -> frozenset[str]:
        return frozenset(h for e in segmentation if isinstance(e, Stage) for h in e.repeated)

    blocks = frozenset(h for e in elements if isinstance(e, Stage) for h in e.block_hashes)
    return Evidence(blocks, repeated(elements), repeated(own))


def _segment(structure: Structure, path: str, other: Evidence) -> list[Element]:
    comps = structure.components_in
    position = {n: i for i, n in enumerate(comps.get(path, []))}
    items: list[tuple[int, str, object]] = []
    for child in structure.tree.get(path, []):
        nodes = comps.get(child)
        if not nodes:
            continue
        if position[nodes[-1]] - position[nodes[0]] + 1 == len(nodes):
            items.append((nodes[0], "module", child))
        else:
            # its layers run in several places (two norms kept in one list): each counts where it runs
            items.extend((n, "component", n) for n in nodes)
    for n in structure.direct_components(path):
        items.append((n, "component", n))
    items.sort(key=lambda item: item[0])

    # siblings of stage containers (RegNet's s1 of one block beside s3 of several) are stages, not
    # blocks: they compare exactly, so two one-block stages of different widths stay apart
    label = "exact" if any(_holds_stage(structure, child) for child in structure.tree.get(path, [])) else "family"

    def run_end(start: int) -> int:
        first = structure.subtree_hash(items[start][2], label)
        end = start
        while (
            end + 1 < len(items)
            and items[end + 1][1] == "module"
            and structure.subtree_hash(items[end + 1][2], label) == first
        ):
            end += 1
        family = structure.subtree_hash(items[start][2], "family")
        members = [items[k][2] for k in range(start, end + 1)]
        if (
            end > start
            and family in other.blocks
            and family not in other.repeated
            and len({_out_width(structure, comps[m][-1]) for m in members}) == len(members)
        ):
            # the other model has this block but never twice in a row, and here each one writes a
            # width of its own: a run of one-block stages (a ResNet of depth 1 per stage, each
            # stage its entry block), not one stage
            return start
        return end

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
        j = run_end(i)
        run = [items[k][2] for k in range(i, j + 1)]
        if (
            len(run) == 1
            and j + 1 < len(items)
            and items[j + 1][1] == "module"
            # a block the other model repeats is a block of its own, not the entry of the next one,
            # and an entry differs from the blocks it opens (equal ones were split just above)
            and structure.subtree_hash(value, "family") not in other.repeated | other.own_repeated
            and structure.subtree_hash(value, "family") != structure.subtree_hash(items[j + 1][2], "family")
            and _is_entry(structure, value, items[j + 1][2])
        ):
            # an entry block (downsampling, widening) followed by its repeated blocks
            end = run_end(j + 1)
            run = [value] + [items[k][2] for k in range(j + 1, end + 1)]
            j = end
        i = j + 1
        run_hashes = [structure.subtree_hash(b, "family") for b in run]
        hashes = tuple(dict.fromkeys(run_hashes))
        big_enough = all(len(comps[b]) >= 2 for b in run)
        # two repeats of a two-layer unit (conv + norm) is how people nest layers, not evidence of a stage
        repeated = len(run) >= 3 or (len(run) == 2 and all(len(comps[b]) >= 3 for b in run))
        if big_enough and (repeated or hashes[0] in other.blocks) and _chained(structure, run):
            inner = _segment(structure, run[0], other)
            # a stage inside the block is a deeper level of repetition, unless it is the block's
            # own layers held in one child (``self.layers = ModuleList([...])``) or, in an entry
            # block, its body beside a shortcut, smaller than the body (torchvision RegNet's ``f``
            # next to ``proj``; a list holding one block, HF Swin's ``blocks`` beside
            # ``downsample``, is a stage; a block beside another block is two blocks)
            if not any(_deeper(structure, e, run[0]) for e in inner):
                out.append(
                    Stage(
                        blocks=run,
                        first_node=order,
                        family_hash=hashes[-1],
                        parent=path,
                        block_hashes=hashes,
                        repeated=tuple(h for h in hashes if run_hashes.count(h) > 1),
                    )
                )
                continue
        for member in run:
            out.extend(
                e for e in _segment(structure, member, other) if not (isinstance(e, Component) and e.node in seen)
            )
            seen.update(e.node for e in out if isinstance(e, Component))
    return out


def _deeper(structure: Structure, element: Element, block: str) -> bool:
    """Whether ``element``, found inside ``block``, is a deeper level of repetition (see ``_segment``)."""
    if not isinstance(element, Stage):
        return False
    if len(element.blocks) > 1:
        return True
    whole, body = set(structure.components_in[block]), set(structure.components_in[element.blocks[0]])
    if body == whole:
        return False
    return element.parent != block or _wraps_one(structure, element.blocks[0]) or len(whole - body) >= len(body)


def _holds_stage(structure: Structure, path: str) -> bool:
    """Whether ``path`` directly holds a run: two consecutive children of equal width-free structure,
    or an entry block and the block it opens."""
    children = [c for c in structure.tree.get(path, []) if len(structure.components_in.get(c, [])) >= 2]
    return any(
        structure.subtree_hash(a, "family") == structure.subtree_hash(b, "family") or _is_entry(structure, a, b)
        for a, b in zip(children, children[1:], strict=False)
    )


def _wraps_one(structure: Structure, path: str) -> bool:
    """Whether every component of ``path`` lies in one child module (a wrapper, a list of one)."""
    children = [c for c in structure.tree.get(path, []) if structure.components_in.get(c)]
    return len(children) == 1 and len(structure.components_in[children[0]]) == len(structure.components_in[path])


def _chained(structure: Structure, run: list[str]) -> bool:
    """Blocks of a stage run one after another: each reads what the previous one wrote.

    Parallel branches of equal shape (a ResNet-style block's last conv and its shortcut conv) are
    not a stage.
    """
    graph = structure.graph
    for before, after in zip(run, run[1:], strict=False):
        later = set(structure.components_in[after])
        if not any(b in later for a in structure.components_in[before] for b in graph.successors(a)):
            return False
    return True


def _is_entry(structure: Structure, entry: str, block: str) -> bool:
    """Whether ``entry`` is a variant of ``block`` opening a stage (a ResNet block with downsample)."""
    entry_nodes, block_nodes = structure.components_in[entry], structure.components_in[block]
    if len(block_nodes) < 2 or len(entry_nodes) > 2 * len(block_nodes) + 2:
        return False
    # an entry block changes stride or input width but writes the stage's width, like its blocks
    # (two one-block stages in a row differ here)
    if _out_width(structure, entry_nodes[-1]) != _out_width(structure, block_nodes[-1]):
        return False
    families = structure.family
    shared = lcs_length([families[n] for n in entry_nodes], [families[n] for n in block_nodes])
    return shared >= 0.75 * len(block_nodes)


def _out_width(structure: Structure, node: int) -> int | None:
    for slot in structure.graph.nodes[node]["tensors"]:
        if slot.out_axis is not None:
            return slot.shape[slot.out_axis]
    return None
