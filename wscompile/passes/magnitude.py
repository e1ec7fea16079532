"""Magnitude selection: keep the channels on which the teacher's weights are largest.

A coupled dimension (the residual stream, an MLP's hidden units, the channels of a convolution) is
read and written by several teacher tensors, its members ``m``: for an MLP hidden dimension the
rows of ``fc1.weight`` and ``fc1.bias`` and the columns of ``fc2.weight``; for the residual stream
every block's projections and norms. Unit ``c`` scores the summed L2 norms of its slices::

    score(c) = sum_m  sum_b  || W_m[..., offset_m + b * t + c, ...] ||_2

(the norm over every other axis of ``W_m``; ``b`` runs over the member's fused blocks, see
``choice.fold``). The student keeps the ``s`` highest-scoring units in ascending order, the same
ones for every member, so coupled dimensions stay consistent.

Only teacher tensors are read, through the ``TensorSource``: a file-backed teacher stays on disk.
"""

from __future__ import annotations

import torch

from wscompile.passes.choice import Choice, Evidence, Member, MethodSpec, Scorer, fold, keep_top
from wscompile.weights import TensorSource

NAME = "magnitude"


def choose(choice: Choice) -> list[int]:
    """The ``student_size`` most important teacher units, ascending."""
    return keep_top(choice.importance(), choice.student_size)


def scorer(source: TensorSource) -> Scorer:
    """Magnitude importance of a dimension's units from its members' teacher tensors."""
    norms: dict[str, list[torch.Tensor]] = {}  # teacher key -> slice norms along each axis

    def axis_norms(key: str, axis: int) -> torch.Tensor:
        if key not in norms:
            tensor = source.read(key).float()
            norms[key] = [tensor.movedim(a, 0).reshape(tensor.shape[a], -1).norm(dim=1) for a in range(tensor.dim())]
        return norms[key][axis]

    def scores(members: list[Member]) -> torch.Tensor | None:
        unique = {(m.teacher, m.axis, m.offset, m.blocks): m for m in members}
        if not unique:
            return None
        return sum(fold(axis_norms(m.teacher, m.axis), m) for m in unique.values())

    return scores


def _from_evidence(evidence: Evidence) -> Scorer:
    assert evidence.weights is not None, "magnitude reads the teacher's weights"
    return scorer(evidence.weights)


SPEC = MethodSpec(NAME, choose, _from_evidence, needs_weights=True)
