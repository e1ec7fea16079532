from __future__ import annotations

import pytest
import torch

from wscompile.passes.uniform import uniform_indices


def paper_uniform(teacher: torch.Tensor, student_shape: tuple[int, ...]) -> torch.Tensor:
    """The paper's uniform selection on a same-named tensor: every differing axis, whole width."""
    out = teacher
    for axis, size in enumerate(student_shape):
        if out.shape[axis] != size:
            out = out.index_select(axis, torch.tensor(uniform_indices(out.shape[axis], size)))
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
