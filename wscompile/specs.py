"""One string names a model: ``"timm:NAME?k=v"``, ``"hf:DIR"``, ``"py:mod:fn"`` -> ``nn.Module`` (+ weights).

Spec forms (overrides after ``?`` are ``key=value`` pairs joined by ``&``)::

    timm:convnext_tiny?depths=2,2,6,2&dims=48,96,192,384   timm.create_model(NAME, pretrained=False, **kw)
    timm:convnext_tiny?pretrained=True                       ... timm's pretrained weights (or pretrained_file=PATH)
    torchvision:resnet18                                     torchvision.models.get_model(NAME, weights=None, **kw)
    hf:path/to/dir?num_hidden_layers=3&task=masked-lm        AutoConfig.from_pretrained(DIR, **kw) -> AutoModel...
    hf:org/name?revision=main&cache_dir=DIR                  the hub snapshot's directory (hub.py), as above
    py:package.module:factory?width=8                        factory(**kw)
    path/to/file.py:factory?width=8                          factory(**kw) from that file

Values are Python literals (``ast.literal_eval``: ``2,2,6,2`` is a tuple, ``False`` a bool);
anything else stays a string. ``py:`` and ``.py`` specs import and run user code by design.
"""

from __future__ import annotations

import ast
import copy
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from wscompile.checkpoints import ConvertedSource, hf_checkpoint_source, is_transformers_model
from wscompile.errors import InputsError, SpecError, WscompileError
from wscompile.hub import hub_snapshot, is_hub_id, is_hub_miss, timm_weights_error
from wscompile.meta import skip_meta_init
from wscompile.weights import (
    DictSource,
    ModuleSource,
    RenamedSource,
    ShardedSource,
    TensorSource,
    hf_weights_path,
    open_weights,
)

SCHEMES = ("timm", "torchvision", "hf", "py", "file")
SPEC_FORMS = "use timm:NAME, torchvision:NAME, hf:DIR_OR_ID, py:module:factory or path/to/file.py:factory"

# Values of the hf: override `task` -> transformers auto class building the model from its config.
HF_TASKS = {
    "base": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
    "semantic-segmentation": "AutoModelForSemanticSegmentation",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
    "ctc": "AutoModelForCTC",
    "audio-classification": "AutoModelForAudioClassification",
}

DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)
DEFAULT_SEQ_LEN = 16
DEFAULT_AUDIO_FRAMES = 16  # feature frames of an example waveform or spectrogram
DEFAULT_WAVEFORM_LENGTH = 16000  # samples, when the config does not say how they become frames

# Values of LoadedModel.kind.
KIND_IMAGE = "image"
KIND_TEXT = "text"
KIND_OTHER = "other"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec string."""

    scheme: str  # one of SCHEMES
    name: str  # model name, HF dir or id, "package.module:factory", or "path/to/file.py:factory"
    overrides: dict[str, Any] = field(hash=False)  # parsed ?key=value&... pairs
    text: str  # the original string
    origin: str | None = None  # "org/name@commit" when `name` is the snapshot of a hub id (resolve_hub)


@dataclass
class LoadedModel:
    """A built model, its example inputs and where its tensors are read from."""

    module: nn.Module  # in eval() mode
    spec: ModelSpec
    kind: str  # KIND_IMAGE | KIND_TEXT | KIND_OTHER
    inputs: dict[str, torch.Tensor]  # batch-1 forward kwargs, on the module's device (meta if on meta)
    make_inputs: Callable[[int, int | None], dict[str, torch.Tensor]]  # (batch, seq_len) -> CPU inputs
    source: TensorSource  # the weights file (teacher with weights) or the module's own tensors
    on_meta: bool  # module built on the meta device: shapes only, no data
    weights_origin: str | None = None  # where its values come from (a path, a hub id, timm pretrained); None: own init
    pretrained: bool | None = False  # values loaded from somewhere; None: unknown (a py:/file factory may load them)
    described: list[_Input] = field(default_factory=list)  # how `inputs` and `make_inputs` are made


def parse_spec(text: str) -> ModelSpec:
    """Parse a model spec string (see the module docstring for the forms).

    Raises:
        SpecError: unknown scheme, missing name or factory, or a malformed override.
    """
    body, _, query = text.partition("?")
    scheme, sep, name = body.partition(":")
    head = body.rpartition(":")[0]
    # NOTE: the scheme decides first: "timm:evil.py:f" is a timm name, never a file to run. A file
    # whose path contains a colon is named from the current directory ("./a:b.py:f") or absolutely.
    if scheme in SCHEMES and scheme != "file":
        pass
    elif head.endswith(".py") and (":" not in head or head.startswith(("./", "../", "/"))):
        scheme, name = "file", body
    elif head.endswith(".py"):
        raise SpecError(f"file spec {text!r} has a colon in its path; write it as ./{body} or with an absolute path")
    elif not sep:
        raise SpecError(f"spec {text!r} has no scheme; {SPEC_FORMS}")
    else:
        raise SpecError(f"unknown spec scheme {scheme!r} in {text!r}; {SPEC_FORMS}")
    if not name:
        raise SpecError(f"spec {text!r} names no model; {SPEC_FORMS}")
    if scheme == "py" and not all(name.partition(":")[::2]):
        raise SpecError(f"spec {text!r} needs a factory: py:package.module:factory")
    if scheme == "file" and not name.rpartition(":")[2]:
        raise SpecError(f"spec {text!r} needs a factory: path/to/file.py:factory")
    overrides = _parse_overrides(query, text)
    if scheme in ("timm", "torchvision", "hf"):
        _check_depths(overrides, text)
    return ModelSpec(scheme=scheme, name=name, overrides=overrides, text=text)


# Overrides of a library model that count layers, and the most layers one may ask for: a larger count
# is a typo, and would spend minutes constructing the model before any memory check could refuse it.
DEPTH_OVERRIDES = (
    "depth",
    "depths",
    "layers",
    "num_layers",
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_blocks",
    "encoder_layers",
    "decoder_layers",
)
MAX_DEPTH = 1000


def _check_depths(overrides: dict[str, Any], text: str) -> None:
    for key in DEPTH_OVERRIDES:
        value = overrides.get(key)
        counts = value if isinstance(value, tuple) else (value,)
        too_deep = [n for n in counts if isinstance(n, int) and n > MAX_DEPTH]
        if too_deep:
            raise SpecError(
                f"override {key}={too_deep[0]} in {text!r} asks for more than {MAX_DEPTH} layers; "
                "pass a smaller count (a model that deep would not fit in memory)"
            )


def _parse_overrides(query: str, text: str) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for pair in query.split("&") if query else []:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SpecError(f"bad override {pair!r} in {text!r}; write key=value pairs joined by '&'")
        if key in overrides:
            raise SpecError(f"override {key!r} is given twice in {text!r}")
        overrides[key] = _parse_value(value)
    return overrides


def _parse_value(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if "," in value:
        return tuple(_parse_value(part) for part in value.split(","))
    return value


HUB_OVERRIDES = ("revision", "cache_dir")  # hf: overrides that choose the hub snapshot, not the config


def resolve_hub(spec: ModelSpec, *, role: str, weights: bool | None = None) -> ModelSpec:
    """An ``hf:org/name`` spec with its name replaced by the local snapshot directory (see ``hub.py``).

    ``revision=`` and ``cache_dir=`` overrides pick the snapshot and are removed, so they never reach
    the config; ``origin`` records ``org/name@commit``. The snapshot includes the weights when
    ``weights`` says so (default: for a teacher; not when its weights come from ``--teacher-weights``).
    Any other spec is returned unchanged.

    Raises:
        SpecError: offline (or the hub unreachable) and the repo not cached, no such repo or revision,
            or ``revision=``/``cache_dir=`` given for a local directory.
    """
    if spec.scheme != "hf":
        return spec
    if not is_hub_id(spec.name):
        if any(key in spec.overrides for key in HUB_OVERRIDES):
            raise SpecError(
                f"revision= and cache_dir= in {spec.text!r} choose a Hugging Face hub snapshot, but "
                f"'{spec.name}' is a local path; remove them"
            )
        return spec
    overrides = {key: value for key, value in spec.overrides.items() if key not in HUB_OVERRIDES}
    revision, cache_dir = (spec.overrides.get(key) for key in HUB_OVERRIDES)
    path = hub_snapshot(
        spec.name,
        revision=None if revision is None else str(revision),
        cache_dir=None if cache_dir is None else str(cache_dir),
        weights=role == "teacher" if weights is None else weights,
    )
    return replace(spec, name=path, overrides=overrides, origin=f"{spec.name}@{os.path.basename(path)}")


def spec_files(text: str, *, role: str) -> list[tuple[str, str]]:
    """Files and folders that building spec ``text`` reads, as (what, path), for outputs to be checked against.

    A local ``hf:`` directory, the ``.py`` file of a ``py:`` or file spec, a timm ``pretrained_file``.
    A hub id is not listed (its snapshot, in the hub cache, is found later); text that is not a spec
    gives nothing (``load_model`` reports it).
    """
    try:
        spec = parse_spec(text)
    except SpecError:
        return []
    found = []
    if spec.scheme == "hf" and os.path.exists(spec.name):
        found.append((f"the {role} model folder", spec.name))
    elif spec.scheme == "file":
        found.append((f"the {role} spec's file", spec.name.rpartition(":")[0]))
    elif spec.scheme == "py":
        origin = _module_file(spec.name.partition(":")[0])
        if origin:
            found.append((f"the {role} spec's module", origin))
    if spec.scheme == "timm" and "pretrained_file" in spec.overrides:
        found.append((f"the {role}'s pretrained_file", str(spec.overrides["pretrained_file"])))
    return found


def _module_file(name: str) -> str | None:
    """The file module ``name`` is imported from, or None when it cannot be found.

    NOTE: finding ``pkg.mod`` imports ``pkg``, as loading the spec will.
    """
    try:
        found = importlib.util.find_spec(name)
    except Exception:  # the package's own code may raise anything; loading the spec reports it
        return None
    return found.origin if found is not None and found.has_location else None


@dataclass(frozen=True)
class _Input:
    """How to make one forward argument; ``make_inputs`` builds tensors from these."""

    name: str
    shape: tuple[int, ...]  # at the example batch size
    role: str  # "float" (random normal), "ids" (random ints in [0, high)) or "mask" (ones)
    dtype: torch.dtype = torch.float32
    high: int = 1


@dataclass
class _Recipe:
    """What a scheme contributes: how to build the module, its inputs, and its default weights."""

    build: Callable[[], nn.Module]
    describe_inputs: Callable[[nn.Module], tuple[str, list[_Input]]]  # -> (kind, inputs)
    default_weights: str | None = None
    builtin_weights: str | None = None  # what pretrained weights `build` itself loads (timm pretrained=True)


def load_model(
    text: str,
    *,
    role: str,
    weights: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    trust_remote_code: bool = False,
    unsafe_pickle: bool = False,
    allow_outside_paths: bool = False,
    inputs_from: LoadedModel | None = None,
    built: nn.Module | None = None,
) -> LoadedModel:
    """Build the model a spec names, attach its weights and example inputs.

    ``py:`` and ``path/to/file.py:`` specs import and run that code: use them only with code you trust.

    Args:
        text: the spec string, e.g. ``"timm:convnext_tiny?depths=2,2,6,2"``.
        role: ``"teacher"`` or ``"student"``. Only a teacher takes the weights found in an ``hf:``
            directory; a student is always built fresh from its config.
        weights: a weights file or directory (see ``open_weights``) to load into the model.
        device: where to build; ``"meta"`` builds without memory (shapes only) and then reads
            weights lazily through ``source``. Models that cannot be built on meta fall back to CPU.
        seed: torch seed set before building, so a fresh init is deterministic; also seeds inputs.
        input_shape: shape of the main input (``BATCH,SEQ`` for text), replacing the default.
        trust_remote_code: allow ``hf:`` configs/models defined by code in the directory.
        unsafe_pickle: allow pickle checkpoints that need code execution.
        allow_outside_paths: let a model folder name weight files outside itself (see ``weights.confined``).
        inputs_from: the other model of the pair, whose example inputs this one takes when its own
            cannot be told (a ``py:`` factory without ``example_inputs``, say).
        built: the module ``build_on_meta`` already built from the same spec, seed and input shape
            (to count its memory), taken instead of building it again when ``device`` is meta.

    Raises:
        InputsError: the inputs cannot be told and there is no ``inputs_from``.
        SpecError: the spec, its overrides, its inputs or its weights do not fit.
    """
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    spec = resolve_hub(parse_spec(text), role=role, weights=role == "teacher" and not weights)
    recipe = _recipe(spec, role=role, input_shape=input_shape, trust_remote_code=trust_remote_code)
    if built is not None and device == "meta":
        module = built
    else:
        module = _construct(recipe.build, spec, device=device, seed=seed).eval()
    on_meta = is_on_meta(module)
    try:
        kind, described = recipe.describe_inputs(module)
    except InputsError:
        if inputs_from is None:
            raise
        kind, described = inputs_from.kind, inputs_from.described

    origin, pretrained = _weights_origin(spec, weights, recipe)
    weights = weights or recipe.default_weights
    source: TensorSource
    if weights:
        stored = open_weights(weights, unsafe_pickle=unsafe_pickle, allow_outside_paths=allow_outside_paths)
        if is_transformers_model(module):
            source = _fit_hf_weights(module, hf_checkpoint_source(module, stored), spec, weights, seed=seed)
        else:
            source = _fit_weights(module, stored, spec, weights)
        if not on_meta:
            _copy_weights(module, source)
    else:
        source = ModuleSource(module)

    def make_inputs(batch: int, seq_len: int | None = None) -> dict[str, torch.Tensor]:
        return _make_inputs(described, batch=batch, seq_len=seq_len, seed=seed)

    example_device = "meta" if on_meta else _module_device(module)
    inputs = {name: t.to(example_device) for name, t in _make_inputs(described, None, None, seed).items()}
    return LoadedModel(
        module=module,
        spec=spec,
        kind=kind,
        inputs=inputs,
        make_inputs=make_inputs,
        source=source,
        on_meta=on_meta,
        weights_origin=origin,
        pretrained=pretrained,
        described=described,
    )


def _weights_origin(spec: ModelSpec, weights: str | None, recipe: _Recipe) -> tuple[str | None, bool | None]:
    """(where the model's values come from, whether they are pretrained) for ``LoadedModel``."""
    if weights:
        return os.fspath(weights), True
    if recipe.default_weights:
        return (f"hf hub {spec.origin}" if spec.origin else recipe.default_weights), True
    if recipe.builtin_weights:
        return recipe.builtin_weights, True
    # A factory may well load a checkpoint itself; only the built-in schemes are known to be fresh.
    return None, None if spec.scheme in ("py", "file") else False


def build_module(
    text: str,
    *,
    role: str,
    device: str = "cpu",
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The module a spec names, built as ``load_model`` builds it (same seed, same init) but with no
    weights loaded and no example inputs told: all ``wscompile apply`` needs of a student."""
    spec = resolve_hub(parse_spec(text), role=role, weights=False)
    recipe = _recipe(spec, role=role, input_shape=input_shape, trust_remote_code=trust_remote_code)
    return _construct(recipe.build, spec, device=device, seed=seed).eval()


def build_on_meta(
    text: str, *, role: str, seed: int = 0, input_shape: tuple[int, ...] | None = None, trust_remote_code: bool = False
) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """The module a spec names on the meta device (CPU if it cannot be built there), with meta example inputs.

    The inputs are those ``load_model`` would make (``input_shape`` replacing the main one's), as
    shapes only: none is allocated. They are None when the spec does not tell them (``InputsError``).
    """
    spec = resolve_hub(parse_spec(text), role=role, weights=False)  # shapes only: no weights to fetch
    recipe = _recipe(spec, role=role, input_shape=input_shape, trust_remote_code=trust_remote_code)
    module = _construct(recipe.build, spec, device="meta", seed=seed).eval()
    try:
        _, described = recipe.describe_inputs(module)
    except InputsError:
        return module, None
    return module, {i.name: torch.empty(i.shape, dtype=i.dtype, device="meta") for i in described}


def _recipe(spec: ModelSpec, *, role: str, input_shape: tuple[int, ...] | None, trust_remote_code: bool) -> _Recipe:
    if spec.scheme == "timm":
        return _timm_recipe(spec, input_shape)
    if spec.scheme == "torchvision":
        return _torchvision_recipe(spec, input_shape)
    if spec.scheme == "hf":
        return _hf_recipe(spec, role=role, input_shape=input_shape, trust_remote_code=trust_remote_code)
    return _python_recipe(spec, input_shape)


def _construct(build: Callable[[], nn.Module], spec: ModelSpec, *, device: str, seed: int) -> nn.Module:
    """Run ``build`` under ``device`` with a fixed seed (restoring the global RNG afterwards)."""
    with torch.random.fork_rng(devices=[]):
        if device == "meta":
            torch.manual_seed(seed)
            try:
                with torch.device("meta"), skip_meta_init():
                    return _checked_module(build(), spec)
            except WscompileError:  # a SpecError, or construction_guard's ResourceError
                raise
            except Exception:
                # Some constructors compute on tensor data (e.g. ``.item()``), which meta has not.
                device = "cpu"
        torch.manual_seed(seed)
        try:
            with torch.device(device):
                return _checked_module(build(), spec)
        except WscompileError:
            raise
        except Exception as e:
            raise _build_error(spec, e) from e


def _checked_module(module: object, spec: ModelSpec) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise SpecError(f"{spec.text!r} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _build_error(spec: ModelSpec, error: Exception) -> SpecError:
    message = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, TypeError):
        rejected = [key for key in spec.overrides if f"'{key}'" in message]
        if rejected:
            return SpecError(
                f"{spec.scheme} model {spec.name!r} does not accept override {rejected[0]!r} in {spec.text!r} "
                f"({message}); remove it or use one of the constructor's arguments"
            )
    return SpecError(f"cannot build {spec.text!r}: {type(error).__name__}: {message}")


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}? " if close else ""


def _first_param(module: nn.Module) -> str:
    return next(iter(inspect.signature(module.forward).parameters), "x")


def _image_inputs(module: nn.Module, shape: tuple[int, ...]) -> tuple[str, list[_Input]]:
    return KIND_IMAGE, [_Input(_first_param(module), tuple(shape), "float")]


def _timm_recipe(spec: ModelSpec, input_shape: tuple[int, ...] | None) -> _Recipe:
    import timm

    if not timm.is_model(spec.name):
        raise SpecError(
            f"unknown timm model {spec.name!r} in {spec.text!r}; {_suggest(spec.name, timm.list_models())}"
            f"list names with timm.list_models('{spec.name[:4]}*')"
        )

    def describe(module: nn.Module) -> tuple[str, list[_Input]]:
        if input_shape is not None:
            return _image_inputs(module, input_shape)
        channels, height, width = getattr(module, "pretrained_cfg", {}).get("input_size", DEFAULT_IMAGE_SHAPE[1:])
        # NOTE: timm keeps the pretrained cfg's input_size even when img_size/in_chans are overridden.
        channels = spec.overrides.get("in_chans", channels)
        if "img_size" in spec.overrides:
            size = spec.overrides["img_size"]
            height, width = (size, size) if isinstance(size, int) else size
        return _image_inputs(module, (1, channels, height, width))

    kwargs, builtin_weights = _timm_weights(spec)
    return _Recipe(lambda: _timm_create(spec, kwargs, builtin_weights), describe, builtin_weights=builtin_weights)


def _timm_weights(spec: ModelSpec) -> tuple[dict[str, Any], str | None]:
    """``timm.create_model`` keyword arguments for ``spec``, and which pretrained weights they load (None: none).

    ``pretrained_file=PATH`` means ``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)`` (timm's
    own loader, so the model's ``checkpoint_filter_fn`` converts the checkpoint; a model's custom
    loader, e.g. ViT's for .npz, only for .npz files). ``pretrained_cfg_overlay=dict(file=...)``, whose
    value is not a Python literal, is parsed here; an overlay naming a file implies ``pretrained=True``.
    """
    import timm.models

    kwargs = dict(spec.overrides)
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay is not None and not isinstance(overlay, dict):
        overlay = kwargs["pretrained_cfg_overlay"] = _dict_call(_raw_override(spec, "pretrained_cfg_overlay"), spec)
    if "pretrained_file" in kwargs:
        if overlay is not None:
            raise SpecError(f"{spec.text!r} gives both pretrained_file= and pretrained_cfg_overlay=; keep one")
        file = str(kwargs.pop("pretrained_file"))
        overlay = kwargs["pretrained_cfg_overlay"] = {"file": file}
        if not file.endswith(".npz"):
            overlay["custom_load"] = False
    if overlay and overlay.get("file"):
        kwargs.setdefault("pretrained", True)
    if not kwargs.get("pretrained"):
        kwargs["pretrained"] = False
        return kwargs, None
    if overlay and overlay.get("file"):
        if not os.path.isfile(overlay["file"]):
            raise SpecError(f"pretrained file '{overlay['file']}' in {spec.text!r} does not exist")
        return kwargs, f"timm pretrained_file {overlay['file']}"
    try:
        cfg = timm.models.get_pretrained_cfg(spec.name)
    except RuntimeError as e:
        raise SpecError(f"timm has no pretrained weights for {spec.name!r} in {spec.text!r} ({e})") from e
    found = {**(cfg.to_dict() if cfg else {}), **(overlay or {})}
    # timm prefers the hub copy of a checkpoint to its original url (timm.models._builder)
    if found.get("hf_hub_id"):
        return kwargs, f"timm pretrained hf hub {found['hf_hub_id']}"
    if found.get("url"):
        return kwargs, f"timm pretrained url {found['url']}"
    raise SpecError(
        f"timm registers no pretrained weights for {spec.name!r} ({spec.text!r}); pass "
        "pretrained_file=PATH or --teacher-weights FILE"
    )


def _timm_create(spec: ModelSpec, kwargs: dict[str, Any], builtin_weights: str | None) -> nn.Module:
    """``timm.create_model`` with ``kwargs``; pretrained weights are skipped on the meta device (nothing to fill)."""
    import timm

    if kwargs["pretrained"] and torch.get_default_device().type == "meta":
        kwargs = {**kwargs, "pretrained": False}
    try:
        return timm.create_model(spec.name, **kwargs)
    except Exception as e:
        if builtin_weights and kwargs["pretrained"] and is_hub_miss(e):
            raise timm_weights_error(spec.name, builtin_weights, kwargs.get("cache_dir")) from e
        raise


def _raw_override(spec: ModelSpec, key: str) -> str:
    """The unparsed text of override ``key`` in ``spec``."""
    pairs = (pair.partition("=") for pair in spec.text.partition("?")[2].split("&"))
    return next(value for name, _, value in pairs if name == key)


def _dict_call(text: str, spec: ModelSpec) -> dict[str, Any]:
    """``dict(key=literal, ...)`` -> that dict, without evaluating anything but the literals."""
    try:
        node = ast.parse(text, mode="eval").body
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "dict"
            and not node.args
            and all(k.arg for k in node.keywords)
        ):
            return {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError):
        pass
    raise SpecError(
        f"pretrained_cfg_overlay in {spec.text!r} must be dict(key=literal, ...) or "
        f"{{'key': literal}}, got {text!r}; e.g. pretrained_cfg_overlay=dict(file='/x.pth')"
    )


def _torchvision_recipe(spec: ModelSpec, input_shape: tuple[int, ...] | None) -> _Recipe:
    import torchvision

    known = torchvision.models.list_models()
    if spec.name not in known:
        raise SpecError(
            f"unknown torchvision model {spec.name!r} in {spec.text!r}; {_suggest(spec.name, known)}"
            "list names with torchvision.models.list_models()"
        )

    def describe(module: nn.Module) -> tuple[str, list[_Input]]:
        if input_shape is not None:
            return _image_inputs(module, input_shape)
        return _image_inputs(module, _torchvision_image_shape(module))

    return _Recipe(lambda: torchvision.models.get_model(spec.name, weights=None, **spec.overrides), describe)


def _torchvision_image_shape(module: nn.Module) -> tuple[int, ...]:
    size = getattr(module, "image_size", None)  # vit_* models fix their input size
    return (1, 3, size, size) if isinstance(size, int) else DEFAULT_IMAGE_SHAPE


def _hf_recipe(spec: ModelSpec, *, role: str, input_shape: tuple[int, ...] | None, trust_remote_code: bool) -> _Recipe:
    import transformers

    overrides = dict(spec.overrides)
    task = overrides.pop("task", None)
    if task is not None and task not in HF_TASKS:
        raise SpecError(f"unknown hf task {task!r} in {spec.text!r}; use task= one of {', '.join(HF_TASKS)}")
    # NOTE: always explicit: when it is left out, transformers asks on stdin whether to run the code.
    remote = {"trust_remote_code": trust_remote_code}
    try:
        config, unused = transformers.AutoConfig.from_pretrained(
            spec.name, return_unused_kwargs=True, **remote, **overrides
        )
    except (OSError, ValueError, KeyError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "trust_remote_code" in str(e):
            raise SpecError(
                f"{spec.name!r} defines its model with its own Python code ({first_line}); wscompile does not run "
                "it unless you pass --trust-remote-code, which you should only do for code you trust"
            ) from e
        raise SpecError(
            f"cannot load a Hugging Face config from {spec.name!r} ({first_line}); "
            "pass a local directory containing config.json"
        ) from e
    if unused:
        key = next(iter(unused))
        raise SpecError(
            f"hf config {type(config).__name__} has no attribute {key!r} (override in {spec.text!r}); "
            f"{_suggest(key, list(config.to_dict()))}remove it or use a config attribute"
        )
    if hasattr(config, "use_cache"):
        # Caches add outputs (past_key_values) that tracing and export do not want.
        config.use_cache = False
    _fit_layer_types(config, overrides)
    _fit_backbone_stages(config, overrides)
    build = _hf_builder(config, task, remote)
    # The folder, not its weights file: open_weights keeps what the folder names inside it.
    has_weights = role == "teacher" and os.path.isdir(spec.name) and hf_weights_path(spec.name) is not None
    default_weights = spec.name if has_weights else None
    return _Recipe(
        build,
        lambda module: _hf_inputs(module, config, spec, input_shape),
        default_weights,
    )


def _fit_layer_types(config: Any, overrides: dict[str, Any]) -> None:
    """Keep a per-layer ``layer_types`` list as long as an overridden ``num_hidden_layers``.

    Configs that list each layer's attention kind (sliding or full) keep the teacher's list when only
    the depth is overridden, which transformers refuses when the config is saved. The student keeps
    the first layers' kinds, as first-N layer selection keeps the first layers.
    """
    for sub_config in {id(c): c for c in (config, config.get_text_config())}.values():
        types, depth = getattr(sub_config, "layer_types", None), getattr(sub_config, "num_hidden_layers", None)
        if "layer_types" in overrides or not isinstance(types, list) or not isinstance(depth, int):
            continue
        if len(types) > depth:
            sub_config.layer_types = types[:depth]
        elif len(types) < depth and types:
            sub_config.layer_types = [types[i % len(types)] for i in range(depth)]


def _fit_backbone_stages(config: Any, overrides: dict[str, Any]) -> None:
    """Re-derive a backbone config's ``stage_names`` after a depth override (DINOv2 names one per layer).

    The teacher's ``out_features`` then name stages the student may not have; a teacher whose output
    was its last stage gives a student whose output is its last stage, as the config class defaults.
    """
    from transformers.backbone_utils import BackboneConfigMixin

    if not isinstance(config, BackboneConfigMixin) or {"stage_names", "out_features", "out_indices"} & set(overrides):
        return
    try:
        stages = type(config)(**overrides).stage_names
    except Exception:  # a config class that needs more than the overrides to construct: leave it
        return
    if not stages or stages == config.stage_names:
        return
    teacher_last = config.out_features == [config.stage_names[-1]]
    kept = config.out_features if not teacher_last and set(config.out_features) <= set(stages) else None
    config.stage_names = stages
    config.set_output_features_output_indices(out_features=kept, out_indices=None)


def _hf_builder(config: Any, task: str | None, remote: dict[str, bool]) -> Callable[[], nn.Module]:
    """How to build the model of ``config``: the class its ``architectures`` names (as ``from_pretrained``
    picks it) unless ``task`` asks for an auto class; the base model when neither says."""
    import transformers

    if task is None:
        named = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, named, None) if isinstance(named, str) else None
        if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
            return lambda: model_class._from_config(config)
        task = "base"
    auto_class = getattr(transformers, HF_TASKS[task])
    return lambda: auto_class.from_config(config, **remote)


def _hf_inputs(
    module: nn.Module, config: Any, spec: ModelSpec, input_shape: tuple[int, ...] | None
) -> tuple[str, list[_Input]]:
    processor = _processor_config(spec.name) if spec.scheme == "hf" else {}
    inputs = _hf_config_inputs(module, config, processor=processor, input_shape=input_shape, label=spec.text)
    if not inputs:
        return _python_inputs(module, spec, input_shape)
    return _hf_kind(inputs), inputs


def _hf_config_inputs(
    module: nn.Module,
    config: Any,
    *,
    processor: dict[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
    label: str = "the model",
) -> list[_Input]:
    """The forward arguments a transformers model takes, told from its config (and processor config).

    Each modality the forward signature names gets one input: ``pixel_values`` (vision), ``input_features``
    (log-mel spectrogram, Whisper), ``input_values`` (raw waveform, wav2vec2-like), ``input_ids`` (text),
    and ``decoder_input_ids`` for encoder-decoder models. ``input_shape`` replaces the shape of the main
    input: the token ids when there are any, else the single vision or audio input. Empty when the
    signature names none of them.

    Raises:
        SpecError: ``input_shape`` does not have the main input's rank.
    """
    params = inspect.signature(module.forward).parameters
    processor = processor or {}
    vision = getattr(config, "vision_config", None) or config
    text = config.get_text_config()
    inputs: list[_Input] = []
    if "pixel_values" in params:
        inputs.append(
            _Input("pixel_values", (1, getattr(vision, "num_channels", 3), *_image_size(vision, processor)), "float")
        )
    if "input_features" in params and hasattr(config, "num_mel_bins"):
        inputs.append(_Input("input_features", _spectrogram_shape(config, processor), "float"))
    if "input_values" in params:
        inputs.append(_Input("input_values", (1, _waveform_length(config)), "float"))
    seq_len = min(DEFAULT_SEQ_LEN, getattr(text, "max_position_embeddings", DEFAULT_SEQ_LEN))
    if "input_ids" in params and hasattr(text, "vocab_size"):
        inputs.append(_Input("input_ids", (1, seq_len), "ids", torch.int64, text.vocab_size))
        if "attention_mask" in params:
            inputs.append(_Input("attention_mask", (1, seq_len), "mask", torch.int64))
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params and hasattr(text, "vocab_size"):
        decoder_len = min(seq_len, getattr(config, "max_target_positions", seq_len))
        inputs.append(_Input("decoder_input_ids", (1, decoder_len), "ids", torch.int64, text.vocab_size))
    if input_shape is not None and inputs:
        inputs = _with_main_shape(inputs, tuple(input_shape), label)
    return inputs


def _with_main_shape(inputs: list[_Input], shape: tuple[int, ...], label: str) -> list[_Input]:
    """``inputs`` with the main one (token ids, else the only non-text input) shaped ``shape``."""
    if any(i.name == "input_ids" for i in inputs) or all(i.role != "float" for i in inputs):
        if len(shape) != 2:
            raise SpecError(f"{label!r} takes token ids: pass --input-shape BATCH,SEQ, got {shape}")
        # Every token input (encoder, mask, decoder) follows the given batch and length.
        return [replace(i, shape=shape) if i.role != "float" else i for i in inputs]
    main = next(i for i in inputs if i.role == "float")
    if len(shape) != len(main.shape):
        raise SpecError(
            f"{label!r} takes {main.name} of shape {main.shape}: pass --input-shape with {len(main.shape)} "
            f"numbers, got {shape}"
        )
    batch = shape[0]
    return [replace(i, shape=shape) if i is main else replace(i, shape=(batch, *i.shape[1:])) for i in inputs]


def _hf_kind(inputs: list[_Input]) -> str:
    names = {i.name for i in inputs}
    if names == {"pixel_values"}:
        return KIND_IMAGE
    if all(i.role != "float" for i in inputs):
        return KIND_TEXT
    return KIND_OTHER


def _image_size(vision: Any, processor: dict[str, Any]) -> tuple[int, int]:
    """Height and width: the config's ``image_size``, else the processor's crop or resize, else 224."""
    size = getattr(vision, "image_size", None)
    if size is None:
        size = processor.get("crop_size") if processor.get("do_center_crop", True) else None
        size = size or processor.get("size")
    if isinstance(size, dict):
        size = (size["height"], size["width"]) if "height" in size and "width" in size else size.get("shortest_edge")
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return DEFAULT_IMAGE_SHAPE[2], DEFAULT_IMAGE_SHAPE[3]


def _spectrogram_shape(config: Any, processor: dict[str, Any]) -> tuple[int, int, int]:
    """(1, mel bins, frames); Whisper's encoder takes exactly 2 frames per source position (its conv stride)."""
    frames = 2 * config.max_source_positions if hasattr(config, "max_source_positions") else None
    frames = frames or processor.get("nb_max_frames") or DEFAULT_AUDIO_FRAMES
    return 1, config.num_mel_bins, frames


def _waveform_length(config: Any) -> int:
    """Samples of the shortest waveform the conv feature extractor turns into ``DEFAULT_AUDIO_FRAMES`` frames."""
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides:
        return DEFAULT_WAVEFORM_LENGTH
    length = DEFAULT_AUDIO_FRAMES
    for kernel, stride in reversed(list(zip(kernels, strides, strict=True))):
        length = (length - 1) * stride + kernel  # the input length of a conv that outputs `length` frames
    return length


def _processor_config(directory: str) -> dict[str, Any]:
    """The directory's image processor / feature extractor config (preprocessor_config.json), or {}."""
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            found = json.load(fh)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _python_recipe(spec: ModelSpec, input_shape: tuple[int, ...] | None) -> _Recipe:
    target, _, factory_name = spec.name.rpartition(":")
    user_module = _import_file(target, spec) if spec.scheme == "file" else _import_module(target, spec)
    factory = getattr(user_module, factory_name, None)
    if not callable(factory):
        raise SpecError(f"{target!r} has no callable {factory_name!r} (spec {spec.text!r})")
    return _Recipe(lambda: factory(**spec.overrides), lambda module: _python_inputs(module, spec, input_shape))


def _import_module(name: str, spec: ModelSpec) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise SpecError(f"cannot import {name!r} for {spec.text!r} ({e}); check that it is on PYTHONPATH") from e


def _import_file(path: str, spec: ModelSpec) -> Any:
    if not os.path.isfile(path):
        raise SpecError(f"python file '{path}' in {spec.text!r} does not exist")
    # A stable, unique module name, so classes defined in the file can be found again by name.
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
    name = f"wscompile_user_{os.path.splitext(os.path.basename(path))[0]}_{digest}"
    file_spec = importlib.util.spec_from_file_location(name, path)
    if file_spec is None or file_spec.loader is None:
        raise SpecError(f"cannot load python file '{path}' in {spec.text!r}")
    user_module = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = user_module
    try:
        file_spec.loader.exec_module(user_module)
    except Exception as e:
        del sys.modules[name]
        raise SpecError(f"running '{path}' failed: {type(e).__name__}: {e}") from e
    return user_module


def _python_inputs(module: nn.Module, spec: ModelSpec, input_shape: tuple[int, ...] | None) -> tuple[str, list[_Input]]:
    if input_shape is not None:
        return _kind_of([_Input(_first_param(module), tuple(input_shape), "float")])
    inputs = _attribute_inputs(module, spec.text)
    if inputs is None:
        raise InputsError(
            f"cannot tell the inputs of {spec.text!r}; pass --input-shape 1,3,32,32 (the shape of its first "
            "forward argument) or give the model an `example_inputs` attribute (a tensor or a dict of them)"
        )
    return _kind_of(inputs)


def _attribute_inputs(module: nn.Module, label: str) -> list[_Input] | None:
    """The inputs described by the module's own ``example_inputs`` attribute, None without one."""
    examples = getattr(module, "example_inputs", None)
    if isinstance(examples, torch.Tensor):
        examples = {_first_param(module): examples}
    if not isinstance(examples, dict) or not examples:
        return None
    inputs = []
    for name, tensor in examples.items():
        if not isinstance(tensor, torch.Tensor):
            raise SpecError(f"example_inputs[{name!r}] of {label!r} is a {type(tensor).__name__}, not a tensor")
        shape = tuple(tensor.shape)
        if tensor.dtype == torch.bool:
            inputs.append(_Input(name, shape, "mask", torch.bool))
        elif tensor.is_floating_point():
            inputs.append(_Input(name, shape, "float", tensor.dtype))
        else:
            high = int(tensor.max()) + 1 if tensor.numel() and not tensor.is_meta else 1
            inputs.append(_Input(name, shape, "ids", tensor.dtype, high))
    return inputs


def example_inputs(module: nn.Module, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch-1 example inputs for an in-memory model, told the way the CLI tells them for a spec.

    A transformers model's come from ``module.config`` (every modality, as for ``hf:`` specs), a timm
    model's from its ``pretrained_cfg`` input size, a torchvision model's are a default image, and any
    other model's from its ``example_inputs`` attribute. Tensors are on the CPU (meta for a meta model).

    Raises:
        InputsError: none of these tells the inputs; pass them (``example_inputs=`` in Python).
    """
    label = type(module).__name__
    inputs = _module_inputs(module, label)
    if inputs is None:
        raise InputsError(
            f"cannot tell the inputs of {label}: it has no transformers config, timm pretrained_cfg or "
            "`example_inputs` attribute; pass example_inputs= (a tensor for its first forward argument or a dict "
            "of keyword arguments)"
        )
    device = "meta" if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())) else "cpu"
    return {name: t.to(device) for name, t in _make_inputs(inputs, None, None, seed).items()}


def _module_inputs(module: nn.Module, label: str) -> list[_Input] | None:
    config = getattr(module, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):  # a transformers config
        inputs = _hf_config_inputs(module, config, label=label)
        if inputs:
            return inputs
    pretrained_cfg = getattr(module, "pretrained_cfg", None) or {}
    if "input_size" in pretrained_cfg:
        channels, height, width = pretrained_cfg["input_size"]
        # NOTE: timm keeps pretrained_cfg's size when img_size is overridden; the patch embed knows.
        img_size = getattr(getattr(module, "patch_embed", None), "img_size", None)
        if img_size:
            height, width = img_size
        return [_Input(_first_param(module), (1, channels, height, width), "float")]
    if type(module).__module__.startswith("torchvision.models"):
        return [_Input(_first_param(module), _torchvision_image_shape(module), "float")]
    return _attribute_inputs(module, label)


def _kind_of(inputs: list[_Input]) -> tuple[str, list[_Input]]:
    if any(i.role == "ids" for i in inputs):
        return KIND_TEXT, inputs
    if len(inputs) == 1 and len(inputs[0].shape) == 4:
        return KIND_IMAGE, inputs
    return KIND_OTHER, inputs


def _make_inputs(inputs: list[_Input], batch: int | None, seq_len: int | None, seed: int) -> dict[str, torch.Tensor]:
    """CPU tensors for ``inputs``; ``None`` keeps the described batch size / sequence length."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for spec in inputs:
        shape = list(spec.shape)
        if batch is not None and shape:
            shape[0] = batch
        if seq_len is not None and spec.role in ("ids", "mask") and len(shape) >= 2:
            shape[1] = seq_len
        if spec.role == "float":
            out[spec.name] = torch.randn(shape, generator=generator, dtype=spec.dtype)
        elif spec.role == "ids":
            out[spec.name] = torch.randint(0, spec.high, shape, generator=generator, dtype=spec.dtype)
        else:
            mask = torch.ones(shape, dtype=spec.dtype)
            if len(shape) >= 2 and shape[0] > 1 and shape[1] > 1:
                # Padding at the end of the second row, so masks are exercised.
                mask[1, -max(1, shape[1] // 4) :] = 0
            out[spec.name] = mask
    return out


def _module_device(module: nn.Module) -> torch.device:
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _fit_hf_weights(
    module: nn.Module, source: ConvertedSource, spec: ModelSpec, path: str, *, seed: int
) -> TensorSource:
    """A transformers checkpoint, already under the module's keys, checked as ``from_pretrained`` checks it.

    Checkpoint keys the model has no place for are dropped with a warning, as transformers does. Missing
    keys are an error, except the head of a base-model checkpoint loaded into a model with a head
    (``BertModel`` weights into ``BertForMaskedLM``): those tensors get the model's fresh init.
    """
    if source.unexpected:
        _warn(
            f"{len(source.unexpected)} tensor(s) in '{path}' have no place in {type(module).__name__} and are "
            f"not used ({_first(source.unexpected)})"
        )
    known = set(source.keys())
    tied = _tied_names(module.state_dict(keep_vars=True))
    missing = [key for key, names in tied.items() if not known.intersection(names)]  # a tied twin counts
    prefix = f"{module.base_model_prefix}." if module.base_model_prefix else None
    head = [key for key in missing if prefix and not key.startswith(prefix)]
    base_only = (
        prefix is not None
        and hasattr(module, module.base_model_prefix)
        and not any(not key.startswith(prefix) for key in known)
        and head == missing
    )
    if missing and not base_only:
        return _fit_weights(module, source, spec, path)  # the full error message
    if head:
        _warn(
            f"'{path}' holds the base model only: the teacher's head ({_first(head)}) is not in it and keeps a "
            "fresh init, as from_pretrained does"
        )
        fresh = _fresh_tensors(module, head, seed=seed)
        owners = {key: "checkpoint" for key in source.keys()} | {key: "fresh" for key in head}
        source = ShardedSource(owners, {"checkpoint": source, "fresh": DictSource(fresh)}.__getitem__)
    return _fit_weights(module, source, spec, path)


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def init_kept(module: nn.Module, names: Iterable[str], seed: int) -> bool:
    """Give the tensors ``names`` of a model built on meta its library's own init, and nothing else.

    The rule (transformers models, whose ``_init_weights`` initializes one module at a time): the
    modules owning ``names`` are allocated on the CPU and initialized by ``_init_weights`` one after
    another, in the model's module order, after ``torch.manual_seed(seed)``. The values are
    deterministic per seed but are not those of a whole-model build (which draws every tensor in
    construction order); the rest of the model stays on meta. Returns False, changing nothing,
    where the rule does not apply (another library, a kept buffer, which constructors fill, or a
    tensor shared with another module): build the whole model instead.
    """
    init = getattr(module, "_init_weights", None)
    names = set(names)
    if not is_transformers_model(module) or init is None or not names:
        return False
    parameters = dict(module.named_parameters(remove_duplicate=False))
    if not names <= parameters.keys() or has_tied_tensors(module) or not all(parameters[n].is_meta for n in names):
        return False
    owners = {name.rpartition(".")[0] for name in names}
    ordered = [(path, m) for path, m in module.named_modules() if path in owners]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, owner in ordered:
            owner.to_empty(device="cpu", recurse=False)
            init(owner)
    return True


def is_on_meta(module: nn.Module) -> bool:
    """Whether ``module`` holds meta tensors (built on the meta device, or partly: see ``init_kept``)."""
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def has_tied_tensors(module: nn.Module) -> bool:
    """Whether two state_dict keys of ``module`` name one parameter or buffer (tied embeddings, say)."""
    named = itertools.chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
    )
    tensors = [id(tensor) for _, tensor in named]
    return len(tensors) != len(set(tensors))


def _tied_names(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Each state_dict key -> every key naming the same tensor (tied weights)."""
    groups: dict[int, list[str]] = {}
    for key, tensor in state.items():
        groups.setdefault(id(tensor), []).append(key)
    return {key: groups[id(tensor)] for key, tensor in state.items()}


def _fresh_tensors(module: nn.Module, keys: list[str], *, seed: int) -> dict[str, torch.Tensor]:
    """The model's own init of ``keys``, computed on copies of their submodules (``module`` stays as it is)."""
    by_owner: dict[str, list[str]] = {}
    for key in keys:
        owner_name, _, name = key.rpartition(".")
        by_owner.setdefault(owner_name, []).append(name)
    out: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for owner_name, names in by_owner.items():
            owner = copy.deepcopy(module.get_submodule(owner_name))
            if any(t.is_meta for t in itertools.chain(owner.parameters(), owner.buffers())):
                owner = owner.to_empty(device="cpu")
                module._init_weights(owner)
            state = owner.state_dict()
            out |= {f"{owner_name}.{name}" if owner_name else name: state[name].detach().clone() for name in names}
    return out


def _fit_weights(module: nn.Module, source: TensorSource, spec: ModelSpec, path: str) -> RenamedSource:
    """``source`` under the module's state_dict names, or a SpecError listing what does not fit."""
    state = module.state_dict(keep_vars=True)
    expected = {key: tuple(tensor.shape) for key, tensor in state.items()}
    file_keys = list(source.keys())
    rename = _best_rename(file_keys, list(expected))
    names: dict[str, str] = {}
    unexpected: list[str] = []
    # Non-persistent buffers (e.g. HF position_ids) are in old checkpoints but not in state_dict.
    transient = {key for key, _ in module.named_buffers()} - set(expected)
    for file_key in file_keys:
        key = rename(file_key)
        if key in expected:
            names.setdefault(key, file_key)
        elif key not in transient:
            unexpected.append(file_key)
    # A tied weight is saved once; its other names read the same file tensor.
    tied = _tied_names(state)
    for key in state:
        if key not in names:
            loaded = next((names[other] for other in tied[key] if other in names), None)
            if loaded is not None:
                names[key] = loaded
    missing = [key for key in expected if key not in names]
    mismatched = [
        f"{key} {tuple(source.shape(names[key]))} in file vs {shape} in model"
        for key, shape in expected.items()
        if key in names and tuple(source.shape(names[key])) != shape
    ]
    problems = [
        f"{len(found)} {what} ({_first(found, 5)})"
        for what, found in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if found
    ]
    if problems:
        raise SpecError(
            f"weights '{path}' do not fit {spec.text!r}: {'; '.join(problems)}; "
            "check that they were saved from this model with the same overrides"
        )
    return RenamedSource(source, {key: names[key] for key in expected})


def _best_rename(file_keys: list[str], module_keys: list[str]) -> Callable[[str], str]:
    """The key renaming (none, strip a prefix, add a prefix) that fits the most file keys."""
    candidates: list[Callable[[str], str]] = [lambda key: key]
    # Wrappers (DDP's "module.", Lightning's "model.") prefix every key of a checkpoint.
    for prefix in _shared_prefixes(file_keys, need=len(file_keys)):
        candidates.append(lambda key, p=prefix: key.removeprefix(p))
    # A base-model checkpoint loaded into a model with a head ("bert." + base keys).
    for prefix in _shared_prefixes(module_keys, need=(len(module_keys) + 1) // 2):
        candidates.append(lambda key, p=prefix: p + key)
    wanted = set(module_keys)
    # max keeps the first of equal scores, so no renaming wins ties.
    return max(candidates, key=lambda rename: sum(rename(key) in wanted for key in file_keys))


def _shared_prefixes(keys: list[str], *, need: int) -> list[str]:
    """Prefixes of one or two dotted components that at least ``need`` keys start with."""
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                counts[".".join(parts[:depth]) + "."] += 1
    return [prefix for prefix, count in counts.items() if count >= need > 0]


def _copy_weights(module: nn.Module, source: TensorSource) -> None:
    """Copy every state_dict tensor from ``source``, one at a time (dtype converted by ``copy_``)."""
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            tensor.copy_(source.read(key))
