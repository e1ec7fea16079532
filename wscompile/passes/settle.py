"""Settle: write the chosen indices into new axis rules, then account for every tensor.

1. groups: a group is a root of the coupled spaces (``CoupledDimensions.spaces``) at one pair of
   block sizes, numbered ``g0, g1, ...`` in the order its first axis occurs; a head-structured axis
   is its own group per distinct head index set. Every pending axis gets a new rule reading its
   group's indices (or, for the uniform rule with ``t % s == 0``, its step); a group the student is
   larger in reads every teacher unit and records how its extra units are filled (``grow.py``);
2. records: a record whose every axis is whole is a copy, else a selection; with ``rescale`` a
   weight whose input axis shrank is scaled by ``sqrt(t_in / s_in)`` (``rescale.py``);
3. coverage: a student larger than its teacher fails here unless ``allow_partial``; untraced
   tensors, tied keys and dtype conversions are recorded, unused teacher tensors listed with why.
   Elements filled by replication (widen) count as grown, not selected.
"""

from __future__ import annotations

from dataclasses import replace

import networkx as nx
import torch

from wscompile import ir
from wscompile.errors import SelectionError
from wscompile.matching.align import Alignment
from wscompile.matching.coupling import UnionFind
from wscompile.passes.choose import Chosen, Dimension, dimension
from wscompile.passes.collect import Collected, Pending
from wscompile.passes.grow import Growth
from wscompile.passes.layout import axis_rule
from wscompile.passes.rescale import input_scale
from wscompile.plan import (
    AXIS_FULL,
    GROW_WIDEN,
    GROWTH_RULES,
    RULE_COPY,
    RULE_SELECT,
    RULE_STUDENT_INIT,
    AxisRule,
    Coverage,
    GroupRecord,
    StagePair,
    TensorRecord,
    UnusedTeacher,
)

TeacherKeys = dict[str, tuple[tuple[int, ...], torch.dtype]]  # teacher key -> (shape, dtype)


def settle_groups(
    collected: Collected,
    chosen: Chosen,
    spaces: UnionFind,
    linked: UnionFind,
    *,
    method: str,
    heads_rule: str,
    rescale: bool,
    grown: dict[Dimension, Growth] | None = None,
) -> tuple[dict[str, TensorRecord], list[GroupRecord]]:
    """New records with every pending axis settled, and the groups in id order; ``grown`` maps each
    dimension the student is larger in to its ``Growth``."""
    groups: dict[tuple, GroupRecord] = {}
    # (student key, part) -> axes being settled; part None is the tensor itself, an int a part of an
    # assembled tensor (separate teacher q/k/v into a fused qkv)
    axes = {(key, None): list(r.axes) for key, r in collected.records.items() if r.axes is not None}
    for key, record in collected.records.items():
        axes.update(((key, i), list(part.axes)) for i, part in enumerate(record.parts))
    for p in collected.pending:
        rule, t_block, s_block = p.rule, p.member.size, p.student_block
        root = spaces.find(p.space)
        if p.structured:
            indices = chosen.by_head_axis[(p.space.node, p.space.side)]
            key = (root, t_block, s_block, tuple(indices))
            if key not in groups:
                groups[key] = GroupRecord(f"g{len(groups)}", t_block, s_block, [], heads_rule, list(indices))
            settled = replace(rule, rule=heads_rule, group=groups[key].id, indices=list(indices))
        elif s_block > t_block:
            key = (root, t_block, s_block)
            growth = (grown or {})[dimension(linked, p)]
            if key not in groups:
                groups[key] = GroupRecord(
                    f"g{len(groups)}",
                    t_block,
                    s_block,
                    [],
                    growth.rule,
                    list(growth.indices),
                    growth.rule,
                    growth.replicas,
                    growth.note,
                )
            settled = _grown_rule(p, groups[key].id, growth)
        else:
            key = (root, t_block, s_block)
            if key not in groups:
                equal = t_block == s_block
                indices = list(range(t_block)) if equal else chosen.by_dimension[dimension(linked, p)]
                groups[key] = GroupRecord(
                    f"g{len(groups)}", t_block, s_block, [], AXIS_FULL if equal else method, indices
                )
            settled = axis_rule(rule.teacher_size, rule.student_size, rule.blocks, groups[key], method, rule.offset)
        if f"{p.student}:{p.axis}" not in groups[key].members:  # the parts of an assembled tensor share it
            groups[key].members.append(f"{p.student}:{p.axis}")
        if (p.student, p.part) in axes:  # NOTE: not for a tensor found larger than its teacher after this axis
            axes[(p.student, p.part)][p.axis] = settled

    def settled_record(record: TensorRecord, key: str, part: int | None) -> TensorRecord:
        if (key, part) not in axes:
            return replace(record)
        copy = all(a.rule == AXIS_FULL for a in axes[(key, part)])
        in_axis = collected.rescalable.get(key) if rescale else None
        grown_input = in_axis is not None and axes[(key, part)][in_axis].rule in GROWTH_RULES
        scale = input_scale(axes[(key, part)][in_axis]) if in_axis is not None and not grown_input else record.scale
        return replace(record, axes=axes[(key, part)], rule=RULE_COPY if copy else RULE_SELECT, scale=scale)

    records = {}
    for key, record in collected.records.items():
        records[key] = settled_record(record, key, None)
        if record.parts:
            records[key].parts = [settled_record(part, key, i) for i, part in enumerate(record.parts)]
    return records, sorted(groups.values(), key=lambda g: int(g.id[1:]))


def _grown_rule(p: Pending, group: str, growth: Growth) -> AxisRule:
    """The rule of an axis its student is larger in: every teacher unit, the rest by ``growth``."""
    rule = p.rule
    return AxisRule(
        rule.teacher_size,
        rule.student_size,
        growth.rule,
        group,
        rule.blocks,
        None,
        list(growth.indices),
        rule.offset,
        divide=growth.rule == GROW_WIDEN and p.space.side == "in",
    )


def check_sizes(alignment: Alignment, too_large: list[str], *, allow_partial: bool) -> None:
    """Refuse a student wider or deeper than its teacher unless ``allow_partial``."""
    deeper = [n for n, r in alignment.unmatched.items() if "has no teacher block" in r]
    problems = []
    if too_large:
        problems.append(
            f"{len(too_large)} student tensor(s) larger than their teacher match: "
            + "; ".join(too_large[:4])
            + (" ..." if len(too_large) > 4 else "")
        )
    if deeper:
        stage = next(s for s in alignment.stages if any(b.teacher is None for b in s.blocks))
        problems.append(
            f"student {stage.student} is deeper than teacher {stage.teacher} "
            f"({stage.student_depth} vs {stage.teacher_depth} blocks)"
        )
    if problems and not allow_partial:
        raise SelectionError("; ".join(problems) + "; pass --allow-partial to keep the student's init for them")


def untraced_pairs(
    alignment: Alignment,
    teacher_graph: nx.DiGraph,
    student_graph: nx.DiGraph,
    student_keys: list[str],
    teacher_keys: TeacherKeys,
) -> dict[str, str]:
    """Student tensor -> teacher tensor, for tensors no traced op reads, paired by structure.

    A BatchNorm's ``num_batches_tracked`` only changes in training mode, so an eval-mode trace never
    reads it; it still belongs to the module whose other tensors were matched. The ``k``-th untraced
    tensor of a student module (in state_dict order, its registration order) pairs with the ``k``-th
    untraced tensor of the teacher module its components matched; names are not compared.
    """
    modules: dict[str, str] = {}
    for s_node, t_node in alignment.pairs.items():
        modules.setdefault(student_graph.nodes[s_node][ir.MODULE], teacher_graph.nodes[t_node][ir.MODULE])
    traced = ir.tensor_names(teacher_graph)
    teacher_untraced: dict[str, list[str]] = {}
    for key in teacher_keys:
        if key not in traced:
            teacher_untraced.setdefault(key.rpartition(".")[0], []).append(key)
    student_untraced: dict[str, list[str]] = {}
    for key in student_keys:
        student_untraced.setdefault(key.rpartition(".")[0], []).append(key)
    pairs = {}
    for module, keys in student_untraced.items():
        if module in modules:
            pairs.update(zip(keys, teacher_untraced.get(modules[module], []), strict=False))
    return pairs


def add_untraced(
    records: dict[str, TensorRecord],
    student_state: dict[str, torch.Tensor],
    pairs: dict[str, str],
    teacher_keys: TeacherKeys,
) -> None:
    """Student tensors no traced op reads: copied from their structural pair (``untraced_pairs``)
    when shapes agree; the rest keep init, recorded as untraced (tied aliases are settled afterwards
    by ``unify_ties``)."""
    for key, tensor in student_state.items():
        if key in records:
            continue
        teacher_key = pairs.get(key)
        if teacher_key is not None and teacher_keys[teacher_key][0] == tuple(tensor.shape):
            full = [AxisRule(d, d, AXIS_FULL, None) for d in tensor.shape]
            records[key] = TensorRecord(
                key,
                list(tensor.shape),
                teacher_key,
                list(tensor.shape),
                RULE_COPY,
                key.rpartition(".")[0],
                full,
                reason="buffer of a matched layer, not read in eval mode",
            )
            continue
        # NOTE: a structural pair of another shape (an untraced mask token of the teacher's width) gets the
        # same reason as no pair: the manifest says the tensor is untraced, whatever its teacher has
        records[key] = TensorRecord(
            key, list(tensor.shape), None, None, RULE_STUDENT_INIT, reason="not read by any traced operation"
        )


def unify_ties(records: dict[str, TensorRecord], student_state: dict[str, torch.Tensor]) -> None:
    """Keys sharing one tensor (tied embeddings, an LM head tied to the input embedding) get one plan.

    Loading the student writes the storage once per key, so differing plans would overwrite each
    other; the member filled from the teacher (outside the head first) decides for all.
    """
    tied: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for key, tensor in student_state.items():
        if tensor.numel() and tensor.device.type != "meta":
            tied.setdefault(
                (
                    tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
                    tuple(tensor.shape),
                ),
                [],
            ).append(key)
    for keys in tied.values():
        if len(keys) < 2:
            continue
        ranked = sorted(keys, key=lambda k: (records[k].teacher is None, records[k].is_head, keys.index(k)))
        base = records[ranked[0]]
        for key in ranked[1:]:
            records[key] = replace(
                records[key],
                teacher=base.teacher,
                teacher_shape=base.teacher_shape,
                rule=base.rule,
                axes=base.axes,
                reshape=base.reshape,
                scale=base.scale,
                parts=base.parts,
                parts_axis=base.parts_axis,
                reason=f"tied to {base.student}",
            )


def note_dtypes(
    records: dict[str, TensorRecord], student_state: dict[str, torch.Tensor], teacher_keys: TeacherKeys
) -> None:
    """Note on each record whose teacher dtype differs from the student's that it is converted."""
    for key, record in records.items():
        if record.teacher is None or record.teacher not in teacher_keys:
            continue
        t_dtype, s_dtype = teacher_keys[record.teacher][1], student_state[record.student].dtype
        if t_dtype != s_dtype:
            note = f"converted {str(t_dtype).removeprefix('torch.')} -> {str(s_dtype).removeprefix('torch.')}"
            records[key] = replace(record, reason=f"{record.reason}; {note}" if record.reason else note)


def unused_teacher(
    alignment: Alignment, teacher_graph: nx.DiGraph, teacher_keys: TeacherKeys, used: set[str], select_head: bool
) -> list[UnusedTeacher]:
    """Every teacher tensor no student tensor reads, with why."""
    owner: dict[str, int] = {}
    for n in teacher_graph.nodes:
        for slot in teacher_graph.nodes[n][ir.TENSORS]:
            owner.setdefault(slot.name, n)
    dropped_blocks = {block: _dropped_reason(stage) for stage in alignment.stages for block in _dropped(stage)}
    paired = set(alignment.pairs.values())
    out = []
    for key, (shape, _) in teacher_keys.items():
        if key in used:
            continue
        node = owner.get(key)
        dropped = next((reason for b, reason in dropped_blocks.items() if key.startswith(b + ".")), None)
        if node is None:
            reason = "not read by any traced operation"
        elif node in alignment.teacher_head and not select_head:
            reason = "classifier head (not selected)"
        elif dropped is not None:
            reason = dropped
        elif node in paired:
            reason = "its layer is matched but the student has no tensor in this role or it did not fit"
        else:
            reason = "no student layer matches it structurally"
        out.append(UnusedTeacher(key, list(shape), reason))
    return out


def _dropped(stage: StagePair) -> list[str]:
    """Teacher blocks of a stage no student block takes."""
    taken = {b.teacher for b in stage.blocks}
    return [b for b in stage.teacher_blocks if b not in taken]


def _dropped_reason(stage: StagePair) -> str:
    if stage.policy == "first":
        return "block beyond the student's depth (layer policy: first-N)"
    return f"block not selected (layer policy: {stage.policy})"


def filled(record: TensorRecord) -> tuple[int, int]:
    """(elements read from the teacher, elements grown by replication) of a record."""
    if record.rule == RULE_STUDENT_INIT:
        return 0, 0
    if record.repeats is not None:
        return 0, record.numel
    if record.parts:
        counts = [filled(part) for part in record.parts]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    if not any(a.rule in GROWTH_RULES for a in record.axes or []):
        return record.numel, 0
    teacher, written = 1, 1
    for a in record.axes or []:
        grown = a.rule in GROWTH_RULES
        teacher *= a.teacher_size if grown else a.student_size
        written *= a.student_size if a.rule == GROW_WIDEN or not grown else a.teacher_size
    return teacher, written - teacher


def coverage(tensors: list[TensorRecord]) -> Coverage:
    """How many student elements come from the teacher (and are grown from it), with and without the head."""
    counts = [(filled(r), r.is_head) for r in tensors]
    selected = sum(c[0] for c, _ in counts)
    grown = sum(c[1] for c, _ in counts)
    total = sum(r.numel for r in tensors)
    selected_nh = sum(c[0] for c, head in counts if not head)
    grown_nh = sum(c[1] for c, head in counts if not head)
    total_nh = sum(r.numel for r in tensors if not r.is_head)
    return Coverage(
        selected,
        total,
        selected / total if total else 0.0,
        selected_nh,
        total_nh,
        selected_nh / total_nh if total_nh else 0.0,
        grown,
        grown_nh,
    )
