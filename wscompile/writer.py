"""The write stage: stream the student's planned tensors to a ``.safetensors`` file or a model folder.

One tensor at a time is read from the teacher, selected, converted and written, then dropped, so
the student is never whole in memory (``outputs.stream_safetensors``, atomic). A directory output
is a folder the student's library loads (``folders.plan_folder``): its configs and the teacher's
tokenizer files next to the weights, saved under the names and with the tied copies its
``from_pretrained`` expects. ``wscompile init`` and ``wscompile.save`` both write through here.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from wscompile.folders import DTYPES, FolderPlan, plan_folder
from wscompile.outputs import is_directory_output, stream_safetensors, stream_safetensors_dir
from wscompile.passes.apply import student_layout, student_tensors
from wscompile.plan import SelectionPlan, WrittenAs
from wscompile.specs import parse_spec, resolve_hub
from wscompile.weights import TensorSource

T = TypeVar("T")

# Default largest shard of a directory output (bytes), as transformers' save_pretrained.
MAX_SHARD_SIZE = 5 * 10**9


@dataclass(frozen=True)
class WriteConfig:
    """Where and how the student's weights are written."""

    out: str  # a .safetensors file, or a directory (ending in '/' or existing): a model folder
    teacher_spec: str  # recorded in the file's metadata; a hub teacher's tokenizer files go into a folder
    student_spec: str  # recorded in the metadata; its library decides a folder's layout
    method: str  # recorded in the metadata
    hub_weights: bool = True  # a hub teacher's weights come from the hub (no --teacher-weights)
    dtype: str | None = None  # floating tensors written as fp32, fp16 or bf16; None: as the student's
    force: bool = False  # replace an existing output
    progress: bool | None = None  # progress bar on stderr; None: when stderr is a terminal
    max_shard_size: int = MAX_SHARD_SIZE  # bytes per shard of a directory output
    strict: bool = False  # NaN/inf among the teacher values read is an error, not a warning

    def written_as(self) -> WrittenAs:
        """What the manifest records of this config, for ``apply`` to write the same files."""
        return WrittenAs(self.dtype, self.max_shard_size if is_directory_output(self.out) else None)


@dataclass
class Written:
    """What the write stage wrote."""

    path: str  # the file or folder written
    folder: FolderPlan  # where each student tensor went: its saved name, or into a converted group


def metadata(teacher_spec: str, student_spec: str, method: str) -> dict[str, str]:
    """The ``__metadata__`` of the student's safetensors file: where its weights came from."""
    return {
        "format": "pt",
        "wscompile.teacher": teacher_spec,
        "wscompile.student": student_spec,
        "wscompile.method": method,
    }


def write_student(config: WriteConfig, plan: SelectionPlan, teacher: TensorSource, student: torch.nn.Module) -> Written:
    """Stream the student's tensors to ``config.out``: read, select, write and drop one at a time.

    Teacher reads holding NaN/inf are listed in ``plan.nonfinite_teacher`` (an error with ``strict``).
    """
    student_state = student.state_dict()
    dtype = DTYPES[config.dtype] if config.dtype else None
    info = metadata(config.teacher_spec, config.student_spec, config.method)
    layout = {
        key: (shape, _written_dtype(stored, dtype))
        for key, (shape, stored) in student_layout(plan, student_state).items()
    }
    if is_directory_output(config.out):
        # a hub teacher's tokenizer files are in its snapshot (already fetched: hub.py remembers it)
        teacher_spec = resolve_hub(parse_spec(config.teacher_spec), role="teacher", weights=config.hub_weights)
        folder = plan_folder(student, parse_spec(config.student_spec), teacher_spec, dtype)
    else:
        folder = FolderPlan({key: key for key in layout}, set(layout))
    layout = {folder.saved_as[key]: value for key, value in layout.items() if key in folder.written}
    layout |= {key: (shape, _written_dtype(stored, dtype)) for key, (shape, stored) in folder.converted_layout.items()}
    show = sys.stderr.isatty() if config.progress is None else config.progress

    def saved_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        held: dict[str, torch.Tensor] = {}  # tensors saved converted wait for every part of their group
        for key, tensor in student_tensors(plan, teacher, student_state, strict=config.strict):
            if key in folder.converted:
                held[key] = tensor
            elif key in folder.written:
                yield folder.saved_as[key], tensor.to(_written_dtype(tensor.dtype, dtype))
        if held:
            for saved, tensor in folder.convert(held).items():
                yield saved, tensor.to(_written_dtype(tensor.dtype, dtype))

    tensors = _with_progress(saved_tensors(), len(layout), teacher, show=show)
    if is_directory_output(config.out):
        stream_safetensors_dir(
            config.out,
            layout,
            tensors,
            info,
            force=config.force,
            max_shard_size=config.max_shard_size,
            files=folder.files,
        )
    else:
        stream_safetensors(config.out, layout, tensors, info, force=config.force)
    return Written(config.out, folder)


def _written_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor stored as ``stored`` is written in: ``dtype`` for floating tensors."""
    return dtype if dtype is not None and stored.is_floating_point else stored


def size_text(n: int) -> str:
    """A byte count for messages: GB from 0.1 GB on, else MB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _with_progress(items: Iterator[T], total: int, teacher: TensorSource, *, show: bool) -> Iterator[T]:
    """``items``, with a progress bar on stderr counting them and the teacher bytes read so far."""
    from tqdm import tqdm

    teacher_bytes = sum(math.prod(teacher.shape(key)) * teacher.dtype(key).itemsize for key in teacher.keys())  # noqa: SIM118 - a source, not a dict
    with tqdm(total=total, unit="tensor", desc="writing student", file=sys.stderr, disable=not show) as bar:
        for item in items:
            yield item
            bar.set_postfix_str(
                f"teacher read {size_text(getattr(teacher, 'bytes_read', 0))} of {size_text(teacher_bytes)}",
                refresh=False,
            )
            bar.update()
