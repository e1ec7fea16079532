"""Zoo: every pair of ``tests/zoo/registry.py`` compiled once, coverage and compile time tabulated.

For each teacher -> student pair: the frontend that traced each model, the share of the student
taken from the teacher with and without the classifier head, how many student tensors outside the
head stay at the student's init, and the time of

- ``plan``: ``pipeline.compile(..., write=False)``: trace both models, match, select (no values read);
- ``compile``: the full ``pipeline.compile``, which also reads the selected teacher elements.

Models are built before timing (``build`` column). HF configs are written to a temporary directory,
as the tests do; specs are shown with their placeholders (``{bert}`` = a 4-layer, 128-wide BERT config,
see ``registry._hf_configs``).

    python benchmarks/zoo.py [--only SUBSTRING] [--threads 1]

Writes ``benchmarks/results/zoo.md`` and ``zoo.csv`` (only with every pair, i.e. without ``--only``).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.zoo.registry import PAIRS, Pair, resolve, write_hf_configs  # noqa: E402
from wscompile import pipeline  # noqa: E402
from wscompile.plan import RULE_STUDENT_INIT  # noqa: E402
from wscompile.specs import load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ERROR_CHARS = 300  # of an error message shown in the tables
COLUMNS = ["pair", "kind", "teacher", "student", "frontend", "coverage_pct", "coverage_no_head_pct",
           "left_at_init_no_head", "teacher_params_m", "student_params_m", "build_s", "plan_s", "compile_s",
           "error"]  # fmt: skip


def run_pair(pair: Pair, places: dict[str, str]) -> dict[str, object]:
    row: dict[str, object] = {"pair": pair.id, "kind": pair.kind, "teacher": pair.teacher, "student": pair.student}
    try:
        start = time.perf_counter()
        teacher = load_model(resolve(pair.teacher, places), role="teacher", seed=0, input_shape=pair.input_shape)
        student = load_model(resolve(pair.student, places), role="student", seed=1, input_shape=pair.input_shape)
        row["build_s"] = time.perf_counter() - start
        timings = {}
        for column, write in (("plan_s", False), ("compile_s", True)):
            start = time.perf_counter()
            compiled = pipeline.compile(
                teacher.module,
                student.module,
                teacher_inputs=teacher.inputs,
                student_inputs=student.inputs,
                teacher_source=teacher.source,
                write=write,
            )
            timings[column] = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - one failing pair is a row of the table, not the end of the run
        row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:ERROR_CHARS]}"
        return row
    plan = compiled.plan
    coverage = plan.coverage
    row.update(timings)
    row.update(
        frontend=f"{plan.frontend['teacher']} / {plan.frontend['student']}",
        coverage_pct=100 * coverage.fraction,
        coverage_no_head_pct=100 * coverage.fraction_no_head,
        left_at_init_no_head=sum(r.rule == RULE_STUDENT_INIT and not r.is_head for r in plan.tensors),
        teacher_params_m=plan.teacher_params / 1e6,
        student_params_m=plan.student_params / 1e6,
    )
    return row


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def write_results(rows: list[dict[str, object]], threads: int) -> Path:
    import timm
    import torchvision
    import transformers

    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "zoo.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _cell(row.get(key)) for key in COLUMNS})
    lines = [
        "# Zoo: every registry pair, compiled once",
        "",
        f"`python benchmarks/zoo.py --threads {threads}`: torch {torch.__version__}, timm {timm.__version__}, "
        f"torchvision {torchvision.__version__}, transformers {transformers.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores shared with other jobs: times are noisy.",
        "",
        "- pairs and their checks: `tests/zoo/registry.py`, `tests/zoo/test_zoo.py`; random weights except "
        "`{minilm}` (pretrained all-MiniLM-L6-v2); `{bert}`, `{gpt2}`, ... are small HF configs "
        "(`registry._hf_configs`), overridden by the student specs.",
        "- coverage: share of the student's state_dict elements filled from the teacher, with and without the "
        "classifier head (kept at the student's init, as in the paper). *left*: student tensors outside the head "
        "kept at init (each has a reason in the plan).",
        "- plan: `pipeline.compile(write=False)` (trace both models, match, select), run first. compile: the "
        "full `pipeline.compile` (also reads the selected teacher elements), run second. build: both models, "
        "before timing.",
        "",
        "| pair | kind | teacher | student | frontend (teacher / student) | coverage % | no head % | left | "
        "params teacher / student (M) | build (s) | plan (s) | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['pair']} | {row['kind']} | `{row['teacher']}` | `{row['student']}` |"
        if row.get("error"):
            lines.append(f"{head} **{row['error']}** |" + " |" * 7)
            continue
        params = f"{_cell(row['teacher_params_m'])} / {_cell(row['student_params_m'])}"
        cells = [row["frontend"], _cell(row["coverage_pct"]), _cell(row["coverage_no_head_pct"]),
                 _cell(row["left_at_init_no_head"]), params, _cell(row["build_s"]), _cell(row["plan_s"]),
                 _cell(row["compile_s"])]  # fmt: skip
        lines.append(f"{head} " + " | ".join(cells) + " |")
    done = [row for row in rows if not row.get("error")]
    lines += [
        "",
        f"{len(done)} of {len(rows)} pairs compiled; total plan time {sum(r['plan_s'] for r in done):.1f} s, "
        f"full compile {sum(r['compile_s'] for r in done):.1f} s.",
        "",
        "Notes on pairs:",
        "",
    ]
    lines += [f"- {pair.id}: {pair.note}" for pair in PAIRS if pair.note and pair.id in {r["pair"] for r in rows}]
    (RESULTS / "zoo.md").write_text("\n".join(lines) + "\n")
    return RESULTS / "zoo.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the pairs whose id contains this string (results are not written)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = [pair for pair in PAIRS if not args.only or args.only in pair.id]
    rows = []
    with tempfile.TemporaryDirectory(prefix="wscompile-zoo-") as directory:
        places = write_hf_configs(Path(directory))
        for pair in pairs:
            rows.append(run_pair(pair, places))
            row = rows[-1]
            status = row.get("error") or (
                f"{row['coverage_no_head_pct']:.1f}% no head, "
                f"plan {row['plan_s']:.2f} s, compile {row['compile_s']:.2f} s"
            )
            print(f"{pair.id}: {status}", flush=True)
    if not args.only:
        print(f"wrote {write_results(rows, args.threads)}")


if __name__ == "__main__":
    main()
