"""Align a student graph with its teacher: layer selection, then component mapping.

1. Both models are cut into loose components and stages of repeated blocks (``blocks.py``).
2. The two element sequences are aligned in execution order (a dynamic program maximizing the
   summed score): a component pairs with a component of the same family (score 1, +0.25 when its
   non-channel axes are equal), a stage with a stage by the best order-preserving map of their
   blocks (``BlockScores``: 1 per structurally matched component, +0.25 where the teacher's is at
   least as large on every axis), so a student stage finds the teacher stage of its structure
   wherever it is, not the one at its position.
3. Layer selection: the layer policy (``layers.py``; default "first": ``L[i] = i``, first-N per
   stage, the paper's best policy) proposes teacher block ``L[i]`` for student block ``i``; the
   order-preserving block map of highest score keeps as many of those as it can
   (``choose_blocks``), so the policy decides among equally good blocks and a teacher block that
   fits better (right structure, at least as large) replaces one that does not. Each block pair
   records its cost (1 - score / best score) and whether the policy or the structure chose it.
4. Component mapping inside a block pair: VF2 subgraph isomorphism (networkx) on the two blocks'
   component graphs, nodes compared by family, edges by argument position. Among isomorphisms
   the one that best keeps execution order wins. Blocks with different structure (a ResNet
   bottleneck vs a basic block) fall back to an order-preserving partial match; what stays
   unmatched keeps the student's init, with the reason recorded.

Names are never read: renaming or re-nesting the student's modules gives the same alignment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

import networkx as nx
from networkx.algorithms import isomorphism

from wscompile import ir
from wscompile.errors import MatchError
from wscompile.matching.blocks import Component, Element, Stage, evidence, segment
from wscompile.matching.layers import EXPLICIT, LayerPolicy, choose_blocks, parse_layer_policy, teacher_blocks
from wscompile.matching.structure import Structure
from wscompile.plan import BlockPair, StagePair

NO_LAYER_HERE = "no teacher layer of this kind at this position"
MAX_ISOMORPHISMS = 64  # candidates scored per block pair; blocks have few symmetric mappings
MIN_ALIGNED_SHARE = 0.5  # of the student's components outside the head; below it align() refuses the pair
FIT_BONUS = 0.25  # score of a teacher component at least as large as the student's on every axis, on top of 1
LOOSE_FIT_BONUS = 0.1  # the same for loose layers, under the 0.25 of equal non-channel axes: a tie-breaker


@dataclass
class Alignment:
    """Student-to-teacher correspondence of components, and the layer map behind it."""

    pairs: dict[int, int]  # student component -> teacher component
    unmatched: dict[int, str]  # student component -> why it has no teacher counterpart
    stages: list[StagePair]  # layer selection, per student stage
    head: set[int]  # student components forming the classifier head
    teacher_head: set[int]  # teacher components forming the classifier head
    block_of: dict[int, str] = field(default_factory=dict)  # student component -> its block path
    parts: dict[int, tuple[int, int]] = field(default_factory=dict)
    # ^ student component -> (part, parts): it reads one part of a fused teacher projection
    assembled: dict[int, list[int]] = field(default_factory=dict)
    # ^ fused student component -> the teacher component of each of its parts (separate q, k, v
    #   into a fused qkv); ``pairs`` holds the first


def align(
    teacher: nx.DiGraph,
    student: nx.DiGraph,
    *,
    layer_policy: str | LayerPolicy = "first",
    block_similarity: Callable[[list[str]], dict[str, float]] | None = None,
    allow_partial: bool = False,
) -> Alignment:
    """Align ``student`` with ``teacher``.

    ``layer_policy`` picks the teacher blocks of each stage (``layers.py``); the "importance" policy
    calls ``block_similarity`` once, with every teacher block of the aligned stages, for the cosine
    similarity of each block's input and output on calibration data.

    Raises:
        MatchError: nothing at all matches; or, unless ``allow_partial``, less than
            ``MIN_ALIGNED_SHARE`` of the student's components outside the head found a teacher
            counterpart (the message names the best-matched blocks).
    """
    policy = layer_policy if isinstance(layer_policy, LayerPolicy) else parse_layer_policy(layer_policy)
    t_struct, s_struct = Structure(teacher), Structure(student)
    t_struct.head, s_struct.head = _terminal(t_struct), _terminal(s_struct)
    t_elements = segment(t_struct)
    s_elements = segment(s_struct, evidence(t_elements))
    # a lone block of one model is a one-block stage if the other model repeats it, and a block
    # either model repeats is never an entry block; promoting one side can promote blocks of the
    # other, so iterate until neither changes (two rounds suffice in practice; four bounds it)
    for _ in range(4):
        t_next = segment(t_struct, evidence(s_elements, own=t_elements))
        s_next = segment(s_struct, evidence(t_next, own=s_elements))
        if evidence(t_next) == evidence(t_elements) and evidence(s_next) == evidence(s_elements):
            t_elements, s_elements = t_next, s_next
            break
        t_elements, s_elements = t_next, s_next

    pairs: dict[int, int] = {}
    unmatched: dict[int, str] = {}
    stages: list[StagePair] = []
    block_of: dict[int, str] = {}
    parts: dict[int, tuple[int, int]] = {}
    assembled: dict[int, list[int]] = {}
    cache: dict[tuple[str, str], dict[int, tuple[int, int | None]]] = {}
    scores = BlockScores(t_struct, s_struct)
    sequence = _align_sequences(t_struct, s_struct, t_elements, s_elements, scores)
    similarities: dict[str, float] = {}

    def similarity(t_stage: Stage) -> list[float]:
        if not similarities:
            if block_similarity is None:
                raise MatchError(
                    "layer policy 'importance' ranks teacher blocks on calibration data: pass "
                    "calibration inputs (--calib FILE_OR_DIR)"
                )
            aligned = [b for t, s in sequence if isinstance(t, Stage) and isinstance(s, Stage) for b in t.blocks]
            similarities.update(block_similarity(aligned))
        return [similarities[b] for b in t_stage.blocks]

    for t_el, s_el in sequence:
        if isinstance(s_el, Component):
            if t_el is None:
                unmatched[s_el.node] = NO_LAYER_HERE
            else:
                pairs[s_el.node] = t_el.node
            continue
        if s_el is None:
            continue
        name, picked, chosen = "first", [], []
        if t_el is not None:
            entry = len(t_el.block_hashes) > 1 or len(s_el.block_hashes) > 1
            name, picked = teacher_blocks(
                policy,
                s_el.index,
                s_el.label,
                len(t_el.blocks),
                len(s_el.blocks),
                entry=entry,
                similarity=lambda t_el=t_el: similarity(t_el),
            )
            # the policy chooses among equally good teacher blocks; a better-matching one wins (explicit maps stand)
            chosen = list(picked) if name == EXPLICIT else scores.stage(t_el, s_el, picked)[1]
        stage_pair = StagePair(
            student=s_el.label,
            teacher=t_el.label if t_el else None,
            student_depth=len(s_el.blocks),
            teacher_depth=len(t_el.blocks) if t_el else 0,
            policy=name,
            teacher_blocks=list(t_el.blocks) if t_el else [],
        )
        achieved = possible = 0.0
        for i, s_block in enumerate(s_el.blocks):
            s_nodes = s_struct.components_in[s_block]
            for n in s_nodes:
                block_of[n] = s_block
            possible += scores.best(s_block)
            if t_el is None or i >= len(chosen) or chosen[i] is None:
                reason = (
                    f"student block {i} of {s_el.label} has no teacher block: {_why_none(t_el, picked, i)}"
                    if t_el
                    else f"no teacher stage matches {s_el.label}"
                )
                unmatched.update({n: reason for n in s_nodes})
                stage_pair.blocks.append(BlockPair(s_block, None, 0, len(s_nodes)))
                continue
            t_block = t_el.blocks[chosen[i]]
            score = scores(t_block, s_block)
            achieved += score
            t_nodes = t_struct.components_in[t_block]
            mapping = _map_block(t_struct, s_struct, t_nodes, s_nodes, cache)
            for n in s_nodes:
                if n in mapping:
                    pairs[n], part = mapping[n]
                    if part is not None:
                        parts[n] = (part, _fused_parts(t_struct, pairs[n]))
                elif all((n, part) in mapping for part in _part_range(s_struct, n)):
                    assembled[n] = [mapping[(n, part)][0] for part in _part_range(s_struct, n)]
                    pairs[n] = assembled[n][0]
                else:
                    unmatched[n] = f"no structural counterpart in teacher block {t_block}"
            stage_pair.blocks.append(
                BlockPair(
                    s_block,
                    t_block,
                    len(mapping),
                    len(s_nodes),
                    cost=_cost(score, scores.best(s_block)),
                    chosen_by="policy" if i < len(picked) and picked[i] == chosen[i] else "structure",
                )
            )
        stage_pair.cost = _cost(achieved, possible)
        stages.append(stage_pair)

    _pair_leftovers(t_struct, s_struct, t_elements, pairs, unmatched)
    if policy.name == EXPLICIT:
        aligned = sorted(s.index for t, s in sequence if isinstance(s, Stage) and t is not None)
        unknown = sorted(set(policy.explicit) - set(aligned))
        if unknown:
            raise MatchError(
                f"layer map {policy.text!r} names student stage(s) {unknown}, but the student's stages "
                f"with a teacher stage are {aligned}; see `wscompile diff` for the stages"
            )
    if not any(s not in s_struct.head for s in pairs):
        first = min(student.nodes)
        example = student.nodes[first][ir.TENSORS][0].name
        raise MatchError(
            f"nothing in the student matched the teacher: no layer of the same kind in the same order "
            f"(e.g. {example}, a {s_struct.family[first]} layer, has no counterpart); "
            "are they the same family of model (e.g. both vision transformers)?"
        )
    if not allow_partial:
        check_aligned_share(s_struct, pairs, stages)
    return Alignment(pairs, unmatched, stages, _head(s_struct), _head(t_struct), block_of, parts, assembled)


def check_aligned_share(s_struct: Structure, pairs: dict[int, int], stages: list[StagePair]) -> None:
    """Refuse an alignment that pairs under ``MIN_ALIGNED_SHARE`` of the student's components outside the head."""
    body = [n for n in s_struct.graph.nodes if n not in s_struct.head]
    share = sum(n in pairs for n in body) / len(body) if body else 1.0
    if share >= MIN_ALIGNED_SHARE:
        return
    blocks = sorted(
        (pair.cost, pair.student, pair.teacher) for stage in stages for pair in stage.blocks if pair.teacher
    )
    best = "; ".join(f"student {s} <- teacher {t} (cost {c:.2f})" for c, s, t in blocks[:2]) or "no block pairs"
    raise MatchError(
        f"only {share:.0%} of the student's layers outside the head align with the teacher (under "
        f"{MIN_ALIGNED_SHARE:.0%}); best matched: {best}; are they the same family of model? "
        "pass --allow-partial to write it anyway"
    )


def _cost(score: float, best: float) -> float:
    return round(1.0 - score / best, 4) if best else 1.0


def _why_none(t_stage: Stage, picked: list[int], i: int) -> str:
    if i >= len(picked):
        return f"the teacher stage has {len(t_stage.blocks)} blocks"
    return f"no teacher block of {t_stage.label} left in order matches its structure"


def _local_fit(t_data: dict, s_data: dict) -> float | None:
    """How the axes that are not channels (vocabulary, positions, kernel) compare: None if the
    student's do not fit in the teacher's, 0.25 if they are equal, 0 otherwise."""
    t_slot, s_slot = t_data[ir.TENSORS][0], s_data[ir.TENSORS][0]
    if len(t_slot.shape) != len(s_slot.shape):
        return 0.0  # a Linear against a 1x1 convolution: no local axes to compare
    local = [a for a in range(len(s_slot.shape)) if a not in (s_slot.out_axis, s_slot.in_axis)]
    if any(s_slot.shape[a] > t_slot.shape[a] for a in local if s_data[ir.KIND] != ir.KIND_PARAM):
        return None
    return 0.25 if all(s_slot.shape[a] == t_slot.shape[a] for a in local) else 0.0


def _pair_leftovers(
    t_struct: Structure,
    s_struct: Structure,
    t_elements: list[Element],
    pairs: dict[int, int],
    unmatched: dict[int, str],
) -> None:
    """Loose layers the ordered alignment left out pair up when exactly one teacher layer fits.

    Execution order says little between siblings that are summed (word, position and token-type
    embeddings added in another order), so a second, order-free pass pairs each leftover student
    layer with the only leftover teacher layer of its family whose non-channel axes are equal.
    """
    taken = set(pairs.values())
    free = [e.node for e in t_elements if isinstance(e, Component) and e.node not in taken]
    leftovers = sorted(n for n, reason in unmatched.items() if reason == NO_LAYER_HERE and n not in s_struct.head)
    for s_node in leftovers:
        fits = [
            t
            for t in free
            if t_struct.family[t] == s_struct.family[s_node]
            and _local_fit(t_struct.graph.nodes[t], s_struct.graph.nodes[s_node]) == 0.25
        ]
        if len(fits) == 1:
            pairs[s_node] = fits[0]
            free.remove(fits[0])
            del unmatched[s_node]


def _terminal(structure: Structure) -> set[int]:
    """Dense layers whose output only feeds the model output (classifiers, poolers, LM heads).

    A layer read by other layers too (the first projection of a residual stream that reaches the
    output through additions) is not one.
    """
    graph = structure.graph
    return {n for n in graph.graph[ir.OUTPUT_NODES] if structure.family[n] == "dense" and graph.out_degree(n) == 0}


def _head(structure: Structure) -> set[int]:
    """Classifier head: dense layers whose output is a model output directly and whose width
    differs from their input's (class logits; a BERT pooler maps the hidden width to itself)."""
    graph = structure.graph
    head = set()
    for n in _terminal(structure):
        weight = next((s for s in graph.nodes[n][ir.TENSORS] if s.role == "weight"), None)
        if (
            weight is not None
            and weight.in_axis is not None
            and weight.shape[weight.out_axis] != weight.shape[weight.in_axis]
        ):
            head.add(n)
    return head


class BlockScores:
    """Scores of (teacher block, student block) pairs, memoized by the blocks' exact structure.

    A pair scores per student component matched structurally (equal width-free structure: every
    component, by position; otherwise the longest common subsequence of families, and nothing when
    that is under half the block): ``1``, plus ``FIT_BONUS`` when the teacher component is at least
    as large as the student's on every axis of every tensor (selection can then fill it whole).
    """

    def __init__(self, t_struct: Structure, s_struct: Structure) -> None:
        self.t_struct, self.s_struct = t_struct, s_struct
        self._cache: dict[tuple[str, str], float] = {}

    def __call__(self, t_block: str, s_block: str) -> float:
        t_struct, s_struct = self.t_struct, self.s_struct
        key = (t_struct.subtree_hash(t_block), s_struct.subtree_hash(s_block))
        if key not in self._cache:
            t_nodes, s_nodes = t_struct.components_in[t_block], s_struct.components_in[s_block]
            if t_struct.subtree_hash(t_block, "family") == s_struct.subtree_hash(s_block, "family"):
                matched = dict(zip(s_nodes, t_nodes, strict=True))
            else:
                matched = _order_match(t_struct, s_struct, t_nodes, s_nodes)
                if 2 * len(matched) < len(s_nodes):
                    matched = {}
            self._cache[key] = sum(
                1.0 + FIT_BONUS * _fits(t_struct.graph.nodes[t], s_struct.graph.nodes[s]) for s, t in matched.items()
            )
        return self._cache[key]

    def best(self, s_block: str) -> float:
        """The score of ``s_block`` against a teacher block equal in structure and larger everywhere."""
        return (1.0 + FIT_BONUS) * len(self.s_struct.components_in[s_block])

    def stage(
        self, t_stage: Stage, s_stage: Stage, preferred: list[int] | None = None
    ) -> tuple[float, list[int | None]]:
        """The best order-preserving block map of two stages: (its score, teacher block per student block)."""
        scores = [[self(t, s) for t in t_stage.blocks] for s in s_stage.blocks]
        return choose_blocks(scores, preferred)


def _fits(t_data: dict, s_data: dict) -> bool:
    """Whether every tensor of the teacher component is at least as large as the student's on every axis."""
    t_slots, s_slots = t_data[ir.TENSORS], s_data[ir.TENSORS]
    return len(t_slots) == len(s_slots) and all(
        len(t.shape) == len(s.shape) and all(a >= b for a, b in zip(t.shape, s.shape, strict=True))
        for t, s in zip(t_slots, s_slots, strict=True)
    )


def _element_score(
    t_struct: Structure, s_struct: Structure, t_el: Element, s_el: Element, blocks: BlockScores
) -> float:
    if isinstance(t_el, Component) and isinstance(s_el, Component):
        if (t_el.node in t_struct.head) != (s_el.node in s_struct.head):
            return 0.0  # an output layer only pairs with an output layer
        if t_struct.family[t_el.node] != s_struct.family[s_el.node]:
            return 0.0
        t_data, s_data = t_struct.graph.nodes[t_el.node], s_struct.graph.nodes[s_el.node]
        fit = _local_fit(t_data, s_data)
        return 0.0 if fit is None else 1.0 + fit + LOOSE_FIT_BONUS * _fits(t_data, s_data)
    if isinstance(t_el, Stage) and isinstance(s_el, Stage):
        return blocks.stage(t_el, s_el)[0]
    return 0.0


def _align_sequences(
    t_struct: Structure, s_struct: Structure, t_elements: list[Element], s_elements: list[Element], blocks: BlockScores
) -> list[tuple[Element | None, Element]]:
    """Order-preserving alignment maximizing the summed element scores.

    A student stage may also take several consecutive teacher stages of one container as one
    (``_joined``): a student run of plain blocks across a teacher run of other blocks it dropped
    (``[P P G P P] <- [P P P]``). That is taken only where it scores strictly higher than every
    alignment of the teacher stages one by one, so equal structures pair exactly as before.
    """
    n, m = len(t_elements), len(s_elements)
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    pair_score = {
        (i, j): _element_score(t_struct, s_struct, t_elements[i], s_elements[j], blocks)
        for i in range(n)
        for j in range(m)
    }
    joined = {
        (i, k): _joined([e for e in t_elements[i:k] if isinstance(e, Stage)])
        for i in range(n)
        for k in _join_ends(t_struct, t_elements, i)
    }
    spans: dict[tuple[int, int], list[tuple[int, float]]] = {}  # (teacher i, student j) -> [(end, score)]
    for (i, k), stage in joined.items():
        for j in range(m):
            value = blocks.stage(stage, s_elements[j])[0] if isinstance(s_elements[j], Stage) else 0.0
            if value > 0:
                spans.setdefault((i, j), []).append((k, value))
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            here = pair_score[i, j]
            best = max(score[i + 1][j], score[i][j + 1])
            if here > 0:
                best = max(best, here + score[i + 1][j + 1])
            for k, value in spans.get((i, j), ()):
                best = max(best, value + score[k][j + 1])
            score[i][j] = best
    out: list[tuple[Element | None, Element]] = []
    i = j = 0
    while j < m:
        here = pair_score[i, j] if i < n else 0.0
        if i < n and here > 0 and score[i][j] == here + score[i + 1][j + 1]:
            out.append((t_elements[i], s_elements[j]))
            i, j = i + 1, j + 1
        elif i < n and score[i][j] == score[i + 1][j]:
            i += 1
        elif span := next((k for k, value in spans.get((i, j), ()) if score[i][j] == value + score[k][j + 1]), None):
            out.append((joined[i, span], s_elements[j]))
            i, j = span, j + 1
        else:
            out.append((None, s_elements[j]))
            j += 1
    return out


def _join_ends(t_struct: Structure, elements: list[Element], i: int) -> list[int]:
    """Ends ``k`` of the spans ``elements[i:k]`` that join into one stage: two or more stages of one
    container, one after another, with only loose layers of that container between them (a
    dropped run of other blocks)."""
    first = elements[i]
    if not isinstance(first, Stage):
        return []
    inside = set(t_struct.components_in.get(first.parent, [])) if first.parent else None
    ends = []
    for k in range(i + 1, len(elements)):
        element = elements[k]
        if isinstance(element, Stage) and element.parent == first.parent:
            ends.append(k + 1)
        elif not (isinstance(element, Component) and inside is not None and element.node in inside):
            break
    return ends


def _joined(stages: list[Stage]) -> Stage:
    """Consecutive stages of one container as one stage (its blocks in order)."""
    first, last = stages[0], stages[-1]
    label = f"stages {first.index}-{last.index} ({first.parent or 'root'}, {sum(len(s.blocks) for s in stages)} blocks)"
    return Stage(
        blocks=[b for s in stages for b in s.blocks],
        first_node=first.first_node,
        family_hash=last.family_hash,
        parent=first.parent,
        index=first.index,
        label=label,
        block_hashes=tuple(dict.fromkeys(h for s in stages for h in s.block_hashes)),
        repeated=tuple(dict.fromkeys(h for s in stages for h in s.repeated)),
    )


def _map_block(
    t_struct: Structure, s_struct: Structure, t_nodes: list[int], s_nodes: list[int], cache: dict[tuple[str, str], dict]
) -> dict[int | tuple[int, int], tuple[int, int | None]]:
    """Student node -> (teacher node, part of a fused teacher node or None) inside one block pair.

    A part of a fused student node matched on its own (a fused student qkv against separate teacher
    q, k, v) is keyed ``(student node, part)``.
    """
    key = (t_struct.subtree_hash_of_nodes(t_nodes), s_struct.subtree_hash_of_nodes(s_nodes))
    if key not in cache:
        t_units = [(n, None) for n in t_nodes]
        s_units = [(n, None) for n in s_nodes]
        positional = _isomorphic_match(t_struct, s_struct, t_units, s_units)
        if positional is None and any(_fused_parts(t_struct, n) > 1 for n in t_nodes):
            # a fused q/k/v teacher against separate q, k, v: try again with its parts as layers
            split = [(n, part) for n in t_nodes for part in _part_range(t_struct, n)]
            positional = _isomorphic_match(t_struct, s_struct, split, s_units)
        if positional is None and any(_fused_parts(s_struct, n) > 1 for n in s_nodes):
            # separate teacher q, k, v against a fused student qkv: the student's parts as layers
            split = [(n, part) for n in s_nodes for part in _part_range(s_struct, n)]
            positional = _isomorphic_match(t_struct, s_struct, t_units, split)
        if positional is None:
            positional = _order_match(t_struct, s_struct, t_nodes, s_nodes)
            positional = {(s, None): (t, None) for s, t in positional.items()}
        # cache by position so every block with the same structure reuses the search
        cache[key] = {
            (s_nodes.index(s), s_part): (t_nodes.index(t), part) for (s, s_part), (t, part) in positional.items()
        }
    return {
        (s_nodes[s] if s_part is None else (s_nodes[s], s_part)): (t_nodes[t], part)
        for (s, s_part), (t, part) in cache[key].items()
    }


def _fused_parts(struct: Structure, node: int) -> int:
    weight = next((s for s in struct.graph.nodes[node][ir.TENSORS] if s.role == "weight"), None)
    if weight is None or weight.out_axis is None:
        return 1
    return dict(getattr(weight, "blocks", ())).get(weight.out_axis, 1)


def _part_range(struct: Structure, node: int) -> list[int | None]:
    k = _fused_parts(struct, node)
    return list(range(k)) if k > 1 else [None]


def _block_graph(struct: Structure, units: list) -> nx.DiGraph:
    """Block graph over units: (node, None) for a layer, (node, part) for a part of a split fused layer."""
    sub = nx.DiGraph()
    by_node: dict[int, list] = {}
    for unit in units:
        node = unit[0]
        sub.add_node(unit, family=struct.family[node])
        by_node.setdefault(node, []).append(unit)
    # NOTE: not ``graph.subgraph(nodes).edges``: on a large model graph that view filters the whole
    # adjacency, 50 ms per block; the successors of these few nodes are all that is needed.
    succ = struct.graph.succ
    for a in by_node:
        for b, data in succ[a].items():
            for ua in by_node[a]:
                for ub in by_node.get(b, ()):
                    sub.add_edge(ua, ub, arg=data[ir.ARG])
    return sub


def _isomorphic_match(
    t_struct: Structure,
    s_struct: Structure,
    t_units: list[tuple[int, int | None]],
    s_units: list[tuple[int, int | None]],
) -> dict[tuple[int, int | None], tuple[int, int | None]] | None:
    """Student unit -> teacher unit of the isomorphism that best keeps execution order, or None."""
    if len(t_units) != len(s_units):
        return None
    t_graph, s_graph = _block_graph(t_struct, t_units), _block_graph(s_struct, s_units)
    matcher = isomorphism.DiGraphMatcher(
        s_graph,
        t_graph,
        node_match=lambda a, b: a["family"] == b["family"],
        edge_match=lambda a, b: a["arg"] == b["arg"],
    )
    t_pos = {u: i for i, u in enumerate(t_units)}
    s_pos = {u: i for i, u in enumerate(s_units)}
    best, best_cost = None, None
    for mapping in islice(matcher.isomorphisms_iter(), MAX_ISOMORPHISMS):
        cost = sum(abs(s_pos[s] - t_pos[t]) for s, t in mapping.items())
        if best_cost is None or cost < best_cost:
            best, best_cost = dict(mapping), cost
            if cost == 0:
                break
    return best


def _order_match(t_struct: Structure, s_struct: Structure, t_nodes: list[int], s_nodes: list[int]) -> dict[int, int]:
    """Longest common subsequence of families, in execution order."""
    n, m = len(t_nodes), len(s_nodes)
    lcs = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            if t_struct.family[t_nodes[i]] == s_struct.family[s_nodes[j]]:
                lcs[i][j] = 1 + lcs[i + 1][j + 1]
            else:
                lcs[i][j] = max(lcs[i + 1][j], lcs[i][j + 1])
    out: dict[int, int] = {}
    i = j = 0
    while i < n and j < m:
        if t_struct.family[t_nodes[i]] == s_struct.family[s_nodes[j]] and lcs[i][j] == 1 + lcs[i + 1][j + 1]:
            out[s_nodes[j]] = t_nodes[i]
            i, j = i + 1, j + 1
        elif lcs[i + 1][j] >= lcs[i][j + 1]:
            i += 1
        else:
            j += 1
    return out
