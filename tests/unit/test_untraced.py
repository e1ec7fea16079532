"""Tensors no traced op reads pair by structure (their module's match, their place in it), not by name."""

from __future__ import annotations

import torch
from torch import nn

import wscompile


class Counted(nn.Linear):
    """A linear layer with a bookkeeping buffer its forward never reads."""

    def __init__(self, width_in: int, width_out: int, buffer: str, length: int = 3) -> None:
        super().__init__(width_in, width_out)
        self.register_buffer(buffer, torch.zeros(length))


def _pair(teacher_buffer: str, student_buffer: str, student_length: int = 3):
    torch.manual_seed(0)
    teacher = nn.Sequential(Counted(8, 16, teacher_buffer), nn.ReLU(), nn.Linear(16, 4)).eval()
    student = nn.Sequential(Counted(8, 6, student_buffer, student_length), nn.ReLU(), nn.Linear(6, 4)).eval()
    getattr(teacher[0], teacher_buffer).copy_(torch.tensor([1.0, 2.0, 3.0]))
    plan = wscompile.initialize(teacher, student, torch.randn(2, 8))
    return student, {r.student: r for r in plan.tensors}


def test_untraced_buffer_pairs_with_its_structural_counterpart_under_another_name():
    student, records = _pair("calls", "steps")
    assert records["0.steps"].teacher == "0.calls"
    assert records["0.steps"].reason == "buffer of a matched layer, not read in eval mode"
    assert torch.equal(student[0].steps, torch.tensor([1.0, 2.0, 3.0]))


def test_untraced_buffer_of_another_shape_is_reported_and_kept():
    student, records = _pair("calls", "steps", student_length=5)
    assert records["0.steps"].teacher is None
    assert records["0.steps"].reason == "not read by any traced operation"
    assert torch.equal(student[0].steps, torch.zeros(5))
