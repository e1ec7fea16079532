"""Rescaling: keep a layer's output variance when its input shrinks (weight subcloning).

A linear layer ``y_j = sum_i W_ji x_i`` over ``t`` inputs of roughly independent, equal-variance
terms has ``Var(y_j) = t * Var(W_j. x)``. Keeping ``s`` of the ``t`` inputs sums ``s`` terms,
so the output variance drops by ``s / t``. Multiplying the selected weights by::

    gamma = sqrt(t_in / s_in)

restores it (Samragh et al., 2023, "Weight subcloning: direct initialization of transformers
using larger pretrained ones"). Only the weights of linear, convolution and attention layers
whose input axis shrank are scaled; biases, norms and embeddings are copied as selected.
``gamma`` is recorded per tensor (``TensorRecord.scale``, manifest ``tensors[].scale``), so the
manifest still says exactly how every student value was made.
"""

from __future__ import annotations

import math

import torch

from wscompile import ir
from wscompile.plan import AxisRule

KINDS = {ir.KIND_LINEAR, ir.KIND_CONV, ir.KIND_ATTENTION}  # layers whose weights are rescaled


def rescales(kind: str, slot: ir.TensorSlot) -> bool:
    """Whether ``slot`` is a weight that --rescale may scale: it reads its layer's input channels."""
    return kind in KINDS and slot.in_axis is not None and slot.in_axis != slot.out_axis and "weight" in slot.role


def input_scale(in_rule: AxisRule) -> float | None:
    """``sqrt(t_in / s_in)`` for a shrunk input axis, None when it kept its size."""
    if in_rule.student_size >= in_rule.teacher_size:
        return None
    return math.sqrt(in_rule.teacher_size / in_rule.student_size)


def rescale_tensor(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """``tensor * scale``, computed in at least float32 (a bf16 teacher is not rounded twice)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32)) * scale
