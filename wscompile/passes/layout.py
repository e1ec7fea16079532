"""Views: how the axes of a student tensor read the axes of its teacher tensor.

Layouts that differ but hold the same numbers are read through a view: a Linear weight ``(O, I)``
feeds a 1x1 convolution ``(O, I, 1, 1)`` and back, and transformers' ``Conv1D`` stores ``(I, O)``
where a Linear stores ``(O, I)``. A planned record names its view (``TensorRecord.reshape``);
``teacher_index`` turns its axis rules into teacher indices per teacher axis and
``to_student_layout`` brings the selected elements into the student's layout (transposed,
resampled, rescaled, reshaped). The writer (``apply.py``) and the tests read plans through these two.

An axis its student is larger in (``grow.py``) reads every teacher unit once; ``to_student_layout``
then widens it (each student unit takes its teacher unit, divided by the unit's replication count
on an input axis) or places the teacher part in the student's own tensor (init).
"""

from __future__ import annotations

import torch

from wscompile import ir
from wscompile.indices import uniform_indices, uniform_step
from wscompile.passes.interpolate import RULE as INTERPOLATE
from wscompile.passes.interpolate import resample
from wscompile.passes.rescale import rescale_tensor
from wscompile.plan import (
    AXIS_FULL,
    AXIS_UNIFORM,
    GROW_INIT,
    GROW_WIDEN,
    GROWTH_RULES,
    AxisRule,
    GroupRecord,
    TensorRecord,
)


def layout(teacher: ir.TensorSlot, student: ir.TensorSlot) -> tuple[str | None, list[int | None]] | None:
    """How student axes read teacher axes: (reshape name, teacher axis per student axis), or None."""
    t_shape, s_shape = teacher.shape, student.shape
    if len(t_shape) == len(s_shape):
        if (
            len(s_shape) == 2
            and teacher.out_axis is not None
            and student.out_axis is not None
            and teacher.out_axis != student.out_axis
        ):
            return "transpose", [1, 0]
        return None, list(range(len(s_shape)))
    if len(t_shape) == 2 and len(s_shape) > 2 and all(d == 1 for d in s_shape[2:]):
        return "linear->conv1x1", [0, 1] + [None] * (len(s_shape) - 2)
    if len(s_shape) == 2 and len(t_shape) > 2 and all(d == 1 for d in t_shape[2:]):
        return "conv1x1->linear", [0, 1]
    return None


def axis_rule(t_size: int, s_size: int, blocks: int, group: GroupRecord | None, method: str, offset: int) -> AxisRule:
    """The rule of a flat axis: its group's indices, or uniform ones for a local axis (group None)."""
    t_block, s_block = t_size // blocks, s_size // blocks
    gid = group.id if group else None
    if t_size == s_size:
        return AxisRule(t_size, s_size, AXIS_FULL, gid, blocks, offset=offset)
    indices = group.indices if group else uniform_indices(t_block, s_block)
    step = uniform_step(t_block, s_block) if method == AXIS_UNIFORM else None
    return AxisRule(t_size, s_size, method, gid, blocks, step, None if step else list(indices), offset)


def teacher_index(record: TensorRecord, group_indices: dict[str, list[int]]) -> list[list[int] | None]:
    """Teacher indices per *teacher* axis for a planned record (None: whole axis)."""
    assert record.axes is not None and record.teacher_shape is not None
    teacher_axes = _view_axes(record)
    index: list[list[int] | None] = [None] * len(record.teacher_shape)
    for rule, t_axis in zip(record.axes, teacher_axes, strict=True):
        if t_axis is None:
            continue
        if rule.rule == AXIS_FULL and rule.offset == 0 and rule.teacher_size == record.teacher_shape[t_axis]:
            continue  # the whole teacher axis
        if rule.rule == AXIS_FULL:
            index[t_axis] = list(range(rule.offset, rule.offset + rule.teacher_size))
            continue
        if rule.rule == INTERPOLATE:
            continue  # read whole, resized by to_student_layout
        if rule.rule in GROWTH_RULES:
            within = list(range(rule.teacher_size // rule.blocks))  # every teacher unit, once
        elif rule.group is not None:
            within = group_indices[rule.group]
        elif rule.step is not None:
            within = list(range(0, rule.teacher_size // rule.blocks, rule.step))
        else:
            within = rule.indices or []
        block = rule.teacher_size // rule.blocks
        index[t_axis] = [rule.offset + b * block + i for b in range(rule.blocks) for i in within]
    return index


def _view_axes(record: TensorRecord) -> list[int | None]:
    rank = len(record.student_shape)
    if record.reshape == "transpose":
        return [1, 0]
    if record.reshape == "linear->conv1x1":
        return [0, 1] + [None] * (rank - 2)
    if record.reshape == "conv1x1->linear":
        return [0, 1]
    return list(range(rank))


def to_student_layout(tensor: torch.Tensor, record: TensorRecord, student: torch.Tensor | None = None) -> torch.Tensor:
    """Selected teacher elements in the student's layout (transposed, reshaped, resampled, rescaled,
    grown); ``student`` is the student's own tensor, needed when an axis grows by ``init``."""
    if record.reshape == "transpose":
        tensor = tensor.t()
    for axis, rule in enumerate(record.axes or []):
        if rule.rule == INTERPOLATE:
            tensor = resample(tensor, rule.student_size, axis)
    if record.scale is not None:
        tensor = rescale_tensor(tensor, record.scale)
    axes = record.axes or []
    if not any(rule.rule in GROWTH_RULES for rule in axes):
        return tensor.reshape(record.student_shape)
    tensor = tensor.reshape([r.teacher_size if r.rule in GROWTH_RULES else r.student_size for r in axes])
    for axis, rule in enumerate(axes):
        if rule.rule == GROW_WIDEN:
            tensor = _widen(tensor, axis, rule)
    placed = [(axis, rule) for axis, rule in enumerate(axes) if rule.rule == GROW_INIT]
    if not placed:
        return tensor
    assert student is not None, f"{record.student}: growing by init needs the student's tensor"
    return _place(student.detach().to(tensor.dtype), tensor, placed)


def _widen(tensor: torch.Tensor, axis: int, rule: AxisRule) -> torch.Tensor:
    """Student unit ``j`` of each block takes teacher unit ``indices[j]``, divided by its count on an input axis."""
    within = rule.indices or []
    t_block = rule.teacher_size // rule.blocks
    positions = torch.tensor([b * t_block + i for b in range(rule.blocks) for i in within])
    tensor = tensor.index_select(axis, positions)
    if rule.divide:
        counts = torch.bincount(torch.tensor(within), minlength=t_block)
        divisor = counts[torch.tensor(within)].repeat(rule.blocks).to(tensor.dtype)
        shape = [1] * tensor.dim()
        shape[axis] = -1
        tensor = tensor / divisor.reshape(shape)
    return tensor


def _place(student: torch.Tensor, part: torch.Tensor, placed: list[tuple[int, AxisRule]]) -> torch.Tensor:
    """``student`` with ``part`` written at the first teacher units of every block of each placed axis."""
    if not placed:
        return part
    (axis, rule), rest = placed[0], placed[1:]
    t_block, s_block = rule.teacher_size // rule.blocks, rule.student_size // rule.blocks
    positions = torch.tensor([b * s_block + i for b in range(rule.blocks) for i in range(t_block)])
    inner = _place(student.index_select(axis, positions), part, rest)
    return student.clone().index_copy_(axis, positions, inner)
