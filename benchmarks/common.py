"""Shared pieces of the effectiveness benchmarks: inits, schedule, curves, tables, plots.

Every benchmark compares *inits* of the same student: ``random-init`` (the student's own
initialization) and ``ws-<method>`` (wscompile weight selection with that element-selection
method). A run records a learning curve, a list of ``Point`` (init, seed, step, metric values);
the summary reduces the curves of all seeds to final scores (mean ± std), the score at step 0, and
the steps each init needs to reach random init's final score.
"""

from __future__ import annotations

import csv
import math
import statistics
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import wscompile  # noqa: E402
from wscompile.passes.select import METHODS  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RANDOM_INIT = "random-init"
# Element-selection methods of the paper; those the installed wscompile lacks are skipped with a note.
PAPER_METHODS = "uniform,consecutive,magnitude,activation,random"


@dataclass
class Point:
    """One evaluation of one run."""

    config: str  # student configuration, e.g. "3L-192"
    init: str  # RANDOM_INIT or "ws-<method>"
    seed: int
    step: int  # optimizer steps taken before this evaluation
    metrics: dict[str, float]  # metric name -> value on the held-out set
    seconds: float = 0.0  # wall time of the run so far (training and evaluation)


@dataclass
class Metric:
    """A metric as the tables and plots show it."""

    key: str  # key in Point.metrics
    label: str  # column / axis label
    digits: int = 3  # decimals in tables


@dataclass
class Summary:
    """One (config, init) over all seeds."""

    config: str
    init: str
    seeds: int
    step0: dict[str, tuple[float, float]]  # metric -> (mean, std) before training
    final: dict[str, tuple[float, float]]  # metric -> (mean, std) after the last step
    steps_to_random_final: dict[str, int | None]  # first evaluated step where the seed-mean curve
    # reaches random init's final seed-mean; None if never
    seconds: float  # mean wall time per run


def set_threads(threads: int) -> None:
    """Use few threads: the benchmarks run on shared CPU cores."""
    torch.set_num_threads(threads)


def parse_methods(spec: str) -> tuple[list[str], list[str]]:
    """Split a comma list of selection methods into (available, notes on the skipped ones)."""
    available, notes = [], []
    for method in (name.strip() for name in spec.split(",")):
        if not method:
            continue
        if method in METHODS:
            available.append(method)
        else:
            notes.append(
                f"method {method!r} skipped: not in this wscompile "
                f"(wscompile.passes.select.METHODS = {sorted(METHODS)})"
            )
    return available, notes


def init_names(methods: list[str]) -> list[str]:
    return [RANDOM_INIT] + [f"ws-{method}" for method in methods]


def init_options(init: str) -> dict[str, object]:
    """``wscompile.initialize`` keyword options of a ``ws-<method>[+option...]`` init name.

    Options: ``heads=whole|split``, ``layers=<policy>`` (``layer_policy``), ``rescale``; e.g.
    ``ws-uniform+heads=whole`` or ``ws-magnitude+layers=importance+rescale``.
    """
    method, *options = init.removeprefix("ws-").split("+")
    kwargs: dict[str, object] = {"method": method}
    for option in options:
        key, _, value = option.partition("=")
        if key == "rescale" and not value:
            kwargs["rescale"] = True
        elif key == "heads" and value:
            kwargs["heads"] = value
        elif key == "layers" and value:
            kwargs["layer_policy"] = value
        else:
            raise ValueError(
                f"init {init!r}: unknown option {option!r}; use heads=whole|split, layers=<policy> or rescale"
            )
    return kwargs


def apply_init(
    init: str,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    example_inputs: torch.Tensor | dict[str, torch.Tensor],
    *,
    calibration: torch.Tensor | dict[str, torch.Tensor],
    seed: int,
) -> str:
    """Initialize ``student`` in place for ``init``; returns a one-line coverage note.

    ``init`` is RANDOM_INIT or ``ws-<method>[+option...]`` (see ``init_options``). ``calibration``
    (real task inputs) feeds data-dependent methods ("activation", layer policy "importance");
    ``seed`` the "random" method.
    """
    if init == RANDOM_INIT:
        return "student's own init"
    plan = wscompile.initialize(
        teacher, student, example_inputs, calibration=calibration, seed=seed, **init_options(init)
    )
    return f"{plan.coverage.fraction_no_head:.1%} of non-head elements from the teacher ({plan.frontend['student']})"


def provenance() -> str:
    """The wscompile source the numbers come from: git commit, and whether wscompile/ had local edits."""
    package = Path(wscompile.__file__).parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=package, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"wscompile {wscompile.__version__}"
    return f"wscompile {wscompile.__version__} at commit {commit}" + (" with uncommitted changes" if dirty else "")


def partial(done: int, total: int) -> str:
    """A note for a report header written before every run finished ("" once all have)."""
    return "" if done >= total else f"; partial: {done} of {total} runs done"


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base lr over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def eval_steps(total: int, every: int) -> list[int]:
    """Steps at which a run is evaluated: 0, every ``every`` steps, and the last one."""
    return sorted({0, total, *range(every, total, every)})


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_mean_curve(points: list[Point], key: str) -> list[tuple[int, float, float]]:
    """(step, mean, std) over seeds, per evaluated step."""
    steps = sorted({p.step for p in points})
    return [(step, *_mean_std([p.metrics[key] for p in points if p.step == step])) for step in steps]


def summarize(points: list[Point], metrics: list[Metric]) -> list[Summary]:
    """Reduce all runs to one Summary per (config, init), in first-seen order."""
    keys = list(dict.fromkeys((p.config, p.init) for p in points))
    summaries = []
    for config, init in keys:
        runs = [p for p in points if p.config == config and p.init == init]
        baseline = [p for p in points if p.config == config and p.init == RANDOM_INIT]
        first, last = min(p.step for p in runs), max(p.step for p in runs)
        step0, final, reach = {}, {}, {}
        for metric in metrics:
            step0[metric.key] = _mean_std([p.metrics[metric.key] for p in runs if p.step == first])
            final[metric.key] = _mean_std([p.metrics[metric.key] for p in runs if p.step == last])
            reach[metric.key] = None
            if baseline:
                target = seed_mean_curve(baseline, metric.key)[-1][1]
                reach[metric.key] = next(
                    (step for step, mean, _ in seed_mean_curve(runs, metric.key) if mean >= target), None
                )
        seconds = statistics.fmean(max(p.seconds for p in runs if p.seed == seed) for seed in {p.seed for p in runs})
        summaries.append(Summary(config, init, len({p.seed for p in runs}), step0, final, reach, seconds))
    return summaries


def _pm(value: tuple[float, float], digits: int) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def summary_table(summaries: list[Summary], metrics: list[Metric], last_step: int) -> list[str]:
    """Markdown table: per (config, init), step-0 and final scores and steps to random's final."""
    header = ["student", "init", "seeds"]
    for metric in metrics:
        header += [f"{metric.label} @0", f"{metric.label} @{last_step}", f"steps to random's final {metric.label}"]
    header.append("s / run")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [s.config, s.init, str(s.seeds)]
        for metric in metrics:
            reach = s.steps_to_random_final[metric.key]
            cells += [
                _pm(s.step0[metric.key], metric.digits),
                _pm(s.final[metric.key], metric.digits),
                "never" if reach is None else str(reach),
            ]
        cells.append(f"{s.seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_summary_csv(summaries: list[Summary], metrics: list[Metric], path: Path) -> None:
    columns = ["config", "init", "seeds", "seconds_per_run"]
    for metric in metrics:
        columns += [
            f"{metric.key}_step0_mean",
            f"{metric.key}_step0_std",
            f"{metric.key}_final_mean",
            f"{metric.key}_final_std",
            f"{metric.key}_steps_to_random_final",
        ]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for s in summaries:
            row: list[object] = [s.config, s.init, s.seeds, f"{s.seconds:.1f}"]
            for metric in metrics:
                reach = s.steps_to_random_final[metric.key]
                row += [
                    f"{s.step0[metric.key][0]:.6f}",
                    f"{s.step0[metric.key][1]:.6f}",
                    f"{s.final[metric.key][0]:.6f}",
                    f"{s.final[metric.key][1]:.6f}",
                    "" if reach is None else reach,
                ]
            writer.writerow(row)


def write_curves_csv(points: list[Point], metrics: list[Metric], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "init", "seed", "step", "seconds", *(m.key for m in metrics)])
        for p in points:
            writer.writerow(
                [p.config, p.init, p.seed, p.step, f"{p.seconds:.1f}", *(f"{p.metrics[m.key]:.6f}" for m in metrics)]
            )


def plot_curves(points: list[Point], metrics: list[Metric], title: str, path: Path, columns: int = 3) -> None:
    """One panel per (metric, config), ``columns`` configs per row: seed-mean curve per init, ±std band."""
    configs = list(dict.fromkeys(p.config for p in points))
    inits = list(dict.fromkeys(p.init for p in points))
    columns = min(columns, len(configs))
    rows_per_metric = math.ceil(len(configs) / columns)
    fig, axes = plt.subplots(
        len(metrics) * rows_per_metric,
        columns,
        figsize=(max(8.0, 4.4 * columns), 3.3 * len(metrics) * rows_per_metric),  # 8 in: room for the title
        squeeze=False,
    )
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2)
    styles = {init: ("black", "--") if init == RANDOM_INIT else (next(colors), "-") for init in inits}
    for m, metric in enumerate(metrics):
        for c, config in enumerate(configs):
            ax = axes[m * rows_per_metric + c // columns][c % columns]
            for init in inits:
                runs = [p for p in points if p.config == config and p.init == init]
                if not runs:
                    continue
                steps, means, stds = zip(*seed_mean_curve(runs, metric.key), strict=True)
                color, line = styles[init]
                ax.plot(steps, means, line, marker="o", markersize=3, color=color, label=init)
                low = [mean - std for mean, std in zip(means, stds, strict=True)]
                high = [mean + std for mean, std in zip(means, stds, strict=True)]
                ax.fill_between(steps, low, high, color=color, alpha=0.15)
            ax.grid(alpha=0.3)
            ax.set_title(config, fontsize=10)
            ax.set_xlabel("training step", fontsize=9)
            ax.set_ylabel(metric.label, fontsize=9)
    for m in range(len(metrics)):
        for c in range(len(configs), rows_per_metric * columns):
            axes[m * rows_per_metric + c // columns][c % columns].set_visible(False)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_to(points: list[Point], metric: Metric, baseline: str = RANDOM_INIT) -> list[str]:
    """Per (config, other init): final score minus ``baseline``'s final score, paired by seed."""
    lines = []
    last = max(p.step for p in points)
    final = {(p.config, p.init, p.seed): p.metrics[metric.key] for p in points if p.step == last}
    name = "random init" if baseline == RANDOM_INIT else baseline
    for config, init in dict.fromkeys((c, i) for c, i, _ in final if i != baseline):
        seeds = [s for c, i, s in final if (c, i) == (config, init) and (config, baseline, s) in final]
        if not seeds:
            continue
        differences = [final[config, init, s] - final[config, baseline, s] for s in seeds]
        wins, losses = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
        verdict = (
            f"beats {name} on every seed"
            if wins == len(seeds)
            else f"loses to {name} on every seed"
            if losses == len(seeds)
            else f"identical to {name} on every seed"
            if wins == losses == 0
            else f"mixed: better on {wins} of {len(seeds)} seeds"
        )
        mean, std = _mean_std(differences)
        lines.append(
            f"- {config}, {init}: {metric.label} {mean:+.{metric.digits}f} ± {std:.{metric.digits}f} vs {name} "
            f"(same seed, {len(seeds)} seeds): {verdict}."
        )
    return lines


def write_results(
    stem: str,
    out: Path,
    points: list[Point],
    metrics: list[Metric],
    *,
    title: str,
    preamble: Iterable[str],
    baselines: Iterable[str] = (RANDOM_INIT,),
    epilogue: Iterable[str] = (),
) -> list[Summary]:
    """Write ``<stem>.md``, ``<stem>.csv`` (summary), ``<stem>_curves.csv`` and ``<stem>.png``.

    The markdown pairs every init by seed against each of ``baselines``; ``epilogue`` lines follow.
    """
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize(points, metrics)
    last_step = max(p.step for p in points)
    lines = [f"# {title}", "", *preamble, "", *summary_table(summaries, metrics, last_step), ""]
    for baseline in baselines:
        name = "random init" if baseline == RANDOM_INIT else f"`{baseline}`"
        lines += [f"## Final scores (step {last_step}) vs {name}, paired by seed", ""]
        lines += [line for metric in metrics for line in compare_to(points, metric, baseline)]
        lines += [""]
    lines += [
        *epilogue,
        f"Learning curves: `{stem}.png` (mean ± std over seeds); every evaluation: `{stem}_curves.csv`.",
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines), encoding="utf-8")
    write_summary_csv(summaries, metrics, out / f"{stem}.csv")
    write_curves_csv(points, metrics, out / f"{stem}_curves.csv")
    plot_curves(points, metrics, title, out / f"{stem}.png")
    return summaries
