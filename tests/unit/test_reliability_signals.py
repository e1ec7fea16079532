"""Reliability, round 2: inputs never overwritten, signals, and one-line errors for what used to be tracebacks.

Each case: the command, its exit status, the one line it prints, no file lost and no temporary
left, and every input as it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import wscompile.outputs
from wscompile.cli import BROKEN_PIPE, INTERNAL_ERROR, main

MODELS = """
import torch
from torch import nn


def mlp(width=8, depth=2):
    layers = [nn.Linear(16, width)]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    model = nn.Sequential(*layers, nn.ReLU(), nn.Linear(width, 4))
    model.example_inputs = torch.randn(2, 16)
    return model
"""
# A 16 MB student: writing it takes long enough to be interrupted in the middle.
BIG = "mlp?width=1024&depth=4"
VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=1"
ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]), OMP_NUM_THREADS="1")


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding ``models.py``, the teacher's weights and an old student."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(MODELS)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)]
    state = {f"{2 * i}.{name}": p for i, layer in enumerate(layers) for name, p in layer.state_dict().items()}
    save_file(state, tmp_path / "teacher.safetensors")
    save_file({"old": torch.zeros(3)}, tmp_path / "old.safetensors")
    return tmp_path


def _snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden temporaries included) and a hash of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _error_line(capsys: pytest.CaptureFixture[str], command: str = "init") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith(f"wscompile {command}: error: "), err
    return lines[0]


def _init(*extra: str, out: str = "old.safetensors") -> int:
    return main(["init", "--teacher", "models.py:mlp", "--student", "models.py:mlp", "--out", out, "--force", *extra])


# ---- 3. outputs are compared with every input ---------------------------------------------------------


def _bert_folder(path: Path) -> Path:
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    return path


def _overlap(case: str, work: Path) -> list[str]:
    """The command of one overlap case: each writes onto (or into) something it reads."""
    bert = "?num_hidden_layers=1&hidden_size=8&num_attention_heads=1&intermediate_size=16"
    if case == "teacher-weights":
        return [
            "init",
            "--teacher",
            "models.py:mlp",
            "--student",
            "models.py:mlp",
            "--teacher-weights",
            "teacher.safetensors",
            "--out",
            "teacher.safetensors",
            "--force",
        ]
    if case in ("symlink", "hard-link"):
        link = work / "link.safetensors"
        (os.symlink if case == "symlink" else os.link)(work / "teacher.safetensors", link)
        return [
            "init",
            "--teacher",
            "models.py:mlp",
            "--student",
            "models.py:mlp",
            "--teacher-weights",
            "teacher.safetensors",
            "--out",
            str(link),
            "--force",
        ]
    if case == "calib":
        torch.save({"input": torch.randn(4, 16)}, work / "calib.pt")
        return [
            "init",
            "--teacher",
            "models.py:mlp",
            "--student",
            "models.py:mlp",
            "--method",
            "activation",
            "--calib",
            "calib.pt",
            "--out",
            "student.safetensors",
            "--manifest",
            "calib.pt",
            "--force",
        ]
    if case == "file-spec":
        return [
            "init",
            "--teacher",
            "models.py:mlp",
            "--student",
            "models.py:mlp",
            "--out",
            "student.safetensors",
            "--report",
            "models.py",
            "--force",
        ]
    if case in ("inside-hf-folder", "hf-folder-as-out-dir"):
        folder = _bert_folder(work / "bert")
        out = str(folder / "student.safetensors") if case == "inside-hf-folder" else f"{folder}/"
        return ["init", "--teacher", f"hf:{folder}", "--student", f"hf:{folder}{bert}", "--out", out, "--force"]
    if case == "export-weights":
        return [
            "export",
            "--student",
            "models.py:mlp",
            "--weights",
            "teacher.safetensors",
            "--onnx",
            "teacher.safetensors",
            "--force",
        ]
    assert case == "diff-output"
    return ["diff", "--teacher", "models.py:mlp", "--student", "models.py:mlp", "-o", "models.py", "--force"]


@pytest.mark.parametrize(
    "case",
    [
        "teacher-weights",
        "symlink",
        "hard-link",
        "calib",
        "file-spec",
        "inside-hf-folder",
        "hf-folder-as-out-dir",
        "export-weights",
        "diff-output",
    ],
)
def test_an_output_never_overwrites_an_input_even_with_force(work, capsys, case):
    argv = _overlap(case, work)
    capsys.readouterr()  # save_pretrained's progress bar
    before = _snapshot(work)
    assert main(argv) == 2
    line = _error_line(capsys, argv[0])
    assert "which this run reads" in line and "never overwritten, even with --force" in line
    assert _snapshot(work) == before


# ---- 4. SIGTERM and SIGHUP clean up as Ctrl-C does ------------------------------------------------------


def test_sigterm_and_sighup_remove_the_temporary_and_keep_the_old_file(work):
    old = (work / "old.safetensors").read_bytes()
    runs = []
    for sig in (signal.SIGTERM, signal.SIGHUP):
        directory = work / sig.name
        directory.mkdir()
        (directory / "student.safetensors").write_bytes(old)
        command = [
            sys.executable,
            "-m",
            "wscompile",
            "init",
            "--teacher",
            f"{work}/models.py:{BIG}",
            "--student",
            f"{work}/models.py:{BIG}",
            "--out",
            "student.safetensors",
            "--force",
        ]
        process = subprocess.Popen(command, cwd=directory, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        runs.append((sig, directory, process))
    sent: set[signal.Signals] = set()
    deadline = time.monotonic() + 120
    while len(sent) < len(runs) and time.monotonic() < deadline:
        for sig, directory, process in runs:
            if sig not in sent and process.poll() is None and any(directory.glob(".student.safetensors.tmp-*")):
                process.send_signal(sig)  # while the student is being written
                sent.add(sig)
        time.sleep(0.0005)
    for sig, directory, process in runs:
        stderr = process.communicate(timeout=60)[1].decode()
        assert sig in sent, f"the temporary never appeared: {stderr}"
        assert process.returncode == 128 + sig, stderr
        assert (
            stderr.strip().splitlines()[-1]
            == f"wscompile init: terminated ({sig.name}); no output was left half-written"
        )
        assert "Traceback" not in stderr
        assert [p.name for p in directory.iterdir()] == ["student.safetensors"]  # no temporary left
        assert (directory / "student.safetensors").read_bytes() == old


def test_signal_handlers_are_restored_after_a_run(work):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    assert _init(out="student.safetensors") == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ---- 5. tracebacks become one-line errors ---------------------------------------------------------------


@pytest.mark.parametrize("out", ["old.safetensors", "folder/"])
def test_disk_full_while_writing(work, capsys, monkeypatch, out):
    def full(tensor: torch.Tensor) -> memoryview:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wscompile.outputs, "_as_bytes", full)  # the tensor bytes written to the file
    before = _snapshot(work)
    assert _init(out=out) == 2
    assert f"no space left on device writing '{out}'; free space" in _error_line(capsys)
    assert _snapshot(work) == before and not (work / "folder").exists()  # old file kept, temporaries removed


def test_target_that_cannot_be_replaced(work, capsys, monkeypatch):
    def immutable(source: str, target: str) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), source, target)

    # NOTE: root writes through read-only modes; an immutable file (chattr +i) fails the rename like this.
    monkeypatch.setattr(os, "replace", immutable)
    before = _snapshot(work)
    assert _init() == 2
    line = _error_line(capsys)
    assert "cannot write or replace 'old.safetensors'" in line and "fix its permissions" in line
    assert _snapshot(work) == before


@pytest.mark.parametrize("image", ["corrupt", "decompression-bomb"])
def test_calibration_image_that_cannot_be_decoded(work, capsys, monkeypatch, image):
    from PIL import Image

    folder = work / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "a.png")
    if image == "corrupt":
        (folder / "b.png").write_bytes(b"\x89PNG not really an image")
    else:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 32x32 image is then a bomb (> 2 x the limit)
    assert (
        main(
            [
                "init",
                "--teacher",
                VIT,
                "--student",
                VIT,
                "--method",
                "activation",
                "--calib",
                str(folder),
                "--out",
                "student.safetensors",
                "--allow-random-teacher",
            ]
        )
        == 2
    )
    line = _error_line(capsys)
    expected = "cannot be read (UnidentifiedImageError" if image == "corrupt" else "too large to decode safely"
    assert f"--calib image '{folder}/{'b' if image == 'corrupt' else 'a'}.png' " in line and expected in line
    assert not (work / "student.safetensors").exists()


def test_calibration_text_that_is_not_utf8(work, capsys):
    folder = _bert_folder(work / "bert")
    (work / "calib.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    capsys.readouterr()
    assert (
        main(
            [
                "init",
                "--teacher",
                f"hf:{folder}",
                "--student",
                f"hf:{folder}?num_hidden_layers=1",
                "--method",
                "activation",
                "--calib",
                "calib.txt",
                "--out",
                "student.safetensors",
            ]
        )
        == 2
    )
    assert "--calib 'calib.txt' is not UTF-8 text (invalid continuation byte: byte 0xe9)" in _error_line(capsys)


def test_seed_out_of_range_is_refused_by_argparse(work, capsys):
    with pytest.raises(SystemExit) as raised:
        _init("--seed", str(2**80))
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "expected a whole number from 0 to 9223372036854775807" in err
    assert _init("--seed", str(2**63 - 1), out="student.safetensors") == 0  # the largest seed works


def test_diff_into_a_closed_pipe_exits_quietly(work):
    command = [
        sys.executable,
        "-m",
        "wscompile",
        "diff",
        "--teacher",
        "models.py:mlp?depth=3",
        "--student",
        "models.py:mlp",
    ]
    process = subprocess.Popen(command, cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the report is printed (`| head` after its lines)
    stderr = process.communicate(timeout=120)[1].decode()
    assert process.returncode in (0, BROKEN_PIPE) and stderr == ""


def test_unexpected_exception_is_one_line_and_the_traceback_only_with_debug(work, capsys, monkeypatch):
    def bug(*args: object, **kwargs: object) -> None:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr("wscompile.pipeline.compile", bug)
    before = _snapshot(work)
    assert _init() == INTERNAL_ERROR
    assert _error_line(capsys) == (
        "wscompile init: error: internal error: TypeError: unsupported operand type(s) "
        "for +: 'int' and 'NoneType' (rerun with --debug for the traceback)"
    )
    with pytest.raises(TypeError, match="unsupported operand"):
        _init("--debug")
    assert _snapshot(work) == before
