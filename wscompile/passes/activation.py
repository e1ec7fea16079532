"""Activation selection: keep the channels the teacher uses most on real inputs.

One forward pass of the teacher over calibration inputs (``calibration.py``) records, for every
layer, the mean absolute value of each input and output channel::

    a_in(c)  = mean over samples and positions of |x[..., c]|      (what the layer reads)
    a_out(c) = mean over samples and positions of |y[..., c]|      (what it writes)

A member axis (see ``choice.py``) that indexes a layer's output channels reads that layer's
``a_out``, an input axis its ``a_in``. Unit ``c`` of a coupled dimension scores the sum over its
distinct observed (layer, side) pairs, fused blocks folded::

    score(c) = sum_(layer, side)  sum_b  a_side(offset + b * t + c)

and the student keeps the ``s`` highest-scoring units in ascending order, the same ones for every
member. A loose parameter (``cls_token``, a layer scale) is not a layer and is not observed; a
dimension with no observed layer at all is ranked by weight magnitude instead (the plan notes how
many).
"""

from __future__ import annotations

import torch

from wscompile.passes import magnitude
from wscompile.passes.choice import Choice, Evidence, Member, MethodSpec, Scorer, fold, keep_top

NAME = "activation"

ChannelMeans = dict[tuple[str, str], torch.Tensor]  # (teacher module, "in" | "out") -> a(c)


def choose(choice: Choice) -> list[int]:
    """The ``student_size`` most active teacher units, ascending."""
    return keep_top(choice.importance(), choice.student_size)


def scorer(channel_means: ChannelMeans) -> Scorer:
    """Activation importance of a dimension's units; None when none of its layers was observed."""

    def scores(members: list[Member]) -> torch.Tensor | None:
        unique = {(m.module, m.side, m.offset, m.blocks, m.size): m for m in members}
        found = []
        for m in unique.values():
            means = channel_means.get((m.module, m.side))
            if means is not None and means.numel() == m.length:
                found.append(fold(means, m))
        return sum(found) if found else None

    return scores


def _from_evidence(evidence: Evidence) -> Scorer:
    """Activation importance, falling back to magnitude for a dimension without observed layers
    (its first member is appended to ``evidence.unobserved``)."""
    assert evidence.weights is not None and evidence.channel_means is not None, "activation reads both"
    by_weight = magnitude.scorer(evidence.weights)
    by_activation = scorer(evidence.channel_means())

    def scores(members: list[Member]) -> torch.Tensor | None:
        found = by_activation(members)
        if found is None:
            evidence.unobserved.append(f"{members[0].teacher}:{members[0].axis}")
            found = by_weight(members)
        return found

    return scores


SPEC = MethodSpec(NAME, choose, _from_evidence, needs_calibration=True, needs_weights=True)
