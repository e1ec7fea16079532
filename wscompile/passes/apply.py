"""Write a selection plan: read the planned teacher elements, produce the student's tensors.

Teacher tensors are read one at a time through a ``TensorSource`` with exactly the indices the
plan names, so a file-backed teacher never has to be in memory whole. Values are converted to the
student tensor's dtype (an fp16/bf16 teacher initializes an fp32 student).

``student_tensors`` yields the student's tensors one by one, computed when asked for: a writer that
saves each before asking for the next (``outputs.stream_safetensors``) holds one teacher read and
one student tensor at a time, whatever the models' sizes. ``apply_plan`` collects them in memory.

Every floating read is checked for NaN and infinity as it passes (no extra pass over the teacher);
what is found goes to ``plan.nonfinite_teacher``, or, with ``strict``, stops the writing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from wscompile.errors import SelectionError
from wscompile.passes.interpolate import RULE as INTERPOLATE
from wscompile.passes.layout import teacher_index, to_student_layout
from wscompile.plan import RULE_STUDENT_INIT, NonFinite, SelectionPlan, TensorRecord
from wscompile.weights import TensorSource


def student_tensors(
    plan: SelectionPlan, teacher: TensorSource, student_state: dict[str, torch.Tensor], *, strict: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every student tensor in plan order: planned ones from the teacher, the rest
    as given in ``student_state``. Each tensor is contiguous, on the CPU, in the student's dtype.

    Teacher reads holding NaN/inf are listed in ``plan.nonfinite_teacher``; with ``strict`` the first
    one raises ``SelectionError`` instead (a streaming writer then leaves no file)."""
    plan.nonfinite_teacher = []
    group_indices = {g.id: g.indices for g in plan.groups}
    planned = [r for r in plan.tensors if r.rule != RULE_STUDENT_INIT]
    following = dict(zip((r.student for r in planned), planned[1:], strict=False))  # last: none
    for record in plan.tensors:
        current = student_state[record.student]
        if record.rule == RULE_STUDENT_INIT:
            yield record.student, current.detach().clone()
            continue
        pieces = record.parts or [record]  # an assembled tensor reads one teacher tensor per part
        read = [teacher.read(piece.teacher, teacher_index(piece, group_indices)) for piece in pieces]
        for piece, values in zip(pieces, read, strict=True):
            if values.is_floating_point():
                _check_finite(plan, piece.teacher, record.student, values, strict=strict)
        upcoming = following.get(record.student)
        if upcoming is not None:
            # A file source reads the next tensor while this one is converted and written.
            first = (upcoming.parts or [upcoming])[0]
            teacher.prefetch(first.teacher, teacher_index(first, group_indices))
        laid_out = [to_student_layout(values, piece, current) for piece, values in zip(pieces, read, strict=True)]
        values = laid_out[0] if len(laid_out) == 1 else torch.cat(laid_out, record.parts_axis)
        yield record.student, values.to(dtype=current.dtype).contiguous()


def _check_finite(plan: SelectionPlan, teacher: str, student: str, values: torch.Tensor, *, strict: bool) -> None:
    if _all_finite(values):
        return
    count = values.numel() - int(torch.isfinite(values).sum())
    if not count:
        return
    if strict:
        raise SelectionError(
            f"teacher tensor {teacher!r} has {count} non-finite value(s) (NaN or inf) among the "
            f"elements selected for student {student!r}; repair the teacher checkpoint, or drop "
            "--strict to write the student anyway (with a warning)"
        )
    plan.nonfinite_teacher.append(NonFinite(teacher, student, count))


def _all_finite(values: torch.Tensor) -> bool:
    """Whether no value is NaN or inf, in one single-threaded numpy pass over ``values`` (no copy).

    NOTE: not ``torch.isfinite``: it runs several passes, each split across torch's intra-op threads,
    and on a machine whose cores are busy every split waits for a thread to be scheduled; for the
    hundreds of small reads of a write that waiting was most of its time.
    """
    if values.device.type != "cpu":
        return bool(torch.isfinite(values).all())
    if values.dtype == torch.bfloat16:  # numpy has no bfloat16: NaN and inf are the values with every exponent bit set
        exponent = np.int16(0x7F80)
        return not bool(((values.view(torch.int16).numpy() & exponent) == exponent).any())
    if values.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(values.numpy()).all())
    return bool(torch.isfinite(values).all())


def student_layout(
    plan: SelectionPlan, student_state: dict[str, torch.Tensor]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor ``student_tensors`` yields, in the same order, before any is read."""
    return {r.student: (tuple(r.student_shape), student_state[r.student].dtype) for r in plan.tensors}


def check_plan(plan: SelectionPlan, teacher: TensorSource, student_state: dict[str, torch.Tensor]) -> None:
    """Refuse a plan read from elsewhere (``wscompile apply``'s manifest) that does not fit these models.

    Every student tensor the plan names must be the student's, with its shape, and the plan must name
    them all; every teacher tensor it reads must be in ``teacher`` with the recorded shape, and every
    index it reads must lie inside that shape, as many per axis as the student axis holds.

    Raises:
        SelectionError: listing each problem found (the first few), on one line.
    """
    problems: list[str] = []
    group_indices = {g.id: g.indices for g in plan.groups}
    named = {r.student for r in plan.tensors}
    problems += [f"the student's {key!r} is not in the plan" for key in student_state if key not in named]
    teacher_keys = set(teacher.keys())
    for record in plan.tensors:
        own = student_state.get(record.student)
        if own is None:
            problems.append(f"student {record.student!r} is not a tensor of the student")
        elif list(own.shape) != list(record.student_shape):
            problems.append(
                f"student {record.student!r} is {list(own.shape)} in the student, {record.student_shape} in the plan"
            )
        if record.rule == RULE_STUDENT_INIT:
            continue
        for piece in record.parts or [record]:
            problems += _piece_problems(piece, teacher, teacher_keys, group_indices)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise SelectionError(
            f"the plan does not fit these models ({len(problems)} problem(s)): {shown}; pass the "
            "teacher weights and student spec the manifest was written for"
        )


def _piece_problems(
    piece: TensorRecord, teacher: TensorSource, teacher_keys: set[str], group_indices: dict[str, list[int]]
) -> list[str]:
    """What keeps one planned teacher read (a record, or a part of an assembled one) from being made."""
    name = f"teacher {piece.teacher!r} (for student {piece.student!r})"
    if piece.teacher not in teacher_keys:
        return [f"{name} is not in the teacher weights"]
    shape = list(teacher.shape(piece.teacher))
    if piece.teacher_shape is None or shape != list(piece.teacher_shape):
        return [f"{name} is {shape} in the teacher weights, {piece.teacher_shape} in the plan"]
    if piece.axes is None or len(piece.axes) != len(piece.student_shape):
        return [f"{name} needs one axis rule per student axis ({len(piece.student_shape)})"]
    unknown = sorted({a.group for a in piece.axes if a.group is not None} - set(group_indices))
    if unknown:
        return [f"{name} names group(s) {', '.join(unknown)} the plan does not list"]
    if any(a.blocks < 1 for a in piece.axes):
        return [f"{name} has an axis of fewer than one block"]
    problems = []
    index = teacher_index(piece, group_indices)
    for axis, (size, along) in enumerate(zip(shape, index, strict=True)):
        outside = [i for i in along or [] if not 0 <= i < size]
        if outside:
            problems.append(f"{name} reads index {outside[0]} of its axis {axis} of size {size}")
    read = math.prod(size if along is None else len(along) for size, along in zip(shape, index, strict=True))
    if not problems and all(a.rule != INTERPOLATE for a in piece.axes) and read != math.prod(piece.student_shape):
        problems.append(f"{name} reads {read} elements for a student tensor of {math.prod(piece.student_shape)}")
    return problems


def apply_plan(
    plan: SelectionPlan, teacher: TensorSource, student_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The student's full state_dict: planned tensors from the teacher, the rest as given."""
    return dict(student_tensors(plan, teacher, student_state))
