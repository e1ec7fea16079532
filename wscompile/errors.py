"""One exception tree for every failure a user can act on.

Every message says what failed, where, expected vs got, and what to do next. The CLI prints
``str(error)`` on one line and exits with ``error.exit_code``; tracebacks only with ``--debug``.
"""

from __future__ import annotations


class WscompileError(Exception):
    """Base of all wscompile errors. ``exit_code`` 2 means bad input, 1 a failed check."""

    exit_code = 2


class SpecError(WscompileError, ValueError):
    """A model spec or a weights file that cannot be turned into a model."""


class InputsError(SpecError):
    """A model's example inputs cannot be told from its spec or config (the other model's may stand in)."""


class TraceError(WscompileError, RuntimeError):
    """No frontend could trace a model into the IR."""


class MatchError(WscompileError, ValueError):
    """Teacher and student graphs could not be aligned."""


class SelectionError(WscompileError, ValueError):
    """A student tensor cannot be filled from its teacher match (e.g. it is larger)."""


class OutputError(WscompileError, OSError):
    """An output file cannot be written (exists without --force, directory not writable)."""


class ResourceError(WscompileError, MemoryError):
    """A request that would not fit in memory, predicted from tensor shapes before allocating."""


class ExportError(WscompileError, RuntimeError):
    """ONNX export failed."""


class ValidationError(WscompileError, AssertionError):
    """An artifact fails its check: ONNX outputs differ from PyTorch, a manifest breaks its schema."""

    exit_code = 1


class MissingDependencyError(WscompileError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived; raised by the CLI's handler so every cleanup path runs as for Ctrl-C.

    A ``BaseException``, like ``KeyboardInterrupt``: ``except Exception`` blocks do not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum  # the signal's number; the CLI exits with 128 + signum
