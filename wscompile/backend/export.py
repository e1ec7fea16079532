"""The backend stage: export a student to ONNX, prove it computes the same function, make edge variants.

Outputs are checked before any work (``outputs.check_outputs``). Everything is then written to a
private staging directory beside ``onnx_path`` and moved into place (``outputs.atomic_output``) only
after export, parity check, variants and latency all succeeded: a file at ``onnx_path`` is always
complete and verified, and a failure leaves nothing behind. Whole files are staged, not written
under temporary names, because an ``.onnx`` refers to its ``.onnx.data`` by file name.

With ``optimize``, every file is replaced by onnxruntime's optimized graph before any check, and
with ``ort`` every file gets its mobile-format copy (``mobile.py``): what is checked is always
what is installed.

Weights stay inline in the one ``.onnx`` file unless they exceed what protobuf can hold; then they
go to ``<name>.onnx.data`` beside it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from wscompile.backend import latency as timing
from wscompile.backend.convert import (
    BATCH_AXIS,
    KIND_TEXT,
    KINDS,
    SEQUENCE_AXIS,
    Attempt,
    ExporterFailed,
    experts_implementation,
    export_attempts,
    output_names,
    write_onnx,
)
from wscompile.backend.deps import import_onnx, import_onnxruntime
from wscompile.backend.mobile import ort_paths, write_ort
from wscompile.backend.optimize import OPTIMIZATION_LEVELS, optimize_in_place
from wscompile.backend.results import ExportResult, Latency, OrtFile, VariantResult
from wscompile.backend.variants import FP16, INT8, agreement, variant_path, write_fp16, write_int8
from wscompile.backend.verify import (
    VERIFY_BATCH,
    MakeInputs,
    check_parity,
    example_seq_len,
    input_shapes,
    open_session,
    other_seq_len,
    providers,
    run_session,
    run_torch,
    shape_problem,
)
from wscompile.errors import ExportError, OutputError, ValidationError
from wscompile.outputs import atomic_output, check_outputs
from wscompile.progress import Progress

# Protobuf caps a serialized model at 2 GiB; leave room for the graph and constants the exporter folds.
EXTERNAL_DATA_ABOVE = 2**31 - 2**28
AGREEMENT_BATCH = 16  # samples for variant agreement: more than VERIFY_BATCH so top-1 is not in thirds
# Batch of the example a dynamic-batch export traces: not 0 or 1, which torch.export specializes (see convert).
EXPORT_BATCH = 2
FP32 = "fp32"  # OrtFile.name of the main file's copy


def export_student(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    make_inputs: MakeInputs,
    onnx_path: str,
    *,
    kind: str,
    opset: int | None = None,
    fp16: bool = False,
    int8: bool = False,
    ort: bool = False,
    optimize: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    calib: list[dict[str, torch.Tensor]] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    latency_runs: int = 20,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a student to ONNX, verify it with onnxruntime, and optionally write fp16/int8/.ort copies.

    The model is exported with dynamic batch axes (and a dynamic sequence axis for text) when it
    allows them, else with static shapes (see ``convert``), checked against PyTorch at batch 3 (and
    another sequence length) or at the static shape, and timed. Variants go beside the main file as
    ``<name>.fp16.onnx`` and ``<name>.int8.onnx``; with ``ort`` every file also gets its ``.ort``
    copy and ``.required_operators.config``, each checked again as written.

    Args:
        model: The student. Put in eval mode for the export; its mode is restored afterwards.
        inputs: Example forward kwargs (``model(**inputs)``), usually at batch 1; their names become
            the ONNX input names and their shapes the static ones when an axis cannot be dynamic.
        make_inputs: ``make_inputs(batch, seq_len)`` builds real inputs of another size;
            ``seq_len`` is None except for text students.
        onnx_path: Where the fp32 model goes.
        kind: "image", "text" (adds a dynamic sequence axis) or "other".
        opset: ai.onnx opset; None for the exporter's default (20 on torch 2.14).
        fp16: Also write an fp16 copy.
        int8: Also write an int8 copy: dynamic quantization, or static when ``calib`` is given.
        ort: Also write the ONNX Runtime mobile format of every file (``.ort`` and its operator config).
        optimize: onnxruntime graph optimizations applied to every file before saving: "basic" or
            "extended"; None for the exporter's graph as it is.
        device: onnxruntime device for checks and latency, "cpu" or "cuda"; None: CUDA when present.
        batch_size: The batch of a static-shape export; None for the batch of ``inputs``.
        calib: Calibration batches (forward kwargs) for static int8 quantization.
        atol: Absolute tolerance of the fp32 parity checks.
        rtol: Relative tolerance of the fp32 parity checks.
        latency_runs: Timed runs per runtime after warm-up; 0 skips latency.
        force: Overwrite existing output files.
        log: Receives one line per step and per output.
        progress: Says on stderr which step runs and how long each took; by default nothing.

    Returns:
        Paths, exporter, dynamic axes, opset, sizes, parity checks, variant agreement and latency.

    Raises:
        OutputError: An output exists and ``force`` is False, or the directory is not writable.
        ExportError: No export attempt produced a file that runs, or a variant could not be made.
        ValidationError: The fp32 model (or its ``.ort``) does not reproduce the student; lists
            every failing output.
        MissingDependencyError: onnx or onnxruntime is not installed, or has no CUDA provider for
            ``device="cuda"``.
    """
    if kind not in KINDS:
        raise ExportError(f"unknown student kind {kind!r}; expected one of {', '.join(KINDS)}")
    if optimize not in (None, *OPTIMIZATION_LEVELS):
        raise ExportError(f"unknown optimization {optimize!r}; expected one of {', '.join(OPTIMIZATION_LEVELS)}")
    if batch_size is not None and batch_size < 1:
        raise ExportError(f"batch size must be at least 1, got {batch_size}")
    import_onnx()
    import_onnxruntime()
    providers(device)  # fails before the export when the device is missing
    variants = [name for name, wanted in ((FP16, fp16), (INT8, int8)) if wanted]
    files = [onnx_path] + [variant_path(onnx_path, name) for name in variants]
    targets = files + ([path for file in files for path in ort_paths(file)] if ort else [])
    check_outputs([path for target in targets for path in (target, target + ".data")], force=force)
    staging = _make_staging(onnx_path)
    was_training = model.training
    model.eval()
    settings = _Settings(
        kind,
        opset,
        variants,
        ort,
        optimize,
        device,
        batch_size,
        calib,
        atol,
        rtol,
        latency_runs,
        progress or Progress(),
    )
    try:
        result = _export_staged(model, inputs, make_inputs, onnx_path, staging, settings, log)
        _install(staging, targets, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        model.train(was_training)
    log(f"wrote {', '.join(targets)}")
    return result


@dataclass
class _Settings:
    """The options of export_student that the steps after the output checks read."""

    kind: str
    opset: int | None
    variants: list[str]  # FP16 / INT8, in the order they are written
    ort: bool
    optimize: str | None
    device: str | None
    batch_size: int | None
    calib: list[dict[str, torch.Tensor]] | None
    atol: float
    rtol: float
    latency_runs: int
    progress: Progress  # a status line per step on stderr (when enabled)


@dataclass
class _Exported:
    """The attempt that produced a file which runs at another shape, and the inputs that go with it."""

    attempt: Attempt
    fallback_reason: str | None  # the earlier attempts' failures, "; "-joined
    export_inputs: dict[str, torch.Tensor]  # what the exporter traced
    verify_inputs: dict[str, torch.Tensor]  # parity inputs: another size on every dynamic axis
    agreement_inputs: list[dict[str, torch.Tensor]]  # AGREEMENT_BATCH samples, in batches the file accepts


def _export_staged(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    make_inputs: MakeInputs,
    onnx_path: str,
    staging: str,
    settings: _Settings,
    log: Callable[[str], None],
) -> ExportResult:
    """Every step of export_student, writing into ``staging`` under the final file names."""
    kind, device, progress = settings.kind, settings.device, settings.progress
    staged = _staged(staging, onnx_path)
    external_data = _weight_bytes(model) > EXTERNAL_DATA_ABOVE
    with progress.holding(f"exporting the student to ONNX ({onnx_path})", log) as step_log:
        names = output_names(model, inputs, kind)
        exported = _export_first_that_runs(model, inputs, make_inputs, staged, names, settings, external_data, step_log)
    written_opset = _opset(staged)
    log(
        f"exported {onnx_path} with the {exported.attempt.exporter} exporter (opset {written_opset}, "
        f"{_mb(_size(staged))}, inputs {list(inputs)}, outputs {names}); {_describe_shapes(exported)}"
    )

    variant_paths = {name: _staged(staging, variant_path(onnx_path, name)) for name in settings.variants}
    copies = " and ".join(settings.variants) + (" copy" if len(settings.variants) == 1 else " copies")
    with progress.stage(f"writing the {copies}" if settings.variants else None):
        methods = {name: _write_variant(name, staged, path, settings.calib, external_data)
                   for name, path in variant_paths.items()}  # fmt: skip
    if settings.optimize:
        with progress.stage(f"applying onnxruntime {settings.optimize} graph optimizations"):
            for path in [staged, *variant_paths.values()]:
                optimize_in_place(path, settings.optimize, device=device, external_data=external_data)
        log(f"applied onnxruntime {settings.optimize} graph optimizations to {len(variant_paths) + 1} file(s)")

    with progress.holding(f"checking {onnx_path} against PyTorch with onnxruntime", log) as step_log:
        session = open_session(staged, device)
        try:
            checks = check_parity(
                session,
                onnx_path,
                model,
                exported.verify_inputs,
                kind=kind,
                atol=settings.atol,
                rtol=settings.rtol,
                log=step_log,
            )
        except ValidationError as e:
            raise ValidationError(f"{e}; {onnx_path} was not written") from e

    variant_results, variant_sessions = [], []
    with progress.holding(f"comparing the {copies} with PyTorch" if settings.variants else None, log) as step_log:
        reference = _torch_batches(model, exported.agreement_inputs, kind)
        for name, path in variant_paths.items():
            variant_session = open_session(path, device)
            cosine, max_abs, top1 = agreement(_session_batches(variant_session, exported.agreement_inputs), reference,
                                              kind)  # fmt: skip
            final = variant_path(onnx_path, name)
            variant = VariantResult(name, methods[name], final, _size(path), cosine, max_abs, top1, ort_ms=None)
            step_log(
                f"{name} ({variant.method}) {final}: {_mb(variant.size_bytes)}, cosine {cosine:.5f}, "
                f"max abs diff {max_abs:.3g}" + (f", top-1 agreement {top1:.0%}" if top1 is not None else "")
            )
            variant_results.append(variant)
            variant_sessions.append(variant_session)

    ort_files = []
    if settings.ort:
        sources = [(FP32, staged, onnx_path)] + [(n, p, variant_path(onnx_path, n)) for n, p in variant_paths.items()]
        with progress.holding("writing and checking the .ort copies", log) as step_log:
            for name, path, final in sources:
                ort_files.append(_write_ort_copy(name, path, final, model, exported, reference, settings, step_log))
    latency_inputs = inputs if BATCH_AXIS in _axis_names(exported.attempt) else exported.export_inputs
    with progress.holding("timing PyTorch and onnxruntime" if settings.latency_runs > 0 else None, log) as step_log:
        measured = _measure_latency(
            model, latency_inputs, session, variant_results, variant_sessions, settings.latency_runs, step_log
        )
    return ExportResult(
        onnx_path=onnx_path,
        data_path=onnx_path + ".data" if external_data else None,
        exporter=exported.attempt.exporter,
        fallback_reason=exported.fallback_reason,
        opset=written_opset,
        input_names=list(inputs),
        output_names=names,
        size_bytes=_size(staged),
        dynamic_axes=exported.attempt.axes,
        export_shapes=input_shapes(exported.export_inputs),
        verify_shapes=input_shapes(exported.verify_inputs),
        checks=checks,
        variants=variant_results,
        ort_files=ort_files,
        optimization=settings.optimize,
        experts_implementation=experts_implementation(model),
        latency=measured,
    )


def _export_first_that_runs(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    make_inputs: MakeInputs,
    staged: str,
    names: list[str],
    settings: _Settings,
    external_data: bool,
    log: Callable[[str], None],
) -> _Exported:
    """Try ``export_attempts`` in order; keep the first file that runs at the verify shapes."""
    kind = settings.kind
    seq_len = example_seq_len(inputs) if kind == KIND_TEXT else None
    example_batch = _batch_of(inputs)
    static_batch = settings.batch_size or example_batch
    failures: list[str] = []
    for attempt in export_attempts(inputs, kind):
        dynamic = _axis_names(attempt)
        if not dynamic and static_batch == example_batch:
            export_inputs = inputs
        else:
            export_inputs = make_inputs(EXPORT_BATCH if BATCH_AXIS in dynamic else static_batch, seq_len)
        verify_batch = VERIFY_BATCH if BATCH_AXIS in dynamic else static_batch
        verify_seq = other_seq_len(seq_len) if seq_len is not None and SEQUENCE_AXIS in dynamic else seq_len
        verify_inputs = make_inputs(verify_batch, verify_seq)
        try:
            write_onnx(model, export_inputs, staged, attempt, kind=kind, names=names, opset=settings.opset,
                       external_data=external_data)  # fmt: skip
            problem = shape_problem(open_session(staged, settings.device), model, verify_inputs, kind)
        except (ExporterFailed, ValidationError) as e:
            problem = str(e)
        if problem is None:
            agreement_inputs = _batches(make_inputs, AGREEMENT_BATCH, verify_batch, BATCH_AXIS in dynamic, verify_seq)
            reason = "; ".join(failures) or None
            return _Exported(attempt, reason, export_inputs, verify_inputs, agreement_inputs)
        failures.append(f"{attempt.describe()} failed: {problem}")
        log(failures[-1])
        _remove(staged)
    raise ExportError(
        f"could not export {type(model).__name__} to ONNX (opset {settings.opset or 'default'}): "
        f"{'; '.join(failures)}; try another --opset, or check that the model runs under torch.export"
    )


def _batches(
    make_inputs: MakeInputs, samples: int, batch: int, dynamic_batch: bool, seq_len: int | None
) -> list[dict[str, torch.Tensor]]:
    """``samples`` inputs in one batch when the batch is dynamic, else in batches of the static size."""
    if dynamic_batch:
        return [make_inputs(samples, seq_len)]
    return [make_inputs(batch, seq_len) for _ in range(-(-samples // batch))]


def _session_batches(session: Any, batches: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
    """A session's outputs over several batches, concatenated along the batch axis."""
    runs = [run_session(session, batch) for batch in batches]
    return [np.concatenate(parts) if parts[0].ndim else parts[0] for parts in zip(*runs, strict=True)]


def _torch_batches(model: nn.Module, batches: list[dict[str, torch.Tensor]], kind: str) -> list[tuple[str, np.ndarray]]:
    """The student's named outputs over several batches, concatenated along the batch axis."""
    runs = [run_torch(model, batch, kind) for batch in batches]
    return [
        (parts[0][0], np.concatenate([a for _, a in parts]) if parts[0][1].ndim else parts[0][1])
        for parts in zip(*runs, strict=True)
    ]


def _write_variant(
    name: str, fp32_path: str, path: str, calib: list[dict[str, torch.Tensor]] | None, external_data: bool
) -> str:
    """Write one staged variant from the staged fp32 file; return how it was made."""
    if name == FP16:
        return write_fp16(fp32_path, path, external_data=external_data)
    return write_int8(fp32_path, path, calib=calib, external_data=external_data)


def _write_ort_copy(
    name: str,
    path: str,
    final: str,
    model: nn.Module,
    exported: _Exported,
    reference: list[tuple[str, np.ndarray]],
    settings: _Settings,
    log: Callable[[str], None],
) -> OrtFile:
    """Convert one staged file to ``.ort`` and check the copy: fp32 against the parity tolerance."""
    staged_ort, _ = write_ort(path)
    ort_path, config_path = ort_paths(final)
    session = open_session(staged_ort, settings.device)
    if name == FP32:
        try:
            check_parity(
                session, ort_path, model, exported.verify_inputs, kind=settings.kind, atol=settings.atol,
                rtol=settings.rtol, log=lambda line: log(f"{os.path.basename(ort_path)} {line}"),
            )  # fmt: skip
        except ValidationError as e:
            raise ValidationError(f"{e}; nothing was written") from e
    cosine, max_abs, _ = agreement(_session_batches(session, exported.agreement_inputs), reference, settings.kind)
    copy = OrtFile(name, ort_path, config_path, os.path.getsize(staged_ort), cosine, max_abs)
    log(f"{name} .ort {ort_path} (+ {os.path.basename(config_path)}): {_mb(copy.size_bytes)}, cosine {cosine:.5f}, "
        f"max abs diff {max_abs:.3g}")  # fmt: skip
    return copy


def _axis_names(attempt: Attempt) -> set[str]:
    return {name for axes in attempt.axes.values() for name in axes.values()}


def _describe_shapes(exported: _Exported) -> str:
    """``dynamic axes x[0] batch`` or ``static shapes x [1, 3, 64, 64]``, with what else is fixed."""
    shapes = input_shapes(exported.export_inputs)
    dynamic = [f"{name}[{axis}] {axis_name}" for name, axes in exported.attempt.axes.items()
               for axis, axis_name in axes.items()]  # fmt: skip
    fixed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
    if not dynamic:
        return f"static shapes {fixed} (this model fixes a dimension; --batch-size and --input-shape choose them)"
    return f"dynamic axes {', '.join(dynamic)}, other axes as in {fixed}"


def _remove(path: str) -> None:
    """Drop a failed attempt's file and its weights, so the next attempt starts clean."""
    for stale in (path, path + ".data"):
        if os.path.exists(stale):
            os.remove(stale)


def _measure_latency(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    session: Any,
    variants: list[VariantResult],
    variant_sessions: list[Any],
    runs: int,
    log: Callable[[str], None],
) -> Latency | None:
    """Medians of PyTorch, the fp32 model and every variant (whose ``ort_ms`` is filled in) on ``inputs``."""
    if runs <= 0:
        return None
    runners = {"PyTorch eager": timing.torch_runner(model, inputs), "onnxruntime": timing.ort_runner(session, inputs)}
    for variant, variant_session in zip(variants, variant_sessions, strict=True):
        runners[f"onnxruntime {variant.name}"] = timing.ort_runner(variant_session, inputs)
    medians = timing.medians_ms(runners, runs)
    for variant in variants:
        variant.ort_ms = medians[f"onnxruntime {variant.name}"]
    provider = session.get_providers()[0]
    log(
        f"latency at batch {_batch_of(inputs)}, median of {runs} ({provider}): "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
    )
    return Latency(ort_ms=medians["onnxruntime"], torch_ms=medians["PyTorch eager"], runs=runs, provider=provider)


def _batch_of(inputs: dict[str, torch.Tensor]) -> int:
    return next((int(t.shape[0]) for t in inputs.values() if t.ndim > 0), 1)


def _make_staging(onnx_path: str) -> str:
    """A private directory beside the output, so moving files into place never crosses filesystems."""
    directory = os.path.dirname(os.path.abspath(onnx_path))
    try:
        return tempfile.mkdtemp(prefix=f".{os.path.basename(onnx_path)}.", dir=directory)
    except OSError as e:
        raise OutputError(f"cannot write to directory '{directory}': {e.strerror}; choose another output path") from e


def _staged(staging: str, final: str) -> str:
    return os.path.join(staging, os.path.basename(final))


def _install(staging: str, targets: list[str], force: bool) -> None:
    """Move staged files into place; with force, drop a stale ``.data`` the new file does not use."""
    for target in targets:
        staged = _staged(staging, target)
        # The weights first: an installed .onnx must never point at a missing or old .data file.
        if os.path.exists(staged + ".data"):
            _move(staged + ".data", target + ".data", force)
        elif os.path.exists(target + ".data"):
            os.remove(target + ".data")
        _move(staged, target, force)


def _move(staged: str, target: str, force: bool) -> None:
    with atomic_output(target, force=force) as temp:
        os.replace(staged, temp)


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, shared tensors counted once."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())


def _opset(path: str) -> int:
    onnx = import_onnx()
    imports = onnx.load(path, load_external_data=False).opset_import
    return next(entry.version for entry in imports if entry.domain in ("", "ai.onnx"))


def _size(path: str) -> int:
    """Bytes of an ONNX file plus its external data file, if any."""
    data = path + ".data"
    return os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"
