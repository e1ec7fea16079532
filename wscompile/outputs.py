"""Atomic, non-destructive output files.

Outputs are checked before any expensive work (``check_outputs``), then each is written to a hidden
temporary file in its target directory and renamed over the target only once complete
(``atomic_output``): an interrupted run leaves either the old file or the new one, never half of
one, and never a stray temporary. An existing file is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from wscompile.errors import OutputError

PathLike = str | os.PathLike[str]


def check_output(path: PathLike, *, force: bool) -> Path:
    """Check that ``path`` can be written, before any expensive work.

    Raises:
        OutputError: it exists and ``force`` is False, is a directory, or its parent directory
            is missing, not a directory or not writable.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"'{path}' is a directory; give a file path")
    if target.exists() and not force:
        raise OutputError(f"'{path}' exists; pass --force to overwrite it")
    parent = target.parent
    if not parent.exists():
        raise OutputError(f"directory '{parent}' of '{path}' does not exist; create it first (mkdir -p '{parent}')")
    if not parent.is_dir():
        raise OutputError(f"'{parent}' in '{path}' is not a directory; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"directory '{parent}' is not writable; choose another output path or fix its permissions")
    return target


def check_outputs(paths: Iterable[PathLike | None], *, force: bool) -> list[Path]:
    """Check several outputs together; ``None`` entries (outputs not asked for) are skipped.

    Returns:
        The checked paths, in order.

    Raises:
        OutputError: one message listing every problem, including two outputs that name the
            same file.
    """
    checked: list[Path] = []
    problems: list[str] = []
    seen: dict[Path, PathLike] = {}
    for path in paths:
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            problems.append(f"outputs '{seen[resolved]}' and '{path}' are the same file; give each its own path")
            continue
        seen[resolved] = path
        try:
            checked.append(check_output(path, force=force))
        except OutputError as e:
            problems.append(str(e))
    if problems:
        raise OutputError("; ".join(problems))
    return checked


@contextmanager
def atomic_output(path: PathLike, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block succeeds.

    The caller writes the whole file to the yielded path. On success it is flushed to disk and
    renamed over ``path`` (atomic on POSIX); on any exception, KeyboardInterrupt included, it is
    deleted and the exception re-raised, leaving ``path`` as it was.

    Raises:
        OutputError: as ``check_output``, or nothing was written to the temporary path, or
            ``path`` appeared meanwhile and ``force`` is False.
    """
    target = check_output(path, force=force)
    temp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield temp
        if not temp.is_file():
            raise OutputError(f"nothing was written for '{path}'")
        _fsync(temp)
        # Checked again: another process may have created the file while this one was working.
        if target.exists() and not force:
            raise OutputError(f"'{path}' exists; pass --force to overwrite it")
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    # NOTE: makes the rename itself durable; directories cannot be opened for fsync on Windows.
    if os.name == "posix":
        _fsync(directory)


def write_json(path: PathLike, obj: Any, *, force: bool) -> None:
    """Write ``obj`` as JSON (sorted keys, indent 2, trailing newline), atomically."""
    text = json.dumps(obj, sort_keys=True, indent=2) + "\n"
    with atomic_output(path, force=force) as temp:
        temp.write_text(text, encoding="utf-8")


def save_safetensors(
    path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, force: bool
) -> None:
    """Save tensors as safetensors, atomically; the same input gives the same bytes.

    Tensors are moved to the CPU and made contiguous; tensors sharing memory (tied weights) are
    cloned, since safetensors stores each one separately.
    """
    data = safetensors_bytes(_standalone(tensors), metadata=metadata)
    with atomic_output(path, force=force) as temp:
        temp.write_bytes(_sorted_header(data))


def _standalone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            tensor = tensor.clone()
        elif storage:
            storages.add(storage)
        out[key] = tensor
    return out


def _sorted_header(data: bytes) -> bytes:
    """``data`` with its JSON header re-serialized with sorted keys.

    NOTE: safetensors writes ``__metadata__`` from a hash map whose order changes from run to run.
    """
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes to align the data
    return len(text).to_bytes(8, "little") + text + data[8 + header_len :]
