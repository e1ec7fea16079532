"""The backend stage: export a student to ONNX, prove it computes the same function, make edge variants.

Outputs are checked before any work (``outputs.check_outputs``). Everything is then written to a
private staging directory beside ``onnx_path`` and moved into place (``outputs.atomic_output``) only
after export, parity check, variants and latency all succeeded: a file at ``onnx_path`` is always
complete and verified, and a failure leaves nothing behind. Whole files are staged, not written
under temporary names, because an ``.onnx`` refers to its ``.onnx.data`` by file name.

Weights stay inline in the one ``.onnx`` file unless they exceed what protobuf can hold; then they
go to ``<name>.onnx.data`` beside it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from wscompile.backend import latency as timing
from wscompile.backend.convert import KIND_TEXT, KINDS, write_onnx
from wscompile.backend.deps import import_onnx, import_onnxruntime
from wscompile.backend.results import ExportResult, Latency, VariantResult
from wscompile.backend.variants import FP16, INT8, agreement, variant_path, write_fp16, write_int8
from wscompile.backend.verify import (
    VERIFY_BATCH,
    MakeInputs,
    check_parity,
    example_seq_len,
    input_shapes,
    open_session,
    other_seq_len,
    run_session,
    run_torch,
)
from wscompile.errors import ExportError, OutputError, ValidationError
from wscompile.outputs import atomic_output, check_outputs

# Protobuf caps a serialized model at 2 GiB; leave room for the graph and constants the exporter folds.
EXTERNAL_DATA_ABOVE = 2**31 - 2**28
AGREEMENT_BATCH = 16  # samples for variant agreement: more than VERIFY_BATCH so top-1 is not in thirds


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
    calib: list[dict[str, torch.Tensor]] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    latency_runs: int = 20,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export a student to ONNX, verify it with onnxruntime, and optionally write fp16/int8 copies.

    The model is exported with dynamic batch axes (and a dynamic sequence axis for text), checked
    against PyTorch at batch 3 (and another sequence length), and timed at batch 1. Variants go
    beside the main file as ``<name>.fp16.onnx`` and ``<name>.int8.onnx``.

    Args:
        model: The student. Put in eval mode for the export; its mode is restored afterwards.
        inputs: Example forward kwargs at batch 1 (``model(**inputs)``); their names become the ONNX
            input names.
        make_inputs: ``make_inputs(batch, seq_len)`` builds real inputs of another size;
            ``seq_len`` is None except for text students.
        onnx_path: Where the fp32 model goes.
        kind: "image", "text" (adds a dynamic sequence axis) or "other".
        opset: ai.onnx opset; None for the exporter's default (20 on torch 2.14).
        fp16: Also write an fp16 copy.
        int8: Also write an int8 copy: dynamic quantization, or static when ``calib`` is given.
        calib: Calibration batches (forward kwargs) for static int8 quantization.
        atol: Absolute tolerance of the fp32 parity check.
        rtol: Relative tolerance of the fp32 parity check.
        latency_runs: Timed batch-1 runs per runtime after warm-up; 0 skips latency.
        force: Overwrite existing output files.
        log: Receives one progress line per step and per output.

    Returns:
        Paths, exporter, opset, sizes, parity checks, variant agreement and latency.

    Raises:
        OutputError: An output exists and ``force`` is False, or the directory is not writable.
        ExportError: Neither exporter produced a usable file, or a variant could not be made.
        ValidationError: The fp32 model does not reproduce the student; lists every failing output.
        MissingDependencyError: onnx or onnxruntime is not installed.
    """
    if kind not in KINDS:
        raise ExportError(f"unknown student kind {kind!r}; expected one of {', '.join(KINDS)}")
    import_onnx()
    import_onnxruntime()
    variants = [name for name, wanted in ((FP16, fp16), (INT8, int8)) if wanted]
    targets = [onnx_path] + [variant_path(onnx_path, name) for name in variants]
    check_outputs([path for target in targets for path in (target, target + ".data")], force=force)
    staging = _make_staging(onnx_path)
    was_training = model.training
    model.eval()
    try:
        result = _export_staged(
            model,
            inputs,
            make_inputs,
            onnx_path,
            staging,
            kind=kind,
            opset=opset,
            variants=variants,
            calib=calib,
            atol=atol,
            rtol=rtol,
            latency_runs=latency_runs,
            log=log,
        )
        _install(staging, targets, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        model.train(was_training)
    log(f"wrote {', '.join(targets)}")
    return result


def _export_staged(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    make_inputs: MakeInputs,
    onnx_path: str,
    staging: str,
    *,
    kind: str,
    opset: int | None,
    variants: list[str],
    calib: list[dict[str, torch.Tensor]] | None,
    atol: float,
    rtol: float,
    latency_runs: int,
    log: Callable[[str], None],
) -> ExportResult:
    """Every step of export_student, writing into ``staging`` under the final file names."""
    staged = _staged(staging, onnx_path)
    external_data = _weight_bytes(model) > EXTERNAL_DATA_ABOVE
    exported = write_onnx(model, inputs, staged, kind=kind, opset=opset, external_data=external_data, log=log)
    written_opset = _opset(staged)
    log(
        f"exported {onnx_path} with the {exported.exporter} exporter (opset {written_opset}, "
        f"{_mb(_size(staged))}, inputs {exported.input_names}, outputs {exported.output_names})"
    )

    seq_len = example_seq_len(inputs) if kind == KIND_TEXT else None
    check_seq_len = other_seq_len(seq_len) if seq_len is not None else None
    verify_inputs = make_inputs(VERIFY_BATCH, check_seq_len)
    session = open_session(staged)
    try:
        checks = check_parity(session, onnx_path, model, verify_inputs, kind=kind, atol=atol, rtol=rtol, log=log)
    except ValidationError as e:
        raise ValidationError(f"{e}; {onnx_path} was not written") from e

    variant_results, variant_sessions = [], []
    if variants:
        agreement_inputs = make_inputs(AGREEMENT_BATCH, check_seq_len)
        reference = run_torch(model, agreement_inputs, kind)
        for name in variants:
            variant, variant_session = _make_variant(
                name,
                staged,
                onnx_path,
                staging,
                agreement_inputs,
                reference,
                kind=kind,
                calib=calib,
                external_data=external_data,
                log=log,
            )
            variant_results.append(variant)
            variant_sessions.append(variant_session)
    measured = _measure_latency(model, inputs, session, variant_results, variant_sessions, latency_runs, log)
    return ExportResult(
        onnx_path=onnx_path,
        data_path=onnx_path + ".data" if external_data else None,
        exporter=exported.exporter,
        fallback_reason=exported.fallback_reason,
        opset=written_opset,
        input_names=exported.input_names,
        output_names=exported.output_names,
        size_bytes=_size(staged),
        verify_shapes=input_shapes(verify_inputs),
        checks=checks,
        variants=variant_results,
        latency=measured,
    )


def _make_variant(
    name: str,
    fp32_path: str,
    onnx_path: str,
    staging: str,
    agreement_inputs: dict[str, torch.Tensor],
    reference: list[tuple[str, np.ndarray]],
    *,
    kind: str,
    calib: list[dict[str, torch.Tensor]] | None,
    external_data: bool,
    log: Callable[[str], None],
) -> tuple[VariantResult, Any]:
    """Write one staged variant and measure its agreement; return it with its open session."""
    final = variant_path(onnx_path, name)
    path = _staged(staging, final)
    if name == FP16:
        method = write_fp16(fp32_path, path, external_data=external_data)
    else:
        method = write_int8(fp32_path, path, calib=calib, external_data=external_data)
    session = open_session(path)
    cosine, max_abs, top1 = agreement(run_session(session, agreement_inputs), reference, kind)
    variant = VariantResult(name, method, final, _size(path), cosine, max_abs, top1, ort_ms=None)
    log(
        f"{name} ({method}) {final}: {_mb(variant.size_bytes)}, cosine {cosine:.5f}, max abs diff {max_abs:.3g}"
        + (f", top-1 agreement {top1:.0%}" if top1 is not None else "")
    )
    return variant, session


def _measure_latency(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    session: Any,
    variants: list[VariantResult],
    variant_sessions: list[Any],
    runs: int,
    log: Callable[[str], None],
) -> Latency | None:
    """Batch-1 medians of PyTorch, the fp32 model and every variant (whose ``ort_ms`` is filled in)."""
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
        f"latency at batch 1, median of {runs} ({provider}): "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
    )
    return Latency(ort_ms=medians["onnxruntime"], torch_ms=medians["PyTorch eager"], runs=runs, provider=provider)


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
