"""ONNX export of teacher/student pairs: file sizes, parity, fp16/int8 agreement, latency.

Random weights (no downloads): parity and agreement measure the export and the precision loss, not
accuracy. Every model goes through ``wscompile.backend.export_student`` exactly as the CLI runs it.

    python benchmarks/export.py [--runs 10] [--threads 1]

Writes ``benchmarks/results/export.md`` and ``benchmarks/results/export.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime
import timm
import torch

from wscompile.backend import ExportResult, export_student

IMAGE_SIZE = 224
RESULTS = Path(__file__).parent / "results"

# (teacher, student) timm names at 224 px.
PAIRS = [
    ("vit_small_patch16_224", "vit_tiny_patch16_224"),
    ("convnext_tiny", "convnext_femto"),
    ("resnet50", "resnet18"),
    ("mobilenetv3_large_100", "mobilenetv3_small_100"),
]

COLUMNS = [
    "model", "role", "params_m", "exporter", "opset", "fp32_mb", "fp16_mb", "int8_mb", "parity_max_abs",
    "parity_ok", "fp16_cosine", "fp16_top1", "int8_cosine", "int8_top1", "ort_ms", "torch_ms",
    "fp16_ort_ms", "int8_ort_ms", "export_s", "error",
]  # fmt: skip


def image_inputs(batch: int, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)}


def measure(name: str, role: str, runs: int, directory: str) -> dict[str, object]:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    row: dict[str, object] = {"model": name, "role": role, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    start = time.perf_counter()
    try:
        result = export_student(
            model,
            image_inputs(1),
            image_inputs,
            os.path.join(directory, f"{name}.onnx"),
            kind="image",
            fp16=True,
            int8=True,
            latency_runs=runs,
            log=lambda line: print(f"  {line}", flush=True),
        )
    except Exception as e:  # a failing model is a result too: record it and go on
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        return row
    row["export_s"] = time.perf_counter() - start
    row.update(summarize(result))
    return row


def summarize(result: ExportResult) -> dict[str, object]:
    row: dict[str, object] = {
        "exporter": result.exporter,
        "opset": result.opset,
        "fp32_mb": result.size_bytes / 2**20,
        "parity_max_abs": max(check.max_abs for check in result.checks),
        "parity_ok": all(check.ok for check in result.checks),
        "ort_ms": result.latency.ort_ms if result.latency else None,
        "torch_ms": result.latency.torch_ms if result.latency else None,
    }
    for variant in result.variants:
        row[f"{variant.name}_mb"] = variant.size_bytes / 2**20
        row[f"{variant.name}_cosine"] = variant.cosine
        row[f"{variant.name}_top1"] = variant.top1_agreement
        row[f"{variant.name}_ort_ms"] = variant.ort_ms
    return row


def fmt(value: object, digits: int = 2) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_markdown(rows: list[dict[str, object]], args: argparse.Namespace, path: Path) -> None:
    header = (
        "| model | role | params (M) | fp32 / fp16 / int8 (MB) | parity max abs diff | ok | "
        "fp16 cosine / top-1 | int8 cosine / top-1 | onnxruntime / PyTorch (ms) | fp16 / int8 ort (ms) |"
    )
    lines = [
        "# ONNX export: teacher vs student",
        "",
        f"`python benchmarks/export.py --runs {args.runs} --threads {args.threads}`: torch {torch.__version__}, "
        f"timm {timm.__version__}, onnxruntime {onnxruntime.__version__} (CPUExecutionProvider), "
        f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, {IMAGE_SIZE} px, random weights.",
        "",
        "- parity: fp32 ONNX vs PyTorch at batch 3 (exported at batch 1), tolerance atol 1e-4 + rtol 1e-3.",
        "- fp16 (`convert_float_to_float16`, fp32 I/O) and int8 (`quantize_dynamic`) vs the fp32 PyTorch model",
        "  on 16 random images: cosine similarity of the logits, top-1 agreement.",
        f"- latency: batch 1, threads {args.threads} for both runtimes, median of {args.runs} runs after 5 warm-up",
        "  runs; PyTorch eager (`torch.inference_mode`), then onnxruntime fp32, fp16, int8. The cores are",
        "  shared with other jobs: timings are noisy.",
        "- `quantize_dynamic` turns Conv into ConvInteger, which onnxruntime's CPU kernels run slower than fp32",
        "  Conv: for CNNs pass calibration batches (static QDQ quantization) when speed matters.",
        "- top-1 agreement is fragile with random weights (nearly tied logits); read it with the cosine.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['model']} | {row['role']} | {fmt(row['params_m'], 1)} | failed: {row['error']} |")
            continue
        lines.append(
            f"| {row['model']} | {row['role']} | {fmt(row['params_m'], 1)} "
            f"| {fmt(row['fp32_mb'], 1)} / {fmt(row['fp16_mb'], 1)} / {fmt(row['int8_mb'], 1)} "
            f"| {row['parity_max_abs']:.1e} | {fmt(row['parity_ok'])} "
            f"| {fmt(row['fp16_cosine'], 5)} / {fmt(row['fp16_top1'])} "
            f"| {fmt(row['int8_cosine'], 4)} / {fmt(row['int8_top1'])} "
            f"| {fmt(row['ort_ms'], 1)} / {fmt(row['torch_ms'], 1)} "
            f"| {fmt(row['fp16_ort_ms'], 1)} / {fmt(row['int8_ort_ms'], 1)} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def csv_value(value: object) -> object:
    """Floats to 6 significant digits (parity differences are ~1e-7), None as an empty cell."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: csv_value(row.get(key)) for key in COLUMNS})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed batch-1 runs per runtime (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="threads for PyTorch and onnxruntime (default 1)")
    args = parser.parse_args()
    # onnxruntime sessions take PyTorch's thread count: one budget for both runtimes.
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for teacher, student in PAIRS:
            for name, role in ((teacher, "teacher"), (student, "student")):
                print(f"{name} ({role})", flush=True)
                rows.append(measure(name, role, args.runs, directory))
    write_markdown(rows, args, RESULTS / "export.md")
    write_csv(rows, RESULTS / "export.csv")
    print(f"wrote {RESULTS / 'export.md'} and {RESULTS / 'export.csv'}")


if __name__ == "__main__":
    main()
