"""What the backend stage hands back: plain dataclasses, so ``dataclasses.asdict`` gives the JSON."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from wscompile.plan import ExportSummary

# Values of ExportResult.exporter.
EXPORTER_DYNAMO = "dynamo"  # torch.onnx.export(dynamo=True): torch.export graph, translated by onnxscript
EXPORTER_TORCHSCRIPT = "torchscript"  # torch.onnx.export(dynamo=False): the deprecated tracing exporter


@dataclass
class OutputCheck:
    """Agreement of one ONNX output with the PyTorch student on the same inputs."""

    name: str  # ONNX output name
    shape: list[int]  # shape onnxruntime returned
    max_abs: float  # max |onnx - torch| over all elements (inf on a shape mismatch)
    max_rel: float  # max |onnx - torch| / (|torch| + atol); atol keeps near-zero references finite
    ok: bool  # every element within atol + rtol * |torch| (torch.allclose semantics)


@dataclass
class VariantResult:
    """A reduced-precision copy of the exported model and how far it drifts from the fp32 student."""

    name: str  # "fp16" or "int8"
    method: str  # how it was made: "float16, fp32 inputs/outputs", "dynamic", "static, N calibration batches"
    path: str  # where it was written, beside the fp32 file
    size_bytes: int  # .onnx plus its .onnx.data, if any
    cosine: float  # cosine similarity of flattened outputs vs the fp32 PyTorch student; worst output
    max_abs: float  # max |variant - torch| over every output
    top1_agreement: float | None  # share of samples with the same argmax; classifiers only
    ort_ms: float | None  # median onnxruntime latency at batch 1; None when latency is not measured


@dataclass
class OrtFile:
    """An ONNX Runtime mobile-format (``.ort``) copy of one written ``.onnx`` file, as run by onnxruntime."""

    name: str  # which .onnx it was converted from: "fp32", "fp16" or "int8"
    path: str  # the .ort file, beside its .onnx
    config_path: str  # reduced-operator config for a minimal onnxruntime build (--include_ops_by_config)
    size_bytes: int
    cosine: float  # worst output's cosine similarity vs the fp32 PyTorch student
    max_abs: float  # max |ort - torch| over every output; for fp32 held to the parity tolerance


@dataclass
class Latency:
    """Median batch-1 latency of the fp32 ONNX model and of the PyTorch student."""

    ort_ms: float  # onnxruntime, median over `runs`
    torch_ms: float  # PyTorch eager under torch.inference_mode, median over `runs`
    runs: int  # timed runs after the warm-up runs
    provider: str  # onnxruntime execution provider that ran the model


@dataclass
class ExportResult:
    """Everything ``export_student`` wrote and measured."""

    onnx_path: str  # the fp32 model
    data_path: str | None  # its external weights file; only for models over 2 GB
    exporter: str  # EXPORTER_DYNAMO by default, EXPORTER_TORCHSCRIPT when every dynamo attempt failed
    fallback_reason: str | None  # why the first attempts failed ("; "-joined); None when the first worked
    opset: int  # ai.onnx opset of the written model
    input_names: list[str]  # ONNX inputs: the forward kwarg names
    output_names: list[str]  # ONNX outputs: "logits", or the model output's tensor fields in order
    size_bytes: int  # .onnx plus its .onnx.data, if any
    dynamic_axes: dict[str, dict[int, str]]  # input -> {axis: name} of the axes left dynamic; {} if all static
    export_shapes: dict[str, list[int]]  # example input shapes the exporter saw; static axes keep these sizes
    verify_shapes: dict[str, list[int]]  # input shapes of the parity run (another batch, sequence length)
    checks: list[OutputCheck]  # fp32 parity, one per output
    variants: list[VariantResult] = field(default_factory=list)  # fp16 / int8 copies, when asked for
    ort_files: list[OrtFile] = field(default_factory=list)  # .ort copies of every written file, with --ort
    optimization: str | None = None  # onnxruntime graph optimization applied before saving: "basic", "extended"
    experts_implementation: str | None = None  # transformers MoE experts forward exported; None: not an MoE model
    latency: Latency | None = None  # None when latency_runs == 0

    def to_dict(self) -> dict[str, object]:
        """Return the result as JSON-ready nested dicts and lists."""
        return asdict(self)


def export_summary(result: ExportResult) -> ExportSummary:
    """The manifest's record of a verified export."""
    dynamic = {name: list(axes.values()) for name, axes in result.dynamic_axes.items() if axes}
    written = [result.onnx_path, *(v.path for v in result.variants), *(f.path for f in result.ort_files)]
    return ExportSummary(
        onnx=os.path.basename(result.onnx_path),
        exporter=result.exporter,
        dynamic_axes=dynamic,
        static_shapes={name: list(shape) for name, shape in result.export_shapes.items() if name not in dynamic},
        max_abs_diff=max((c.max_abs for c in result.checks), default=0.0),
        fallback_reason=result.fallback_reason,
        files=[os.path.basename(path) for path in written],
    )
