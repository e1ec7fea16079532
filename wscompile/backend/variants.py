"""Reduced-precision copies of the fp32 ONNX model, written beside it.

- fp16: ``onnxruntime.transformers.float16.convert_float_to_float16`` (ships with onnxruntime, so
  ``onnxconverter_common`` is not needed) with ``keep_io_types=True``: inputs and outputs stay
  float32, so the same feeds work and only the weights and arithmetic are halved.
- int8: ``onnxruntime.quantization``. ``quantize_dynamic`` (int8 weights, activations quantized at
  run time from their observed range) needs no data; with calibration batches ``quantize_static``
  (QDQ format, activation ranges from the batches) is used instead.

A variant is not held to the fp32 tolerance. What it is measured by, against the fp32 PyTorch
student on the same inputs: cosine similarity of each flattened output (the worst one is reported),
the largest absolute difference, and for classifiers the share of samples with the same top-1 class.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import numpy as np
import torch

from wscompile.backend.convert import KIND_IMAGE
from wscompile.backend.deps import import_onnx, import_onnxruntime
from wscompile.errors import ExportError

FP16 = "fp16"
INT8 = "int8"


def variant_path(onnx_path: str, name: str) -> str:
    """``student.onnx`` -> ``student.fp16.onnx``."""
    root, ext = os.path.splitext(onnx_path)
    return f"{root}.{name}{ext or '.onnx'}"


def write_fp16(fp32_path: str, path: str, *, external_data: bool) -> str:
    """Write the fp16 copy of ``fp32_path`` to ``path``; return how it was made."""
    onnx = import_onnx()
    import_onnxruntime()
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        # A path, not a loaded model: onnx shape inference on a path also works past 2 GB.
        model = convert_float_to_float16(fp32_path, keep_io_types=True)
        onnx.save_model(model, path, **_external_data_options(path, external_data))
    except Exception as e:  # the converter fails with assorted exception types
        raise ExportError(f"fp16 conversion of {fp32_path} failed: {e}; export without --fp16") from e
    return "float16, fp32 inputs/outputs"


def write_int8(fp32_path: str, path: str, *, calib: list[dict[str, torch.Tensor]] | None, external_data: bool) -> str:
    """Write the int8 copy of ``fp32_path`` to ``path``: static with ``calib``, else dynamic."""
    onnx = import_onnx()
    import_onnxruntime()
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    try:
        with _without_preprocessing_advice():
            if calib:
                input_names = [i.name for i in onnx.load(fp32_path, load_external_data=False).graph.input]
                feeds = _CalibrationFeeds(calib, input_names)
                quantize_static(fp32_path, path, feeds, use_external_data_format=external_data)
                method = f"static, {len(calib)} calibration batches"
            else:
                quantize_dynamic(fp32_path, path, use_external_data_format=external_data)
                method = "dynamic"
    except Exception as e:  # the quantizer fails with assorted exception types
        raise ExportError(f"int8 quantization of {fp32_path} failed: {e}; export without --int8") from e
    return method


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """Drop the quantizer's root-logger advice to run ``quant_pre_process`` first.

    Measured on the test students: pre-processing changed neither cosine nor size meaningfully,
    and it fails on BERT ("Incomplete symbolic shape inference"), so it is not run.
    """

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


class _CalibrationFeeds:
    """onnxruntime's CalibrationDataReader protocol (``get_next``) over a list of input dicts."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], input_names: list[str]) -> None:
        self._feeds = iter([{name: batch[name].detach().cpu().numpy() for name in input_names} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _external_data_options(path: str, external_data: bool) -> dict[str, object]:
    if not external_data:
        return {}
    return {
        "save_as_external_data": True,
        "all_tensors_to_one_file": True,
        "location": os.path.basename(path) + ".data",
    }


def agreement(
    got: list[np.ndarray], want: list[tuple[str, np.ndarray]], kind: str
) -> tuple[float, float, float | None]:
    """Worst cosine similarity, max abs diff, and top-1 agreement (classifiers) of a variant.

    Args:
        got: The variant's outputs from onnxruntime.
        want: The fp32 PyTorch student's named outputs on the same inputs.
        kind: "image", "text" or "other"; top-1 is reported for image students with 2-D logits.

    Returns:
        ``(cosine, max_abs, top1_agreement)``; ``top1_agreement`` is None for non-classifiers.
    """
    cosines, max_abs = [], 0.0
    for variant_out, (_, torch_out) in zip(got, want, strict=True):
        a = variant_out.astype(np.float64).ravel()
        b = torch_out.ravel()
        norms = np.linalg.norm(a) * np.linalg.norm(b)
        cosines.append(float(a @ b / norms) if norms > 0 else float(np.array_equal(a, b)))
        max_abs = max(max_abs, float(np.abs(a - b).max(initial=0.0)))
    top1 = None
    if kind == KIND_IMAGE and len(want) == 1 and want[0][1].ndim == 2:
        top1 = float(np.mean(got[0].argmax(axis=1) == want[0][1].argmax(axis=1)))
    return min(cosines), max_abs, top1
