"""Uniform element selection, the paper's rule (Xu et al., 2024, "Initializing Models with Larger Ones").

For a dimension of teacher size ``t`` kept at student size ``s <= t``::

    t % s == 0:  indices = arange(s) * (t // s)
    otherwise:   indices = round(linspace(0, t - 1, s))      (float32 linspace, round half to even)

The indices depend only on ``(t, s)``, so every tensor sharing a dimension gets the same ones and
coupled dimensions stay consistent without any bookkeeping. wscompile applies the rule per
*logical* dimension: a fused q/k/v projection of width ``3*t`` is three blocks of ``t``, each
selected with the same indices, so student heads are never assembled from misaligned q and k
slices. When sizes divide this equals the paper's rule on the fused width. The rule itself is in
``wscompile/indices.py``, shared with the "uniform" layer policy.
"""

from __future__ import annotations

from wscompile.indices import uniform_indices, uniform_step
from wscompile.passes.choice import Choice, MethodSpec

NAME = "uniform"

__all__ = ["NAME", "SPEC", "choose", "uniform_indices", "uniform_step"]


def choose(choice: Choice) -> list[int]:
    """The uniform method: evenly spaced indices, whatever the teacher's values."""
    return uniform_indices(choice.teacher_size, choice.student_size)


SPEC = MethodSpec(NAME, choose)
