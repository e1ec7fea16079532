"""Argument checks that need no model: run by the CLI right after parsing, before torch is imported.

An empty path, an ``--out`` that is neither a file with an extension nor a directory, a
``--teacher-weights`` or ``--calib`` that does not exist: each is one line and exit status 2 in
milliseconds, instead of after seconds of imports and model building. A ``--calib`` that nothing
reads is a warning.
"""

from __future__ import annotations

import argparse
import os
import sys

from wscompile.errors import SpecError

PATH_FLAGS = ("out", "manifest", "report", "onnx", "output", "weights", "teacher_weights", "calib")


def check_arguments(args: argparse.Namespace) -> None:
    """Check a parsed command line's paths, and warn about a ``--calib`` nothing reads.

    Raises:
        SpecError: a path flag is empty, ``--out`` is ambiguous, or an input file does not exist.
    """
    for name in PATH_FLAGS:
        if getattr(args, name, None) == "":
            raise SpecError(f"--{name.replace('_', '-')} is empty; pass a path")
    out = getattr(args, "out", None)
    if out and not out.endswith(("/", os.sep)) and not os.path.isdir(out) and not os.path.splitext(out)[1]:
        raise SpecError(
            f"--out '{out}' has no extension: pass '{out}/' for a model folder or "
            f"'{out}.safetensors' for a weights file"
        )
    weights = getattr(args, "teacher_weights", None) or (
        getattr(args, "weights", None) if args.command == "export" else None
    )
    if weights and not os.path.exists(weights):
        flag = "--teacher-weights" if args.command != "export" else "--weights"
        raise SpecError(f"{flag} '{weights}' does not exist")
    if args.command == "apply" and not os.path.isfile(args.manifest):
        raise SpecError(
            f"--manifest '{args.manifest}' does not exist; pass the manifest `wscompile init --manifest` wrote"
        )
    calib = getattr(args, "calib", None)
    if calib is None:
        return
    if not os.path.exists(calib):
        raise SpecError(
            f"--calib '{calib}' does not exist; pass a .pt/.safetensors file of input tensors, a folder "
            "of images or a text file"
        )
    if not _reads_calibration(args):
        wanted = "--int8" if args.command == "export" else "--method activation, --layers importance or --int8"
        print(f"warning: --calib '{calib}' is not used: only {wanted} reads calibration inputs", file=sys.stderr)


def _reads_calibration(args: argparse.Namespace) -> bool:
    return (
        getattr(args, "method", None) == "activation"
        or getattr(args, "layers", "").strip() == "importance"
        or getattr(args, "int8", False)
    )
