"""onnxruntime graph optimizations, applied to a written ONNX file before it is saved for good.

An ``InferenceSession`` with ``SessionOptions.optimized_model_filepath`` writes the graph it will
run after its optimizer passes. "basic" is constant folding and redundant-node removal (standard
ONNX operators only, runs anywhere); "extended" adds fusions into onnxruntime's contrib operators
(``com.microsoft``: FusedConv, Attention, GELU...), which only onnxruntime runs. Layout ("all")
optimizations are left out: they are specific to the machine that ran them.
"""

from __future__ import annotations

import os
from typing import Any

from wscompile.backend.deps import import_onnx, import_onnxruntime
from wscompile.backend.verify import providers
from wscompile.errors import ExportError

OPTIMIZATION_LEVELS = ("basic", "extended")


def optimize_in_place(path: str, level: str, *, device: str | None, external_data: bool) -> None:
    """Replace the ONNX file at ``path`` by its onnxruntime-optimized graph.

    Args:
        path: The ``.onnx`` file; its ``.onnx.data`` is rewritten too when ``external_data``.
        level: "basic" or "extended".
        device: onnxruntime device the graph is optimized for (see ``verify.providers``).
        external_data: Keep the weights in ``path + ".data"``.

    Raises:
        ExportError: onnxruntime could not load or optimize the file.
    """
    if level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"level must be one of {OPTIMIZATION_LEVELS}, got {level!r}")
    ort = import_onnxruntime()
    root, ext = os.path.splitext(path)
    optimized = f"{root}.optimized{ext}"
    options = _options(ort, level, optimized, external_data)
    try:
        ort.InferenceSession(path, sess_options=options, providers=providers(device))
    except Exception as e:  # onnxruntime raises its own unrelated exception types
        raise ExportError(f"onnxruntime could not optimize {path} ({level}): {e}; export without --optimize") from e
    if external_data:
        os.replace(optimized + ".data", path + ".data")
        _relocate_weights(optimized, os.path.basename(path) + ".data")
    os.replace(optimized, path)


def _relocate_weights(path: str, location: str) -> None:
    """Point every external tensor of the model at ``path`` to the weights file ``location``."""
    onnx = import_onnx()
    model = onnx.load(path, load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)


def _options(ort: Any, level: str, optimized: str, external_data: bool) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    options.optimized_model_filepath = optimized
    if external_data:
        # NOTE: the file name is relative to the optimized model; it is renamed with it afterwards.
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", os.path.basename(optimized) + ".data"
        )
    return options
