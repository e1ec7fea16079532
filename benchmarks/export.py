"""ONNX export over a matrix of students: export ok, dynamic axes, parity, fp32/fp16/int8/.ort sizes, latency.

Random weights (no downloads): parity and agreement measure the export and the precision loss, not
accuracy. Every model is built from a spec by ``wscompile.specs.load_model`` (timm names with
overrides; Hugging Face configs written to a temporary folder and read as ``hf:DIR``) and goes
through ``wscompile.backend.export_student`` exactly as ``wscompile export --fp16 --int8 --ort``
runs it. Small configs at 64 px keep the whole matrix within minutes; the 224 px teacher/student
pairs of the first version of this benchmark are kept (``--no-pairs`` skips them).

    python benchmarks/export.py [--runs 10] [--threads 1] [--only beit,mixtral] [--no-pairs]

Writes ``benchmarks/results/export.md`` and ``benchmarks/results/export.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import timm
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import provenance  # noqa: E402

from wscompile.backend import ExportResult, export_student  # noqa: E402
from wscompile.specs import load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SMALL = (1, 3, 64, 64)  # example input of the small timm students
ERROR_CHARS = 300  # of an error message shown in the tables


@dataclass
class Student:
    """One row of the matrix."""

    name: str  # readable id, also the --only key
    family: str  # the architecture family the issue names, or the model family
    spec: str | Callable[[str], str]  # a timm spec, or a function writing an HF config into a folder -> hf: spec
    input_shape: tuple[int, ...] | None = SMALL


def _hf(config_class: str, **fields: object) -> Callable[[str], str]:
    """Write ``transformers.<config_class>(**fields)`` into a folder and return its ``hf:`` spec."""

    def write(directory: str) -> str:
        folder = os.path.join(directory, config_class)
        getattr(transformers, config_class)(**fields).save_pretrained(folder)
        return f"hf:{folder}"

    return write


TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "vocab_size": 100}  # fmt: skip
SWIN = "img_size=64&window_size=4&depths=1,1,1,1&embed_dim=32&num_heads=1,2,2,4"

STUDENTS = [
    # The families issue 14 names: batch baked into a Reshape/view before this export.
    Student("beit", "beit", "timm:beit_base_patch16_224?img_size=64&embed_dim=64&depth=2&num_heads=2"),
    Student(
        "vit_relpos", "vit_relpos", "timm:vit_relpos_small_patch16_224?img_size=64&embed_dim=64&depth=2&num_heads=2"
    ),
    Student("coatnet", "coatnet", "timm:coatnet_nano_rw_224?img_size=64"),
    Student("pvt_v2", "pvt_v2", "timm:pvt_v2_b0"),
    Student("swinv2", "swinv2", f"timm:swinv2_tiny_window8_256?{SWIN}"),
    Student(
        "segformer",
        "hf segformer",
        _hf(
            "SegformerConfig",
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            num_attention_heads=[1, 2],
            decoder_hidden_size=32,
            patch_sizes=[7, 3],
            strides=[4, 2],
            mlp_ratios=[2, 2],
            image_size=64,
        ),
        None,
    ),  # fmt: skip
    # MoE: transformers' grouped_mm experts have no ONNX translation.
    Student(
        "mixtral",
        "hf mixtral (moe)",
        _hf("MixtralConfig", **TINY_TEXT, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2),
        None,
    ),  # fmt: skip
    Student(
        "qwen2_moe",
        "hf qwen2-moe (moe)",
        _hf(
            "Qwen2MoeConfig",
            **TINY_TEXT,
            num_key_value_heads=1,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
        ),
        None,
    ),  # fmt: skip
    # Other timm families, small configs.
    Student("swin", "swin", f"timm:swin_tiny_patch4_window7_224?{SWIN}"),
    Student("maxvit", "maxvit", "timm:maxvit_nano_rw_256?img_size=64"),
    Student("vit", "vit", "timm:vit_tiny_patch16_224?img_size=64&depth=2"),
    Student("deit", "deit", "timm:deit_tiny_distilled_patch16_224?img_size=64&depth=2"),
    Student("eva02", "eva", "timm:eva02_tiny_patch14_224?img_size=56&depth=2", (1, 3, 56, 56)),
    Student("cait", "cait", "timm:cait_xxs24_224?img_size=64&depth=2"),
    Student("xcit", "xcit", "timm:xcit_nano_12_p16_224?img_size=64&depth=2"),
    Student("levit", "levit", "timm:levit_128s?img_size=64"),
    Student("tiny_vit", "tiny_vit", "timm:tiny_vit_5m_224", None),  # fixed-resolution attention biases
    Student("mixer", "mlp-mixer", "timm:mixer_s16_224?img_size=64"),
    Student("convnext", "convnext", "timm:convnext_atto"),
    Student("convnextv2", "convnextv2", "timm:convnextv2_atto"),
    Student("efficientnet", "efficientnet", "timm:efficientnet_b0"),
    Student("mobilenetv3", "mobilenetv3", "timm:mobilenetv3_small_050"),
    Student("mobilevit", "mobilevit", "timm:mobilevit_xxs"),
    Student("efficientformer", "efficientformer", "timm:efficientformer_l1", None),  # 224 px only
    Student("poolformer", "poolformer", "timm:poolformerv2_s12"),
    Student("edgenext", "edgenext", "timm:edgenext_xx_small"),
    Student("regnet", "regnet", "timm:regnetx_002"),
    Student("resnet", "resnet", "timm:resnet18?layers=1,1,1,1"),
    Student("ghostnet", "ghostnet", "timm:ghostnet_050"),
    Student("repvgg", "repvgg", "timm:repvgg_a0"),
    # Other Hugging Face families.
    Student("bert", "hf bert", _hf("BertConfig", **TINY_TEXT), None),
    Student("gpt2", "hf gpt2", _hf("GPT2Config", n_embd=32, n_layer=2, n_head=2, vocab_size=100), None),
    Student(
        "hf_vit",
        "hf vit",
        _hf(
            "ViTConfig",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=64,
            patch_size=16,
        ),
        None,
    ),  # fmt: skip
    Student(
        "hf_swin",
        "hf swin",
        _hf("SwinConfig", image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4),
        None,
    ),  # fmt: skip
]

# The students of the families issue 14 names (baked batch, MoE), counted on their own in the table.
NAMED = {"beit", "vit_relpos", "coatnet", "pvt_v2", "swinv2", "segformer", "mixtral", "qwen2_moe"}

# The first version's (teacher, student) timm pairs at 224 px.
PAIRS = [
    ("vit_small_patch16_224", "vit_tiny_patch16_224"),
    ("convnext_tiny", "convnext_femto"),
    ("resnet50", "resnet18"),
    ("mobilenetv3_large_100", "mobilenetv3_small_100"),
]

COLUMNS = [
    "model", "family", "spec", "params_m", "exporter", "dynamic_axes", "export_shapes", "verify_shapes",
    "experts", "parity_ok", "parity_max_abs", "fp32_mb", "fp16_mb", "int8_mb", "ort_mb", "ort_max_abs",
    "fp16_cosine", "int8_cosine", "fp16_ort_cosine", "int8_ort_cosine", "ort_ms", "torch_ms", "fp16_ort_ms",
    "int8_ort_ms", "export_s", "fallback", "error",
]  # fmt: skip


def measure(student: Student, runs: int, directory: str) -> dict[str, object]:
    """Export one student with every variant and .ort; a failure is a row too."""
    spec = student.spec if isinstance(student.spec, str) else student.spec(directory)
    row: dict[str, object] = {"model": student.name, "family": student.family, "spec": _short(spec, directory)}
    start = time.perf_counter()
    try:
        loaded = load_model(spec, role="student", seed=0, input_shape=student.input_shape)
        wake_zero_weights(loaded.module)
        row["params_m"] = sum(p.numel() for p in loaded.module.parameters()) / 1e6
        with torch.no_grad():
            result = export_student(
                loaded.module,
                loaded.inputs,
                loaded.make_inputs,
                os.path.join(directory, f"{student.name}.onnx"),
                kind=loaded.kind,
                fp16=True,
                int8=True,
                ort=True,
                latency_runs=runs,
                log=lambda line: print(f"  {line}", flush=True),
            )
    except Exception as e:  # a failing model is a result too: record it and go on
        row["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:ERROR_CHARS]
        return row
    row["export_s"] = time.perf_counter() - start
    row.update(summarize(result))
    return row


def wake_zero_weights(module: torch.nn.Module) -> None:
    """Give weights that timm initializes to zero (classifier heads, last BN scales) small random values.

    With a zero head every output is the bias, so parity and agreement would compare constants.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("weight") and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def summarize(result: ExportResult) -> dict[str, object]:
    row: dict[str, object] = {
        "exporter": result.exporter,
        "dynamic_axes": _axes(result.dynamic_axes),
        "export_shapes": _shapes(result.export_shapes),
        "verify_shapes": _shapes(result.verify_shapes),
        "experts": result.experts_implementation,
        "fp32_mb": result.size_bytes / 2**20,
        "parity_max_abs": max(check.max_abs for check in result.checks),
        "parity_ok": all(check.ok for check in result.checks),
        "ort_ms": result.latency.ort_ms if result.latency else None,
        "torch_ms": result.latency.torch_ms if result.latency else None,
        "fallback": result.fallback_reason,
    }
    for variant in result.variants:
        row[f"{variant.name}_mb"] = variant.size_bytes / 2**20
        row[f"{variant.name}_cosine"] = variant.cosine
        row[f"{variant.name}_ort_ms"] = variant.ort_ms
    for copy in result.ort_files:
        if copy.name == "fp32":
            row["ort_mb"] = copy.size_bytes / 2**20
            row["ort_max_abs"] = copy.max_abs
        else:
            row[f"{copy.name}_ort_cosine"] = copy.cosine
    return row


def _axes(axes: dict[str, dict[int, str]]) -> str:
    names = sorted({name for per_input in axes.values() for name in per_input.values()})
    return "+".join(names) if names else "static"


def _shapes(shapes: dict[str, list[int]]) -> str:
    return " ".join(f"{name}={'x'.join(map(str, shape))}" for name, shape in shapes.items())


def _short(spec: str, directory: str) -> str:
    """An hf: spec's temporary folder replaced by the config class name."""
    return spec.replace(directory + os.sep, "") if spec.startswith("hf:") else spec


def fmt(value: object, digits: int = 2) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_markdown(rows: list[dict[str, object]], command: str, args: argparse.Namespace, path: Path) -> None:
    exported = [row for row in rows if not row.get("error") and row.get("parity_ok")]
    named = [row for row in rows if row["model"] in NAMED]
    header = (
        "| model | family | params (M) | exporter | dynamic | parity shapes | parity max abs | ok | "
        "fp32 / fp16 / int8 / .ort (MB) | .ort max abs | fp16 / int8 cosine | fp16 / int8 .ort cosine | "
        "onnxruntime / PyTorch (ms) |"
    )
    lines = [
        f"`{command}`: {provenance()}, torch {torch.__version__}, timm {timm.__version__}, transformers "
        f"{transformers.__version__}, onnxruntime {onnxruntime.__version__} (CPUExecutionProvider), "
        f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, random weights.",
        "",
        "# ONNX export over a matrix of students",
        "",
        f"**{len(exported)} of {len(rows)} students export with parity at another batch size or their stated "
        f"static shape ({len(exported) / max(len(rows), 1):.0%}); {sum(r in exported for r in named)} of "
        f"{len(named)} of the families issue 14 names.**",
        "",
        "- export: `export_student(..., fp16=True, int8=True, ort=True)`, as `wscompile export --fp16 --int8 --ort`;",
        "  example inputs at batch 1, traced at batch 2 when the batch is dynamic.",
        "- dynamic: the axes left dynamic in the file (`static`: the model fixes them and the file runs at the",
        "  example shape); parity: fp32 ONNX and fp32 `.ort` vs PyTorch on the parity shapes (batch 3, text",
        "  sequence 9 of 16), atol 1e-4 + rtol 1e-3.",
        "- random weights; those timm initializes to zero (heads, last BN scales) get small random values, so",
        "  that no output is a constant.",
        "- fp16 (`convert_float_to_float16`, fp32 I/O), int8 (`quantize_dynamic`) and their `.ort` copies vs",
        "  the fp32 PyTorch model on 16 random samples: cosine similarity of the worst output.",
        f"- latency: batch 1, {args.threads} thread(s) for both runtimes, median of {args.runs} runs after 5",
        "  warm-up runs. The cores are shared with other jobs: timings are noisy.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for row in rows:
        if row.get("error"):
            lines.append(
                f"| {row['model']} | {row['family']} | {fmt(row.get('params_m'), 1)} | failed: {row['error']} |"
            )
            continue
        lines.append(
            f"| {row['model']} | {row['family']} | {fmt(row['params_m'])} | {row['exporter']} "
            f"| {row['dynamic_axes']} | {row['verify_shapes']} | {row['parity_max_abs']:.1e} | {fmt(row['parity_ok'])} "
            f"| {fmt(row.get('fp32_mb'), 1)} / {fmt(row.get('fp16_mb'), 1)} / {fmt(row.get('int8_mb'), 1)} / "
            f"{fmt(row.get('ort_mb'), 1)} | {fmt(row.get('ort_max_abs'), 7)} "
            f"| {fmt(row.get('fp16_cosine'), 5)} / {fmt(row.get('int8_cosine'), 4)} "
            f"| {fmt(row.get('fp16_ort_cosine'), 5)} / {fmt(row.get('int8_ort_cosine'), 4)} "
            f"| {fmt(row.get('ort_ms'), 1)} / {fmt(row.get('torch_ms'), 1)} |"
        )
    fallbacks = [row for row in rows if row.get("fallback")]
    if fallbacks:
        lines += ["", "Earlier attempts that failed (the exporter column says which one worked):", ""]
        lines += [f"- {row['model']}: {row['fallback'][:ERROR_CHARS]}" for row in fallbacks]
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


def matrix(args: argparse.Namespace) -> list[Student]:
    students = list(STUDENTS)
    if not args.no_pairs:
        for teacher, student in PAIRS:
            students += [Student(f"{name}@224", f"{role} at 224 px", f"timm:{name}", None)
                         for name, role in ((teacher, "teacher"), (student, "student"))]  # fmt: skip
    if args.only:
        wanted = set(args.only.split(","))
        students = [s for s in students if s.name in wanted]
    return students


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed batch-1 runs per runtime (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="threads for PyTorch and onnxruntime (default 1)")
    parser.add_argument("--only", help="comma-separated model ids of the matrix to run")
    parser.add_argument("--no-pairs", action="store_true", help="skip the 224 px teacher/student pairs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    args = parser.parse_args()
    # onnxruntime sessions take PyTorch's thread count: one budget for both runtimes.
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for student in matrix(args):
            print(f"{student.name} ({student.family})", flush=True)
            rows.append(measure(student, args.runs, directory))
    command = "python benchmarks/export.py " + " ".join(sys.argv[1:])
    write_markdown(rows, command.strip(), args, args.out / "export.md")
    write_csv(rows, args.out / "export.csv")
    print(f"wrote {args.out / 'export.md'} and {args.out / 'export.csv'}")


if __name__ == "__main__":
    main()
