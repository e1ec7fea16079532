"""Teacher tensors, read lazily.

Nothing in wscompile assumes the whole teacher is in memory: passes ask a ``TensorSource`` for one
tensor at a time, with the indices they need along each axis, so a file-backed source can read only
those elements (safetensors ``get_slice``) and a module-backed source just indexes its tensors.

``open_weights`` opens any supported weights file or Hugging Face directory as a source: a single
``.safetensors`` file, a sharded ``*.safetensors.index.json``, or a PyTorch checkpoint
(``.pt/.pth/.bin/.ckpt``, sharded ``pytorch_model.bin.index.json``). File sources count the bytes
they read in ``bytes_read``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import nn

from wscompile.errors import SpecError

# One entry per axis: None for the whole axis, or the teacher indices to keep (ascending).
AxisIndex = Sequence[int] | None

# Files looked for in a Hugging Face model directory, in order of preference.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Checkpoint dict keys that hold the actual state_dict (training frameworks wrap it).
STATE_DICT_WRAPPERS = ("model", "state_dict", "model_state_dict", "module", "ema")

# Reading axis 0 run by run costs one call per run; past this many runs one bounding read is cheaper.
_MAX_ROW_RUNS = 64
# A mapping of a file serves reads until this many bytes have been read through it (SafetensorsSource).
_REMAP_BYTES = 64 * 2**20
# Runs of rows closer than this (bytes between them) are read as one: a mapping and a read-ahead
# request cost more than reading through a small gap (a step-2 uniform selection has a one-row gap
# after every row), while the wide gaps of first-N layers or chosen experts are still never read.
_MAX_GAP_BYTES = 128 * 2**10
# A bounding box larger than this (bytes) is read in runs of rows, each through its own mapping, so
# the mapped pages and the selected copy are not both as large as the box.
_CHUNK_BYTES = 64 * 2**20

_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def take(tensor: torch.Tensor, index: Sequence[AxisIndex]) -> torch.Tensor:
    """Index ``tensor`` axis by axis; ``None`` keeps an axis whole."""
    out = tensor
    for axis, idx in enumerate(index):
        if idx is not None:
            out = out.index_select(axis, torch.as_tensor(list(idx), dtype=torch.long, device=out.device))
    return out


class TensorSource(Protocol):
    """Read access to a model's named tensors (parameters and persistent buffers)."""

    def keys(self) -> Iterator[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def read(self, key: str, index: Sequence[AxisIndex] | None = None) -> torch.Tensor:
        """The tensor ``key`` restricted to ``index`` (all of it when None), on the CPU."""
        ...

    def prefetch(self, key: str, index: Sequence[AxisIndex] | None = None) -> None:
        """Hint that ``read(key, index)`` comes soon: a file source may start reading it in the background."""
        ...


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class DictSource:
    """Tensors held in a mapping (a loaded checkpoint), indexed on read without copying first."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)
        self.bytes_read = 0

    def keys(self) -> Iterator[str]:
        return iter(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def read(self, key: str, index: Sequence[AxisIndex] | None = None) -> torch.Tensor:
        tensor = self._tensors[key].detach()
        if tensor.device.type == "meta":
            raise RuntimeError(f"teacher tensor {key!r} has no data (meta device); pass --teacher-weights")
        out = take(tensor, index) if index is not None else tensor
        self.bytes_read += _nbytes(out)
        return out

    def prefetch(self, key: str, index: Sequence[AxisIndex] | None = None) -> None:
        pass  # already in memory


class ModuleSource(DictSource):
    """Tensors of an in-memory module's ``state_dict`` (no copy)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module.state_dict(keep_vars=False))


class SafetensorsSource:
    """One ``.safetensors`` file, memory-mapped; reads touch only the requested elements' range.

    NOTE: pages touched through a mapping count in the process's resident set until it is
    unmapped, so one long-lived mapping would grow the RSS to every byte read from the teacher.
    A mapping serves reads until ``_REMAP_BYTES`` have been read through it, then the file is
    mapped anew: the RSS stays bounded by that and the tensor being read, and the hundreds of
    small reads of a small model do not each pay for mapping the file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._header = _read_safetensors_header(path)
        with open(path, "rb") as fh:
            self._data_start = 8 + int.from_bytes(fh.read(8), "little")
        try:
            with self._open():
                pass
        except Exception as e:  # safetensors raises its own SafetensorError, or OSError
            raise SpecError(f"'{path}' is not a valid safetensors file ({e}); re-download or re-save it") from e
        self.bytes_read = 0
        self._mapped: Any = None  # the open safe_open handle, or None
        self._read_through_mapping = 0  # bytes read through it

    def _open(self):
        return safe_open(self.path, framework="pt", device="cpu")

    def _mapping(self) -> Any:
        """The file's open mapping, mapped anew once ``_REMAP_BYTES`` have been read through it."""
        if self._mapped is None or self._read_through_mapping >= _REMAP_BYTES:
            self._unmap()
            self._mapped = self._open().__enter__()
            self._read_through_mapping = 0
        return self._mapped

    def _unmap(self) -> None:
        if self._mapped is not None:
            self._mapped.__exit__(None, None, None)
            self._mapped = None

    def _count(self, out: torch.Tensor) -> torch.Tensor:
        self.bytes_read += _nbytes(out)
        self._read_through_mapping += _nbytes(out)
        return out

    def prefetch(self, key: str, index: Sequence[AxisIndex] | None = None) -> None:
        rows = index[0] if index else None
        self._will_need(key, slice(None) if not rows else slice(min(rows), max(rows) + 1))

    def _will_need(self, key: str, rows: slice) -> None:
        """Ask the kernel to read the bytes of ``key``'s ``rows`` into the page cache, in the background.

        NOTE: page faults on a mapping read the disk a few pages at a time; one read-ahead request
        for the whole range lets it be read at the disk's sequential speed.
        """
        if not hasattr(os, "posix_fadvise"):
            return
        start, end = self._header[key]["data_offsets"]
        shape = self.shape(key)
        if shape and shape[0]:
            row_bytes = self._row_bytes(key)
            lo, hi, _ = rows.indices(shape[0])
            start, end = start + lo * row_bytes, start + max(lo, hi) * row_bytes
        if end > start:  # NOTE: a length of 0 would mean "to the end of the file"
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, self._data_start + start, end - start, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def keys(self) -> Iterator[str]:
        return (key for key in self._header if key != "__metadata__")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self._header[key]["dtype"]
        if name not in _SAFETENSORS_DTYPES:
            raise SpecError(f"tensor {key!r} in '{self.path}' has dtype {name}, which wscompile cannot read")
        return _SAFETENSORS_DTYPES[name]

    def read(self, key: str, index: Sequence[AxisIndex] | None = None) -> torch.Tensor:
        if key not in self._header or key == "__metadata__":
            raise KeyError(key)
        if index is None or all(idx is None for idx in index):
            self._will_need(key, slice(None))
            return self._count(self._mapping().get_tensor(key))
        shape = self.shape(key)
        positions = [None if idx is None else torch.as_tensor(list(idx), dtype=torch.long) for idx in index]
        positions += [None] * (len(shape) - len(positions))
        rows = positions[0]
        if rows is not None and rows.numel() > 0:
            values = torch.unique(rows)  # sorted
            runs = _runs_apart(values, self._row_bytes(key), _MAX_GAP_BYTES)
            if len(runs) <= _MAX_ROW_RUNS:
                # Few runs of rows far apart (first-N layers, chosen experts): read each run alone
                # so the rows between them are never touched, then put the rows in order.
                parts = [self._read_box(key, [run] + positions[1:]) for run in runs]
                out = parts[0] if len(parts) == 1 else torch.cat(parts)
                in_order = rows.numel() == values.numel() and bool(torch.equal(rows, values))
                return out if in_order else out.index_select(0, torch.searchsorted(values, rows))
        return self._read_box(key, positions)

    def _row_bytes(self, key: str) -> int:
        """Bytes of one index along axis 0 of ``key`` (the whole tensor for a scalar)."""
        start, end = self._header[key]["data_offsets"]
        shape = self.shape(key)
        return (end - start) // shape[0] if shape and shape[0] else end - start

    def _read_box(self, key: str, positions: list[torch.Tensor | slice | None]) -> torch.Tensor:
        """Read the bounding box of ``positions`` per axis, then pick the positions inside it."""
        shape = self.shape(key)
        box: list[slice] = []
        inner: list[torch.Tensor | slice] = []
        for pos, size in zip(positions, shape, strict=True):
            if pos is None or isinstance(pos, slice):
                box.append(slice(*(pos or slice(None)).indices(size)))
                inner.append(slice(None))
            elif pos.numel() == 0:
                box.append(slice(0, 0))
                inner.append(slice(None))
            else:
                lo, hi = int(pos.min()), int(pos.max()) + 1
                box.append(slice(lo, hi))
                inner.append(_as_slice(pos - lo))
        box_rows = box[0].stop - box[0].start
        row_bytes = math.prod(b.stop - b.start for b in box[1:]) * self.dtype(key).itemsize
        chunk_rows = max(1, _CHUNK_BYTES // max(row_bytes, 1))
        rows = inner[0] if isinstance(inner[0], torch.Tensor) else torch.arange(*inner[0].indices(box_rows))
        if box_rows <= chunk_rows or not bool((rows.diff() > 0).all()):
            return self._read_selected(key, box, inner)
        out = None
        for start in range(0, box_rows, chunk_rows):
            stop = min(start + chunk_rows, box_rows)
            first, last = int(torch.searchsorted(rows, start)), int(torch.searchsorted(rows, stop))
            if first == last:
                continue
            chunk_box = [slice(box[0].start + start, box[0].start + stop), *box[1:]]
            chunk = self._read_selected(key, chunk_box, [_as_slice(rows[first:last] - start), *inner[1:]])
            if out is None:
                out = chunk.new_empty((rows.numel(), *chunk.shape[1:]))
            out[first:last] = chunk
        assert out is not None  # rows is not empty: box_rows > chunk_rows >= 1
        return out

    def _read_selected(self, key: str, box: list[slice], inner: list[torch.Tensor | slice]) -> torch.Tensor:
        """Read ``box`` through the file's mapping, and pick ``inner`` (positions relative to the box) from it."""
        self._will_need(key, box[0])
        out = self._count(self._mapping().get_slice(key)[tuple(box)])
        # Evenly spaced positions (the uniform rule's steps) become a strided view: no gather.
        out = out[tuple(pos if isinstance(pos, slice) else slice(None) for pos in inner)]
        for axis, pos in enumerate(inner):
            if isinstance(pos, torch.Tensor):
                out = out.index_select(axis, pos)
        return out


def _as_slice(positions: torch.Tensor) -> torch.Tensor | slice:
    """Non-empty ``positions`` as a slice when evenly spaced and increasing, else unchanged."""
    first = int(positions[0])
    if positions.numel() == 1:
        return slice(first, first + 1)
    step = int(positions[1] - positions[0])
    if step > 0 and bool((positions.diff() == step).all()):
        return slice(first, int(positions[-1]) + 1, step)
    return positions


def _runs_apart(values: torch.Tensor, row_bytes: int, max_gap_bytes: int) -> list[torch.Tensor]:
    """Sorted unique ``values`` split where the rows between two neighbours hold ``max_gap_bytes`` or more."""
    gaps = (values.diff() - 1) * row_bytes
    return list(torch.tensor_split(values, (torch.nonzero(gaps >= max_gap_bytes).flatten() + 1).tolist()))


def _read_safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header, after checking that the file holds every byte the header promises."""
    if not os.path.isfile(path):
        raise SpecError(f"weights file '{path}' does not exist")
    size = os.path.getsize(path)
    corrupt = f"'{path}' is truncated or corrupt (not a complete safetensors file); re-download or re-save it"
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise SpecError(corrupt)
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise SpecError(corrupt)
        try:
            header = json.loads(fh.read(header_len))
            data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise SpecError(corrupt) from e
    if 8 + header_len + data_end > size:
        raise SpecError(corrupt)
    return header


class ShardedSource:
    """Several weight files behind one key space (a ``*.index.json`` weight map); shards open on first use."""

    def __init__(self, weight_map: Mapping[str, str], open_shard: Callable[[str], TensorSource]) -> None:
        self._weight_map = dict(weight_map)
        self._open_shard = open_shard
        self._shards: dict[str, TensorSource] = {}

    @property
    def bytes_read(self) -> int:
        return sum(getattr(shard, "bytes_read", 0) for shard in self._shards.values())

    def _shard(self, key: str) -> TensorSource:
        path = self._weight_map[key]
        if path not in self._shards:
            self._shards[path] = self._open_shard(path)
        return self._shards[path]

    def keys(self) -> Iterator[str]:
        return iter(self._weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shard(key).shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._shard(key).dtype(key)

    def read(self, key: str, index: Sequence[AxisIndex] | None = None) -> torch.Tensor:
        return self._shard(key).read(key, index)

    def prefetch(self, key: str, index: Sequence[AxisIndex] | None = None) -> None:
        self._shard(key).prefetch(key, index)


class RenamedSource:
    """Another source seen under new names: ``names`` maps each exposed key to the inner source's key.

    Used to present a checkpoint in its module's naming (``module.`` prefix stripped, a tied weight
    exposed under both of its names).
    """

    def __init__(self, source: TensorSource, names: Mapping[str, str]) -> None:
        self.inner = source
        self._names = dict(names)

    @property
    def bytes_read(self) -> int:
        return getattr(self.inner, "bytes_read", 0)

    def keys(self) -> Iterator[str]:
        return iter(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(self._names[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.inner.dtype(self._names[key])

    def read(self, key: str, index: Sequence[AxisIndex] | None = None) -> torch.Tensor:
        return self.inner.read(self._names[key], index)

    def prefetch(self, key: str, index: Sequence[AxisIndex] | None = None) -> None:
        self.inner.prefetch(self._names[key], index)


def hf_weights_path(directory: str) -> str | None:
    """The weights file of a Hugging Face model directory, or None when it has none."""
    for name in HF_WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def inside_folder(real: str, folder: str) -> bool:
    """Whether the resolved path ``real`` lies in ``folder``.

    A Hugging Face hub cache keeps ``snapshots/<commit>/<file>`` as links to ``../../blobs/<hash>``:
    a snapshot folder's links into its own repository's ``blobs`` count as inside.
    """
    root = os.path.realpath(folder)
    places = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":
        places.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    return any(os.path.commonpath([place, real]) == place for place in places)


def confined(path: str, folder: str, *, what: str, allow_outside: bool = False) -> str:
    """``path`` (named by a file inside ``folder``) made absolute, and refused when it leads out of ``folder``.

    A model folder is untrusted input: a shard index naming ``../../x.safetensors`` or an absolute
    path, or a symlink out of the folder, would copy a file from elsewhere on the machine into the
    student. Nothing outside ``folder`` is read unless ``allow_outside`` is set.

    Raises:
        SpecError: the resolved path is outside ``folder``.
    """
    named = os.path.abspath(os.path.join(folder, path))
    real = os.path.realpath(named)
    if allow_outside or inside_folder(real, folder):
        return named  # NOTE: not ``real``: a hub cache blob has no extension to tell its format by
    raise SpecError(
        f"{what} names '{path}', which resolves to '{real}' outside the model folder '{folder}'; refusing to read it "
        "(pass --allow-outside-paths only if you trust this folder)"
    )


def open_weights(path: str, *, unsafe_pickle: bool = False, allow_outside_paths: bool = False) -> TensorSource:
    """Open a weights file or a Hugging Face model directory as a lazy ``TensorSource``.

    Args:
        path: a ``.safetensors`` file, a ``*.index.json`` shard map, a PyTorch checkpoint
            (``.pt/.pth/.bin/.ckpt``), or a directory holding one of ``HF_WEIGHT_FILES``.
        unsafe_pickle: let ``torch.load`` run code embedded in a pickle checkpoint. Only for
            files from a trusted source.
        allow_outside_paths: let a directory's weights file or a shard index name files outside
            its folder (see ``confined``).

    Returns:
        A source keyed by the names stored in the file (checkpoint wrappers such as
        ``{"state_dict": ...}`` unwrapped; non-tensor entries dropped). Dtypes are as stored.

    Raises:
        SpecError: the path is missing, of an unknown format, truncated or corrupt, or a pickle
            that needs code execution while ``unsafe_pickle`` is False.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = hf_weights_path(path)
        if found is None:
            raise SpecError(f"directory '{path}' has no weights (looked for {', '.join(HF_WEIGHT_FILES)})")
        path = confined(os.path.basename(found), path, what=f"model folder '{path}'", allow_outside=allow_outside_paths)
    if not os.path.exists(path):
        raise SpecError(f"weights file '{path}' does not exist")
    if path.endswith(".index.json"):
        return _open_sharded(path, unsafe_pickle=unsafe_pickle, allow_outside_paths=allow_outside_paths)
    if path.endswith(".safetensors"):
        return SafetensorsSource(path)
    if path.endswith(TORCH_SUFFIXES):
        return DictSource(_load_torch_checkpoint(path, unsafe_pickle=unsafe_pickle))
    raise SpecError(
        f"cannot tell the format of '{path}'; use a .safetensors, {'/'.join(TORCH_SUFFIXES)} file, "
        "a *.index.json shard map or a Hugging Face model directory"
    )


def _open_sharded(index_path: str, *, unsafe_pickle: bool, allow_outside_paths: bool) -> ShardedSource:
    invalid = f"'{index_path}' is not a valid shard index (needs a 'weight_map' object of tensor name -> file name)"
    try:
        with open(index_path, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SpecError(invalid) from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()
    ):
        raise SpecError(invalid)
    directory = os.path.dirname(index_path)
    what = f"shard index '{index_path}'"
    shard_paths = {
        key: confined(name, directory, what=what, allow_outside=allow_outside_paths) for key, name in weight_map.items()
    }
    missing = sorted({p for p in shard_paths.values() if not os.path.isfile(p)})
    if missing:
        raise SpecError(f"shard index '{index_path}' names missing files: {', '.join(missing[:5])}")

    def open_shard(shard: str) -> TensorSource:
        opened = open_weights(shard, unsafe_pickle=unsafe_pickle)
        held = set(opened.keys())
        lacking = sorted(key for key, path in shard_paths.items() if path == shard and key not in held)
        if lacking:
            raise SpecError(
                f"shard '{shard}' lacks {len(lacking)} tensor(s) its index '{index_path}' names "
                f"({', '.join(lacking[:3])}); the folder is incomplete: re-download or re-save it"
            )
        return opened

    return ShardedSource(shard_paths, open_shard)


def _load_torch_checkpoint(path: str, *, unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle, mmap=True)
        except RuntimeError as e:
            # NOTE: mmap needs the zip format (torch >= 1.6); legacy files load fully into memory.
            if "mmap" not in str(e):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise SpecError(
                f"'{path}' is a pickle that needs code execution to load; re-save it as safetensors, "
                "or pass --unsafe-pickle if you trust its source"
            ) from e
        raise SpecError(f"'{path}' is truncated or corrupt (cannot unpickle it: {e})") from e
    except Exception as e:  # torch.load raises many types (RuntimeError, KeyError, EOFError, ...)
        raise SpecError(f"'{path}' is truncated or corrupt (torch.load failed: {type(e).__name__}: {e})") from e
    tensors = _unwrap_state_dict(loaded)
    if not tensors:
        raise SpecError(f"'{path}' holds no tensors; expected a state_dict or a checkpoint containing one")
    return tensors


def _unwrap_state_dict(loaded: object) -> dict[str, torch.Tensor]:
    if isinstance(loaded, nn.Module):
        loaded = loaded.state_dict()
    while isinstance(loaded, Mapping):
        inner = next(
            (loaded[k] for k in STATE_DICT_WRAPPERS if isinstance(loaded.get(k), (Mapping, nn.Module))),
            None,
        )
        if isinstance(inner, nn.Module):
            inner = inner.state_dict()
        if inner is None or not any(isinstance(v, (torch.Tensor, Mapping)) for v in inner.values()):
            break
        loaded = inner
    if not isinstance(loaded, Mapping):
        return {}
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
