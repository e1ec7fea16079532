"""Stage lines on stderr: one line per stage, never torn by other output, nothing at all when off."""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

import wscompile
from wscompile.progress import Progress, shown

DONE = r"done in \d+\.\d s"


def test_a_stage_is_one_line_its_label_then_its_time():
    stream = io.StringIO()
    progress = Progress(True, stream)
    with progress.stage("tracing teacher timm:a"):
        pass
    with progress.stage(None):  # a step left out says nothing
        pass
    assert re.fullmatch(rf"tracing teacher timm:a\.\.\. {DONE}\n", stream.getvalue())


def test_output_during_a_stage_starts_its_own_line_and_the_stage_ends_on_another():
    stream, printed = io.StringIO(), []

    def log(line: str) -> None:
        printed.append(line)
        stream.write(line + "\n")  # as a terminal shows stdout and stderr together

    progress = Progress(True, stream)
    say = progress.lines(log)
    with progress.stage("exporting"):
        say("exported s.onnx")
    assert printed == ["exported s.onnx"]
    assert re.fullmatch(rf"exporting\.\.\. \nexported s\.onnx\nexporting: {DONE}\n", stream.getvalue())


def test_holding_prints_a_stages_lines_after_its_line_even_when_it_fails():
    stream, printed = io.StringIO(), []
    progress = Progress(True, stream)
    with progress.holding("checking parity", printed.append) as step_log:
        step_log("parity logits ok")
        assert printed == []  # held until the stage's line is complete
    assert printed == ["parity logits ok"]
    with pytest.raises(ValueError), progress.holding("checking again", printed.append) as step_log:
        step_log("parity logits FAIL")
        raise ValueError("differs")
    assert printed[-1] == "parity logits FAIL"
    assert stream.getvalue().splitlines()[-1] == "checking again... failed"


def test_off_writes_nothing_and_hands_logs_back_unchanged():
    stream = io.StringIO()
    progress = Progress(False, stream)
    with progress.stage("tracing"), progress.holding("checking", print) as step_log:
        assert step_log is print
    assert progress.lines(print) is print
    assert stream.getvalue() == ""
    assert shown(True, quiet=True) is False and shown(False) is False and shown(True) is True


def test_the_python_api_prints_nothing(capfd):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    student = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    plan = wscompile.initialize(teacher, student, torch.randn(2, 8))
    assert plan.coverage is not None and plan.coverage.selected_params > 0
    assert capfd.readouterr() == ("", "")
