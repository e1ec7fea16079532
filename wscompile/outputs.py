"""Atomic, non-destructive output files.

Outputs are checked before any expensive work (``check_outputs``), then each is written to a hidden
temporary file in its target directory and renamed over the target only once complete
(``atomic_output``): an interrupted run leaves either the old file or the new one, never half of
one. An exception or Ctrl-C deletes the temporary; a process killed outright (SIGKILL, power loss)
cannot, so the next write of the same target deletes temporaries whose process is gone. An
existing file is replaced only with ``force``, and never one the run reads (``check_not_inputs``).
A write that fails for a reason the user can fix (disk full, a target that cannot be replaced) is
an ``OutputError`` naming the file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save as safetensors_bytes

from wscompile.errors import OutputError

PathLike = str | os.PathLike[str]

# Temporaries older than this process and named after a dead process are left by a killed run.
_PROCESS_START = time.time()


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


def check_not_inputs(
    outputs: Iterable[tuple[str, PathLike | None]], inputs: Iterable[tuple[str, PathLike | None]]
) -> None:
    """Refuse outputs that would overwrite a file or folder the run reads, ``force`` or not.

    An output overlaps an input when it is the input, lies inside an input folder (a model folder, an
    image folder), or is a folder holding the input. Paths are compared resolved (symlinks) and by
    device and inode (hard links, bind mounts). ``None`` paths (not asked for) are skipped.

    Args:
        outputs: (option, path) of each output, e.g. ``("--out", "student.safetensors")``.
        inputs: (what, path) of each input, e.g. ``("--teacher-weights", "teacher.safetensors")``.

    Raises:
        OutputError: one message naming every overlapping pair.
    """
    read = [(what, path, _identities(path)) for what, path in inputs if path is not None]
    problems = []
    for option, output in outputs:
        if output is None:
            continue
        written = _identities(output)
        for what, path, identities in read:
            if _inside(written, identities):
                relation = "is" if _same(written[0], identities[0]) else "is inside"
            elif _inside(identities, written):
                relation = "holds"
            else:
                continue
            problems.append(f"{option} '{output}' {relation} {what} '{path}', which this run reads")
            break  # one input per output is enough to say why
    if problems:
        raise OutputError(
            "; ".join(problems) + "; an input is never overwritten, even with --force: choose another output path"
        )


# A path's identity: its resolved form, and its (st_dev, st_ino) when it exists.
_Identity = tuple[Path, tuple[int, int] | None]


def _identities(path: PathLike) -> list[_Identity]:
    """Identities of ``path`` and of each folder above it, innermost first."""
    resolved = Path(path).resolve()
    found = []
    for each in (resolved, *resolved.parents):
        try:
            stat = os.stat(each)
            found.append((each, (stat.st_dev, stat.st_ino)))
        except OSError:
            found.append((each, None))
    return found


def _same(a: _Identity, b: _Identity) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def _inside(path: list[_Identity], folder: list[_Identity]) -> bool:
    """Whether ``path`` (its identities) is ``folder`` or lies under it."""
    return any(_same(each, folder[0]) for each in path)


@contextmanager
def atomic_output(path: PathLike, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block succeeds.

    The caller writes the whole file to the yielded path. On success it is flushed to disk and
    renamed over ``path`` (atomic on POSIX); on any exception, KeyboardInterrupt included, it is
    deleted and the exception re-raised, leaving ``path`` as it was.

    Raises:
        OutputError: as ``check_output``, or nothing was written to the temporary path, or
            ``path`` appeared meanwhile and ``force`` is False, or writing failed for a reason the
            user can fix (``_write_problem``: the disk is full, the target cannot be replaced).
    """
    target = check_output(path, force=force)
    _remove_stale_temps(target)
    temp = target.parent / f"{_temp_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield temp
        if not temp.is_file():
            raise OutputError(f"nothing was written for '{path}'")
        _fsync(temp)
        # Checked again: another process may have created the file while this one was working.
        if target.exists() and not force:
            raise OutputError(f"'{path}' exists; pass --force to overwrite it")
        os.replace(temp, target)
    except BaseException as e:
        temp.unlink(missing_ok=True)
        problem = _write_problem(e, path)
        if problem is None:
            raise
        raise problem from e
    _fsync_directory(target.parent)


def _write_problem(error: BaseException, path: PathLike) -> OutputError | None:
    """The one-line ``OutputError`` for an ``OSError`` raised while writing ``path``, or None when
    the error is not about the output (a bug, or a problem reading an input)."""
    if not isinstance(error, OSError) or isinstance(error, OutputError):
        return None
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"no space left on device writing '{path}'; free space or choose another output path "
            "(--out, --manifest, --report, --onnx)"
        )
    if error.errno == errno.EROFS:
        return OutputError(f"'{path}' is on a read-only file system; choose another output path")
    if error.errno == errno.EFBIG:
        return OutputError(
            f"'{path}' is larger than the file system allows; choose another output path "
            "(or, for --out, a folder ending in '/', written in shards)"
        )
    if isinstance(error, PermissionError):
        return OutputError(
            f"cannot write or replace '{path}' ({error.strerror}); it or its folder is read-only or "
            "immutable (chattr +i): fix its permissions or choose another output path"
        )
    return None


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _remove_stale_temps(target: Path) -> None:
    """Delete temporaries of ``target`` left by killed runs.

    A temporary is stale when the process id in its name is not running and it was last written
    before this process started; another run still writing the same target is never disturbed.
    """
    prefix = _temp_prefix(target)
    for name in os.listdir(target.parent):
        pid = name[len(prefix) :].partition("-")[0]
        if not name.startswith(prefix) or not pid.isdigit() or _process_running(int(pid)):
            continue
        stale = target.parent / name
        try:
            if stale.stat().st_mtime < _PROCESS_START:
                stale.unlink()
        except OSError:
            pass  # removed meanwhile, or not ours to remove: harmless either way


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user
    return True


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
    header, body = _sorted_header(data)
    with atomic_output(path, force=force) as temp, open(temp, "wb") as fh:
        fh.write(header)
        fh.write(body)


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


def _sorted_header(data: bytes) -> tuple[bytes, memoryview]:
    """``data``'s length prefix and JSON header re-serialized with sorted keys, and the rest of it.

    The tensor bytes are returned as a view, not copied: they are as large as the student.
    NOTE: safetensors writes ``__metadata__`` from a hash map whose order changes from run to run.
    """
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return _encode_header(header), memoryview(data)[8 + header_len :]


def _encode_header(header: dict[str, Any]) -> bytes:
    """Length prefix and JSON header with sorted keys, as ``save_safetensors`` writes them."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes to align the data
    return len(text).to_bytes(8, "little") + text


# Student tensors to write, by name: (shape, dtype).
Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]
# Files in a Hugging Face style output directory.
SINGLE_FILE = "model.safetensors"
SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
WEIGHTS_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
# Files a model folder's library reads besides the weights: tokenizers, processors, feature
# extractors and image processors (copied from an hf: teacher directory), plus what wscompile
# writes itself (configs, sentence-transformers module lists).
PREPROCESSING_FILES = re.compile(
    r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)"
    r"|merges\.txt|spiece\.model|tokenizer\.model|sentencepiece\.bpe\.model|\w*\.spm|bpe\.codes"
    r"|(preprocessor|processor|feature_extractor|image_processor|video_preprocessor)_config\.json"
    r"|chat_template\.(jinja|json)"
)
FOLDER_FILES = re.compile(
    rf"{PREPROCESSING_FILES.pattern}|config\.json|generation_config\.json|modules\.json"
    r"|config_sentence_transformers\.json|sentence_bert_config\.json"
)
# A sentence-transformers module folder: "1_Pooling", "2_Normalize".
MODULE_DIR = re.compile(r"\d+_[A-Za-z]\w*")


def stream_safetensors(
    path: PathLike,
    layout: Layout,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    *,
    force: bool,
) -> None:
    """Write tensors to one safetensors file as they are produced, atomically.

    The header is written first, from ``layout``; each tensor is then written at its offset when
    it arrives, in any order, and dropped, so at most one is in memory. The file is byte-identical
    to ``save_safetensors`` on the same tensors.

    Raises:
        OutputError: as ``atomic_output``.
        ValueError: ``tensors`` does not yield exactly the tensors of ``layout``.
    """
    with atomic_output(path, force=force) as temp:
        _stream_files({temp: layout}, tensors, metadata)


def stream_safetensors_dir(
    path: PathLike,
    layout: Layout,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    *,
    force: bool,
    max_shard_size: int,
    files: dict[str, bytes] | None = None,
) -> list[str]:
    """Write a Hugging Face style weights directory as tensors are produced, atomically.

    One ``model.safetensors`` when the tensors take at most ``max_shard_size`` bytes; otherwise
    shards of at most that size (a larger tensor gets a shard of its own), in ``layout`` order, and
    ``model.safetensors.index.json`` naming each tensor's shard. ``files`` (relative path ->
    contents: configs, tokenizer files, ``1_Pooling/config.json``) are written next to them.
    Everything is written into a temporary directory renamed onto ``path`` at the end.

    Returns:
        The file names written, shards first, then the index and ``files`` in sorted order.
    """
    shards = _split(layout, max_shard_size)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [SHARD_FILE.format(index=i + 1, count=len(shards)) for i in range(len(shards))]
    )
    with atomic_output_dir(path, force=force) as temp:
        _stream_files({temp / name: shard for name, shard in zip(names, shards, strict=True)}, tensors, metadata)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(_nbytes(shape, dtype) for shape, dtype in layout.values())},
                "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in shard},
            }
            (temp / SHARD_INDEX).write_text(json.dumps(index, sort_keys=True, indent=2) + "\n", encoding="utf-8")
            names.append(SHARD_INDEX)
        for name, contents in sorted((files or {}).items()):
            target = temp / name
            # NOTE: names come from wscompile itself, never from a file it read; checked anyway.
            if not target.resolve().is_relative_to(temp.resolve()) or name in names:
                raise ValueError(f"output folder file {name!r} is outside the folder or written twice")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(contents)
            names.append(name)
    return names


def safetensors_header(layout: Layout, metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The header ``save_safetensors`` writes for tensors of these shapes and dtypes, and where in
    the file each tensor's bytes start.

    NOTE: safetensors orders the data by dtype, then name; the order and the dtype names are asked
    of the installed library with one-element stand-ins rather than copied from its source.
    """
    stand_ins = safetensors_bytes({key: torch.zeros(1, dtype=dtype) for key, (_, dtype) in layout.items()})
    stand_in_header = json.loads(stand_ins[8 : 8 + int.from_bytes(stand_ins[:8], "little")])
    order = sorted(layout, key=lambda key: stand_in_header[key]["data_offsets"][0])
    header: dict[str, Any] = {"__metadata__": metadata}
    end = 0
    for key in order:
        shape, dtype = layout[key]
        start, end = end, end + _nbytes(shape, dtype)
        header[key] = {"dtype": stand_in_header[key]["dtype"], "shape": list(shape), "data_offsets": [start, end]}
    encoded = _encode_header(header)
    return encoded, {key: len(encoded) + header[key]["data_offsets"][0] for key in layout}


def is_directory_output(path: PathLike) -> bool:
    """Whether ``path`` names an output directory: it ends in a path separator or is one."""
    return str(path).endswith(("/", os.sep)) or Path(path).is_dir()


def check_output_dir(path: PathLike, *, force: bool) -> Path:
    """Check that the directory ``path`` can be written: created, an empty one filled, or, with
    ``force``, one holding only weights files wscompile writes replaced.

    Raises:
        OutputError: it is a file, it holds other files, it holds weights and ``force`` is False,
            or its parent cannot be written.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"'{path}' is a file; give a directory (ending in '/') or a .safetensors path")
    if not target.exists():
        return check_output(target, force=force)
    others = sorted(child.name for child in target.iterdir() if not _written_by_wscompile(child))
    if others:
        raise OutputError(
            f"'{path}' holds files wscompile did not write ({', '.join(others[:3])}); give a new or empty directory"
        )
    if any(target.iterdir()) and not force:
        raise OutputError(f"'{path}' exists; pass --force to replace it")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"directory '{target.parent}' is not writable; choose another output path or fix its permissions"
        )
    return target


def _written_by_wscompile(child: Path) -> bool:
    """Whether ``child`` of an output folder has a name wscompile writes there (weights, configs,
    files copied from the teacher, sentence-transformers module folders holding only configs)."""
    if child.is_dir() and not child.is_symlink():
        return bool(MODULE_DIR.fullmatch(child.name)) and all(
            grandchild.name == "config.json" and grandchild.is_file() for grandchild in child.iterdir()
        )
    return child.is_file() and bool(WEIGHTS_FILES.fullmatch(child.name) or FOLDER_FILES.fullmatch(child.name))


@contextmanager
def atomic_output_dir(path: PathLike, *, force: bool) -> Iterator[Path]:
    """``atomic_output`` for a directory: yield an empty temporary directory, rename it onto ``path``.

    With ``force`` an existing ``path`` is moved aside, replaced and then deleted.
    """
    target = check_output_dir(path, force=force)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    temp = target.parent / f".{target.name}.tmp-{token}"
    temp.mkdir()
    try:
        yield temp
        for child in sorted(temp.rglob("*")):
            _fsync(child)
        old = None
        if target.exists():
            check_output_dir(path, force=force)  # again: it may have changed while this process worked
            old = target.parent / f".{target.name}.old-{token}"
            os.replace(target, old)
        try:
            os.replace(temp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
    except BaseException as e:
        shutil.rmtree(temp, ignore_errors=True)
        problem = _write_problem(e, path)
        if problem is None:
            raise
        raise problem from e
    _fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _stream_files(
    files: dict[Path, Layout], tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str]
) -> None:
    """Write each file's header, then every tensor at its offset in its file, as they arrive."""
    where: dict[str, tuple[BinaryIO, int, tuple[tuple[int, ...], torch.dtype]]] = {}
    with ExitStack() as stack:
        for path, layout in files.items():
            header, offsets = safetensors_header(layout, metadata)
            fh = stack.enter_context(open(path, "wb"))
            fh.write(header)
            fh.truncate(len(header) + sum(_nbytes(shape, dtype) for shape, dtype in layout.values()))
            where.update({key: (fh, offsets[key], layout[key]) for key in layout})
        written: set[str] = set()
        for key, tensor in tensors:
            if key not in where or key in written:
                raise ValueError(f"tensor {key!r} is {'written twice' if key in written else 'not in the layout'}")
            fh, offset, (shape, dtype) = where[key]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"tensor {key!r} is {tuple(tensor.shape)} {tensor.dtype}, the layout says {shape} {dtype}"
                )
            fh.seek(offset)
            fh.write(_as_bytes(tensor))
            written.add(key)
        missing = where.keys() - written
        if missing:
            raise ValueError(f"{len(missing)} tensor(s) of the layout were never written, e.g. {min(missing)!r}")


def _split(layout: Layout, max_shard_size: int) -> list[Layout]:
    """``layout`` cut into consecutive runs of at most ``max_shard_size`` bytes (at least one tensor each)."""
    shards: list[Layout] = [{}]
    size = 0
    for key, (shape, dtype) in layout.items():
        nbytes = _nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = (shape, dtype)
        size += nbytes
    return shards


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order, without copying a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
