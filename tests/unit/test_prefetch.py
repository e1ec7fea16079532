"""The writer's read-ahead: upcoming teacher tensors are asked for in a bounded window, once each,
before they are read, and asking changes no value."""

from __future__ import annotations

import torch
from torch import nn

import wscompile
from wscompile.passes import apply
from wscompile.plan import RULE_STUDENT_INIT
from wscompile.weights import ModuleSource


class Recording(ModuleSource):
    """A module's tensors, logging every prefetch and read in order."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.log: list[tuple[str, str]] = []

    def prefetch(self, key, index=None) -> None:
        self.log.append(("prefetch", key))

    def read(self, key, index=None):
        self.log.append(("read", key))
        return super().read(key, index)


def _stack(width: int, depth: int) -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])


def test_reads_run_ahead_in_a_bounded_window_once_each(monkeypatch):
    torch.manual_seed(0)
    teacher, student = _stack(32, 6).eval(), _stack(16, 6).eval()
    plan = wscompile.initialize(teacher, student, torch.randn(2, 32), student_inputs=torch.randn(2, 16))
    state = student.state_dict()
    weight_bytes = 16 * 16 * 4
    monkeypatch.setattr(apply, "PREFETCH_BYTES", 3 * weight_bytes)  # about three weights (and their biases)
    source = Recording(teacher)
    written = dict(apply.student_tensors(plan, source, state))

    planned = [r.teacher for r in plan.tensors if r.rule != RULE_STUDENT_INIT]
    asked = [key for kind, key in source.log if kind == "prefetch"]
    assert asked == planned  # each once, in plan order
    reads = [key for kind, key in source.log if kind == "read"]
    aheads = []
    for i, key in enumerate(reads):
        at = source.log.index(("read", key))
        assert ("prefetch", key) in source.log[:at]  # asked before it is read
        aheads.append(sum(1 for kind, _ in source.log[:at] if kind == "prefetch") - i)
    # a window of several tensors (not one at a time), bounded by PREFETCH_BYTES (not the whole plan)
    assert max(aheads) >= 3 and max(aheads) <= 7 < len(planned), aheads
    # values as the plain in-memory path gives them
    expected = apply.apply_plan(plan, ModuleSource(teacher), state)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
