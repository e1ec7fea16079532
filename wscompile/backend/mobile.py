"""ONNX Runtime's mobile format: an ``.ort`` file and the reduced-operator config beside it.

Conversion is onnxruntime's own tool (``onnxruntime.tools.convert_onnx_models_to_ort``, the code
behind ``python -m onnxruntime.tools.convert_onnx_models_to_ort``) with the "fixed" optimization
style: the graph is optimized once at conversion, so a minimal build runs it as saved. The tool
writes ``<name>.ort`` and ``<name>.required_operators.config``; the config lists the operators a
build with ``--include_ops_by_config`` must keep. A full onnxruntime loads ``.ort`` files as it loads
``.onnx`` ones, which is how they are checked.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
from collections.abc import Iterator

from wscompile.backend.deps import import_onnxruntime
from wscompile.errors import ExportError

ORT_SUFFIX = ".ort"
CONFIG_SUFFIX = ".required_operators.config"
TOOL_LOGGER = "ort_format_model.utils"  # the converter's logger, at DEBUG level of its own


def ort_paths(onnx_path: str) -> tuple[str, str]:
    """``student.onnx`` -> ``(student.ort, student.required_operators.config)``."""
    root = os.path.splitext(onnx_path)[0]
    return root + ORT_SUFFIX, root + CONFIG_SUFFIX


def write_ort(onnx_path: str) -> tuple[str, str]:
    """Convert ``onnx_path`` to the mobile format beside it; return the ``.ort`` and config paths.

    Raises:
        ExportError: The converter failed (an operator the format does not support, say).
    """
    import_onnxruntime()
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    ort_path, config_path = ort_paths(onnx_path)
    model = pathlib.Path(onnx_path)
    try:
        # NOTE: the tool prints its progress to stdout and logs each config at INFO; the caller logs
        # one line instead.
        with contextlib.redirect_stdout(io.StringIO()), _quiet(logging.getLogger(TOOL_LOGGER)):
            convert_onnx_models_to_ort(model, output_dir=model.parent, optimization_styles=[OptimizationStyle.Fixed])
    except Exception as e:  # the converter raises assorted exception types
        raise ExportError(f"converting {onnx_path} to the .ort format failed: {e}; export without --ort") from e
    for path in (ort_path, config_path):
        if not os.path.isfile(path):
            raise ExportError(f"onnxruntime's converter did not write {path}; export without --ort")
    return ort_path, config_path


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Raise ``logger`` to WARNING for the duration."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
