"""Status lines on stderr for the stages that take a while: what runs now, then how long it took.

``Progress()`` writes nothing at all, so the Python API and the tests see no output; ``wscompile``
turns it on when stderr is a terminal (or with ``--progress``) and never with ``--quiet``. A stage's
line is written in two halves on one line::

    tracing teacher timm:vit_small_patch16_224... done in 1.2 s

the label when the stage starts, so a long stage says what it is doing, and its time when it ends.
Output printed meanwhile goes through ``lines``, which first ends the open half with a newline; the
stage then reports on a line of its own (``tracing teacher ...: done in 1.2 s``). A stage that logs
as it goes (the parity check, a line per output) runs under ``holding``: its lines follow its own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TextIO

Log = Callable[[str], None]


class Progress:
    """One status line per stage on ``stream`` (stderr by default), only when ``enabled``."""

    def __init__(self, enabled: bool = False, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._stream = stream  # None: sys.stderr when written, so a replaced stderr (pytest's capture) is used
        self._open: str | None = None  # the stage whose line still waits for its end

    @contextmanager
    def stage(self, label: str | None) -> Iterator[None]:
        """Say ``label`` while the block runs, then "done in N s" (or "failed" when it raises).

        A ``label`` of None says nothing: the block is a step this run leaves out.
        """
        if not self.enabled or label is None:
            yield
            return
        self._break()  # a stage inside another: the outer one ends on a line of its own
        self._write(f"{label}... ")
        self._open = label
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self._finish(label, "failed")
            raise
        except BaseException:  # Ctrl-C, a stop signal: the CLI's message follows on its own line
            self._finish(label, "stopped")
            raise
        self._finish(label, f"done in {time.perf_counter() - start:.1f} s")

    @contextmanager
    def holding(self, label: str | None, log: Log) -> Iterator[Log]:
        """``stage(label)``, yielding a log whose lines wait until the stage's line is complete.

        The lines are printed after the stage even when it raises; with no line shown, ``log`` itself.
        """
        if not self.enabled or label is None:
            yield log
            return
        held: list[str] = []
        try:
            with self.stage(label):
                yield held.append
        finally:
            for line in held:
                log(line)

    def lines(self, log: Log) -> Log:
        """``log``, made to end an open stage line first, so what it prints starts a line of its own."""
        if not self.enabled:
            return log

        def say(line: str) -> None:
            self._break()
            log(line)

        return say

    def _finish(self, label: str, outcome: str) -> None:
        self._write(f"{outcome}\n" if self._open == label else f"{label}: {outcome}\n")
        self._open = None

    def _break(self) -> None:
        if self._open is not None:
            self._write("\n")
            self._open = None

    def _write(self, text: str) -> None:
        stream = self._stream or sys.stderr
        with suppress(OSError, ValueError):  # a terminal gone (SIGHUP) or closed is no reason to fail the run
            stream.write(text)
            stream.flush()


def shown(asked: bool | None, *, quiet: bool = False) -> bool:
    """Whether progress is shown: never when ``quiet``, else as ``asked`` (--progress / --no-progress),
    else when stderr is a terminal."""
    if quiet:
        return False
    return sys.stderr.isatty() if asked is None else asked
