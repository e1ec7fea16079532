"""wscompile: initialize small models from larger pretrained ones by structural weight selection."""

from wscompile.commands import save
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
