"""Reports of a hand-built ViT plan: manifest schema, text/md layout, HTML in a headless browser."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest

from wscompile.errors import OutputError, ValidationError
from wscompile.plan import (
    AXIS_FULL,
    AXIS_UNIFORM,
    RULE_COPY,
    RULE_SELECT,
    RULE_STUDENT_INIT,
    AxisRule,
    BlockPair,
    Coverage,
    GroupRecord,
    SelectionPlan,
    StagePair,
    TensorRecord,
    UnusedTeacher,
)
from wscompile.reports import (
    SCHEMA_VERSION,
    format_from_path,
    load_schema,
    plan_to_dict,
    render,
    validate_manifest,
    write_report,
)
from wscompile.reports.records import rule_label
from wscompile.reports.text import WIDTH

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# ViT-like pair: teacher width 384, MLP 1536, 4 blocks; student width 192, MLP 576, 2 blocks.
TEACHER_DIM, STUDENT_DIM = 384, 192
TEACHER_MLP, STUDENT_MLP = 1536, 576  # 1536 % 576 != 0: the MLP takes explicit uniform indices
TOKENS, PATCH, CLASSES = 197, 16, 1000
TEACHER_DEPTH, STUDENT_DEPTH = 4, 2
MLP_INDICES = [i * TEACHER_MLP // STUDENT_MLP for i in range(STUDENT_MLP)]


def _axis(teacher: int, student: int, group: str | None = None, blocks: int = 1) -> AxisRule:
    if teacher == student:
        return AxisRule(teacher, student, AXIS_FULL, group, blocks)
    if teacher % student == 0:
        return AxisRule(teacher, student, AXIS_UNIFORM, group, blocks, step=teacher // student)
    return AxisRule(teacher, student, AXIS_UNIFORM, group, blocks, indices=MLP_INDICES)


def _select(name: str, teacher_shape: list[int], axes: list[AxisRule]) -> TensorRecord:
    return TensorRecord(
        student=name,
        student_shape=[a.student_size for a in axes],
        teacher=name,
        teacher_shape=teacher_shape,
        rule=RULE_SELECT,
        component=name.rsplit(".", 1)[0],
        axes=axes,
    )


def _embed(teacher_shape: list[int], axis: int) -> list[AxisRule]:
    """Axes of a tensor whose ``axis`` is the embedding width and whose other axes are kept."""
    return [
        _axis(TEACHER_DIM, STUDENT_DIM, "embed") if i == axis else _axis(size, size)
        for i, size in enumerate(teacher_shape)
    ]


def _block_tensors(block: str) -> list[TensorRecord]:
    d, t, s = TEACHER_DIM, TEACHER_MLP, STUDENT_MLP
    embed, hidden = _axis(d, STUDENT_DIM, "embed"), f"{block}.mlp.hidden"
    qkv = _axis(3 * d, 3 * STUDENT_DIM, f"{block}.attn.qkv", blocks=3)
    return [
        _select(f"{block}.norm1.weight", [d], [embed]),
        _select(f"{block}.norm1.bias", [d], [embed]),
        _select(f"{block}.attn.qkv.weight", [3 * d, d], [qkv, embed]),
        _select(f"{block}.attn.qkv.bias", [3 * d], [qkv]),
        _select(f"{block}.attn.proj.weight", [d, d], [embed, embed]),
        _select(f"{block}.attn.proj.bias", [d], [embed]),
        _select(f"{block}.norm2.weight", [d], [embed]),
        _select(f"{block}.norm2.bias", [d], [embed]),
        _select(f"{block}.mlp.fc1.weight", [t, d], [_axis(t, s, hidden), embed]),
        _select(f"{block}.mlp.fc1.bias", [t], [_axis(t, s, hidden)]),
        _select(f"{block}.mlp.fc2.weight", [d, t], [embed, _axis(t, s, hidden)]),
        _select(f"{block}.mlp.fc2.bias", [d], [embed]),
    ]


def _numel(shape: list[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def make_plan(*, name_prefix: str = "") -> SelectionPlan:
    """A consistent plan: 2 of 4 blocks, head at student init, teacher head and blocks 2-3 unused.

    ``name_prefix`` nests every student tensor deeper, to exercise truncation of long names.
    """
    d = TEACHER_DIM
    tensors = [
        _select("cls_token", [1, 1, d], _embed([1, 1, d], 2)),
        _select("pos_embed", [1, TOKENS, d], _embed([1, TOKENS, d], 2)),
        _select("patch_embed.proj.weight", [d, 3, PATCH, PATCH], _embed([d, 3, PATCH, PATCH], 0)),
        _select("patch_embed.proj.bias", [d], _embed([d], 0)),
    ]
    for i in range(STUDENT_DEPTH):
        tensors += _block_tensors(f"blocks.{i}")
    tensors += [
        _select("norm.weight", [d], _embed([d], 0)),
        _select("norm.bias", [d], _embed([d], 0)),
        TensorRecord(
            "head.weight",
            [CLASSES, STUDENT_DIM],
            None,
            None,
            RULE_STUDENT_INIT,
            component="head",
            is_head=True,
            reason="classifier head kept at student init",
        ),
        TensorRecord(
            "head.bias",
            [CLASSES],
            None,
            None,
            RULE_STUDENT_INIT,
            component="head",
            is_head=True,
            reason="classifier head kept at student init",
        ),
    ]
    for record in tensors:
        record.student = name_prefix + record.student

    unused = [
        UnusedTeacher(
            r.teacher,
            r.teacher_shape,
            f"block not selected (first {STUDENT_DEPTH} of {TEACHER_DEPTH})",
        )
        for i in range(STUDENT_DEPTH, TEACHER_DEPTH)
        for r in _block_tensors(f"blocks.{i}")
    ]
    unused += [
        UnusedTeacher("head.weight", [CLASSES, d], "student head kept at its own init"),
        UnusedTeacher("head.bias", [CLASSES], "student head kept at its own init"),
    ]

    selected = sum(r.numel for r in tensors if r.teacher is not None)
    total = sum(r.numel for r in tensors)
    head = sum(r.numel for r in tensors if r.is_head)
    teacher_params = sum(_numel(r.teacher_shape) for r in tensors if r.teacher_shape)
    teacher_params += sum(_numel(u.teacher_shape) for u in unused)

    embed_members = [
        f"{r.student}:{i}" for r in tensors for i, axis in enumerate(r.axes or []) if axis.group == "embed"
    ]
    groups = [GroupRecord("embed", d, STUDENT_DIM, embed_members, "uniform", list(range(0, d, 2)))] + [
        GroupRecord(
            f"blocks.{i}.mlp.hidden",
            TEACHER_MLP,
            STUDENT_MLP,
            [
                f"blocks.{i}.mlp.fc1.weight:0",
                f"blocks.{i}.mlp.fc1.bias:0",
                f"blocks.{i}.mlp.fc2.weight:1",
            ],
            "uniform",
            MLP_INDICES,
        )
        for i in range(STUDENT_DEPTH)
    ]
    stage = StagePair(
        student=f"stage 0 ({name_prefix}blocks, {STUDENT_DEPTH} blocks)",  # as matching/blocks.py names stages
        teacher=f"stage 0 (blocks, {TEACHER_DEPTH} blocks)",
        student_depth=STUDENT_DEPTH,
        teacher_depth=TEACHER_DEPTH,
        policy="first",
        blocks=[BlockPair(f"{name_prefix}blocks.{i}", f"blocks.{i}", 6, 6, cost=0.0) for i in range(STUDENT_DEPTH)],
        teacher_blocks=[f"blocks.{i}" for i in range(TEACHER_DEPTH)],
        cost=0.0,
    )
    return SelectionPlan(
        teacher_spec="timm:vit_small_patch16_224",
        student_spec="timm:vit_tiny_patch16_224?mlp_ratio=3",
        method="uniform",
        layer_policy="first",
        frontend={"teacher": "fx", "student": "fx"},
        tensors=tensors,
        stages=[stage],
        groups=groups,
        unused_teacher=unused,
        teacher_params=teacher_params,
        student_params=total,
        coverage=Coverage(selected, total, selected / total, selected, total - head, selected / (total - head)),
        notes=["teacher weights converted from float16 to float32"],
    )


@pytest.fixture(scope="module")
def plan() -> SelectionPlan:
    return make_plan()


def make_cnn_plan() -> SelectionPlan:
    """A ResNet-like plan: two stages cut to 2 blocks, a third student stage with no teacher."""
    tensors = [
        _select("conv1.weight", [64, 3, 7, 7], [_axis(64, 32), _axis(3, 3), _axis(7, 7), _axis(7, 7)]),
        _select("bn1.weight", [64], [_axis(64, 32)]),
    ]
    stages = []
    for stage, teacher_depth in ((1, 3), (2, 4)):
        pairs = [BlockPair(f"layer{stage}.{i}", f"layer{stage}.{i}", 2, 2) for i in range(2)]
        for pair in pairs:
            tensors += [
                _select(
                    f"{pair.student}.conv1.weight",
                    [64, 64, 3, 3],
                    [_axis(64, 32), _axis(64, 32), _axis(3, 3), _axis(3, 3)],
                ),
                _select(f"{pair.student}.bn1.weight", [64], [_axis(64, 32)]),
            ]
        teacher_blocks = [f"layer{stage}.{i}" for i in range(teacher_depth)]
        stages.append(StagePair(f"layer{stage}", f"layer{stage}", 2, teacher_depth, "first", pairs, teacher_blocks))
    extra = [BlockPair("layer3.0", None, 0, 2)]
    tensors.append(
        TensorRecord(
            "layer3.0.conv1.weight",
            [32, 32, 3, 3],
            None,
            None,
            RULE_STUDENT_INIT,
            reason="no teacher stage",
        )
    )
    stages.append(StagePair("layer3", None, 1, 0, "first", extra, []))
    tensors.append(_select("fc.weight", [10, 64], [_axis(10, 10), _axis(64, 32)]))
    total = sum(r.numel for r in tensors)
    return SelectionPlan(
        teacher_spec="py:models:resnet_teacher",
        student_spec="py:models:resnet_student",
        method="uniform",
        layer_policy="first",
        frontend={"teacher": "fx", "student": "fx"},
        tensors=tensors,
        stages=stages,
        groups=[],
        unused_teacher=[UnusedTeacher("layer1.2.conv1.weight", [64, 64, 3, 3], "block not selected")],
        teacher_params=10**6,
        student_params=total,
    )


# --- manifest ---------------------------------------------------------------------------------


def test_manifest_validates_and_round_trips(plan):
    manifest = plan_to_dict(plan)
    validate_manifest(manifest)
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert len(manifest["tensors"]) == len(plan.tensors) == 4 + 12 * STUDENT_DEPTH + 4
    assert len(manifest["unused_teacher"]) == 12 * (TEACHER_DEPTH - STUDENT_DEPTH) + 2
    assert manifest["coverage"]["selected_params"] == plan.coverage.selected_params
    assert manifest["teacher"] == {"spec": plan.teacher_spec, "params": plan.teacher_params}
    head = next(t for t in manifest["tensors"] if t["student"] == "head.weight")
    assert head["teacher"] is None and head["axes"] is None and head["is_head"]
    qkv = next(t for t in manifest["tensors"] if t["student"] == "blocks.1.attn.qkv.weight")
    assert qkv["axes"][0] == {
        "teacher_size": 1152,
        "student_size": 576,
        "rule": "uniform",
        "group": "blocks.1.attn.qkv",
        "blocks": 3,
        "step": 2,
        "indices": None,
        "offset": 0,
    }
    text = render(plan, "json")
    assert json.loads(text) == manifest
    assert render(make_plan(), "json") == text, "the manifest must be deterministic"


def test_manifest_without_coverage_is_valid(plan):
    manifest = plan_to_dict(replace(plan, coverage=None))
    validate_manifest(manifest)
    assert manifest["coverage"] is None


def test_validate_manifest_lists_every_problem(plan):
    manifest = copy.deepcopy(plan_to_dict(plan))
    del manifest["coverage"]["fraction"]
    manifest["tensors"][10]["rule"] = "borrow"
    manifest["tensors"][2]["axes"][0]["step"] = 0
    manifest["tensors"][-1]["teacher"] = "head.bias"  # student-init with a teacher
    with pytest.raises(ValidationError, match=r"4 problems") as error:
        validate_manifest(manifest)
    message = str(error.value)
    last = f"tensors/{len(plan.tensors) - 1}/teacher"
    for where in ("coverage: 'fraction'", "tensors/2/axes/0/step", "tensors/10/rule", last):
        assert where in message
    assert message.index("tensors/2/") < message.index("tensors/10/") < message.index(last)


def test_schema_is_documented():
    import jsonschema

    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$id"] and schema["title"]
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION

    def undocumented(node: dict, path: str) -> list[str]:
        """Fields (object properties) without a description, walking definitions and items."""
        found = [f"{path}/{name}" for name, sub in node.get("properties", {}).items() if "description" not in sub]
        children = list(node.get("properties", {}).items()) + list(node.get("$defs", {}).items())
        children += [(key, node[key]) for key in ("items", "additionalProperties") if isinstance(node.get(key), dict)]
        for name, sub in children:
            found += undocumented(sub, f"{path}/{name}")
        return found

    assert undocumented(schema, "") == []


# --- text and markdown ------------------------------------------------------------------------


def test_rule_labels():
    def select(*axes: AxisRule) -> TensorRecord:
        return TensorRecord(
            "w",
            [a.student_size for a in axes],
            "w",
            [a.teacher_size for a in axes],
            RULE_SELECT,
            axes=list(axes),
        )

    assert rule_label(select(_axis(8, 4), _axis(6, 6))) == "uniform step 2"
    assert rule_label(select(_axis(8, 4), _axis(16, 4))) == "uniform step 2/4"
    assert rule_label(select(_axis(TEACHER_MLP, STUDENT_MLP))) == "uniform idx"
    assert rule_label(select(AxisRule(8, 4, "magnitude", None, indices=[0, 2, 5, 7]))) == ("magnitude idx")
    assert rule_label(TensorRecord("w", [4], "w", [4], RULE_COPY)) == "copy"
    assert rule_label(TensorRecord("w", [4], None, None, RULE_STUDENT_INIT)) == "student-init"


def test_text_report(plan):
    text = render(plan, "text")
    lines = text.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert "\x1b" not in text
    # the words after the stage names give way to the width first: both block counts stay whole
    assert "stage 0 (blocks, 2 blocks) <- stage 0 (blocks, 4 blocks): 2 of 4 blocks (first; ali" in text
    assert "alignment cost 0.00" in render(plan, "md")
    assert f"({plan.coverage.fraction:.1%})" in text
    assert f"({plan.coverage.fraction_no_head:.1%})" in text
    for expected in (
        "uniform step 2",
        "uniform idx",
        "student-init",
        "left behind",
        "classifier head kept at student init",
        "block not selected",
    ):
        assert expected in text
    row = next(line for line in lines if line.lstrip().startswith("blocks.1.attn.qkv.weight"))
    assert re.search(r"576x192\s+blocks\.1\.attn\.qkv\.weight\s+1152x384\s+uniform step 2", row)
    layer_rows = [line.split() for line in lines if line.startswith("  — ")]
    assert [row[1] for row in layer_rows] == ["blocks.2", "blocks.3"]


def test_text_report_color_and_truncation():
    plan = make_plan(name_prefix="encoder.transformer.very_long_module_name.")
    plain = render(plan, "text")
    assert all(len(line) <= WIDTH for line in plain.splitlines())
    assert "…" in plain and "…" in plain.split("qkv.weight")[0]  # cut in the middle, suffix kept
    colored = render(plan, "text", color=True)
    assert "\x1b[" in colored
    assert ANSI.sub("", colored) == plain


STAGE_START = re.compile(r"stage \d+ \(")


@pytest.mark.parametrize("width", [WIDTH, 80, 60, 40])
def test_narrow_text_report_never_cuts_a_stage_block_count(width):
    from wscompile.reports import build_report
    from wscompile.reports.text import STAGE_NAME, render_text

    plan = make_plan(name_prefix="encoder.transformer.very_long_module_name.")
    text = render_text(build_report(plan), width=width)
    assert all(len(line) <= width for line in text.splitlines())
    # the long student path is shortened, yet every stage name shown ends in its own block count
    assert "very_long_module_name.blocks," not in text
    shown = [line[m.start() :] for line in text.splitlines() for m in STAGE_START.finditer(line)]
    assert shown
    for rest in shown:
        whole = STAGE_NAME.match(rest)
        assert whole, rest
        assert whole[3] in (f", {STUDENT_DEPTH} blocks)", f", {TEACHER_DEPTH} blocks)"), rest
    if width >= 60:  # room for both names of the layer-map title
        assert f"({STUDENT_DEPTH} blocks)" not in text  # (the path is never dropped whole: '…' stays)
        assert f", {STUDENT_DEPTH} blocks) <- stage 0 (" in text and f", {TEACHER_DEPTH} blocks)" in text


def test_truncate_middle_keeps_stage_counts_and_cuts_other_text_in_the_middle():
    from wscompile.reports.text import truncate_middle

    line = "stage 1 (stages.1.blocks, 3 blocks) <- stage 1 (stages.1.blocks, 9 blocks): 3 of 9 blocks (first)"
    assert truncate_middle(line, len(line)) == line
    # 4 columns short: the words after the last stage name give way first
    assert truncate_middle(line, len(line) - 4) == (
        "stage 1 (stages.1.blocks, 3 blocks) <- stage 1 (stages.1.blocks, 9 blocks): 3 of 9 blocks (f…"
    )
    # too short for both names whole: each module path is cut in its middle, the rest untouched
    shorter = line.removesuffix(": 3 of 9 blocks (first)")
    assert (
        truncate_middle(shorter, len(shorter) - 4)
        == "stage 1 (stag…1.blocks, 3 blocks) <- stage 1 (stag…1.blocks, 9 blocks)"
    )
    # paths down to '…', then the end is cut: after the names, or before a name it would split
    assert truncate_middle(line, 50) == "stage 1 (…, 3 blocks) <- stage 1 (…, 9 blocks): 3…"
    assert truncate_middle(line, 40) == "stage 1 (…, 3 blocks) <- …"
    assert truncate_middle("blocks.11.mlp.fc1.weight", 20) == "blocks…lp.fc1.weight"  # a third kept from the start


def test_reports_say_student_from_teacher(plan):
    """One arrow convention: `student <- teacher`, never `->` between a student and a teacher name."""
    text, md, page = render(plan, "text"), render(plan, "md"), render(plan, "html")
    student_stage, teacher_stage = plan.stages[0].student, plan.stages[0].teacher
    assert f"{student_stage} <- {teacher_stage}" in text
    assert f"{student_stage} \\<- {teacher_stage}" in md  # '<' escaped: renders as `<-`
    assert f"{student_stage} &lt;- {teacher_stage}" in page
    assert f"<title>wscompile: {plan.student_spec} &lt;- {plan.teacher_spec}</title>" in page
    group = plan.groups[0]
    assert f"{group.student_size} <- {group.teacher_size}" in text
    for rendered in (text, md, page):
        assert "->" not in rendered and "-&gt;" not in rendered


def test_text_report_without_coverage(plan):
    text = render(replace(plan, coverage=None), "text")
    assert "not computed" in text


def test_markdown_report(plan):
    md = render(plan, "md")
    assert md.startswith("## wscompile selection plan")
    assert "| student | shape | teacher | shape | rule | reason |" in md
    assert "| student block | teacher block | status |" in md
    assert "| `blocks.0.attn.qkv.weight` | 576x192 | `blocks.0.attn.qkv.weight` | 1152x384 |" in md
    assert "| `head.weight` | 1000x192 | — | — | student-init |" in md
    # Every table row has as many cells as its header.
    for block in re.findall(r"(?:^\|.*\|$\n?)+", md, flags=re.M):
        rows = [re.split(r"(?<!\\)\|", line) for line in block.splitlines()]
        assert len({len(cells) for cells in rows}) == 1, block


def test_markdown_escapes_pipes(plan):
    odd = replace(plan, notes=["a | b"], unused_teacher=[UnusedTeacher("x|y", [2], "why | not")])
    md = render(odd, "md")
    assert "`x\\|y`" in md and "why \\| not" in md and "- a \\| b" in md


# --- HTML -------------------------------------------------------------------------------------


class _TensorRows(HTMLParser):
    """Counts the rows of the tensor table and which of them are hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.in_table = False
        self.rows: list[bool] = []  # hidden flag per row
        self.attrs: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag in ("html", "body"):
            self.attrs[tag] = named
        if tag == "table":
            self.in_table = named.get("id") == "table-tensors"
        elif tag == "tr" and self.in_table and "data-tone" in named:
            self.rows.append("hidden" in named)


def test_html_is_self_contained(plan):
    page = render(plan, "html")
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(//|[a-z]+:)""", page, flags=re.I)
    assert page.count("<svg") == 1 and "<script src" not in page
    assert "Content-Security-Policy" in page
    for record in plan.tensors:
        assert f"<code>{record.student}</code>" in page
    parser = _TensorRows()
    parser.feed(page)
    assert len(parser.rows) == len(plan.tensors)


def test_html_block_graph_of_several_stages():
    from wscompile.reports.blockgraph import render_block_graph

    plan = make_cnn_plan()
    svg = render_block_graph(plan)
    boxes = re.findall(r'<g class="box" data-name="([^"]+)"', svg)
    teacher_blocks = [b for s in plan.stages for b in s.teacher_blocks]
    student_blocks = [p.student for s in plan.stages for p in s.blocks]
    assert boxes == ["conv1", "bn1", *teacher_blocks, "fc", "conv1", "bn1", *student_blocks, "fc"]
    # One line per matched block pair plus one per non-block component.
    assert svg.count('class="edge"') == 4 + 3
    assert svg.count(">left behind</text>") == 3  # layer1.2, layer2.2, layer2.3
    validate_manifest(plan_to_dict(plan))
    text = render(plan, "text")
    assert "layer3: no teacher stage (1 block)" in text
    assert all(len(line) <= WIDTH for line in text.splitlines())


def test_html_escapes_plan_text(plan):
    page = render(replace(plan, notes=["<script>alert(1)</script> & more"]), "html")
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def _run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _console_messages(stderr: str) -> list[str]:
    """Page console output: uncaught errors, CSP violations (an external load), any logging."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.browser
def test_html_renders_in_chromium(plan, tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    write_report(plan, str(page))
    url = page.as_uri()

    shot = tmp_path / "shot.png"
    result = _run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,900", url)
    assert _console_messages(result.stderr) == []
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    colors = image.getcolors(image.width * image.height)  # [(count, (r, g, b)), ...]
    non_white = sum(n for n, rgb in colors if sum(rgb) < 740) / (image.width * image.height)
    assert non_white > 0.03, f"screenshot looks blank ({non_white:.1%} non-white)"
    assert len(colors) > 50, "screenshot has too few colours to show the graph"

    result = _run_chromium(tmp_path, "--dump-dom", url + "#q=qkv&rule=select")
    assert _console_messages(result.stderr) == []
    dom = _TensorRows()
    dom.feed(result.stdout)
    assert dom.attrs["body"].get("data-ready") == "1", "the page script did not finish"
    assert "data-error" not in dom.attrs["html"], dom.attrs["html"].get("data-error")
    assert len(dom.rows) == len(plan.tensors)
    shown = [hidden for hidden in dom.rows if not hidden]
    assert len(shown) == 2 * STUDENT_DEPTH, "the fragment filter should leave the qkv tensors"


# --- files ------------------------------------------------------------------------------------


def test_format_from_path():
    assert [format_from_path(p) for p in ("a.txt", "b.md", "c.JSON", "d.html", "e.htm")] == [
        "text",
        "md",
        "json",
        "html",
        "html",
    ]
    with pytest.raises(OutputError, match=r"extension '\.xml'.*--format"):
        format_from_path("plan.xml")
    with pytest.raises(OutputError, match="no extension"):
        format_from_path("plan")


def test_render_rejects_unknown_format(plan):
    with pytest.raises(OutputError, match="unknown report format 'pdf'"):
        render(plan, "pdf")


def test_write_report(plan, tmp_path):
    path = tmp_path / "plan.json"
    write_report(plan, str(path))
    assert json.loads(path.read_text(encoding="utf-8")) == plan_to_dict(plan)
    with pytest.raises(OutputError, match="exists; pass --force"):
        write_report(plan, str(path), fmt="text")
    assert json.loads(path.read_text(encoding="utf-8")) == plan_to_dict(plan), "file kept"
    write_report(plan, str(path), fmt="md", force=True)
    assert path.read_text(encoding="utf-8").startswith("## wscompile")
    assert sorted(os.listdir(tmp_path)) == ["plan.json"], "no temporary file left behind"
    with pytest.raises(OutputError, match="does not exist"):
        write_report(plan, str(tmp_path / "missing" / "plan.md"))
