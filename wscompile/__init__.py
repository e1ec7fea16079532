"""wscompile: initialize small models from larger pretrained ones by structural weight selection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wscompile.errors import (
    ExportError,
    InputsError,
    MatchError,
    SelectionError,
    SpecError,
    TraceError,
    ValidationError,
    WscompileError,
)

if TYPE_CHECKING:
    from wscompile.commands import save
    from wscompile.pipeline import compile, initialize
    from wscompile.plan import SelectionPlan

__version__ = "0.1.0"

__all__ = [
    "ExportError",
    "InputsError",
    "MatchError",
    "SelectionError",
    "SelectionPlan",
    "SpecError",
    "TraceError",
    "ValidationError",
    "WscompileError",
    "compile",
    "initialize",
    "save",
]

# NOTE: imported on first use, so that `wscompile --help` and argument errors do not wait for torch.
_LAZY = {
    "compile": "wscompile.pipeline",
    "initialize": "wscompile.pipeline",
    "save": "wscompile.commands",
    "SelectionPlan": "wscompile.plan",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'wscompile' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
