"""Index rules shared by layer selection (``matching``) and element selection (``passes``).

The paper's uniform rule (Xu et al., 2024, "Initializing Models with Larger Ones") keeps ``s <= t``
evenly spaced units of ``t``::

    t % s == 0:  indices = arange(s) * (t // s)
    otherwise:   indices = round(linspace(0, t - 1, s))      (float32 linspace, round half to even)

The indices depend only on ``(t, s)``. Element selection applies it per coupled dimension
(``passes/uniform.py``), the "uniform" layer policy to a stage's blocks (``matching/layers.py``);
it lives here, below both, so neither package imports the other for it.
"""

from __future__ import annotations

import torch


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
