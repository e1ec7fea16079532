"""What a selection method decides, and what it may look at.

A method keeps ``s`` of ``t`` teacher units (channels, attention heads, head dims) of one coupled
dimension. It sees a ``Choice``: the two sizes, a stable key naming the decision (random
selection seeds itself with it, so the result does not depend on the order decisions are made)
and, computed only when asked for, an importance score per teacher unit. It returns the kept
teacher indices in ascending order, so the student keeps the teacher's order of channels.

Importance comes from the teacher tensors that read or write the dimension, its members:
one teacher tensor axis each, read as ``blocks`` logical blocks of ``size`` units from ``offset``
on (a fused q/k/v output is 3 blocks; a separate k projection reading a fused teacher starts at
offset ``size``). ``fold`` sums a per-index vector along such an axis into one score per unit::

    score(c) = sum_b  v[offset + b * size + c]        for c < size

A method is registered as a ``MethodSpec`` (``passes/methods.py``): its choice function, the
scorer it ranks with (built from the ``Evidence`` a run has), and what that evidence must hold, so
the pipeline knows before planning whether to read calibration inputs or teacher weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from wscompile.weights import TensorSource


@dataclass(frozen=True)
class Member:
    """A teacher tensor axis that reads or writes the units of a coupled dimension."""

    teacher: str  # teacher state_dict key
    axis: int  # axis of the teacher tensor indexing the units
    length: int  # size of that axis
    offset: int  # first teacher index read along the axis
    blocks: int  # logical blocks of ``size`` units along the axis; the same units are kept in each
    size: int  # teacher units per block: the dimension's teacher size
    module: str  # teacher module owning the tensor (its activations are observed by calibration)
    side: str  # "out" or "in": whether the axis indexes the module's output or input channels


# Importance of every teacher unit of a dimension from its members, or None when unknown.
Scorer = Callable[[list[Member]], "torch.Tensor | None"]


@dataclass
class Choice:
    """One selection decision: keep ``student_size`` of ``teacher_size`` teacher units."""

    teacher_size: int
    student_size: int
    key: str  # stable name of the decision ("blocks.0.mlp.fc1.weight:0", "layers.0.self_attn/kv")
    seed: int = 0  # seed of the random method
    scores: Callable[[], torch.Tensor] | None = None  # importance per teacher unit, computed when called

    def importance(self) -> torch.Tensor:
        """The importance of every teacher unit (higher: more worth keeping)."""
        assert self.scores is not None, f"no importance scores for {self.key}"
        scores = self.scores()
        assert scores.shape == (self.teacher_size,), f"{self.key}: {tuple(scores.shape)} scores for {self.teacher_size}"
        return scores


# A method: the kept teacher indices, ascending, ``student_size`` of them.
Method = Callable[[Choice], list[int]]


@dataclass(frozen=True)
class Evidence:
    """What importance scorers may read about the teacher, each part present only when the run has it."""

    weights: TensorSource | None  # the teacher's tensors, read on demand
    # per-layer channel means of the teacher on calibration inputs ((module, side) -> a(c)), when calibrated
    channel_means: Callable[[], dict[tuple[str, str], torch.Tensor]] | None
    unobserved: list[str] = field(default_factory=list)  # "teacher:axis" of dimensions a scorer fell back on


@dataclass(frozen=True)
class MethodSpec:
    """A registered element-selection method."""

    name: str  # the --method value
    choose: Method  # keeps s of t units of one coupled dimension
    scorer: Callable[[Evidence], Scorer] | None = None  # importance per unit, for methods that rank
    needs_calibration: bool = False  # the teacher runs on calibration inputs (its activations rank units)
    needs_weights: bool = False  # the teacher's tensor values are read (not only its shapes)


def keep_top(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` highest scores, ascending; equal scores keep the lower index."""
    order = torch.sort(-scores.double().nan_to_num(nan=float("inf")), stable=True).indices
    return sorted(order[:count].tolist())


def fold(values: torch.Tensor, member: Member) -> torch.Tensor:
    """Per-unit sum of ``values`` (one per index of the member's axis) over its blocks."""
    span = values[member.offset : member.offset + member.blocks * member.size]
    return span.reshape(member.blocks, member.size).sum(0)
