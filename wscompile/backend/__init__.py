"""Backend stage: ONNX export of the student, onnxruntime validation, fp16/int8 and .ort copies, latency.

onnx and onnxruntime are imported only when a function needs them.
"""

from __future__ import annotations

from wscompile.backend.export import export_student
from wscompile.backend.results import ExportResult, Latency, OrtFile, OutputCheck, VariantResult
from wscompile.backend.verify import verify_onnx

__all__ = [
    "ExportResult",
    "Latency",
    "OrtFile",
    "OutputCheck",
    "VariantResult",
    "export_student",
    "verify_onnx",
]
