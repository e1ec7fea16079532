"""Backend stage: ONNX export of the student, onnxruntime validation, fp16/int8 variants, latency.

onnx and onnxruntime are imported only when a function needs them.
"""

from __future__ import annotations

from wscompile.backend.export import export_student
from wscompile.backend.results import ExportResult, Latency, OutputCheck, VariantResult
from wscompile.backend.verify import verify_onnx

__all__ = ["ExportResult", "Latency", "OutputCheck", "VariantResult", "export_student", "verify_onnx"]
