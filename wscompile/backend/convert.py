"""PyTorch student -> one ONNX file, with named inputs/outputs and dynamic batch (and sequence) axes.

Exporter choice. ``torch.onnx.export(dynamo=True)`` is tried first: it is torch's default and
maintained exporter (torch.export graph, translated and optimized by onnxscript), it supports opsets
18+, and its graphs quantize cleanly. The deprecated TorchScript tracing exporter (``dynamo=False``,
opsets up to 20) is the last resort, and the reasons dynamo failed are kept in the result.

Attempts, in order (``export_attempts``); the first whose file runs at another shape wins:

1. dynamo, every axis dynamic (batch; and sequence for text);
2. dynamo, batch only dynamic (text students);
3. dynamo, static shapes at the user's ``batch_size`` and example shape: for models that fix a
   dimension in their code (window partitions, relative-position tables, ``view(1, ...)``);
4. TorchScript with the dynamic axes, then TorchScript static.

The example batch of a dynamic attempt is ``EXPORT_BATCH`` (2), never 1: torch.export specializes
sizes 0 and 1, so a batch-1 example let it bake the batch into ``Reshape`` shapes (timm CoAtNet,
PVTv2), and a named ``Dim`` failed outright ("Invalid ranges [2:1]", ConvNeXt).

Dynamic axes are given by *name* (strings, which ``torch.onnx.export`` turns into
``Dim.DYNAMIC``): torch.export then keeps the model's real constraints on them (a sequence no longer
than the position table) instead of refusing the export, and an axis it had to fix shows up as a
constant in the graph input, which ``_require_dynamic`` rejects.

Attention is traced with PyTorch's math backend of ``scaled_dot_product_attention``. With the
default (flash attention for CPU) the traced output has the layout of that kernel, so
``out.transpose(1, 2).reshape(B, N, C)`` is recorded as a ``view``; the ONNX exporter then
decomposes attention with the math layout and the view fails ("Cannot view a tensor with shape
[B, 17, 2, 32] and strides (1088, 32, 544, 1)": timm BEiT, ViT-relpos, anything passing an
``attn_mask``).

Mixture-of-experts students (transformers Mixtral, Qwen2-MoE) run their experts with
``grouped_mm`` by default, a custom op (``transformers::grouped_mm_fallback``) with no ONNX
translation; ``exportable_experts`` switches them to transformers' own ``batched_mm`` for the export
(a gather of each token's expert weights and a batched matmul: no data-dependent shapes, unlike
``eager``, which loops over the experts that were hit) and back afterwards.

Also found on torch 2.14: TorchScript deduplicates identical initializers, after which
onnxruntime's ``quantize_dynamic`` fails on ResNet ("Expected onnx::Conv_205 to be an
initializer"); dynamo takes 3-7 s per small model against 0.2 s for TorchScript.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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


class ExporterFailed(Exception):
    """One export attempt could not produce a usable file; the next one is tried."""


@dataclass
class Attempt:
    """One way to export: an exporter and the input axes it is asked to keep dynamic."""

    exporter: str  # EXPORTER_DYNAMO or EXPORTER_TORCHSCRIPT
    axes: dict[str, dict[int, str]]  # input name -> {axis: name}; empty: every shape static

    def describe(self) -> str:
        """``dynamo exporter (dynamic batch, sequence)`` or ``... (static shapes)``."""
        names = sorted({name for axes in self.axes.values() for name in axes.values()}, key=_AXIS_ORDER.index)
        shapes = f"dynamic {', '.join(names)}" if names else "static shapes"
        return f"{self.exporter} exporter ({shapes})"


_AXIS_ORDER = [BATCH_AXIS, SEQUENCE_AXIS]


def export_attempts(inputs: dict[str, torch.Tensor], kind: str) -> list[Attempt]:
    """The attempts of the module docstring, most dynamic first, TorchScript last."""
    every = dynamic_axes(inputs, kind)
    batch_only = {name: {axis: n for axis, n in axes.items() if n == BATCH_AXIS} for name, axes in every.items()}
    levels = [every] + ([batch_only] if batch_only != every else []) + [{}]
    dynamo = [Attempt(EXPORTER_DYNAMO, axes) for axes in levels]
    torchscript = [Attempt(EXPORTER_TORCHSCRIPT, axes) for axes in (every, {})]
    return dynamo + torchscript


def output_names(model: nn.Module, inputs: dict[str, torch.Tensor], kind: str) -> list[str]:
    """Names of the student's tensor outputs on ``inputs`` (see ``flatten_outputs``).

    Raises:
        ExportError: The model fails on ``inputs`` or returns no tensor.
    """
    try:
        with torch.inference_mode():
            example = flatten_outputs(model(**inputs), kind)
    except Exception as e:  # the student's own code: any failure means the example inputs do not fit
        shapes = {name: list(tensor.shape) for name, tensor in inputs.items()}
        raise ExportError(f"{type(model).__name__} fails on the example inputs {shapes}: {e}") from e
    if not example:
        raise ExportError(f"{type(model).__name__} returns no tensors; ONNX export needs at least one tensor output")
    return [name for name, _ in example]


def write_onnx(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: str,
    attempt: Attempt,
    *,
    kind: str,
    names: list[str],
    opset: int | None,
    external_data: bool,
) -> None:
    """Export ``model(**inputs)`` to ``path`` as ``attempt`` says.

    Args:
        model: The student, in eval mode.
        inputs: Example forward kwargs; their shapes are the static ones of the file.
        path: Where to write the ``.onnx`` file (``path + ".data"`` holds the weights when
            ``external_data``).
        attempt: The exporter and the axes to keep dynamic.
        kind: "image", "text" or "other".
        names: Output names, from ``output_names``.
        opset: ai.onnx opset, or None for the exporter's default.
        external_data: Write the weights to ``path + ".data"`` instead of inline.

    Raises:
        ExporterFailed: The exporter failed, or fixed an axis it was asked to keep dynamic.
    """
    input_names = list(inputs)
    wrapper = _FlatForward(model, input_names, kind)
    export = _export_dynamo if attempt.exporter == EXPORTER_DYNAMO else _export_torchscript
    try:
        # NOTE: the exporters warn (deprecation, tracer) and print graph dumps to stderr when they
        # fail; the caller summarizes a failure in one line.
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
            exportable_experts(model),
            sdpa_kernel([SDPBackend.MATH]),
        ):
            warnings.simplefilter("ignore")
            export(wrapper, tuple(inputs.values()), path, input_names, names, attempt.axes, opset, external_data)
    except Exception as e:  # any exporter failure means: try the next attempt
        raise ExporterFailed(_summary(e)) from e
    _require_dynamic(path, attempt.axes)


# transformers' experts implementations that torch.export captures without custom ops or
# data-dependent shapes; the first is the one switched to.
EXPORTABLE_EXPERTS = ("batched_mm",)


def experts_implementation(model: nn.Module) -> str | None:
    """The transformers MoE experts implementation ``exportable_experts`` exports with; None for others."""
    owner = _experts_owner(model)
    if owner is None:
        return None
    current = owner.config._experts_implementation
    return current if current in EXPORTABLE_EXPERTS else EXPORTABLE_EXPERTS[0]


@contextlib.contextmanager
def exportable_experts(model: nn.Module) -> Iterator[None]:
    """Run a transformers MoE model with an exportable experts implementation; restore it afterwards."""
    owner = _experts_owner(model)
    wanted = experts_implementation(model)
    if owner is None or wanted is None or owner.config._experts_implementation == wanted:
        yield
        return
    previous = owner.config._experts_implementation
    owner.set_experts_implementation(wanted)
    try:
        yield
    finally:
        owner.set_experts_implementation(previous)


def _experts_owner(model: nn.Module) -> nn.Module | None:
    """The outermost transformers model whose experts implementation can be chosen, if any."""
    for module in model.modules():
        can_set = getattr(type(module), "_can_set_experts_implementation", None)
        if can_set is not None and hasattr(module, "set_experts_implementation") and can_set():
            return module
    return None


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
        raise ExporterFailed("; ".join(static))


def _summary(error: Exception) -> str:
    """The informative line of an exporter error: torch's dynamo errors wrap it in advice text."""
    text = str(error)
    marker = "## Exception summary"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # A line ending in a colon introduces the details ("Found the following conflicts ...:").
    shown = lines[:2] if lines and lines[0].endswith(":") else lines[:1]
    return f"{type(error).__name__}: {' '.join(shown)}"[:500]
