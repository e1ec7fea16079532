"""Random selection: ``s`` of ``t`` teacher units drawn without replacement, kept in order.

    indices = sorted(randperm(t, generator=G(seed, key))[:s])

The generator is seeded from ``--seed`` and the decision's key (its coupled dimension), so one
dimension gets one index set, shared by every tensor that reads or writes it, and the result does
not depend on the order in which dimensions are decided. A baseline of the paper (Table 6).
"""

from __future__ import annotations

import zlib

import torch

from wscompile.passes.choice import Choice, MethodSpec

NAME = "random"


def choose(choice: Choice) -> list[int]:
    """``student_size`` distinct teacher indices drawn at random, ascending."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{choice.seed}:{choice.key}".encode()))
    return sorted(torch.randperm(choice.teacher_size, generator=generator)[: choice.student_size].tolist())


SPEC = MethodSpec(NAME, choose)
