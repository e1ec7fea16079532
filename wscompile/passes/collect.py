"""Collect: pair every student tensor with its teacher tensor, and every axis with a teacher axis.

For every matched component pair, tensors pair up by role (weight with weight, running_mean with
running_mean) and axes by the view between the two layouts (``layout.py``). Each student axis is
then one of:

- local (a conv kernel, a vocabulary or position table): settled here, by the uniform or prefix
  rule, or resampled when it is a position table on a patch grid (``position_grid.py``), whatever
  the method;
- grouped (it indexes a component's output or input channels): a ``Pending`` axis, whose teacher
  tensor axis is a ``Member`` of its coupled dimension; its indices are chosen later (``choose.py``)
  and written into its rule last (``settle.py``).

A student layer that is one part of a fused teacher layer (k of q/k/v) reads its part's range of
the teacher axis (``offset``). Nothing is chosen here, and no rule collected here is edited later:
settling builds new records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from wscompile import ir
from wscompile.matching.align import Alignment
from wscompile.matching.coupling import Space
from wscompile.passes.choice import Member
from wscompile.passes.interpolate import RULE as INTERPOLATE
from wscompile.passes.layout import axis_rule, layout
from wscompile.passes.position_grid import position_grids
from wscompile.passes.rescale import rescales
from wscompile.plan import AXIS_FULL, AXIS_UNIFORM, RULE_SELECT, RULE_STUDENT_INIT, AxisRule, TensorRecord

AXIS_PREFIX = "prefix"  # the first student_size ids of a token/position table

HEAD_REASON = "classifier head: kept at the student's init (pass --select-head to select it)"


@dataclass(frozen=True)
class Pending:
    """A grouped student axis whose indices are chosen once every dimension is known."""

    student: str  # student tensor key
    axis: int  # student axis (its position in the record's axes)
    rule: AxisRule  # the rule collected for it (sizes, blocks, offset); settled into a new rule
    space: Space  # its channel space in the student graph
    member: Member  # the teacher tensor axis it reads
    structured: bool  # its indices come from the attention head layout
    part: int | None = None  # the part of an assembled tensor it belongs to (None: the tensor itself)

    @property
    def student_block(self) -> int:
        """Student units per block: the dimension's student size."""
        return self.rule.student_size // self.rule.blocks


@dataclass
class Collected:
    """The result of collecting: records with local axes settled, grouped axes pending."""

    records: dict[str, TensorRecord]  # student key -> record, in planning order
    pending: list[Pending]  # grouped axes, in order of first occurrence
    rescalable: dict[str, int] = field(default_factory=dict)  # student tensor -> input axis --rescale may scale
    too_large: list[str] = field(default_factory=list)  # student tensors larger than their teacher match
    used_teacher: set[str] = field(default_factory=set)  # teacher tensors some student tensor reads


def collect(
    alignment: Alignment,
    teacher_graph: nx.DiGraph,
    student_graph: nx.DiGraph,
    *,
    select_head: bool,
    structured_axes: set[tuple[int, str]],
    grow: bool = False,
) -> Collected:
    """Pair tensors by role and axes by layout; ``structured_axes`` are read by head (``heads.py``).

    With ``grow`` (``--allow-partial``) a grouped flat axis larger than its teacher's stays pending,
    to be grown (``grow.py``); any other larger axis makes its tensor too large.
    """
    found = Collected({}, [])
    grids = position_grids(alignment, teacher_graph, student_graph)
    for s_node in sorted(student_graph.nodes):
        s_data = student_graph.nodes[s_node]
        t_node = alignment.pairs.get(s_node)
        is_head = s_node in alignment.head
        for s_slot in s_data[ir.TENSORS]:
            if s_slot.name in found.records:
                continue  # a tensor read by several components is planned once
            record = TensorRecord(
                s_slot.name,
                list(s_slot.shape),
                None,
                None,
                RULE_STUDENT_INIT,
                component=s_data[ir.MODULE],
                is_head=is_head,
            )
            found.records[s_slot.name] = record
            if t_node is None:
                record.reason = alignment.unmatched.get(s_node, "no teacher counterpart")
                continue
            if is_head and not select_head:
                record.reason = HEAD_REASON
                continue
            if s_node in alignment.assembled:
                # a fused student projection read from separate teacher ones: one planned part each
                _collect_assembled(
                    record, alignment.assembled[s_node], teacher_graph, s_node, s_data, s_slot, structured_axes, found
                )
                continue
            t_data = teacher_graph.nodes[t_node]
            t_slot = next((t for t in t_data[ir.TENSORS] if t.role == s_slot.role), None)
            if t_slot is None:
                record.reason = f"teacher layer {t_data[ir.MODULE]} has no {s_slot.role!r} tensor"
                continue
            view = layout(t_slot, s_slot)
            if view is None:
                record.teacher_shape = list(t_slot.shape)  # NOTE: kept in the manifest, with no teacher
                record.reason = f"teacher layout {list(t_slot.shape)} cannot be read as {list(s_slot.shape)}"
                continue
            axes = _tensor_axes(
                s_node,
                s_data,
                s_slot,
                t_data,
                t_slot,
                view[1],
                alignment.parts.get(s_node, (0, 1)),
                structured_axes,
                s_node in grids,
                found.pending,
                grow,
            )
            if axes is None:
                found.too_large.append(
                    f"{s_slot.name!r} {tuple(s_slot.shape)} vs teacher {t_slot.name!r} {tuple(t_slot.shape)}"
                )
                record.reason = f"larger than its teacher match {t_slot.name} {list(t_slot.shape)} (--allow-partial)"
                continue
            record.teacher, record.teacher_shape, record.reshape, record.axes = (
                t_slot.name,
                list(t_slot.shape),
                view[0],
                axes,
            )
            found.used_teacher.add(t_slot.name)
            if rescales(s_data[ir.KIND], s_slot):
                found.rescalable[s_slot.name] = s_slot.in_axis
    return found


def _tensor_axes(
    s_node: int,
    s_data: dict,
    s_slot: ir.TensorSlot,
    t_data: dict,
    t_slot: ir.TensorSlot,
    teacher_axes: list[int | None],
    fused_part: tuple[int, int],
    structured_axes: set[tuple[int, str]],
    position_grid: bool,
    pending: list[Pending],
    grow: bool,
    assembled_part: int | None = None,
) -> list[AxisRule] | None:
    """One rule per student axis (grouped ones appended to ``pending``), or None when an axis is
    larger than the teacher's (with ``grow``: a local or head-structured one). ``assembled_part``
    marks the pending axes of one part of an assembled tensor (``_collect_assembled``).

    NOTE: grouped axes before a larger one stay pending: they still join their dimension (and its
    group's members), as they always have, so plans do not move.
    """
    part, parts = fused_part
    axes: list[AxisRule] = []
    for s_axis, t_axis in enumerate(teacher_axes):
        s_size = s_slot.shape[s_axis]
        t_size = 1 if t_axis is None else t_slot.shape[t_axis]
        offset = 0
        fused_in_teacher = t_axis is not None and t_slot.blocks_on(t_axis)
        if parts > 1 and t_axis == t_slot.out_axis:
            # this student layer is one part of a fused teacher layer (k of q/k/v)
            t_size //= parts
            offset = part * t_size
            fused_in_teacher = 1
        kind = s_data[ir.KIND]
        if position_grid and s_axis == 1:
            axes.append(AxisRule(t_size, s_size, INTERPOLATE, None))  # the tokens of a patch grid
            continue
        larger = s_size > t_size
        if larger and not grow:
            return None
        if kind == ir.KIND_EMBEDDING and s_axis == 0 and s_size < t_size:
            # rows are token or position ids: a smaller table keeps the first ids
            axes.append(AxisRule(t_size, s_size, AXIS_PREFIX, None, indices=list(range(s_size))))
            continue
        k = s_slot.blocks_on(s_axis)
        if k > 1 and (fused_in_teacher != k or t_size % k):
            k = 1
        space = None
        if s_axis == s_slot.out_axis:
            space = Space(s_node, "out")
        elif s_axis == s_slot.in_axis and s_size > 1:
            space = Space(s_node, "in")
        structured = space is not None and (s_node, space.side) in structured_axes and t_size != s_size
        if larger and (space is None or structured or s_size % k):
            return None
        if space is None:
            axes.append(axis_rule(t_size, s_size, k, None, AXIS_UNIFORM, offset))
            continue
        rule = AxisRule(t_size, s_size, AXIS_FULL, None, k, offset=offset)  # settled by settle.py
        axes.append(rule)
        member = Member(
            t_slot.name, t_axis, t_slot.shape[t_axis], offset, k, t_size // k, t_data[ir.MODULE], space.side
        )
        pending.append(Pending(s_slot.name, s_axis, rule, space, member, structured, assembled_part))
    return axes


def _collect_assembled(
    record: TensorRecord,
    t_nodes: list[int],
    teacher_graph: nx.DiGraph,
    s_node: int,
    s_data: dict,
    s_slot: ir.TensorSlot,
    structured_axes: set[tuple[int, str]],
    found: Collected,
) -> None:
    """Plan a fused student tensor (k blocks along its out axis) from k separate teacher layers.

    Part ``i`` is the student's ``i``-th block, read from the same-role tensor of ``t_nodes[i]`` as a
    whole teacher layer: its out and in axes are the student layer's channel spaces (so every part
    takes the indices its coupled dimension takes: the fused q/k/v rows follow the attention output
    projection's input), any other axis is local. On a problem the record keeps its init and says why.
    """
    k = len(t_nodes)
    shape = list(s_slot.shape)
    shape[s_slot.out_axis] //= k
    part_slot = ir.TensorSlot(s_slot.role, s_slot.name, tuple(shape), s_slot.out_axis, s_slot.in_axis)
    parts: list[TensorRecord] = []
    pending: list[Pending] = []
    for index, t_node in enumerate(t_nodes):
        t_data = teacher_graph.nodes[t_node]
        t_slot = next((t for t in t_data[ir.TENSORS] if t.role == s_slot.role), None)
        view = None if t_slot is None else layout(t_slot, part_slot)
        if view is None:
            record.reason = f"teacher layer {t_data[ir.MODULE]} has no {s_slot.role!r} tensor to read a part from"
            return
        reshape, teacher_axes = view
        # a whole teacher layer per part: no fused teacher part, no position grid, no growth
        axes = _tensor_axes(
            s_node,
            s_data,
            part_slot,
            t_data,
            t_slot,
            teacher_axes,
            (0, 1),
            structured_axes,
            False,
            pending,
            False,
            assembled_part=index,
        )
        if axes is None:
            record.reason = (
                f"a part {shape} is larger than its teacher match {t_slot.name} {list(t_slot.shape)} (--allow-partial)"
            )
            found.too_large.append(f"{s_slot.name!r} part {tuple(shape)} vs teacher {t_slot.name!r} {t_slot.shape}")
            return
        parts.append(
            TensorRecord(s_slot.name, shape, t_slot.name, list(t_slot.shape), RULE_SELECT, axes=axes, reshape=reshape)
        )
    record.parts, record.parts_axis, record.rule = parts, s_slot.out_axis, RULE_SELECT
    record.teacher, record.teacher_shape = parts[0].teacher, parts[0].teacher_shape
    found.pending.extend(pending)
    found.used_teacher.update(part.teacher for part in parts)
    if rescales(s_data[ir.KIND], s_slot):
        found.rescalable[s_slot.name] = s_slot.in_axis
