"""Uniform element selection, the paper's rule (Xu et al., 2024, "Initializing Models with Larger Ones").

For a dimension of teacher size ``t`` kept at student size ``s <= t``::

    t % s == 0:  indices = arange(s) * (t // s)
    otherwise:   indices = round(linspace(0, t - 1, s))      (float32 linspace, round half to even)

The indices depend only on ``(t, s)``, so every tensor sharing a dimension gets the same ones and
coupled dimensions stay consistent without any bookkeeping. wscompile applies the rule per
*logical* dimension: a fused q/k/v projection of width ``3*t`` is three blocks of ``t``, each
selected with the same indices, so student heads are never assembled from misaligned q and k
slices. When sizes divide this equals the paper's rule on the fused width.
"""

from __future__ import annotations

import torch

from wscompile.passes.choice import Choice

NAME = "uniform"


def uniform_indices(teacher_size: int, student_size: int) -> list[int]:
    """Teacher indices kept for a dimension shrinking from ``teacher_size`` to ``student_size``."""
    if not 0 < student_size <= teacher_size:
        raise ValueError(f"cannot select {student_size} of {teacher_size} elements")
    if teacher_size % student_size == 0:
        return list(range(0, teacher_size, teacher_size // student_size))
    return torch.linspace(0, teacher_size - 1, student_size).round().long().tolist()


def uniform_step(teacher_size: int, student_size: int) -> int | None:
    """The stride when the rule is a plain step, else None."""
    return teacher_size // student_size if teacher_size % student_size == 0 else None


def choose(choice: Choice) -> list[int]:
    """The uniform method: evenly spaced indices, whatever the teacher's values."""
    return uniform_indices(choice.teacher_size, choice.student_size)
