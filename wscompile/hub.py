"""Model hubs: an ``hf:org/name`` id -> a local snapshot directory, and hub failures -> one-line errors.

Everything after spec resolution reads local files, so a hub id is turned into the directory of its
cached snapshot first (``huggingface_hub.snapshot_download``, which downloads what is missing when
online and only reads the cache when ``HF_HUB_OFFLINE=1``). Only the files wscompile reads are
fetched: ``config.json`` (and the repo's Python files, run only with ``--trust-remote-code``),
tokenizer/processor files and, for a teacher, its weights (safetensors;
``pytorch_model*.bin`` only when the repo has no safetensors). The cache is ``cache_dir`` when given,
else huggingface_hub's (``HF_HUB_CACHE``, ``HF_HOME/hub``).

timm loads its own pretrained weights through the same cache; ``timm_weights_error`` turns its
failures into the same kind of message.
"""

from __future__ import annotations

import functools
import os

from wscompile.errors import SpecError
from wscompile.weights import hf_weights_path

# Python files too: a config may name classes defined in the repo, which still run only with --trust-remote-code.
CONFIG_PATTERNS = ("config.json", "*.py")
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece*.model",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template*",
)
SAFETENSORS_PATTERNS = ("model*.safetensors", "model.safetensors.index.json")
PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
LOCAL_COPY_HINT = "point at a local copy with hf:/path/to/dir, or set HF_HUB_CACHE to a cache that holds it"


def is_hub_id(name: str) -> bool:
    """Whether an ``hf:`` name is a hub repo id (``org/name`` or ``name``) rather than a local path."""
    if os.path.exists(name) or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_cache_dir(cache_dir: str | None = None) -> str:
    """The hub cache in use: ``cache_dir``, else huggingface_hub's (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return os.path.abspath(os.path.expanduser(cache_dir or constants.HF_HUB_CACHE))


def is_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def hub_snapshot(
    repo_id: str, *, revision: str | None = None, cache_dir: str | None = None, weights: bool = True
) -> str:
    """The local snapshot directory of ``repo_id`` at ``revision``, downloaded into the cache if needed.

    Args:
        repo_id: a model repo id, ``org/name``.
        revision: branch, tag or commit; the repo's default branch when None.
        cache_dir: the hub cache; huggingface_hub's (``HF_HUB_CACHE``) when None.
        weights: also fetch the weights (a teacher); a student needs only its config.

    Raises:
        SpecError: one line saying why (offline and not cached, hub unreachable, no such repo or
            revision) and how to point at a local copy instead.
    """
    return _snapshot(repo_id, revision, hub_cache_dir(cache_dir), weights, is_offline())


@functools.lru_cache(maxsize=32)
def _snapshot(repo_id: str, revision: str | None, cache: str, weights: bool, offline: bool) -> str:
    # NOTE: memoized (successes only) because one run resolves each spec several times (memory
    # check, meta build, real build), and online each resolution is a hub request.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    patterns = [*CONFIG_PATTERNS, *TOKENIZER_PATTERNS]
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=[*patterns, *SAFETENSORS_PATTERNS] if weights else patterns,
        )
        if weights and hf_weights_path(path) is None:
            path = snapshot_download(
                repo_id, revision=revision, cache_dir=cache, allow_patterns=[*patterns, *PICKLE_PATTERNS]
            )
    except LocalEntryNotFoundError as e:
        raise SpecError(f"cannot load {where}: {unreachable(cache)}; {LOCAL_COPY_HINT}") from e
    except RevisionNotFoundError as e:
        raise SpecError(
            f"the Hugging Face hub has no revision {revision!r} of {repo_id!r}; "
            "pass revision= a branch, tag or commit of that repo"
        ) from e
    except RepositoryNotFoundError as e:
        raise SpecError(
            f"no model {repo_id!r} on the Hugging Face hub (or it is private or gated: log in with "
            f"`hf auth login`); check the id, or {LOCAL_COPY_HINT}"
        ) from e
    except HfHubHTTPError as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SpecError(f"the Hugging Face hub refused {where} ({first_line}); {LOCAL_COPY_HINT}") from e
    return path


def unreachable(cache: str) -> str:
    """Why nothing could be fetched: offline mode or no connection, and the cache that was searched."""
    if is_offline():
        return f"offline (HF_HUB_OFFLINE is set) and not in the hub cache '{cache}'"
    return f"the Hugging Face hub cannot be reached and it is not in the hub cache '{cache}'"


def is_hub_miss(error: BaseException) -> bool:
    """Whether ``error`` (or one of its causes) is huggingface_hub failing to find a file offline or in the cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def timm_weights_error(name: str, source: str, cache_dir: str | None) -> SpecError:
    """The one-line error for timm pretrained weights that are neither cached nor downloadable."""
    return SpecError(
        f"cannot load the pretrained weights of timm model {name!r} ({source}): {unreachable(hub_cache_dir(cache_dir))}"
        "; pass pretrained_file=PATH in the spec (a .safetensors/.pth checkpoint of this model) or "
        "--teacher-weights FILE, or set HF_HUB_CACHE to a cache that holds them"
    )
