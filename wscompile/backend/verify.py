"""Run an ONNX (or ``.ort``) file with onnxruntime and compare it with the PyTorch student.

Parity is checked on inputs of another shape than the export example (batch 3, and for text
another sequence length), so a batch or sequence size baked into the graph fails here rather than
on the device. An output passes when every element satisfies
``|onnx - torch| <= atol + rtol * |torch|`` (``torch.allclose``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from wscompile.backend.convert import KIND_TEXT, flatten_outputs
from wscompile.backend.deps import import_onnxruntime
from wscompile.backend.results import OutputCheck
from wscompile.errors import MissingDependencyError, ValidationError

VERIFY_BATCH = 3  # any size but the batch-1 export example

MakeInputs = Callable[[int, int | None], dict[str, torch.Tensor]]


def other_seq_len(seq_len: int) -> int:
    """A sequence length different from ``seq_len`` and no longer than it when it is over 2.

    Shorter keeps within position-embedding limits of a model exported at its maximum length.
    """
    return seq_len // 2 + 1 if seq_len > 2 else seq_len + 2


def example_seq_len(inputs: dict[str, torch.Tensor]) -> int | None:
    """Axis 1 of the first input with two or more axes: the sequence length of a text input."""
    return next((tensor.shape[1] for tensor in inputs.values() if tensor.ndim >= 2), None)


DEVICE_CPU = "cpu"
DEVICE_CUDA = "cuda"
DEVICES = (DEVICE_CPU, DEVICE_CUDA)
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def providers(device: str | None = None) -> list[str]:
    """onnxruntime execution providers for ``device``: CPU only, CUDA then CPU, or (None) CUDA when present.

    Raises:
        MissingDependencyError: ``device`` is "cuda" and this onnxruntime build has no CUDA provider.
    """
    if device not in (None, *DEVICES):
        raise ValueError(f"device must be one of {DEVICES} or None, got {device!r}")
    available = import_onnxruntime().get_available_providers()
    if device == DEVICE_CUDA and CUDA_PROVIDER not in available:
        raise MissingDependencyError(
            f"--device cuda needs onnxruntime's {CUDA_PROVIDER}, which this onnxruntime does not have (it has "
            f"{', '.join(available)}); install the gpu extra: `pip uninstall -y onnxruntime && "
            "pip install 'wscompile[gpu]'`, or pass --device cpu"
        )
    wanted = (CPU_PROVIDER,) if device == DEVICE_CPU else (CUDA_PROVIDER, CPU_PROVIDER)
    return [p for p in wanted if p in available]


def open_session(path: str, device: str | None = None) -> Any:
    """An onnxruntime ``InferenceSession`` on ``path`` (``.onnx`` or ``.ort``); load failures become ValidationError.

    The session gets PyTorch's thread budget (``torch.get_num_threads()``, the physical cores by
    default, as onnxruntime's own default), so latency comparisons run both with the same threads.
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: initializer-pruning warnings are noise here
    options.intra_op_num_threads = torch.get_num_threads()
    chosen = providers(device)
    try:
        return ort.InferenceSession(path, sess_options=options, providers=chosen)
    except Exception as e:  # onnxruntime raises its own unrelated exception types
        raise ValidationError(f"onnxruntime cannot load {path}: {e}") from e


def shape_problem(session: Any, model: nn.Module, inputs: dict[str, torch.Tensor], kind: str) -> str | None:
    """Why ``session`` cannot stand in for the student at the shapes of ``inputs``; None when it can.

    A run failure or an output of another shape means a size was baked into the graph, which
    another export attempt may avoid; wrong values at the right shapes are for ``check_parity``.
    """
    try:
        got = run_session(session, inputs)
    except ValidationError as e:
        return str(e.__cause__ or e).strip().splitlines()[0][:300]
    want = run_torch(model, inputs, kind)
    shapes = [(tuple(g.shape), tuple(w.shape)) for g, (_, w) in zip(got, want, strict=False)]
    wrong = [f"output {i} has shape {g}, expected {w}" for i, (g, w) in enumerate(shapes) if g != w]
    if len(got) != len(want):
        wrong.insert(0, f"{len(got)} outputs, expected {len(want)}")
    return "; ".join(wrong) or None


def run_session(session: Any, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Run ``session`` on the inputs it declares (exporters may drop unused ones)."""
    wanted = [i.name for i in session.get_inputs()]
    missing = [name for name in wanted if name not in inputs]
    if missing:
        raise ValidationError(
            f"the ONNX model needs inputs {missing} that the example inputs do not have (they have "
            f"{list(inputs)}); export and verify with the same input spec"
        )
    feeds = {name: inputs[name].detach().cpu().numpy() for name in wanted}
    try:
        return session.run(None, feeds)
    except Exception as e:  # onnxruntime raises its own unrelated exception types
        shapes = {name: list(feed.shape) for name, feed in feeds.items()}
        raise ValidationError(
            f"onnxruntime failed on inputs {shapes}: {e}; a batch or sequence axis was probably exported as fixed"
        ) from e


def run_torch(model: nn.Module, inputs: dict[str, torch.Tensor], kind: str) -> list[tuple[str, np.ndarray]]:
    """The student's named outputs, as float64 numpy arrays for comparison."""
    with torch.inference_mode():
        outputs = flatten_outputs(model(**inputs), kind)
    return [(name, tensor.detach().cpu().double().numpy()) for name, tensor in outputs]


def verify_onnx(
    onnx_path: str,
    model: nn.Module,
    make_inputs: MakeInputs,
    *,
    kind: str,
    batch: int = VERIFY_BATCH,
    seq_len: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> list[OutputCheck]:
    """Check that an ONNX file reproduces the PyTorch student on fresh inputs.

    Args:
        onnx_path: The ``.onnx`` file (its ``.onnx.data`` is found beside it).
        model: The PyTorch student, in eval mode.
        make_inputs: ``make_inputs(batch, seq_len)`` builds forward kwargs; ``seq_len`` None means
            the spec's default length.
        kind: "image", "text" or "other".
        batch: Batch size of the check; pick one other than the export example's. A file with a
            static batch is checked at its own.
        seq_len: Sequence length of the check for text students; None for the default. A file
            with a static sequence length is checked at its own.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        device: onnxruntime device, "cpu" or "cuda" (see ``providers``); None: CUDA when present.
        log: Receives one line per output.

    Returns:
        One check per output, all passing.

    Raises:
        ValidationError: Once, listing every output out of tolerance (or a load/run failure).
    """
    session = open_session(onnx_path, device)
    # A file exported with static shapes is checked at them (its first input's fixed axes).
    dims = session.get_inputs()[0].shape
    if dims and isinstance(dims[0], int):
        batch = dims[0]
    if kind == KIND_TEXT and len(dims) > 1 and isinstance(dims[1], int):
        seq_len = dims[1]
    inputs = make_inputs(batch, seq_len if kind == KIND_TEXT else None)
    return check_parity(session, onnx_path, model, inputs, kind=kind, atol=atol, rtol=rtol, log=log)


def check_parity(
    session: Any,
    label: str,
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    kind: str,
    atol: float,
    rtol: float,
    log: Callable[[str], None],
) -> list[OutputCheck]:
    """Compare an open onnxruntime session with the student on ``inputs``; see verify_onnx.

    ``label`` names the model in messages (the final path while the file is still staged).
    """
    got = run_session(session, inputs)
    want = run_torch(model, inputs, kind)
    names = [o.name for o in session.get_outputs()]
    where = f"{label} on inputs {input_shapes(inputs)}"
    if len(got) != len(want):
        raise ValidationError(
            f"{where}: ONNX has {len(got)} outputs {names}, the PyTorch student {len(want)} "
            f"{[name for name, _ in want]}; re-export the file from this student"
        )
    checks, failures = [], []
    for name, onnx_out, (_, torch_out) in zip(names, got, want, strict=True):
        check, problem = _compare(name, onnx_out, torch_out, atol, rtol)
        checks.append(check)
        log(
            f"parity {name} {tuple(check.shape)}: max abs diff {check.max_abs:.3g}, "
            f"max rel diff {check.max_rel:.3g} {'ok' if check.ok else 'FAIL'}"
        )
        if problem:
            failures.append(problem)
    if failures:
        raise ValidationError(
            f"{where} does not reproduce the PyTorch student (atol {atol:g}, rtol {rtol:g}): {'; '.join(failures)}; "
            "try another --opset, or raise --atol if the differences are rounding"
        )
    return checks


def _compare(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> tuple[OutputCheck, str | None]:
    """One output's check, and a message when it fails."""
    if got.shape != want.shape:
        check = OutputCheck(name, list(got.shape), float("inf"), float("inf"), False)
        return check, f"'{name}' has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    diff = np.abs(got.astype(np.float64) - want)
    magnitude = np.abs(want)
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / (magnitude + atol)).max(initial=0.0))
    # NaN compares False, so a NaN anywhere fails the check.
    ok = bool(np.all(diff <= atol + rtol * magnitude))
    check = OutputCheck(name, list(got.shape), max_abs, max_rel, ok)
    if ok:
        return check, None
    outside = int(np.count_nonzero(~(diff <= atol + rtol * magnitude)))
    return check, (
        f"'{name}' {tuple(got.shape)} max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g}, "
        f"{outside} of {diff.size} elements out of tolerance"
    )


def input_shapes(inputs: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Shape of every input, for messages and reports."""
    return {name: list(tensor.shape) for name, tensor in inputs.items()}
