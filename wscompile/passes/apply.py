"""Write a selection plan: read the planned teacher elements, produce the student's state_dict.

Teacher tensors are read one at a time through a ``TensorSource`` with exactly the indices the
plan names, so a file-backed teacher never has to be in memory whole. Values are converted to the
student tensor's dtype (an fp16/bf16 teacher initializes an fp32 student).
"""

from __future__ import annotations

import torch

from wscompile.passes.select import teacher_index, to_student_layout
from wscompile.plan import RULE_STUDENT_INIT, SelectionPlan
from wscompile.weights import TensorSource


def apply_plan(plan: SelectionPlan, teacher: TensorSource, student_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's full state_dict: planned tensors from the teacher, the rest as given."""
    group_indices = {g.id: g.indices for g in plan.groups}
    out: dict[str, torch.Tensor] = {}
    for record in plan.tensors:
        current = student_state[record.student]
        if record.rule == RULE_STUDENT_INIT:
            out[record.student] = current.detach().clone()
            continue
        index = teacher_index(record, group_indices)
        values = teacher.read(record.teacher, index)
        values = to_student_layout(values, record).to(dtype=current.dtype)
        out[record.student] = values.contiguous()
    return out
