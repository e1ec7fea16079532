"""``wscompile apply`` as an oracle on the zoo: for every family's representative pair, the student
``apply`` rebuilds from ``init``'s manifest is byte for byte the one ``init`` wrote (the unit tests
run the same check on ``UNIT_PAIRS``; this file runs the other families)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_apply import UNIT_PAIRS, apply_oracle

from .registry import Pair, family_representatives


@pytest.mark.parametrize("pair", [p for p in family_representatives() if p.id not in UNIT_PAIRS], ids=lambda p: p.id)
def test_apply_reproduces_init(pair: Pair, places: dict[str, str], tmp_path: Path) -> None:
    apply_oracle(pair, places, tmp_path)
