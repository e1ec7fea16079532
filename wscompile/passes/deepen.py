"""Deepen: a student stage deeper than its teacher stage repeats the teacher stage's last block.

Under ``--allow-partial`` (growth rule ``widen``), a student block the layer map left without a
teacher block ("has no teacher block") takes its weights from the teacher block that the stage's
last matched student block reads, component by component in execution order::

    teacher(student block i) = teacher(last matched student block)      for every unmatched i

This is the "repeat the last" policy of depth growth (bert2BERT's stacking reuses blocks the same
way); it does not preserve the teacher's function (the repeated block runs twice). It only pairs a
block whose components have the kinds, operations and tensor shapes of the donor block's, so every
axis is read as the donor's is; any other block keeps the student's init, as before. The tensors
filled so are counted as grown, not selected, and name the teacher block they repeat.
"""

from __future__ import annotations

from dataclasses import replace

import networkx as nx

from wscompile import ir
from wscompile.matching.align import Alignment

NO_TEACHER_BLOCK = "has no teacher block"  # the reason the layer map gives a block beyond the teacher's depth
REPEAT_REASON = "repeats teacher block {block}: the student stage is deeper than its teacher's (--allow-partial)"


def deepen(alignment: Alignment, student_graph: nx.DiGraph) -> tuple[Alignment, dict[str, str]]:
    """The alignment with deeper student blocks paired like their stage's last matched block, and
    student tensor -> the teacher block it repeats."""
    members: dict[str, list[int]] = {}
    for node, block in alignment.block_of.items():
        members.setdefault(block, []).append(node)
    pairs, unmatched = dict(alignment.pairs), dict(alignment.unmatched)
    parts, assembled = dict(alignment.parts), dict(alignment.assembled)
    repeated: dict[str, str] = {}
    stages = []
    for stage in alignment.stages:
        donor = next((b for b in reversed(stage.blocks) if b.teacher is not None), None)
        blocks = []
        for pair in stage.blocks:
            nodes = sorted(members.get(pair.student, []))
            donor_nodes = sorted(members.get(donor.student, [])) if donor else []
            if (
                pair.teacher is not None
                or donor is None
                or not nodes
                or not all(NO_TEACHER_BLOCK in unmatched.get(n, "") for n in nodes)
                or [_signature(student_graph, n) for n in nodes] != [_signature(student_graph, n) for n in donor_nodes]
            ):
                blocks.append(pair)
                continue
            matched = 0
            for node, like in zip(nodes, donor_nodes, strict=True):
                if like not in pairs:
                    continue
                pairs[node] = pairs[like]
                unmatched.pop(node, None)
                if like in parts:
                    parts[node] = parts[like]
                if like in assembled:
                    assembled[node] = assembled[like]
                repeated.update({slot.name: donor.teacher for slot in student_graph.nodes[node][ir.TENSORS]})
                matched += 1
            blocks.append(replace(pair, teacher=donor.teacher, components_matched=matched))
        stages.append(replace(stage, blocks=blocks))
    if not repeated:
        return alignment, {}
    return replace(
        alignment, pairs=pairs, unmatched=unmatched, stages=stages, parts=parts, assembled=assembled
    ), repeated


def _signature(graph: nx.DiGraph, node: int) -> tuple:
    data = graph.nodes[node]
    return data[ir.KIND], data.get(ir.OP), tuple((s.role, tuple(s.shape)) for s in data[ir.TENSORS])
