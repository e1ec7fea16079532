from __future__ import annotations

import json
import re
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

import wscompile
from wscompile.cli import main

TEACHER = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=4"
STUDENT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2&embed_dim=96&num_heads=3"


def test_init_writes_student_and_manifest_matching_the_python_api(tmp_path):
    out, manifest = tmp_path / "s.safetensors", tmp_path / "s.json"
    assert (
        main(["init", "--teacher", TEACHER, "--student", STUDENT, "--out", str(out), "--manifest", str(manifest)]) == 0
    )

    saved = load_file(out)
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4)
    student = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=96, num_heads=3)
    teacher.load_state_dict(_teacher_from_seed())
    wscompile.initialize(teacher, student)
    for key, value in student.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(saved[key], value), key
    doc = json.loads(manifest.read_text())
    assert {t["student"] for t in doc["tensors"]} == set(saved)
    assert doc["coverage"]["fraction_no_head"] == 1.0


def _teacher_from_seed():
    # the CLI builds the teacher with seed 0, like load_model does
    from wscompile.specs import load_model

    return load_model(TEACHER, role="teacher", seed=0).module.state_dict()


def test_existing_output_is_not_replaced_without_force(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"keep me")
    assert main(["init", "--teacher", TEACHER, "--student", STUDENT, "--out", str(out)]) == 2
    assert out.read_bytes() == b"keep me"
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--force" in err
    assert main(["init", "--teacher", TEACHER, "--student", STUDENT, "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != b"keep me"


def test_wider_student_is_an_error_naming_tensors(tmp_path, capsys):
    out, manifest = tmp_path / "s.safetensors", tmp_path / "s.json"
    wide_mlp = TEACHER + "&mlp_ratio=8"  # wider than the teacher in the MLP only
    assert main(["init", "--teacher", TEACHER, "--student", wide_mlp, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "blocks.0.mlp.fc1.weight" in err and "--allow-partial" in err and "Traceback" not in err
    assert not out.exists()
    args = ["init", "--teacher", TEACHER, "--student", wide_mlp, "--out", str(out), "--manifest", str(manifest)]
    # --allow-partial grows the wider MLP dimension: every teacher channel, the rest replicated (widen) or kept
    for grow in ("widen", "init"):
        assert main(args + ["--allow-partial", "--grow", grow, "--force"]) == 0
        written = json.loads(manifest.read_text())
        fc1 = next(t for t in written["tensors"] if t["student"] == "blocks.0.mlp.fc1.weight")
        group = next(g for g in written["groups"] if g["id"] == fc1["axes"][0]["group"])
        assert fc1["teacher"] == "blocks.0.mlp.fc1.weight" and group["growth"] == grow
        assert (written["coverage"]["grown_params"] > 0) == (grow == "widen")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(wscompile.SpecError):
        main(["init", "--teacher", "nope:x", "--student", STUDENT, "--out", str(tmp_path / "s.safetensors"), "--debug"])


def test_module_entry_point(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "wscompile", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("wscompile ")


@pytest.mark.parametrize(("extra", "reloads"), [([], 1), (["--select-head"], 0)], ids=["head-kept", "all-selected"])
def test_the_student_is_planned_on_meta_and_built_only_for_the_values_it_keeps(tmp_path, monkeypatch, extra, reloads):
    from wscompile import commands, pipeline
    from wscompile.specs import load_model

    built = []
    reload_student = commands.reload_student
    monkeypatch.setattr(commands, "reload_student", lambda *a: built.append(1) or reload_student(*a))
    out = tmp_path / "s.safetensors"
    assert main(["init", "--teacher", TEACHER, "--student", STUDENT, "--out", str(out), *extra]) == 0
    assert len(built) == reloads  # the student's own init is computed only when the plan keeps some of it

    # The in-memory path with the student built on the CPU, as before: the same tensors, byte for byte.
    teacher = load_model(TEACHER, role="teacher", seed=0)
    student = load_model(STUDENT, role="student", seed=0)
    assert not student.on_meta
    compiled = pipeline.compile(
        teacher.module,
        student.module,
        teacher_inputs=teacher.inputs,
        student_inputs=student.inputs,
        select_head=bool(extra),
    )
    saved = load_file(out)
    assert saved.keys() == compiled.state_dict.keys()
    for key, value in compiled.state_dict.items():
        assert torch.equal(saved[key], value), key


# Runs the CLI as `python -m wscompile` does, then lists the heavy libraries the run imported.
_IMPORTED_AFTER_CLI = """
import runpy, sys
sys.argv = ["wscompile", *sys.argv[1:]]
try:
    runpy.run_module("wscompile", run_name="__main__")
except SystemExit as e:
    code = e.code
print(code, sorted(name for name in ("torch", "networkx", "timm", "transformers") if name in sys.modules))
"""


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["--help"], 0),
        (["init", "--help"], 0),
        (["--version"], 0),
        (["init", "--teacher", "timm:a", "--student", "timm:b"], 2),  # --out missing
        (["init", "--techer", "timm:a", "--student", "timm:b", "--out", "s.safetensors"], 2),  # misspelt flag
        (["init", "--teacher", "timm:a", "--student", "timm:b", "--out", "s"], 2),  # --out without extension
        (["ini"], 2),  # unknown subcommand
        (["apply", "--help"], 0),
        (["apply", "--manifest", "absent.json", "--out", "s.safetensors"], 2),  # no such manifest
        (["diff", "--teacher", "timm:a", "--student", "timm:b", "--quiet", "--progress"], 2),  # contradiction
    ],
    ids=[
        "help",
        "init-help",
        "version",
        "missing-flag",
        "misspelt-flag",
        "ambiguous-out",
        "unknown-command",
        "apply-help",
        "apply-no-manifest",
        "quiet-and-progress",
    ],
)
def test_help_and_argument_errors_import_no_torch(argv, status, tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _IMPORTED_AFTER_CLI, *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.stdout.splitlines()[-1] == f"{status} []", result.stderr


def test_the_import_probe_sees_torch_when_a_command_runs(tmp_path):
    import subprocess
    import sys

    # the same probe, on a command that does build models: it must report torch (the probe can fail)
    argv = ["diff", "--teacher", TEACHER, "--student", STUDENT]
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTED_AFTER_CLI, *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.stdout.splitlines()[-1].startswith("0 [") and "'torch'" in result.stdout.splitlines()[-1]


def test_export_verifies_and_a_corrupted_onnx_fails_with_per_output_differences(tmp_path, capsys):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    weights, model = tmp_path / "s.safetensors", tmp_path / "s.onnx"
    assert (
        main(
            [
                "init",
                "--teacher",
                TEACHER,
                "--student",
                STUDENT,
                "--out",
                str(weights),
                "--onnx",
                str(model),
                "--progress",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "parity logits" in out
    # the export and its parity check each say what they do, then their time, on one stderr line
    assert re.search(rf"^exporting the student to ONNX \({re.escape(str(model))}\)\.\.\. done in \d+\.\d s$", err, re.M)
    assert re.search(
        rf"^checking {re.escape(str(model))} against PyTorch with onnxruntime\.\.\. done in \d+\.\d s$", err, re.M
    )
    verify = ["export", "--student", STUDENT, "--weights", str(weights), "--onnx", str(model), "--verify-only"]
    assert main(verify) == 0
    plain = capsys.readouterr()
    assert main([*verify, "--progress"]) == 0
    shown = capsys.readouterr()
    assert shown.out == plain.out and "parity logits" in plain.out and plain.err == ""
    assert re.search(r"^building student .*\.\.\. done in \d+\.\d s$", shown.err, re.M)
    assert re.search(
        rf"^checking {re.escape(str(model))} against PyTorch with onnxruntime\.\.\. done in", shown.err, re.M
    )

    proto = onnx.load(str(model))
    biggest = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    values = numpy_helper.to_array(biggest).copy()
    # a scale, not a shift: a shift of the head weight is invisible after a zero-mean LayerNorm
    biggest.CopyFrom(numpy_helper.from_array(values * 3.0, biggest.name))
    onnx.save(proto, str(model))
    capsys.readouterr()
    assert main(["export", "--student", STUDENT, "--weights", str(weights), "--onnx", str(model), "--verify-only"]) == 1
    err = capsys.readouterr().err
    assert "logits" in err and "max abs diff" in err and err.count("\n") == 1


def test_int8_export_uses_static_quantization_with_calibration_inputs(tmp_path, capsys):
    weights, model, calib = tmp_path / "s.safetensors", tmp_path / "s.onnx", tmp_path / "calib.pt"
    torch.save({"x": torch.randn(16, 3, 32, 32)}, calib)
    assert main(["init", "--teacher", TEACHER, "--student", STUDENT, "--out", str(weights)]) == 0
    capsys.readouterr()
    args = ["export", "--student", STUDENT, "--weights", str(weights), "--onnx", str(model), "--int8"]
    assert main(args + ["--calib", str(calib)]) == 0
    out = capsys.readouterr().out
    assert "static" in out and (tmp_path / "s.int8.onnx").exists()


def test_init_onnx_records_the_export_in_the_manifest_and_report(tmp_path):
    from wscompile.reports import validate_manifest

    manifest, report = tmp_path / "m.json", tmp_path / "r.md"
    assert (
        main(
            [
                "init",
                "--teacher",
                TEACHER,
                "--student",
                STUDENT,
                "--out",
                str(tmp_path / "s.safetensors"),
                "--manifest",
                str(manifest),
                "--report",
                str(report),
                "--onnx",
                str(tmp_path / "s.onnx"),
                "--allow-random-teacher",
            ]
        )
        == 0
    )
    written = json.loads(manifest.read_text())
    validate_manifest(written)
    export = written["export"]
    assert export["onnx"] == "s.onnx" and export["files"] == ["s.onnx"]
    assert export["dynamic_axes"]["x"] == ["batch"] and export["static_shapes"] == {}
    assert export["max_abs_diff"] < 1e-4
    assert "**onnx export**: s.onnx (dynamo); dynamic axes x: batch" in report.read_text()
    # Without --onnx the field is there, and null.
    main(
        [
            "init",
            "--teacher",
            TEACHER,
            "--student",
            STUDENT,
            "--out",
            str(tmp_path / "t.safetensors"),
            "--manifest",
            str(tmp_path / "t.json"),
            "--allow-random-teacher",
        ]
    )
    assert json.loads((tmp_path / "t.json").read_text())["export"] is None


STAGE_LINE = re.compile(r"^(?P<label>.+)\.\.\. done in \d+\.\d s$", re.M)


def test_progress_says_every_stage_on_stderr_and_leaves_stdout_alone(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.safetensors"
    init = ["init", "--teacher", TEACHER, "--student", STUDENT, "--out", str(out), "--allow-random-teacher", "--force"]
    # stderr is not a terminal under capsys: no progress unless asked
    assert main(init) == 0
    plain = capsys.readouterr()
    assert plain.err == "" and plain.out.startswith(f"student {STUDENT}:")

    assert main([*init, "--progress"]) == 0
    shown = capsys.readouterr()
    assert shown.out == plain.out
    stages = STAGE_LINE.findall(shown.err)
    assert stages == [
        "counting the memory the run needs",
        f"building teacher {TEACHER}",
        f"building student {STUDENT}",
        f"tracing teacher {TEACHER}",
        f"tracing student {STUDENT}",
        "matching layers and planning the selection",
        f"building student {STUDENT} with its own init",  # the head is kept at the student's init
    ]
    assert "writing student" in shown.err  # the bar while the teacher is read

    # a terminal turns it on by default; --no-progress and --quiet turn it off
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(init) == 0
    assert STAGE_LINE.findall(capsys.readouterr().err) == stages
    assert main([*init, "--no-progress"]) == 0
    assert capsys.readouterr() == plain
    assert main([*init, "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_quiet_keeps_warnings_and_diffs_report(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert main(["init", "--teacher", TEACHER, "--student", STUDENT, "--out", str(out), "-q"]) == 0
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err.startswith("warning: teacher") and quiet.err.count("\n") == 1
    assert main(["diff", "--teacher", TEACHER, "--student", STUDENT]) == 0
    report = capsys.readouterr().out
    assert main(["diff", "--teacher", TEACHER, "--student", STUDENT, "--quiet"]) == 0
    assert capsys.readouterr() == (report, "")
    assert "stage 0 (blocks, 2 blocks) <- stage 0 (blocks, 4 blocks)" in report


def test_a_command_runs_with_garbage_collection_paused_and_restores_it(tmp_path, monkeypatch, capsys):
    import gc

    from wscompile import commands

    seen = []

    def run_init(options, log=print):
        seen.append(gc.isenabled())
        raise commands.SpecError("stop here")

    monkeypatch.setattr(commands, "run_init", run_init)
    assert gc.isenabled()
    assert main(["init", "--teacher", TEACHER, "--student", STUDENT, "--out", str(tmp_path / "s.safetensors")]) == 2
    assert seen == [False] and gc.isenabled()  # back on after a failed run too
    assert "stop here" in capsys.readouterr().err


def test_init_builds_each_model_once(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from wscompile import specs

    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in _teacher_from_seed().items()}, weights)
    built = []
    construct = specs._construct
    monkeypatch.setattr(
        specs,
        "_construct",
        lambda build, spec, **kw: built.append((spec.text, kw["device"])) or construct(build, spec, **kw),
    )
    out = tmp_path / "s.safetensors"
    argv = ["init", "--teacher", TEACHER, "--teacher-weights", str(weights), "--student", STUDENT, "--out", str(out)]
    assert main([*argv, "--select-head"]) == 0
    # the student counted for memory is the one planned; the teacher's values are read from its file
    assert sorted(built) == sorted([(TEACHER, "meta"), (STUDENT, "meta")])
