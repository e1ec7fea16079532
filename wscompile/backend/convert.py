"""PyTorch student -> one ONNX file, with named inputs/outputs and dynamic batch (and sequence) axes.

Exporter choice. ``torch.onnx.export(dynamo=True)`` is tried first: it is torch's default and
maintained exporter (torch.export graph, translated and optimized by onnxscript), it supports opsets
18+, and its graphs quantize cleanly. When it fails (an op torch.export cannot capture, a
data-dependent shape, an axis it specialized to a constant) the deprecated TorchScript tracing
exporter (``dynamo=False``, opsets up to 20) is tried, and the reason is kept in the result.

Found on torch 2.14 with timm ViT/ConvNeXt/ResNet/MobileNetV3 and HF BERT students:

- both exporters reproduce all of them to ~1e-6 at other batch sizes and sequence lengths;
- dynamo needs the dynamic axes given by *name* (strings, turned into ``Dim.DYNAMIC``): a
  ``torch.export.Dim("batch")`` with the batch-1 example input fails on ConvNeXt with
  "Invalid ranges [2:1]" (torch.export's 0/1 specialization);
- TorchScript deduplicates identical initializers, after which onnxruntime's ``quantize_dynamic``
  fails on ResNet ("Expected onnx::Conv_205 to be an initializer");
- dynamo takes 3-7 s per small model against 0.2 s for TorchScript.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from wscompile.backend.deps import import_onnx
from wscompile.backend.results import EXPORTER_DYNAMO, EXPORTER_TORCHSCRIPT
from wscompile.errors import ExportError

BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"

# Kinds of student, as passed by the CLI: text students also get a dynamic sequence axis.
KIND_IMAGE = "image"
KIND_TEXT = "text"
KIND_OTHER = "other"
KINDS = (KIND_IMAGE, KIND_TEXT, KIND_OTHER)


@dataclass
class ExportedFile:
    """An ONNX file written by one of the exporters."""

    exporter: str  # EXPORTER_DYNAMO or EXPORTER_TORCHSCRIPT
    fallback_reason: str | None  # why dynamo was not used; None when it was
    input_names: list[str]  # graph inputs, in forward-kwarg order
    output_names: list[str]  # graph outputs, in flatten_outputs order


def flatten_outputs(output: object, kind: str) -> list[tuple[str, torch.Tensor]]:
    """Name every tensor in a model output, in order.

    A single tensor is ``logits`` for an image classifier (2-D) and ``output`` otherwise; a Hugging
    Face ``ModelOutput`` or any mapping gives its tensor fields by key (``last_hidden_state``,
    ``pooler_output``); tuples and lists are numbered (``output.0``, ``hidden_states.1``). ``None``
    fields are skipped, as ``ModelOutput`` itself does.
    """
    if isinstance(output, torch.Tensor):
        return [("logits" if kind == KIND_IMAGE and output.ndim == 2 else "output", output)]
    return _flatten(output, "")


def _flatten(value: object, name: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, Mapping):
        return [item for key, field in value.items() for item in _flatten(field, f"{name}.{key}" if name else key)]
    if isinstance(value, (tuple, list)):
        prefix = name or "output"
        return [item for i, field in enumerate(value) for item in _flatten(field, f"{prefix}.{i}")]
    return []


def dynamic_axes(inputs: dict[str, torch.Tensor], kind: str) -> dict[str, dict[int, str]]:
    """Axis names per input: axis 0 is the batch; axis 1 of a text input is the sequence."""
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in inputs.items():
        if tensor.ndim == 0:
            continue
        axes[name] = {0: BATCH_AXIS}
        if kind == KIND_TEXT and tensor.ndim >= 2:
            axes[name][1] = SEQUENCE_AXIS
    return axes


class _FlatForward(nn.Module):
    """The student with positional tensor inputs and a flat tuple of tensor outputs.

    Both exporters name graph inputs and outputs by position, so the kwargs become positions (in
    ``input_names`` order) and the output structure becomes a tuple (in ``flatten_outputs`` order).
    """

    def __init__(self, student: nn.Module, input_names: list[str], kind: str) -> None:
        super().__init__()
        self.student = student
        self.input_names = input_names
        self.kind = kind

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.student(**dict(zip(self.input_names, inputs, strict=True)))
        return tuple(tensor for _, tensor in flatten_outputs(output, self.kind))


class _ExporterFailed(Exception):
    """One exporter could not produce a usable file; the next one is tried."""


def write_onnx(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: str,
    *,
    kind: str,
    opset: int | None,
    external_data: bool,
    log: Callable[[str], None],
) -> ExportedFile:
    """Export ``model(**inputs)`` to ``path``: dynamo first, TorchScript when dynamo fails.

    Args:
        model: The student, in eval mode.
        inputs: Example forward kwargs.
        path: Where to write the ``.onnx`` file (``path + ".data"`` holds the weights when
            ``external_data``).
        kind: "image", "text" or "other".
        opset: ai.onnx opset, or None for the exporter's default.
        external_data: Write the weights to ``path + ".data"`` instead of inline.
        log: Receives one line per exporter attempt that failed.

    Returns:
        Which exporter wrote the file, and the graph's input and output names.

    Raises:
        ExportError: The model fails on ``inputs``, or neither exporter produced a file with the
            requested dynamic axes.
    """
    try:
        with torch.inference_mode():
            example = flatten_outputs(model(**inputs), kind)
    except Exception as e:  # the student's own code: any failure means the example inputs do not fit
        shapes = {name: list(tensor.shape) for name, tensor in inputs.items()}
        raise ExportError(f"{type(model).__name__} fails on the example inputs {shapes}: {e}") from e
    if not example:
        raise ExportError(f"{type(model).__name__} returns no tensors; ONNX export needs at least one tensor output")
    input_names = list(inputs)
    output_names = [name for name, _ in example]
    wrapper = _FlatForward(model, input_names, kind)
    args = tuple(inputs.values())
    axes = dynamic_axes(inputs, kind)
    failures: list[str] = []
    for exporter, export in ((EXPORTER_DYNAMO, _export_dynamo), (EXPORTER_TORCHSCRIPT, _export_torchscript)):
        try:
            # NOTE: the exporters warn (deprecation, tracer) and print graph dumps to stderr when they
            # fail; parity is checked afterwards and a failure is summarized in one line below.
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                export(wrapper, args, path, input_names, output_names, axes, opset, external_data)
            _require_dynamic(path, axes)
        except Exception as e:  # any exporter failure means: try the next one
            reason = f"{exporter} exporter failed: {_summary(e)}"
            log(reason)
            failures.append(reason)
            continue
        return ExportedFile(exporter, failures[0] if failures else None, input_names, output_names)
    raise ExportError(
        f"could not export {type(model).__name__} to ONNX (opset {opset or 'default'}): {'; '.join(failures)}; "
        "try another --opset, or check that the model runs under torch.export"
    )


def _export_dynamo(
    wrapper: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: str,
    input_names: list[str],
    output_names: list[str],
    axes: dict[str, dict[int, str]],
    opset: int | None,
    external_data: bool,
) -> None:
    # One entry for the *inputs parameter, holding one axes dict per input; names, not Dim objects
    # (see the module docstring).
    shapes = (tuple(axes.get(name) for name in input_names),)
    program = torch.onnx.export(
        wrapper,
        args,
        dynamo=True,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=shapes,
        opset_version=opset,
        verbose=False,
    )
    program.save(path, external_data=external_data)


def _export_torchscript(
    wrapper: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: str,
    input_names: list[str],
    output_names: list[str],
    axes: dict[str, dict[int, str]],
    opset: int | None,
    external_data: bool,
) -> None:
    torch.onnx.export(
        wrapper,
        args,
        path,
        dynamo=False,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=axes,
        opset_version=opset,
    )
    if external_data:
        # TorchScript writes one file per tensor beside `path` for large models; gather them into
        # the single `path.data` the dynamo exporter writes. Strays stay in the staging directory.
        onnx = import_onnx()
        onnx.save_model(
            onnx.load(path),
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=os.path.basename(path) + ".data",
        )


def _require_dynamic(path: str, axes: dict[str, dict[int, str]]) -> None:
    """Fail when an exporter turned a requested dynamic axis into a constant."""
    onnx = import_onnx()
    graph = onnx.load(path, load_external_data=False).graph
    static = []
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, axis_name in axes.get(value.name, {}).items():
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                static.append(f"{value.name} axis {axis} ({axis_name}) is fixed at {dims[axis].dim_value}")
    if static:
        raise _ExporterFailed("; ".join(static))


def _summary(error: Exception) -> str:
    """The informative line of an exporter error: torch's dynamo errors wrap it in advice text."""
    text = str(error)
    marker = "## Exception summary"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]
