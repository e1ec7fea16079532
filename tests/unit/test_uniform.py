from __future__ import annotations

import pytest
import torch

from wscompile.passes.uniform import uniform_indices, uniform_step


@pytest.mark.parametrize(
    ("t", "s", "expected"),
    [
        (12, 6, [0, 2, 4, 6, 8, 10]),
        (12, 4, [0, 3, 6, 9]),
        (10, 10, list(range(10))),
        (10, 4, [0, 3, 6, 9]),
        (7, 3, [0, 3, 6]),
        (5, 4, [0, 1, 3, 4]),  # linspace 0, 1.33, 2.67, 4 -> round
    ],
)
def test_rule_matches_the_paper(t, s, expected):
    assert uniform_indices(t, s) == expected


def test_non_divisible_rounds_half_to_even_in_float32():
    # linspace(0, 9, 7) = 0, 1.5, 3, 4.5, 6, 7.5, 9: halves go to the even neighbour
    assert uniform_indices(10, 7) == [0, 2, 3, 4, 6, 8, 9]
    t, s = 1000, 999
    reference = torch.linspace(0, t - 1, s, dtype=torch.float32).round().long().tolist()
    assert uniform_indices(t, s) == reference


def test_step_only_when_divisible():
    assert uniform_step(768, 384) == 2
    assert uniform_step(10, 4) is None


@pytest.mark.parametrize(("t", "s"), [(4, 5), (4, 0)])
def test_rejects_growing_or_empty(t, s):
    with pytest.raises(ValueError, match="cannot select"):
        uniform_indices(t, s)
