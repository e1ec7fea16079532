"""Command line: ``wscompile init | diff | export | apply``. Parses arguments; the work is in commands.py."""

from __future__ import annotations

import argparse
import difflib
import gc
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import NoReturn

from wscompile import __version__
from wscompile.choices import CALIB_BATCH_SIZE, CALIB_MAX_SAMPLES, HEAD_MODES, LAYER_POLICIES, METHODS
from wscompile.errors import Terminated, WscompileError

# Exit status of an unexpected exception (a bug in wscompile or a library): bad input is 2, a failed check 1.
INTERNAL_ERROR = 3
# Exit status when stdout is a pipe closed early (`wscompile diff ... | head`): 128 + SIGPIPE, as Unix tools.
BROKEN_PIPE = 128 + 13
# Signals that end a run as Ctrl-C does: temporaries removed, exit status 128 + the signal's number.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
SEED_MAX = 2**63 - 1  # torch.manual_seed's largest seed that is also a signed 64-bit integer

SPEC_HELP = (
    "model spec: timm:NAME?k=v&..., torchvision:NAME?..., hf:DIR_OR_ID?..., py:pkg.module:factory?... "
    "or path/to/file.py:factory?... (py: and file specs import and run that code: use only code you trust)"
)


EXAMPLES = {
    "init": """examples:
  wscompile init --teacher timm:vit_small_patch16_224?pretrained=True \\
      --student timm:vit_tiny_patch16_224 --out student.safetensors --manifest student.json
  wscompile init --teacher hf:path/to/bert-base --student hf:path/to/bert-base?num_hidden_layers=4 \\
      --out student/ --report student.html
  wscompile init --teacher timm:resnet50 --teacher-weights resnet50.safetensors \\
      --student timm:resnet18 --method activation --calib images/ --out student.safetensors --strict""",
    "diff": """examples:
  wscompile diff --teacher timm:vit_small_patch16_224 --student timm:vit_tiny_patch16_224
  wscompile diff --teacher timm:convnext_tiny --student timm:convnext_tiny?depths=2,2,2,2 -o plan.html""",
    "export": """examples:
  wscompile export --student timm:vit_tiny_patch16_224 --weights student.safetensors --onnx student.onnx
  wscompile export --student timm:vit_tiny_patch16_224 --weights student.safetensors --onnx student.onnx \\
      --int8 --calib images/
  wscompile export --student timm:vit_tiny_patch16_224 --weights student.safetensors --onnx student.onnx \\
      --verify-only""",
    "apply": """examples:
  wscompile apply --manifest student.json --teacher-weights teacher.safetensors --out student.safetensors
  wscompile apply --manifest student.json --teacher-weights teacher.safetensors --out student.safetensors \\
      --student py:mymodels:small_net   # a py:/file spec in a manifest runs only when named here""",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the closest flag or subcommand (difflib), and the
    model-free argument checks (``preflight.py``) run right after parsing, before torch is imported."""

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        self._argv = list(sys.argv[1:] if args is None else args)
        flags = self._flags()
        # Before argparse's own checks, which would first complain that the flag meant is missing.
        unknown = [
            word
            for word in self._argv
            if word.startswith("--") and word != "--" and not any(flag.startswith(word.split("=")[0]) for flag in flags)
        ]
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        parsed = super().parse_args(self._argv, namespace)
        if getattr(parsed, "quiet", False) and getattr(parsed, "progress", None):
            self.error("--quiet and --progress contradict each other; pass one of them")
        from wscompile.preflight import check_arguments

        try:
            check_arguments(parsed)
        except WscompileError as e:
            if parsed.debug:
                raise
            self.exit(e.exit_code, f"wscompile {parsed.command}: error: {_one_line(e)}\n")
        return parsed

    def error(self, message: str) -> NoReturn:
        hint = _did_you_mean(message, self._flags())
        prog = self._named()[0].prog if self._named() else self.prog
        self.exit(2, f"{prog}: error: {_one_line(message)}{hint}; see `{prog} --help`\n")

    def _named(self) -> list[argparse.ArgumentParser]:
        """The parser of the subcommand named on the command line, if this parser has subcommands and one is."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return [action.choices[a] for a in getattr(self, "_argv", []) if a in action.choices][:1]
        return []

    def _flags(self) -> list[str]:
        """The option strings of the subcommand being parsed (of every subcommand when none is named)."""
        parsers = [self]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers = [self, *(self._named() or action.choices.values())]
        return [flag for p in parsers for a in p._actions for flag in a.option_strings]


def _did_you_mean(message: str, flags: list[str]) -> str:
    """ " (did you mean --teacher?)" for the mistyped flags or subcommand an argparse error names."""
    choice = re.search(r"invalid choice: '?([^'\s]+)'? \(choose from (.*)\)", message)
    if choice:
        known = re.findall(r"[\w-]+", choice[2])
        close = difflib.get_close_matches(choice[1], known, n=1, cutoff=0.5)
        return f" (did you mean {close[0]}?)" if close else ""
    if "unrecognized arguments:" not in message:
        return ""
    typed = [word.split("=")[0] for word in message.split(":", 1)[1].split() if word.startswith("-")]
    close = [match for word in typed for match in difflib.get_close_matches(word, flags, n=1, cutoff=0.6)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,224,224, got {text!r}") from None


def _seed(text: str) -> int:
    """A seed: a whole number from 0 to 2**63 - 1."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {SEED_MAX} (2**63 - 1), got {text!r}")
    return seed


def _bytes(text: str) -> int:
    """A size like 5GB, 500MB or 1000000 (decimal units), in bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB, 500MB or 1000000, got {text!r}")
    return int(float(match[1]) * 1000 ** " KMGT".index(match[2] or " "))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--seed", type=_seed, default=0, help="seed for the student's own init and example inputs")
    p.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,224,224 (text: BATCH,SEQ)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let hf: specs run code from the model directory (off by default)",
    )
    p.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="load .pt/.bin checkpoints that need code execution (only for files you trust)",
    )
    p.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="let a model folder's shard index or weights link to files outside the folder (refused "
        "by default: an untrusted folder could copy any tensor file on the machine into the output)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a status line on stderr for every stage (building, tracing, planning, export, parity check) "
        "and a bar while reading the teacher (default: when stderr is a terminal)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress and nothing on stdout but diff's report: only warnings and errors (on stderr)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _selection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        default="uniform",
        choices=list(METHODS),
        help="element selection per coupled dimension: uniform (the paper's rule, default), consecutive "
        "(first indices), random (--seed), magnitude (teacher weight norms), activation (teacher "
        "activations on --calib)",
    )
    p.add_argument(
        "--layers",
        default="first",
        metavar="POLICY",
        help=f"layer selection per stage: {', '.join(LAYER_POLICIES)} (on --calib), or an explicit map "
        "'STAGE:BLOCK,...;...' of student stage index to teacher block indices, e.g. '0:0,2,4;1:0,1' "
        "(default: first, the paper's)",
    )
    p.add_argument(
        "--heads",
        default="split",
        choices=list(HEAD_MODES),
        help="attention heads: split (heads and head dims shrink, default) or whole (each student head "
        "is a whole teacher head; head_dim must be equal)",
    )
    p.add_argument(
        "--rescale",
        action="store_true",
        help="multiply weights whose input axis shrank by sqrt(teacher_in / student_in)",
    )
    p.add_argument(
        "--calib",
        metavar="PATH",
        help="calibration inputs for --method activation and --layers importance: a .pt/.safetensors file "
        "of input tensors named like the forward arguments, a folder of images, or a text file "
        f"(one sample per line; hf: teachers); the first {CALIB_MAX_SAMPLES} samples are used at "
        f"most, run in batches of {CALIB_BATCH_SIZE}",
    )


def _onnx_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--fp16", action="store_true", help="also write an fp16 copy (<name>.fp16.onnx)")
    p.add_argument("--int8", action="store_true", help="also write a dynamically quantized int8 copy")
    p.add_argument(
        "--ort",
        action="store_true",
        help="also write the ONNX Runtime mobile format of every file (<name>.ort) and the "
        "reduced-operator config for a minimal build (<name>.required_operators.config)",
    )
    p.add_argument(
        "--optimize",
        choices=["basic", "extended"],
        help="apply onnxruntime graph optimizations before saving (extended adds onnxruntime-only fused operators)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="onnxruntime device for the checks and latency (cuda needs onnxruntime-gpu; default: cuda when available)",
    )
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance of the parity check (default 1e-4)")
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="batch of a static-shape export, used when the model fixes its batch (default: the example input's)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wscompile", description="Initialize a small model from a larger pretrained one (weight selection)."
    )
    parser.add_argument("--version", action="version", version=f"wscompile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    init = command("init", "select the student's weights from the teacher and save them")
    init.add_argument("--teacher", required=True, help=SPEC_HELP)
    init.add_argument("--student", required=True, help=SPEC_HELP)
    init.add_argument(
        "--teacher-weights", help="teacher weights: .safetensors, .pt/.pth/.bin, or a Hugging Face directory"
    )
    init.add_argument(
        "--out",
        required=True,
        help="student weights to write: a .safetensors file (full state_dict), or a directory "
        "(ending in /): a folder its library loads (hf: from_pretrained with config and the "
        "teacher's tokenizer files, sentence-transformers, timm local-dir:), sharded past "
        "--max-shard-size",
    )
    init.add_argument(
        "--max-shard-size",
        type=_bytes,
        default=5 * 10**9,
        metavar="SIZE",
        help="largest shard of a directory --out, e.g. 5GB or 500MB (default 5GB)",
    )
    init.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        help="write floating tensors in this dtype (integer buffers unchanged; default: the student's, "
        "which for hf: specs is the teacher config's dtype)",
    )
    init.add_argument("--manifest", help="JSON manifest: the teacher source and index rule of every student tensor")
    init.add_argument("--report", help="report file; format from the extension (.txt, .md, .json, .html)")
    init.add_argument("--onnx", help="also export the initialized student to ONNX and verify it")
    init.add_argument(
        "--select-head", action="store_true", help="select the classifier head too (default: student init)"
    )
    init.add_argument(
        "--allow-partial",
        action="store_true",
        help="keep the student's init where it is wider or deeper than the teacher instead of failing; "
        "a channel dimension the student is wider in is grown (see --grow)",
    )
    init.add_argument(
        "--grow",
        choices=("widen", "init"),
        default="widen",
        help="with --allow-partial, the extra channels of a wider student dimension: widen (replicate "
        "teacher channels, readers divided: the teacher's function) or init (the student's own)",
    )
    init.add_argument(
        "--allow-random-teacher",
        action="store_true",
        help="no warning when a timm, torchvision or hf teacher has no pretrained weights",
    )
    init.add_argument(
        "--strict",
        action="store_true",
        help="make NaN or inf among the teacher values the student takes an error (exit 2, no output "
        "file) instead of a warning",
    )
    _selection_options(init)
    _onnx_options(init)
    _common(init)

    diff = command("diff", "show how a student maps onto a teacher (no weights needed)")
    diff.add_argument("--teacher", required=True, help=SPEC_HELP)
    diff.add_argument("--student", required=True, help=SPEC_HELP)
    diff.add_argument("--format", choices=["text", "md", "json", "html"], help="default: text, or from -o's extension")
    diff.add_argument("-o", "--output", help="write the report here instead of printing it")
    diff.add_argument("--select-head", action="store_true", help="report the head as selected")
    diff.add_argument(
        "--allow-random-teacher",
        action="store_true",
        help="no warning when --method magnitude/activation or --layers importance reads a teacher "
        "without pretrained weights",
    )
    _selection_options(diff)
    _common(diff)

    export = command("export", "export a student to ONNX and verify it with onnxruntime")
    export.add_argument("--student", required=True, help=SPEC_HELP)
    export.add_argument("--weights", required=True, help="student weights (.safetensors from `wscompile init`)")
    export.add_argument("--onnx", required=True, help="ONNX file to write")
    export.add_argument(
        "--verify-only",
        action="store_true",
        help="only check an existing ONNX file against the PyTorch student (exit 1 if it differs)",
    )
    export.add_argument(
        "--calib",
        metavar="PATH",
        help="with --int8: calibration inputs for static quantization (a .pt/.safetensors file, an "
        "image folder or a text file, as for init); default: dynamic quantization",
    )
    _onnx_options(export)
    _common(export)

    apply = command("apply", "rebuild the student a manifest records, without tracing either model")
    apply.add_argument("--manifest", required=True, help="JSON manifest written by `wscompile init --manifest`")
    apply.add_argument(
        "--teacher-weights",
        help="teacher weights: .safetensors, .pt/.pth/.bin, or a Hugging Face directory (needed unless "
        "the manifest's teacher spec names pretrained weights)",
    )
    apply.add_argument(
        "--out",
        required=True,
        help="student weights to write: a .safetensors file, or a directory (ending in /), as for init",
    )
    apply.add_argument(
        "--student",
        help="student spec (default: the manifest's; a py: or file spec in the manifest "
        "is run only when given here too)",
    )
    apply.add_argument(
        "--teacher",
        help="teacher spec, when the teacher must be built to read its weights (default: "
        "the manifest's; a py: or file spec is run only when given here too)",
    )
    apply.add_argument(
        "--max-shard-size",
        type=_bytes,
        default=None,
        metavar="SIZE",
        help="largest shard of a directory --out (default: as init wrote it, which the manifest records; else 5GB)",
    )
    apply.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], help="as for init (default: as init wrote it, in the manifest)"
    )
    apply.add_argument("--strict", action="store_true", help="NaN or inf among the teacher values read is an error")
    _common(apply)
    apply.set_defaults(seed=None)  # the manifest's seed unless given
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"wscompile {args.command}"
    try:
        with _signals_raise(STOP_SIGNALS), collection_paused():
            status = _run(args)
            sys.stdout.flush()  # a pipe closed early fails here, not at interpreter exit
            return status
    except WscompileError as e:
        if args.debug:
            raise
        _say(f"{prefix}: error: {_one_line(e)}")
        return e.exit_code
    except KeyboardInterrupt:
        _say(f"{prefix}: interrupted; no output was left half-written")
        return 130
    except Terminated as e:
        _say(f"{prefix}: terminated ({signal.Signals(e.signum).name}); no output was left half-written")
        return 128 + e.signum
    except BrokenPipeError:
        _discard_stdout()
        return BROKEN_PIPE
    except Exception as e:
        if args.debug:
            raise
        _say(
            f"{prefix}: error: internal error: {type(e).__name__}: {_one_line(e)} "
            "(rerun with --debug for the traceback)"
        )
        return INTERNAL_ERROR


@contextmanager
def _signals_raise(signals: tuple[int, ...]) -> Iterator[None]:
    """While the block runs, the first of ``signals`` to arrive raises ``Terminated``, so every cleanup
    path (``finally``, ``except BaseException``) runs as for Ctrl-C; the previous handlers come back after.

    Later signals are ignored while that cleanup runs (SIGKILL still ends the process). A signal the
    parent set to be ignored (``nohup`` ignores SIGHUP) stays ignored; outside the main thread, where
    Python cannot set handlers, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise Terminated(signum)

    previous = {signum: signal.getsignal(signum) for signum in signals}
    for signum, old in previous.items():
        if old != signal.SIG_IGN:
            signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_DFL if old is None else old)


@contextmanager
def collection_paused() -> Iterator[None]:
    """Python's automatic garbage collection off while the block runs, as it was after.

    NOTE: nearly every object a command creates lives until it ends: the modules torch, timm and
    transformers import, the models, their graphs. Each full collection scans them all again, 0.6 to
    0.9 s of a 5 s ``init`` of the paper's pairs and 1 s at 7B. Reference counting still frees all
    that is not in a cycle: the 7B ``init`` of ``benchmarks/scale.py`` peaked at 1.32 GB with
    collection paused and 1.30 GB without.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _say(line: str) -> None:
    """Print ``line`` on stderr; a terminal gone with SIGHUP is no reason for a traceback."""
    with suppress(OSError):
        print(line, file=sys.stderr)


def _discard_stdout() -> None:
    """Point stdout at /dev/null: the reader has gone, and the interpreter's last flush must not fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout is not a file descriptor (captured in a test): nothing flushes to the pipe
    finally:
        os.close(devnull)


def _run(args: argparse.Namespace) -> int:
    from wscompile import commands

    if args.command == "apply":
        commands.run_apply(
            commands.ApplyOptions(
                manifest=args.manifest,
                out=args.out,
                teacher_weights=args.teacher_weights,
                student=args.student,
                teacher=args.teacher,
                seed=args.seed,
                force=args.force,
                input_shape=args.input_shape,
                trust_remote_code=args.trust_remote_code,
                unsafe_pickle=args.unsafe_pickle,
                allow_outside_paths=args.allow_outside_paths,
                progress=False if args.quiet else args.progress,
                max_shard_size=args.max_shard_size,
                dtype=args.dtype,
                strict=args.strict,
            )
        )
        return 0

    options = commands.InitOptions(
        teacher=getattr(args, "teacher", ""),
        student=args.student,
        out=getattr(args, "out", None),
        teacher_weights=getattr(args, "teacher_weights", None),
        manifest=getattr(args, "manifest", None),
        report=getattr(args, "report", None),
        onnx=getattr(args, "onnx", None),
        method=getattr(args, "method", "uniform"),
        layers=getattr(args, "layers", "first"),
        heads=getattr(args, "heads", "split"),
        rescale=getattr(args, "rescale", False),
        calib=getattr(args, "calib", None),
        select_head=getattr(args, "select_head", False),
        allow_partial=getattr(args, "allow_partial", False),
        growth=getattr(args, "grow", "widen"),
        force=args.force,
        seed=args.seed,
        input_shape=args.input_shape,
        trust_remote_code=args.trust_remote_code,
        unsafe_pickle=args.unsafe_pickle,
        allow_outside_paths=args.allow_outside_paths,
        opset=getattr(args, "opset", None),
        fp16=getattr(args, "fp16", False),
        int8=getattr(args, "int8", False),
        export=commands.ExportSettings.from_args(args),
        progress=args.progress,
        quiet=args.quiet,
        max_shard_size=getattr(args, "max_shard_size", 5 * 10**9),
        dtype=getattr(args, "dtype", None),
        allow_random_teacher=getattr(args, "allow_random_teacher", False),
        strict=getattr(args, "strict", False),
    )
    if args.command == "init":
        commands.run_init(options)
    elif args.command == "diff":
        commands.run_diff(options, args.format, args.output)
    else:
        commands.run_export(args.student, args.weights, args.onnx, options, verify_only=args.verify_only)
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
