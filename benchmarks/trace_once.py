"""Repeated blocks traced once: the same IR as tracing the whole model, and how much sooner.

For every model of the breadth matrix (``breadth.py``) and the 7B-shaped Llama of ``scale.py``
that holds a run of identical blocks (``frontend.repeated.repeated_runs``), built on the meta
device: ``frontend.trace`` with ``blocks_once=False`` (the whole model) and with the default (the
run cut to four blocks, the IR expanded). The two IRs must be equal, node for node (attributes
included), edge for edge, and in their graph attributes; "cut" says whether the expansion applied
or the model was traced whole after all. Times are the median of ``--repeats`` alternating runs.

    python benchmarks/trace_once.py [--repeats 3] [--only SUBSTRING]

Writes ``benchmarks/results/trace_once.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import breadth  # noqa: E402
import scale  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["model", "runs", "components", "cut", "same_ir", "whole_s", "once_s"]


def _ir(graph) -> tuple:
    from wscompile import ir

    edges = sorted((a, b, tuple(sorted(d[ir.ARG]))) for a, b, d in graph.edges(data=True))
    return sorted(graph.nodes(data=True)), edges, graph.graph


def models(root: Path) -> list[tuple[str, tuple[int, ...] | None]]:
    """Every distinct breadth spec (with its input shape), then the 7B-shaped teacher."""
    places = breadth.write_configs(root / "hf")
    seen: dict[str, tuple[int, ...] | None] = {}
    for case in breadth.CASES:
        shape = tuple(int(x) for x in case.input_shape.split(",")) if case.input_shape else None
        for spec in (case.teacher, case.student):
            seen.setdefault(spec.format(**places), shape)
    import transformers

    llama = root / "llama-7b"
    transformers.LlamaConfig(**scale.SIZES["7b"]["teacher"]).save_pretrained(llama)
    seen[f"hf:{llama}?task=causal-lm"] = None
    return list(seen.items())


def measure(spec: str, shape: tuple[int, ...] | None, repeats: int) -> dict[str, object] | None:
    from wscompile import frontend
    from wscompile.frontend import repeated
    from wscompile.specs import load_model

    model = load_model(spec, role="student", device="meta", input_shape=shape)
    runs = repeated.repeated_runs(model.module)
    if not runs:
        return None
    expanded: list[object] = []
    expand = repeated.expand

    def recording(graph, runs):
        expanded.append(expand(graph, runs))
        return expanded[-1]

    times: dict[bool, list[float]] = {False: [], True: []}
    graphs = {}
    for i in range(repeats):
        for once in (False, True) if i % 2 == 0 else (True, False):
            repeated.expand = recording
            try:
                start = time.perf_counter()
                graphs[once] = frontend.trace(model.module, model.inputs, blocks_once=once)
                times[once].append(time.perf_counter() - start)
            finally:
                repeated.expand = expand
    return {
        "model": spec,
        "runs": " ".join(f"{run.path or '<root>'} x{run.length}" for run in runs),
        "components": graphs[False].number_of_nodes(),
        "cut": "yes" if expanded and expanded[-1] is not None else "no",
        "same_ir": "yes" if _ir(graphs[True]) == _ir(graphs[False]) else "NO",
        "whole_s": statistics.median(times[False]),
        "once_s": statistics.median(times[True]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="models whose spec contains this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec, shape in models(Path(tmp)):
            if args.only and args.only not in spec:
                continue
            row = measure(spec, shape, args.repeats)
            if row is None:
                continue
            row["model"] = row["model"].replace(tmp, "<configs>")
            rows.append(row)
            print(
                f"{row['model'][:70]:70s} cut={row['cut']} same={row['same_ir']} "
                f"{row['whole_s']:.2f}s -> {row['once_s']:.2f}s",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "trace_once.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({**r, "whole_s": f"{r['whole_s']:.3f}", "once_s": f"{r['once_s']:.3f}"} for r in rows)
    same = sum(r["same_ir"] == "yes" for r in rows)
    cut = sum(r["cut"] == "yes" for r in rows)
    lines = [
        "# Repeated blocks traced once",
        "",
        f"`python benchmarks/trace_once.py --repeats {args.repeats}`: every breadth-matrix model with a run of "
        "identical blocks, and the 7B-shaped Llama of scale.py, on the meta device. "
        f"{same} of {len(rows)} give the whole model's IR exactly; the cut applied to {cut} of {len(rows)}.",
        "",
        "| model | runs | components | cut | same IR | whole (s) | once (s) |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['model']} | {r['runs']} | {r['components']} | {r['cut']} | {r['same_ir']} | "
            f"{r['whole_s']:.2f} | {r['once_s']:.2f} |"
            for r in rows
        ),
    ]
    (args.out / "trace_once.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'trace_once.md'}")
    if same != len(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
