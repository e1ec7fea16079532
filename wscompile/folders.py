"""Output folders the student's own library loads as they are.

``--out DIR/`` streams the student's weights into ``DIR`` (``outputs.stream_safetensors_dir``);
this module decides everything else about the folder, before any tensor is written:

- the name each tensor is saved under and which are saved at all: for a transformers model,
  what ``save_pretrained`` writes (tied copies dropped, the library's reverse key conversion
  applied, asked of transformers rather than re-implemented), so ``from_pretrained`` finds every
  key; for other models the state_dict names;
- the files next to the weights: a transformers student's ``config.json`` (and
  ``generation_config.json``), the teacher directory's tokenizer and processor files and, for a
  sentence-transformers teacher, its module list with the pooling width set to the student's;
  a timm student's ``config.json`` as ``timm.models.save_for_hf`` writes it, its spec overrides
  in ``model_args`` so ``timm.create_model("local-dir:DIR")`` builds the same architecture.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from wscompile.errors import OutputError
from wscompile.outputs import PREPROCESSING_FILES
from wscompile.specs import ModelSpec
from wscompile.weights import inside_folder

# --dtype values -> the dtype floating tensors are written in.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# sentence-transformers files at the root of its folder, besides modules.json.
SENTENCE_TRANSFORMERS_FILES = ("config_sentence_transformers.json", "sentence_bert_config.json")
# sentence-transformers modules a student folder can hold, by the last part of their type: the
# transformer is the student itself, pooling has no weights and normalize no config at all.
TRANSFORMER_MODULE = "Transformer"
POOLING_MODULE = "Pooling"
NORMALIZE_MODULE = "Normalize"
# Keys of a pooling module's config holding the width of the embeddings it pools.
POOLING_WIDTH_KEYS = ("word_embedding_dimension", "embedding_dimension")


@dataclass
class FolderPlan:
    """What ``--out DIR/`` holds: the name each tensor is saved under, and the other files."""

    # student state_dict key -> key in the folder; a tied copy maps to its saved twin's key
    saved_as: dict[str, str]
    # student state_dict keys whose tensor is written (one per tied group)
    written: set[str]
    # path relative to the folder -> contents
    files: dict[str, bytes] = field(default_factory=dict)
    # student keys saved only through a conversion (fused MoE experts split back per expert)
    converted: set[str] = field(default_factory=set)
    # saved key -> (shape, dtype) of what the conversion writes
    converted_layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    # the conversion: {student key: tensor} of every ``converted`` key -> {saved key: tensor}
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


def plan_folder(
    student: nn.Module, student_spec: ModelSpec, teacher_spec: ModelSpec, dtype: torch.dtype | None
) -> FolderPlan:
    """The output folder of ``student``: tensor names and files, for its library to load.

    Args:
        student: the built student (its config, class and tied weights are read, not its values).
        student_spec: the student's spec; a timm student's overrides become ``model_args``.
        teacher_spec: the teacher's spec; an ``hf:`` directory gives tokenizer and processor files.
        dtype: the dtype floating tensors are written in (``None``: the student's own), recorded
            in a transformers ``config.json``.

    Raises:
        OutputError: the teacher directory's files cannot be copied (a symlink out of it, a
            sentence-transformers module with weights) or transformers would save the student's
            tensors converted, not only renamed.
    """
    from transformers import PreTrainedModel

    if isinstance(student, PreTrainedModel):
        plan = transformers_names(student)
        plan.files = transformers_config_files(student, dtype)
        teacher_dir = hf_teacher_dir(teacher_spec)
        if teacher_dir is not None:
            plan.files.update(teacher_files(teacher_dir))
            if (teacher_dir / "modules.json").is_file():
                plan.files.update(
                    sentence_transformers_files(teacher_dir, student.config.get_text_config().hidden_size)
                )
        return plan
    keys = list(student.state_dict())
    plan = FolderPlan({key: key for key in keys}, set(keys))
    if student_spec.scheme == "timm":
        plan.files = timm_config_files(student, student_spec)
    return plan


def check_teacher_files(teacher_spec: ModelSpec) -> None:
    """Fail on teacher directory files a student folder cannot take, before any model is built.

    Raises:
        OutputError: as ``teacher_files`` and ``sentence_transformers_files``.
    """
    teacher_dir = hf_teacher_dir(teacher_spec)
    if teacher_dir is not None:
        teacher_files(teacher_dir)
        sentence_transformers_files(teacher_dir, hidden_size=0)


def hf_teacher_dir(teacher_spec: ModelSpec) -> Path | None:
    """The teacher's local directory when it is an ``hf:`` directory (not a hub id)."""
    if teacher_spec.scheme != "hf" or not os.path.isdir(teacher_spec.name):
        return None
    return Path(teacher_spec.name)


def transformers_names(student: nn.Module) -> FolderPlan:
    """What ``save_pretrained`` would call each student tensor, and which it would write.

    Tied copies are dropped and the library's reverse key conversion (transformers 5 renames
    some modules' keys on load and back on save, and splits fused MoE experts back into one tensor
    per expert) is applied, by transformers' own functions. A tensor that is only renamed keeps its
    identity through the reversal; the others are ``converted``: their saved shapes come from running
    the reversal on meta tensors, their values from running it again on the selected tensors.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = student.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(state), student)
    original = {id(tensor): key for key, tensor in kept.items()}
    saved_as: dict[str, str] = {}
    produced: dict[str, torch.Tensor] = {}
    for saved, tensor in revert_weight_conversion(student, dict(kept)).items():
        if id(tensor) in original:
            saved_as[original[id(tensor)]] = saved
        else:
            produced[saved] = tensor
    converted = set(kept) - set(saved_as)
    if produced and not converted:
        raise OutputError(
            f"transformers saves {type(student).__name__} with tensors wscompile cannot account for "
            f"({', '.join(sorted(produced)[:3])}); write --out FILE.safetensors instead"
        )

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.contiguous() for key, value in revert_weight_conversion(student, dict(tensors)).items()}

    meta = convert({key: torch.empty_like(kept[key], device="meta") for key in converted}) if converted else {}
    # A tied copy reads its saved twin: the tensor with the same storage, shape and strides.
    twins = {_view_of(state[key]): saved for key, saved in saved_as.items()}
    for key, tensor in state.items():
        if key not in saved_as and _view_of(tensor) in twins:
            saved_as[key] = twins[_view_of(tensor)]
    return FolderPlan(
        saved_as,
        set(kept) - converted,
        converted=converted,
        converted_layout={key: (tuple(t.shape), t.dtype) for key, t in meta.items()},
        convert=convert if converted else None,
    )


def _view_of(tensor: torch.Tensor) -> tuple:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride()


def transformers_config_files(student: nn.Module, dtype: torch.dtype | None) -> dict[str, bytes]:
    """``config.json`` as ``save_pretrained`` writes it (the student's class in ``architectures``,
    ``dtype`` as written), and ``generation_config.json`` for a model that generates."""
    config = copy.deepcopy(student.config)
    config.architectures = [type(student).__name__]
    written = dtype if dtype is not None else student.dtype
    config.dtype = str(written).removeprefix("torch.")
    if getattr(config, "use_cache", None) is False:
        # NOTE: wscompile turns the cache off to trace the student; the folder is for generating.
        config.use_cache = _default_use_cache(type(config))
    files = _saved_files(config.save_pretrained)
    if student.can_generate():
        files.update(_saved_files(student.generation_config.save_pretrained))
    return files


def _default_use_cache(config_class: type) -> bool:
    try:
        return bool(getattr(config_class(), "use_cache", True))
    except Exception:  # a config class that cannot be built without arguments
        return True


def _saved_files(save: Callable[[str], object]) -> dict[str, bytes]:
    """The files ``save(directory)`` writes, read back: a library's own writer, kept atomic."""
    with tempfile.TemporaryDirectory(prefix="wscompile-") as scratch:
        save(scratch)
        return {
            path.relative_to(scratch).as_posix(): path.read_bytes()
            for path in sorted(Path(scratch).rglob("*"))
            if path.is_file()
        }


def teacher_files(teacher_dir: Path) -> dict[str, bytes]:
    """The tokenizer, processor, feature-extractor and image-processor files of ``teacher_dir``.

    Raises:
        OutputError: one of them is a symlink to a file outside the directory (a Hugging Face
            cache snapshot's links into its repository's ``blobs`` are followed).
    """
    return {
        child.name: _read_inside(teacher_dir, child.name)
        for child in sorted(teacher_dir.iterdir())
        if PREPROCESSING_FILES.fullmatch(child.name) and child.resolve().is_file()
    }


def _read_inside(teacher_dir: Path, name: str) -> bytes:
    """``teacher_dir / name``, refused when it resolves outside the directory."""
    path = (teacher_dir / name).resolve()
    if not inside_folder(str(path), str(teacher_dir)):
        raise OutputError(
            f"teacher file '{teacher_dir / name}' links to '{path}', outside '{teacher_dir}'; "
            "wscompile copies only files inside the teacher directory: copy it in or remove the link"
        )
    return path.read_bytes()


def sentence_transformers_files(teacher_dir: Path, hidden_size: int) -> dict[str, bytes]:
    """A sentence-transformers teacher's modules for a student of width ``hidden_size``.

    ``modules.json`` and the root configs are copied; the pooling module's config gets the
    student's width (``word_embedding_dimension``, or ``embedding_dimension`` since
    sentence-transformers 6); a normalize module's config is copied as is.

    Raises:
        OutputError: a module other than transformer, pooling and normalize (a ``Dense``
            projection has weights wscompile does not select), or a module outside the folder.
    """
    if not (teacher_dir / "modules.json").is_file():
        return {}
    modules_text = _read_inside(teacher_dir, "modules.json")
    try:
        modules = json.loads(modules_text)
    except json.JSONDecodeError as e:
        raise OutputError(f"'{teacher_dir / 'modules.json'}' is not valid JSON ({e})") from e
    files = {"modules.json": modules_text}
    files.update(
        {
            name: _read_inside(teacher_dir, name)
            for name in SENTENCE_TRANSFORMERS_FILES
            if (teacher_dir / name).is_file()
        }
    )
    for module in modules:
        kind = str(module.get("type", "")).rpartition(".")[2]
        path = str(module.get("path", ""))
        if kind not in (TRANSFORMER_MODULE, POOLING_MODULE, NORMALIZE_MODULE):
            raise OutputError(
                f"sentence-transformers module '{path}' ({module.get('type')}) of '{teacher_dir}' is not supported in "
                "a student folder (wscompile selects the transformer's weights only); write --out FILE.safetensors, "
                "or drop the module from modules.json"
            )
        if kind == TRANSFORMER_MODULE:
            if path:
                raise OutputError(
                    f"sentence-transformers transformer module of '{teacher_dir}' is in '{path}'; "
                    "wscompile writes it at the folder's root only"
                )
            continue
        if not (teacher_dir / path / "config.json").is_file():
            continue
        config_path = f"{path}/config.json"
        config = _read_inside(teacher_dir, config_path)
        if kind == POOLING_MODULE:
            config = _pooling_config(config, hidden_size, f"{teacher_dir / config_path}")
        files[config_path] = config
    return files


def _pooling_config(config: bytes, hidden_size: int, where: str) -> bytes:
    """A pooling module's config with its input width set to ``hidden_size``."""
    pooling = json.loads(config)
    # sentence-transformers 2-5 write word_embedding_dimension, 6 embedding_dimension.
    widths = [key for key in POOLING_WIDTH_KEYS if key in pooling]
    if not widths:
        raise OutputError(
            f"pooling config '{where}' has none of {', '.join(POOLING_WIDTH_KEYS)}; "
            "cannot set the student's width in it"
        )
    pooling.update(dict.fromkeys(widths, hidden_size))
    return (json.dumps(pooling, indent=2) + "\n").encode()


def timm_config_files(student: nn.Module, student_spec: ModelSpec) -> dict[str, bytes]:
    """timm's ``config.json`` for the student, as ``timm.models.save_for_hf`` writes it, with the
    spec's overrides in ``model_args``."""
    from timm.models._hub import save_config_for_hf

    return _saved_files(
        lambda directory: save_config_for_hf(
            student, os.path.join(directory, "config.json"), model_args=dict(student_spec.overrides)
        )
    )
