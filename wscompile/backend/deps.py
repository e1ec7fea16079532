"""Lazy imports of the ONNX stack, so that ``import wscompile`` works without it."""

from __future__ import annotations

from types import ModuleType

from wscompile.errors import MissingDependencyError


def import_onnx() -> ModuleType:
    """Return the ``onnx`` module or say how to install it."""
    try:
        import onnx
    except ImportError as e:
        raise MissingDependencyError(
            "ONNX export needs the 'onnx' package, which is not installed; run `pip install wscompile` "
            "again or `pip install onnx onnxscript`"
        ) from e
    return onnx


def import_onnxruntime() -> ModuleType:
    """Return the ``onnxruntime`` module or say how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(
            "validating an ONNX model needs onnxruntime, which is not installed; run `pip install onnxruntime` "
            "(CPU) or `pip install 'wscompile[gpu]'` (CUDA)"
        ) from e
    return onnxruntime
