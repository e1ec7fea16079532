"""Reports of real pairs: every format, schema-valid, and coverage equal to what `init` wrote."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file

from wscompile.cli import main
from wscompile.passes.select import teacher_index, to_student_layout
from wscompile.plan import AxisRule, TensorRecord
from wscompile.reports import validate_manifest
from wscompile.specs import load_model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=500,
        max_position_embeddings=64,
    ).save_pretrained(directory)
    return directory


PAIRS = {
    "vit_small->vit_tiny": ("timm:vit_small_patch16_224?img_size=32", "timm:vit_tiny_patch16_224?img_size=32"),
    "convnext_tiny->convnext_femto": ("timm:convnext_tiny", "timm:convnext_femto"),
    "hf-bert": (
        "hf:{bert}",
        "hf:{bert}?hidden_size=32&num_attention_heads=2&intermediate_size=128&num_hidden_layers=2",
    ),
}


def _record(entry: dict) -> TensorRecord:
    axes = [AxisRule(**axis) for axis in entry["axes"]] if entry["axes"] else None
    return TensorRecord(
        entry["student"],
        entry["student_shape"],
        entry["teacher"],
        entry["teacher_shape"],
        entry["rule"],
        entry["component"],
        axes,
        entry["reshape"],
        entry["is_head"],
        entry["reason"],
        entry.get("scale"),
    )


@pytest.mark.parametrize("pair", list(PAIRS), ids=list(PAIRS))
def test_every_format_and_coverage_equals_what_init_selected(pair, tmp_path, bert_dir):
    teacher_spec, student_spec = (s.format(bert=bert_dir) for s in PAIRS[pair])
    out, manifest, html = tmp_path / "s.safetensors", tmp_path / "manifest.json", tmp_path / "init.html"
    assert (
        main(
            [
                "init",
                "--teacher",
                teacher_spec,
                "--student",
                student_spec,
                "--out",
                str(out),
                "--manifest",
                str(manifest),
                "--report",
                str(html),
            ]
        )
        == 0
    )
    for fmt in ("text", "md", "json", "html"):
        assert (
            main(
                [
                    "diff",
                    "--teacher",
                    teacher_spec,
                    "--student",
                    student_spec,
                    "--format",
                    fmt,
                    "-o",
                    str(tmp_path / f"diff.{fmt}"),
                ]
            )
            == 0
        )
        assert (tmp_path / f"diff.{fmt}").stat().st_size > 0

    doc = json.loads(manifest.read_text())
    validate_manifest(doc)
    validate_manifest(json.loads((tmp_path / "diff.json").read_text()))
    assert json.loads((tmp_path / "diff.json").read_text())["coverage"] == doc["coverage"]

    # what init actually wrote: every tensor with a teacher holds exactly the teacher's elements at the
    # manifest's indices, every other tensor the student's own init; their sizes add up to the coverage
    teacher = load_model(teacher_spec, role="teacher", seed=0).module.state_dict()
    student_init = load_model(student_spec, role="student", seed=0).module.state_dict()
    saved = load_file(out)
    groups = {g["id"]: g["indices"] for g in doc["groups"]}
    selected = 0
    for entry in doc["tensors"]:
        key = entry["student"]
        if entry["teacher"] is None:
            assert torch.equal(saved[key], student_init[key]), key
            continue
        record = _record(entry)
        values = teacher[record.teacher]
        for axis, index in enumerate(teacher_index(record, groups)):
            if index is not None:
                values = values.index_select(axis, torch.tensor(index))
        assert torch.equal(saved[key], to_student_layout(values, record).to(saved[key].dtype)), key
        selected += saved[key].numel()
    assert selected == doc["coverage"]["selected_params"]
    assert "<svg" in html.read_text()

    # every stage reads `student <- teacher` in each format, and the text report keeps each name
    # whole with its block count (ConvNeXt's "stage 2 (stages.2.blocks, 9 blocks)" is long)
    text, md, page = ((tmp_path / f"diff.{fmt}").read_text() for fmt in ("text", "md", "html"))
    for stage in doc["stages"]:
        if stage["teacher"] is None:
            continue
        assert f"{stage['student_depth']} blocks) <- " in text and f", {stage['teacher_depth']} blocks)" in text
        assert f"{stage['student']} \\<- {stage['teacher']}" in md
        assert f"{stage['student']} &lt;- {stage['teacher']}" in page
    names = re.findall(r"stage \d+ \([^()]*\)", text)
    assert names and all(re.fullmatch(r"stage \d+ \([^(),]+, \d+ blocks?\)", name) for name in names), names
    for rendered in (text, md, page):  # (a layout change such as "reshape linear->conv1x1" is no pairing)
        assert not re.search(r" (->|-&gt;) ", rendered), re.search(r".* (->|-&gt;) .*", rendered)[0]
