"""Merge the results of one benchmark run in parts (e.g. one process per seed) into one report.

A benchmark split over processes (``--seeds 0 --name X_seed0``, ``--seeds 1 --name X_seed1``, ...)
writes one set of results per part. This reads every part's ``<part>_curves.csv`` (every evaluation
of every run), keeps each part's command line and the first part's description, and writes the
same tables, pairings and plot as a single run would have, under ``--name``.

    python benchmarks/merge_results.py --parts methods_text_seed0,methods_text_seed1,methods_text_seed2 \
        --name methods_text --metrics-from effectiveness_text --baselines random-init,ws-uniform
"""

from __future__ import annotations

import argparse
import csv
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RANDOM_INIT, RESULTS, Metric, Point, write_results  # noqa: E402


def read_curves(path: Path, metrics: list[Metric]) -> list[Point]:
    """The points of a ``<stem>_curves.csv`` written by ``common.write_curves_csv``."""
    with path.open(newline="", encoding="utf-8") as f:
        return [
            Point(
                row["config"],
                row["init"],
                int(row["seed"]),
                int(row["step"]),
                {m.key: float(row[m.key]) for m in metrics},
                float(row["seconds"]),
            )
            for row in csv.DictReader(f)
        ]


def part_header(path: Path) -> tuple[str, str, list[str]]:
    """(title, command line, description bullets) of a part's markdown report."""
    lines = path.read_text(encoding="utf-8").splitlines()
    title = lines[0].removeprefix("# ")
    table = next(i for i, line in enumerate(lines) if line.startswith("| "))
    bullets = [line for line in lines[3:table] if line.startswith("- ")]
    return title, lines[2], bullets


def drop_repeats(points: list[Point]) -> list[Point]:
    """Each evaluation once: a run found in two parts (runs are deterministic) must score the same in both."""
    unique: dict[tuple[str, str, int, int], Point] = {}
    for point in points:
        key = (point.config, point.init, point.seed, point.step)
        first = unique.setdefault(key, point)
        if any(abs(first.metrics[k] - v) > 2e-6 for k, v in point.metrics.items()):  # beyond the csv rounding
            raise SystemExit(
                f"{point.config} / {point.init} / seed {point.seed} / step {point.step} is in two parts with different "
                f"scores ({first.metrics} vs {point.metrics}); rerun one of them with the same code"
            )
    return list(unique.values())


def run_coverage(points: list[Point]) -> str:
    """One line saying which seeds every (student, init) has in the merged points, and whether all have the same."""
    seeds: dict[tuple[str, str], set[int]] = {}
    for point in points:
        seeds.setdefault((point.config, point.init), set()).add(point.seed)
    every = sorted(set().union(*seeds.values()))
    missing = [
        f"{config} / {init} lacks seed(s) {', '.join(map(str, sorted(set(every) - have)))}"
        for (config, init), have in seeds.items()
        if have != set(every)
    ]
    runs = sum(len(have) for have in seeds.values())
    verdict = (
        "incomplete: " + "; ".join(missing)
        if missing
        else f"complete: every (student, init) has seeds {', '.join(map(str, every))}"
    )
    return f"Together the parts hold {runs} runs of {len(seeds)} (student, init) pairs, {verdict}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", required=True, help="comma list of the parts' result stems")
    parser.add_argument("--name", required=True, help="file name stem of the merged results")
    parser.add_argument(
        "--metrics-from",
        required=True,
        help="benchmark module whose METRICS (and epilogue(), PER_PART_NOTES, if any) the parts used",
    )
    parser.add_argument("--baselines", default=RANDOM_INIT, help="comma list of inits to pair against")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the parts and the merged results")
    args = parser.parse_args()
    if args.name in args.parts.split(","):
        parser.error(f"--name {args.name} is one of the --parts; merging would overwrite it, choose another name")
    module = importlib.import_module(args.metrics_from)
    metrics = module.METRICS
    per_part_notes = getattr(module, "PER_PART_NOTES", ())  # setup lines that differ by part: kept from every part
    points: list[Point] = []
    commands, bullets, per_part, title = [], [], [], ""
    for index, part in enumerate(args.parts.split(",")):
        curves, report = args.out / f"{part}_curves.csv", args.out / f"{part}.md"
        if not curves.exists():
            raise SystemExit(f"part {part!r}: {curves} not found; run that part first")
        points += read_curves(curves, metrics)
        title, command, part_bullets = part_header(report)
        commands.append(f"- part `{part}`: {command}")
        bullets += [b for b in part_bullets if index == 0 or (b.startswith("- coverage") and b not in bullets)]
        per_part += [f"{b} (part `{part}`)" for b in part_bullets if b.startswith(per_part_notes)]
    points = drop_repeats(points)
    preamble = [
        f"Merged from {len(commands)} parts, each its own process (`python benchmarks/merge_results.py "
        f"--parts {args.parts} --name {args.name} --metrics-from {args.metrics_from} --baselines {args.baselines}`); "
        "each part's command and run time:",
        "",
        *commands,
        "",
        run_coverage(points) + " A part's own `partial` note counts that part's runs only; `s / run` averages "
        "runs of parts that ran under different machine loads (each part's run time above).",
        "",
        "Setup (the first part's; every part is the same but for its seeds):",
        "",
        *(b for b in bullets if not b.startswith(per_part_notes)),
        *per_part,
    ]
    write_results(
        args.name,
        args.out,
        points,
        metrics,
        title=title,
        preamble=preamble,
        baselines=args.baselines.split(","),
        epilogue=module.epilogue(points) if hasattr(module, "epilogue") else (),  # e.g. distill_text's ranking
    )
    print(f"wrote {args.out}/{args.name}.*")


if __name__ == "__main__":
    main()
