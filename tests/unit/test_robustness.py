"""Robustness of `wscompile init`: bad inputs, unsafe checkpoints, interruptions, determinism.

Every bad input must end in one line on stderr (no traceback without --debug), exit status 2 and
no output file. Outputs are written atomically: a run killed at any moment leaves the old file or
the new complete one. The same command gives the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wscompile.cli import SPEC_HELP, main
from wscompile.commands import MEMORY_LIMIT_ENV

MODELS = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 3)
        self.example_inputs = torch.randn(2, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class Gate(nn.Module):
    """Branches on a value computed from the data: neither torch.fx nor torch.export can trace it."""

    def __init__(self, width):
        super().__init__()
        self.inner = nn.Linear(width, width)

    def forward(self, x):
        h = self.inner(x)
        if h.sum().item() > 0:
            return h.relu()
        return h


class Gated(Net):
    def __init__(self, width):
        super().__init__(width, 1)
        self.gate = Gate(width)

    def forward(self, x):
        return self.head(self.gate(self.blocks(self.stem(x))))


def net(width=8, depth=2):
    return Net(width, depth)


def gated(width=8):
    return Gated(width)


def mlp(width=8, depth=2):
    """A plain MLP; large widths make large files quickly (no repeated blocks to match)."""
    layers = [nn.Linear(16, width)]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    model = nn.Sequential(*layers, nn.ReLU(), nn.Linear(width, 4))
    model.example_inputs = torch.randn(2, 16)
    return model
'''


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # NOTE: tiny ops are much slower with several intra-op threads on a shared 2-core CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def models(tmp_path: Path) -> str:
    """Path of a Python file defining the test models (``f"{models}:net?width=8"`` is a spec)."""
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return str(path)


def init(tmp_path: Path, teacher: str, student: str, *extra: str, out: str = "student.safetensors") -> int:
    return main(["init", "--teacher", teacher, "--student", student, "--out", str(tmp_path / out), *extra])


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single line the CLI printed on stderr; fails on a traceback or anything else printed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wscompile init: error: "), err
    return lines[0]


def outputs(directory: Path) -> list[str]:
    """Files a run left in ``directory``, inputs written by the tests excluded."""
    inputs = {"models.py", "teacher.safetensors", "teacher.pt", "bert", "remote", "__pycache__"}
    return sorted(p.name for p in directory.iterdir() if p.name not in inputs)


# ---- safety: what is executed --------------------------------------------------------------------


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path, models, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    torch.save({"state_dict": {"stem.weight": torch.zeros(16, 4)}, "extra": Payload()}, tmp_path / "teacher.pt")
    code = init(tmp_path, f"{models}:net?width=16", f"{models}:net", "--teacher-weights", str(tmp_path / "teacher.pt"))
    assert code == 2
    line = error_line(capsys)
    assert "teacher.pt' is a pickle that needs code execution" in line and "--unsafe-pickle" in line
    assert not marker.exists()
    assert outputs(tmp_path) == []


def _remote_code_directory(tmp_path: Path, marker: Path) -> Path:
    directory = tmp_path / "remote"
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"model_type": "tiny-remote", "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig"}})
    )
    (directory / "configuration_tiny.py").write_text(
        textwrap.dedent(f"""
        from transformers import PretrainedConfig
        open({str(marker)!r}, "w").write("ran")

        class TinyConfig(PretrainedConfig):
            model_type = "tiny-remote"
    """)
    )
    return directory


def test_hf_remote_code_is_not_run_without_trust_remote_code(tmp_path, models, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    directory = _remote_code_directory(tmp_path, marker)

    def no_prompt(*args):
        raise AssertionError("transformers asked on stdin whether to run remote code")

    monkeypatch.setattr("builtins.input", no_prompt)
    assert init(tmp_path, f"hf:{directory}", f"{models}:net") == 2
    line = error_line(capsys)
    assert "defines its model with its own Python code" in line and "--trust-remote-code" in line
    assert not marker.exists()
    assert outputs(tmp_path) == []


def test_help_says_what_runs_code(capsys):
    with pytest.raises(SystemExit):
        main(["init", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert " ".join(SPEC_HELP.split()) in help_text and "import and run that code: use only code you trust" in help_text
    assert "--trust-remote-code let hf: specs run code from the model directory" in help_text
    assert "--unsafe-pickle load .pt/.bin checkpoints that need code execution" in help_text


# ---- a catalogue of bad inputs: one line, status 2, no output ------------------------------------


@pytest.mark.parametrize(
    ("teacher", "student", "expected"),
    [
        ("foo:vit", "timm:vit_tiny_patch16_224", "unknown spec scheme 'foo'"),
        ("timm:vit_tiny_patch16_2244", "timm:vit_tiny_patch16_224", "unknown timm model 'vit_tiny_patch16_2244'"),
        ("timm:vit_tiny_patch16_224", "torchvision:resnet1", "unknown torchvision model 'resnet1'"),
        ("timm:vit_tiny_patch16_224", "vit_tiny", "has no scheme"),
    ],
    ids=["scheme", "timm-name", "torchvision-name", "no-scheme"],
)
def test_unknown_spec(tmp_path, capsys, teacher, student, expected):
    assert init(tmp_path, teacher, student) == 2
    assert expected in error_line(capsys)
    assert outputs(tmp_path) == []


@pytest.mark.parametrize(
    ("teacher", "student", "expected"),
    [
        ("net?width=8", "net?width=12", "'stem.weight' (12, 4) vs teacher 'stem.weight' (8, 4)"),
        ("net?depth=2", "net?depth=3", "deeper than teacher"),
    ],
    ids=["wider", "deeper"],
)
def test_student_larger_than_teacher(tmp_path, models, capsys, teacher, student, expected):
    assert init(tmp_path, f"{models}:{teacher}", f"{models}:{student}") == 2
    line = error_line(capsys)
    assert expected in line and "--allow-partial" in line
    assert outputs(tmp_path) == []
    assert init(tmp_path, f"{models}:{teacher}", f"{models}:{student}", "--allow-partial") == 0
    assert outputs(tmp_path) == ["student.safetensors"]


def _bert_directory(tmp_path: Path) -> Path:
    import transformers

    directory = tmp_path / "bert"
    transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    ).save_pretrained(directory)
    return directory


def test_unrelated_kinds_nothing_matched(tmp_path, capsys):
    bert = _bert_directory(tmp_path)
    assert init(tmp_path, f"hf:{bert}", "timm:resnet18?num_classes=10", "--allow-random-teacher") == 2
    line = error_line(capsys)
    assert "nothing in the student matched the teacher" in line and "conv1.weight" in line
    assert outputs(tmp_path) == []


def test_unrelated_kinds_nothing_matched_cnn_teacher(tmp_path, capsys):
    bert = _bert_directory(tmp_path)
    assert init(tmp_path, "timm:resnet18", f"hf:{bert}") == 2


@pytest.fixture
def teacher_file(tmp_path: Path, models: str) -> tuple[str, dict[str, torch.Tensor]]:
    """Spec and state_dict of a teacher also saved as teacher.safetensors."""
    from wscompile.specs import load_model

    spec = f"{models}:net?width=16&depth=3"
    state = load_model(spec, role="teacher", seed=5).module.state_dict()
    save_file(state, tmp_path / "teacher.safetensors")
    return spec, state


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_teacher_weights(tmp_path, models, teacher_file, capsys, damage):
    path = tmp_path / "teacher.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x10" + os.urandom(200))
    assert init(tmp_path, teacher_file[0], f"{models}:net", "--teacher-weights", str(path)) == 2
    assert "teacher.safetensors' is truncated or corrupt" in error_line(capsys)
    assert outputs(tmp_path) == []


def test_teacher_weights_that_do_not_fit_list_the_keys(tmp_path, models, teacher_file, capsys):
    spec, state = teacher_file
    renamed = {key.replace("fc", "dense"): value for key, value in state.items()}
    save_file(renamed, tmp_path / "teacher.safetensors")
    assert init(tmp_path, spec, f"{models}:net", "--teacher-weights", str(tmp_path / "teacher.safetensors")) == 2
    line = error_line(capsys)
    assert "do not fit" in line and "missing keys (blocks.0.fc1.weight, blocks.0.fc1.bias" in line
    assert re.search(r"12 unexpected keys \(blocks\.\d\.dense\d\.\w+, ", line)
    assert outputs(tmp_path) == []


def test_bfloat16_teacher_is_converted_and_says_so(tmp_path, models, teacher_file):
    spec, state = teacher_file
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "teacher.safetensors")
    manifest = tmp_path / "student.json"
    code = init(
        tmp_path,
        spec,
        f"{models}:net?width=8&depth=2",
        "--teacher-weights",
        str(tmp_path / "teacher.safetensors"),
        "--manifest",
        str(manifest),
    )
    assert code == 0
    records = {r["student"]: r for r in json.loads(manifest.read_text())["tensors"]}
    assert "converted bfloat16 -> float32" in records["blocks.1.fc2.weight"]["reason"]
    student = load_file(tmp_path / "student.safetensors")
    assert student["blocks.1.fc2.weight"].dtype == torch.float32
    expected = state["blocks.1.fc2.weight"].to(torch.bfloat16).float()[::2, ::2]  # uniform 16 -> 8, 32 -> 16
    assert torch.equal(student["blocks.1.fc2.weight"], expected)


def test_untraceable_model_names_the_module(tmp_path, models, capsys):
    assert init(tmp_path, f"{models}:gated?width=16", f"{models}:gated") == 2
    err = capsys.readouterr().err
    # NOTE: torch.export itself prints the partial graph of a failed export to stderr
    # (torch/export/_trace.py); only that is tolerated before the one-line error.
    noise, _, line = err.rpartition("wscompile init: error: ")
    assert "Traceback" not in err and (not noise.strip() or "def forward(" in noise)
    assert line.count("\n") == 1 and line.startswith("cannot trace teacher")
    assert "(Gate.forward)" in line and "fx:" in line and "torch.export:" in line
    assert outputs(tmp_path) == []


@pytest.mark.parametrize("where", ["parent-is-a-file", "missing-directory"])
def test_output_directory_not_writable(tmp_path, models, capsys, where):
    (tmp_path / "file").write_text("")
    out = "file/student.safetensors" if where == "parent-is-a-file" else "missing/student.safetensors"
    assert init(tmp_path, f"{models}:net", f"{models}:net", out=out) == 2
    assert ("is not a directory" if where == "parent-is-a-file" else "does not exist; create it first") in error_line(
        capsys
    )
    assert outputs(tmp_path) == ["file"]


def test_memory_need_is_predicted_before_allocating(tmp_path, capsys):
    # ~100 GB of student and ~400 GB of teacher: refused from shapes alone, nothing is allocated.
    big = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2&num_heads=1&embed_dim="
    assert init(tmp_path, big + "65536", big + "32768") == 2
    line = error_line(capsys)
    assert "not enough memory: this run needs about 515.94 GB (1 x 103.24 GB for student" in line
    assert "+ 412.64 GB for teacher" in line and "GB is available (" in line and MEMORY_LIMIT_ENV in line
    assert outputs(tmp_path) == []


def test_memory_limit_from_the_environment(tmp_path, models, capsys, monkeypatch):
    teacher, student = f"{models}:net?width=64", f"{models}:net?width=32"
    # student 34.6 kB, teacher 134.7 kB: the limit fits the student but not both
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "100000")
    assert init(tmp_path, teacher, student) == 2
    line = error_line(capsys)
    assert "needs about 0.2 MB" in line and "(WSCOMPILE_MEMORY_LIMIT)" in line
    assert "pass --teacher-weights so the teacher is read from disk" in line
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "a lot")
    assert init(tmp_path, teacher, student) == 2
    assert "WSCOMPILE_MEMORY_LIMIT must be a whole number of bytes, got 'a lot'" in error_line(capsys)
    assert outputs(tmp_path) == []
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "200000")
    assert init(tmp_path, teacher, student) == 0


# ---- determinism -----------------------------------------------------------------------------------

VIT_TEACHER = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2"
VIT_STUDENT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=1&embed_dim=96&num_heads=3"


def test_same_command_gives_identical_bytes(tmp_path):
    def run(name: str, *extra: str) -> list[bytes]:
        paths = [tmp_path / f"{name}.safetensors", tmp_path / f"{name}.manifest.json", tmp_path / f"{name}.json"]
        argv = ["--manifest", str(paths[1]), "--report", str(paths[2]), *extra]
        assert init(tmp_path, VIT_TEACHER, VIT_STUDENT, *argv, out=paths[0].name) == 0
        return [p.read_bytes() for p in paths]

    first, second, other_seed = run("a"), run("b"), run("c", "--seed", "1")
    assert first == second
    # the seed changes the random teacher and the student's own init (its head), so the weights
    assert other_seed[0] != first[0]


# ---- interruptions: SIGKILL and Ctrl-C at any moment ------------------------------------------------

# A 16 MB student: writing it takes a while (~0.2 s); its temporaries are named `.<name>.tmp-<pid>-*`.
BIG = "mlp?width=1024&depth=4"


def _temps(directory: Path) -> list[Path]:
    return sorted(directory.glob(".student.safetensors.tmp-*"))


def _writing(directory: Path, old_size: int) -> bool:
    """The student's temporary exists: the run is writing it."""
    return bool(_temps(directory))


def _replaced(directory: Path, old_size: int) -> bool:
    """The student file was renamed over the old one: the run is writing its manifest, or exiting."""
    return (directory / "student.safetensors").stat().st_size != old_size


def test_killed_or_interrupted_run_leaves_old_or_new_file(tmp_path, models):
    """Runs killed (SIGKILL) while writing the student and right after replacing it, and one
    interrupted by Ctrl-C, leave the old file or the complete new one, byte-identical to an
    uninterrupted run."""
    old = tmp_path / "old.safetensors"
    save_file({"old": torch.zeros(3)}, old)
    old_bytes = old.read_bytes()
    # (signal, moment to send it); None: the reference run, never interrupted
    cases = [(signal.SIGKILL, _writing), (signal.SIGKILL, _replaced), (signal.SIGINT, _writing), (None, None)]
    runs = []
    for i, (sig, moment) in enumerate(cases):
        directory = tmp_path / f"run{i}"
        directory.mkdir()
        (directory / "student.safetensors").write_bytes(old_bytes)
        command = [
            sys.executable,
            "-m",
            "wscompile",
            "init",
            "--teacher",
            f"{models}:{BIG}",
            "--student",
            f"{models}:{BIG}",
            "--out",
            "student.safetensors",
            "--manifest",
            "student.json",
            "--force",
        ]
        # a different hash seed per process: set and dict orders must not change the bytes
        env = dict(os.environ, PYTHONHASHSEED=str(i + 1), OMP_NUM_THREADS="1")
        process = subprocess.Popen(command, cwd=directory, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        runs.append({"process": process, "directory": directory, "signal": sig, "moment": moment, "sent": False})

    deadline = time.monotonic() + 300
    while any(r["process"].poll() is None for r in runs) and time.monotonic() < deadline:
        for run in runs:
            pending = run["signal"] and not run["sent"] and run["process"].poll() is None
            if pending and run["moment"](run["directory"], len(old_bytes)):
                run["process"].send_signal(run["signal"])
                run["sent"] = True
        time.sleep(0.0005)
    for run in runs:
        run["stderr"] = run["process"].communicate(timeout=60)[1].decode()

    reference = runs[-1]
    assert reference["process"].returncode == 0, reference["stderr"]
    new = (reference["directory"] / "student.safetensors").read_bytes()
    assert set(load_file(reference["directory"] / "student.safetensors")) == {
        f"{i}.{p}" for i in (0, 2, 4, 6, 8, 10) for p in ("weight", "bias")
    }
    for run in runs[:-1]:
        directory, process, stderr = run["directory"], run["process"], run["stderr"]
        assert run["sent"], f"the moment never came: {stderr}"
        target = (directory / "student.safetensors").read_bytes()
        assert target == (new if run["moment"] is _replaced else old_bytes)  # never a part of a file
        manifest = directory / "student.json"
        assert not manifest.exists() or json.loads(manifest.read_text())["student"]
        leftovers = [p.name for p in directory.iterdir() if p.name not in ("student.safetensors", "student.json")]
        if run["signal"] == signal.SIGINT:
            assert process.returncode == 130, stderr
            assert stderr.strip().splitlines()[-1] == "wscompile init: interrupted; no output was left half-written"
            assert leftovers == []  # Ctrl-C removes the temporary
        else:
            assert process.returncode == -signal.SIGKILL
            # no chance to clean up: a hidden temporary may stay, never under the target's name
            assert all(name.startswith((".student.safetensors.tmp-", ".student.json.tmp-")) for name in leftovers)

    # The next run writing the same target deletes temporaries left by dead processes before it
    # started. NOTE: this test process started before the killed ones, so their files are backdated.
    killed = runs[0]["directory"]
    assert _temps(killed)
    for path in _temps(killed):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    assert init(killed, f"{models}:net", f"{models}:net", "--force") == 0
    assert _temps(killed) == []
