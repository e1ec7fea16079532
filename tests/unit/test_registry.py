"""Methods are registry entries: a new MethodSpec is used by the planner with no other change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wscompile
from wscompile import pipeline
from wscompile.passes import methods
from wscompile.passes.choice import Choice, MethodSpec
from wscompile.passes.select import SelectionConfig


def _mlp(width: int) -> nn.Module:
    torch.manual_seed(width)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4)).eval()


def _last(choice: Choice) -> list[int]:
    return list(range(choice.teacher_size - choice.student_size, choice.teacher_size))


def test_a_registered_method_selects(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "last", MethodSpec("last", _last))
    teacher, student = _mlp(16), _mlp(6)
    plan = wscompile.initialize(teacher, student, torch.randn(2, 8), method="last", select_head=True)
    assert plan.method == "last"
    assert [g.indices for g in plan.groups if g.rule == "last"] == [list(range(10, 16))]
    assert torch.equal(student[0].weight, teacher[0].weight[10:])
    assert torch.equal(student[2].weight, teacher[2].weight[:, 10:])


def test_a_method_needing_calibration_asks_for_it(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "probe", MethodSpec("probe", _last, needs_calibration=True))
    teacher, student = _mlp(16), _mlp(6)
    inputs = {"input": torch.randn(2, 8)}
    with pytest.raises(wscompile.SelectionError, match="--method probe ranks by the teacher's activations"):
        pipeline.compile(teacher, student, teacher_inputs=inputs, student_inputs=inputs, method="probe")


def test_unknown_method_is_refused_before_any_work():
    with pytest.raises(wscompile.SelectionError, match="unknown selection method 'best'; choose from uniform"):
        SelectionConfig(method="best")
    with pytest.raises(wscompile.SelectionError, match="unknown head mode 'half'"):
        SelectionConfig(heads="half")


def test_selection_config_is_frozen():
    config = SelectionConfig()
    with pytest.raises(AttributeError):
        config.method = "random"  # type: ignore[misc]
