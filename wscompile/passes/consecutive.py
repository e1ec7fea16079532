"""Consecutive selection: the first ``s`` teacher units of every dimension.

    indices = [0, 1, ..., s - 1]

The paper's baseline next to uniform selection (Xu et al., 2024, Table 6): the student's heads,
channels and hidden units are the teacher's first ones, which keeps whole attention heads intact
whenever ``s`` is a multiple of the head size.
"""

from __future__ import annotations

from wscompile.passes.choice import Choice, MethodSpec

NAME = "consecutive"


def choose(choice: Choice) -> list[int]:
    """The first ``student_size`` teacher indices."""
    return list(range(choice.student_size))


SPEC = MethodSpec(NAME, choose)
