"""Reliability of inputs (issue 15, items 6-8): memory bounds, non-finite teacher values, argument hygiene.

Each refusal is one case: the command, its exit status, the one line it prints on stderr, and no
output file. Successful runs check what they record (manifest fields, warnings).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from wscompile import choices, frontend, memory
from wscompile.cli import main
from wscompile.commands import MEMORY_LIMIT_ENV
from wscompile.passes.calibration import BATCH_SIZE, MAX_SAMPLES, observe
from wscompile.reports import validate_manifest

MODELS = """
import torch
from torch import nn


def net(width=8, depth=2):
    layers = [nn.Linear(4, width)]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    model = nn.Sequential(*layers, nn.ReLU(), nn.Linear(width, 3))
    model.example_inputs = torch.randn(2, 4)
    return model


def conv(width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
"""

ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture
def models(tmp_path: Path) -> str:
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return str(path)


def run(tmp_path: Path, *argv: str) -> int:
    """``wscompile ARGV`` in-process from ``tmp_path`` (argparse errors exit: their status is returned)."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return main(list(argv))
    except SystemExit as e:
        return int(e.code)
    finally:
        os.chdir(cwd)


def one_line(capsys: pytest.CaptureFixture[str], prefix: str = "wscompile init: error: ") -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def written(tmp_path: Path) -> list[str]:
    return sorted(
        p.name
        for p in tmp_path.iterdir()
        if p.name not in {"models.py", "teacher.safetensors", "calib.pt", "__pycache__"}
    )


# ---- 6. memory bounds ----------------------------------------------------------------------------


def test_calibration_runs_in_bounded_batches():
    seen: list[int] = []
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    model[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    graph = frontend.trace(model, {"input": torch.randn(1, 4)})
    seen.clear()  # tracing ran the model once
    stats = observe(model, graph, {"input": torch.randn(MAX_SAMPLES + 40, 4)}, channels=True, blocks=[])
    assert stats.samples == MAX_SAMPLES and set(seen) == {BATCH_SIZE} and sum(seen) == MAX_SAMPLES


def test_calibration_leaves_padded_positions_out():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, attention_mask):
            return self.fc(x)

    model = Tagger()
    x = torch.rand(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    x[1, 2:] = 1000.0  # padding that would dominate the means
    graph = frontend.trace(model, {"x": x, "attention_mask": mask})
    stats = observe(model, graph, {"x": x, "attention_mask": mask}, channels=True, blocks=[])
    torch.testing.assert_close(stats.channel_means[("fc", "in")], x[mask.bool()].mean(0))


def test_calibration_cap_is_in_the_manifest(tmp_path, models):
    torch.save({"input": torch.randn(MAX_SAMPLES + 88, 4)}, tmp_path / "calib.pt")
    assert (
        run(
            tmp_path,
            "init",
            "--teacher",
            f"{models}:net?width=8",
            "--student",
            f"{models}:net?width=4",
            "--method",
            "activation",
            "--calib",
            "calib.pt",
            "--out",
            "s.safetensors",
            "--manifest",
            "s.json",
        )
        == 0
    )
    record = json.loads((tmp_path / "s.json").read_text())["calibration"]
    assert record == "512 of 600 samples from calib.pt (at most 512 samples, batches of 16)"


def test_example_input_activations_are_counted(tmp_path, models, capsys):
    code = run(
        tmp_path,
        "init",
        "--teacher",
        f"{models}:conv?width=8",
        "--student",
        f"{models}:conv?width=4",
        "--input-shape",
        "1,3,40000,40000",
        "--out",
        "s.safetensors",
    )
    line = one_line(capsys)
    assert code == 2 and "for the example inputs (1,3,40000,40000) and the activations" in line, line
    assert "pass a smaller --input-shape" in line and written(tmp_path) == []


def test_peak_activations_follow_frees():
    model = nn.Sequential(*[nn.Linear(1000, 1000) for _ in range(10)]).to("meta")
    peak = memory.peak_activation_bytes(model, {"input": torch.empty(100, 1000, device="meta")})
    assert 2 * 400_000 <= peak <= 3 * 400_000  # two or three live outputs, not ten


def test_construction_past_memory_is_stopped(tmp_path, models, capsys, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "100000")
    monkeypatch.setattr(memory, "GUARD_SECONDS", 0.0)
    code = run(
        tmp_path,
        "init",
        "--teacher",
        f"{models}:net?width=64&depth=100",
        "--student",
        f"{models}:net?width=64&depth=100",
        "--out",
        "s.safetensors",
    )
    line = one_line(capsys)
    assert code == 2 and "counted while building it on the meta device, stopped there" in line, line
    assert written(tmp_path) == []


def test_absurd_depth_override_is_refused_before_building(tmp_path, capsys):
    start = time.monotonic()
    code = run(
        tmp_path,
        "init",
        "--teacher",
        "timm:vit_tiny_patch16_224",
        "--student",
        "timm:vit_tiny_patch16_224?depth=1000000",
        "--out",
        "s.safetensors",
    )
    assert code == 2 and "depth=1000000" in one_line(capsys) and written(tmp_path) == []
    assert time.monotonic() - start < 5


# ---- 7. non-finite teacher values ----------------------------------------------------------------


@pytest.fixture
def nan_teacher(tmp_path: Path) -> str:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["0.weight"][0, 0] = float("nan")
    state["2.bias"][0] = float("inf")
    save_file(state, tmp_path / "teacher.safetensors")
    return "teacher.safetensors"


def test_nonfinite_teacher_values_warn_and_are_recorded(tmp_path, models, nan_teacher, capsys):
    assert (
        run(
            tmp_path,
            "init",
            "--teacher",
            f"{models}:net?width=8&depth=1",
            "--student",
            f"{models}:net?width=4&depth=1",
            "--teacher-weights",
            nan_teacher,
            "--out",
            "s.safetensors",
            "--manifest",
            "s.json",
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "warning: 2 teacher tensor(s) hold NaN or inf" in err and "0.weight (1), 2.bias (1)" in err, err
    manifest = json.loads((tmp_path / "s.json").read_text())
    validate_manifest(manifest)
    assert manifest["nonfinite_teacher"] == [
        {"teacher": "0.weight", "student": "0.weight", "count": 1},
        {"teacher": "2.bias", "student": "2.bias", "count": 1},
    ]


def test_strict_makes_nonfinite_teacher_values_an_error(tmp_path, models, nan_teacher, capsys):
    code = run(
        tmp_path,
        "init",
        "--teacher",
        f"{models}:net?width=8&depth=1",
        "--student",
        f"{models}:net?width=4&depth=1",
        "--teacher-weights",
        nan_teacher,
        "--out",
        "s.safetensors",
        "--manifest",
        "s.json",
        "--strict",
    )
    line = one_line(capsys)
    assert code == 2 and "teacher tensor '0.weight' has 1 non-finite value(s)" in line, line
    assert written(tmp_path) == []


@pytest.mark.parametrize(
    ("values", "count"),
    [
        (torch.full((1000,), torch.finfo(torch.float32).max), 0),  # its float32 sum would overflow: still finite
        (torch.full((1000,), torch.finfo(torch.float16).max, dtype=torch.float16), 0),
        (torch.full((1000,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16), 0),
        (torch.full((4,), torch.finfo(torch.float64).max, dtype=torch.float64), 0),  # float64 sum overflows
        (torch.tensor([1.0, float("inf"), -float("inf"), 2.0]), 2),  # inf - inf: a NaN sum
        (torch.tensor([float("nan")] * 3 + [0.0], dtype=torch.bfloat16), 3),
        (torch.empty(0), 0),
        (torch.tensor([[-float("inf"), 1.0], [2.0, float("inf")]], dtype=torch.bfloat16).t(), 2),  # a strided view
        (torch.tensor([[1.0, float("nan")], [-float("inf"), 3.0]], dtype=torch.float16).flip(1).t()[:, 1:], 1),
    ],
)
def test_the_finite_check_counts_exactly_the_nonfinite_values(values, count):
    from wscompile.passes.apply import _check_finite
    from wscompile.plan import SelectionPlan

    plan = SelectionPlan("t", "s", "uniform", "first", {}, [], [], [], [], 0, 0, nonfinite_teacher=[])
    _check_finite(plan, "t", "s", values, strict=False)
    assert [record.count for record in plan.nonfinite_teacher] == ([count] if count else [])
    assert count == values.numel() - int(torch.isfinite(values).sum())  # the definition, counted directly


# ---- 8. argument hygiene -------------------------------------------------------------------------


def test_unused_calib_warns(tmp_path, models, capsys):
    torch.save({"input": torch.randn(4, 4)}, tmp_path / "calib.pt")
    assert (
        run(tmp_path, "diff", "--teacher", f"{models}:net", "--student", f"{models}:net?width=4", "--calib", "calib.pt")
        == 0
    )
    assert "warning: --calib 'calib.pt' is not used" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--calib", "missing.pt"], "--calib 'missing.pt' does not exist"),
        (["--teacher-weights", "missing.safetensors"], "--teacher-weights 'missing.safetensors' does not exist"),
        (["--manifest", ""], "--manifest is empty; pass a path"),
        (["--report", "plan.xml"], "rename the file (e.g. 'plan.html')"),
    ],
)
def test_bad_paths_are_one_line_errors(tmp_path, models, capsys, extra, expected):
    code = run(
        tmp_path,
        "init",
        "--teacher",
        f"{models}:net",
        "--student",
        f"{models}:net?width=4",
        "--out",
        "s.safetensors",
        *extra,
    )
    line = one_line(capsys)
    assert code == 2 and expected in line and "--format" not in line, line
    assert written(tmp_path) == []


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        ("", "--out is empty; pass a path"),
        ("femtodir", "pass 'femtodir/' for a model folder or 'femtodir.safetensors' for a weights file"),
    ],
)
def test_ambiguous_out_is_an_error(tmp_path, models, capsys, out, expected):
    code = run(tmp_path, "init", "--teacher", f"{models}:net", "--student", f"{models}:net", "--out", out)
    assert code == 2 and expected in one_line(capsys) and written(tmp_path) == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["init", "--teachr", "a", "--student", "b", "--out", "s.safetensors"], "(did you mean --teacher?)"),
        (["inti", "--teacher", "a"], "(did you mean init?)"),
    ],
)
def test_mistypes_suggest_the_closest_name(tmp_path, capsys, argv, expected):
    assert run(tmp_path, *argv) == 2
    assert expected in one_line(capsys, prefix="wscompile")


@pytest.mark.parametrize("command", ["init", "diff", "export"])
def test_help_ends_with_examples(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = capsys.readouterr().out
    assert "\nexamples:\n" in help_text and help_text.rstrip().splitlines()[-1].strip().startswith(("wscompile", "--"))


def test_missing_weights_file_fails_before_any_heavy_import(tmp_path):
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wscompile",
            "init",
            "--teacher",
            "timm:vit_small_patch16_224",
            "--student",
            "timm:vit_tiny_patch16_224",
            "--teacher-weights",
            "missing.safetensors",
            "--out",
            "s.safetensors",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "does not exist" in result.stderr and elapsed < 2, elapsed


def test_cli_choices_agree_with_the_registries():
    from wscompile.matching.layers import POLICIES
    from wscompile.passes.heads import HEAD_MODES
    from wscompile.passes.select import METHODS

    assert (tuple(METHODS), POLICIES, HEAD_MODES) == (choices.METHODS, choices.LAYER_POLICIES, choices.HEAD_MODES)
