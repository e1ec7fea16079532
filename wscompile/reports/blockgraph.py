"""The block graph of the HTML report: teacher and student side by side as inline SVG.

Each column is a list of boxes in model order. A box is a block of a stage (from the plan's
``StagePair``s) or a non-block component, i.e. the tensors of one module outside every block
(``patch_embed.proj``, ``norm``, ``head``; a top-level tensor such as ``cls_token`` is its own box).
The teacher column follows the order in which teacher tensors appear in the plan (used ones in
student order, then the unused ones), and a stage shows all its teacher blocks where its first
block appears. Lines join a student box to every teacher box its tensors come from; each student
box sits level with its first teacher box when it can, so dropped teacher blocks show as a gap.

Student boxes are filled by the share of their elements that came from the teacher (a
presentation-level sum of ``TensorRecord.numel``); teacher boxes that feed nothing are dashed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from html import escape
from itertools import pairwise

from wscompile.plan import SelectionPlan
from wscompile.reports.records import from_teacher, percent
from wscompile.reports.text import truncate_middle

BOX_WIDTH = 330
BOX_HEIGHT = 26
CAPTION_HEIGHT = 18
GAP = 6
MARGIN = 12
HEADING_HEIGHT = 34
TEACHER_X = MARGIN
STUDENT_X = MARGIN + BOX_WIDTH + 170
SVG_WIDTH = STUDENT_X + BOX_WIDTH + MARGIN
LABEL_CHARS = 34  # what fits in a box at 12px monospace next to a percentage
HEADING_CHARS = 44

# Fill of a student box by share from the teacher: own init -> all from the teacher.
SCALE = ((0.0, (0xFE, 0xE8, 0xC8)), (0.5, (0x9E, 0xCA, 0xE1)), (1.0, (0x21, 0x71, 0xB5)))
TEACHER_FILL = "#e6ebf2"
EDGE_COLOR = "#6f829c"
UNUSED_STROKE = "#a8a8a8"

# Box keys: ("stage", "<index>") for a stage caption, ("block", path), ("module", path).
Key = tuple[str, str]


@dataclass
class _Box:
    key: Key
    label: str
    height: int
    y: int = 0
    tooltip: str = ""
    names: list[str] = field(default_factory=list)  # state_dict keys shown by this box


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _owner(name: str, blocks: dict[str, int]) -> Key:
    """The box a tensor belongs to: the innermost block containing it, else its module."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in blocks:
            return ("block", prefix)
    return ("module", _module_of(name))


def _column(names: Iterable[str], stages: list[tuple[str, list[str]]]) -> tuple[list[_Box], dict[str, Key]]:
    """Boxes of one model in order, and the box of each tensor name."""
    block_stage = {block: i for i, (_, blocks) in enumerate(stages) for block in blocks}
    boxes: dict[Key, _Box] = {}
    owner_of: dict[str, Key] = {}

    def add_stage(index: int) -> None:
        caption, blocks = stages[index]
        boxes[("stage", str(index))] = _Box(("stage", str(index)), caption, CAPTION_HEIGHT)
        for block in blocks:
            boxes[("block", block)] = _Box(("block", block), block, BOX_HEIGHT)

    for name in names:
        key = _owner(name, block_stage)
        owner_of[name] = key
        if key[0] == "block" and ("stage", str(block_stage[key[1]])) not in boxes:
            add_stage(block_stage[key[1]])
        elif key not in boxes:
            boxes[key] = _Box(key, key[1], BOX_HEIGHT)
        boxes[key].names.append(name)
    for index, (_, blocks) in enumerate(stages):
        if blocks and ("stage", str(index)) not in boxes:
            add_stage(index)
    return list(boxes.values()), owner_of


def _fill(fraction: float) -> str:
    for (lo, lo_rgb), (hi, hi_rgb) in pairwise(SCALE):
        if fraction <= hi:
            t = (fraction - lo) / (hi - lo)
            rgb = [round(a + (b - a) * t) for a, b in zip(lo_rgb, hi_rgb, strict=True)]
            return "#" + "".join(f"{c:02x}" for c in rgb)
    return _fill(1.0)


def _ink(fill: str) -> str:
    """Dark or light text, whichever reads on ``fill``."""
    r, g, b = (int(fill[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "#ffffff" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.45 else "#1b1f24"


def _text(x: float, y: float, content: str, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    return f'<text x="{x}" y="{y}"{extra}>{escape(content)}</text>'


def _box_svg(box: _Box, x: int, fill: str, right: str, *, dashed: bool = False) -> str:
    if box.key[0] == "stage":
        return _text(x + 2, box.y + 13, truncate_middle(box.label, 48), class_="caption")
    ink = _ink(fill) if not dashed else "#6b6b6b"
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    stroke = UNUSED_STROKE if dashed else "#51627a"
    return (
        f'<g class="box" data-name="{escape(box.key[1])}"><title>{escape(box.tooltip)}</title>'
        f'<rect x="{x}" y="{box.y}" width="{BOX_WIDTH}" height="{box.height}" rx="4" '
        f'fill="{fill}" stroke="{stroke}"{dash}/>'
        + _text(x + 8, box.y + 17, truncate_middle(box.label, LABEL_CHARS), fill=ink)
        + _text(x + BOX_WIDTH - 8, box.y + 17, right, fill=ink, text_anchor="end")
        + "</g>"
    )


def _stack(boxes: list[_Box], targets: dict[Key, list[int]]) -> int:
    """Place ``boxes`` top to bottom, each level with its first target when there is room.

    Returns:
        The y just below the last box.
    """
    cursor = HEADING_HEIGHT
    for box in boxes:
        box.y = max(cursor, min(targets.get(box.key, [cursor])))
        cursor = box.y + box.height + GAP
    return cursor


def _layout(plan: SelectionPlan) -> tuple[list[_Box], list[_Box], list[tuple[Key, Key]]]:
    """Teacher boxes, student boxes (both placed), and (student box, teacher box) lines."""
    teacher_names = [r.teacher for r in plan.tensors if r.teacher is not None]
    teacher_names += [u.teacher for u in plan.unused_teacher]
    teacher_boxes, teacher_owner = _column(
        dict.fromkeys(teacher_names), [(s.teacher or "", s.teacher_blocks) for s in plan.stages]
    )
    student_boxes, student_owner = _column(
        (r.student for r in plan.tensors),
        [(s.student, [pair.student for pair in s.blocks]) for s in plan.stages],
    )
    lines: dict[tuple[Key, Key], None] = {}  # a dict keeps the first-seen order
    for record in plan.tensors:
        if record.teacher is not None:
            lines[(student_owner[record.student], teacher_owner[record.teacher])] = None
    for stage in plan.stages:
        for pair in stage.blocks:
            if pair.teacher is not None:
                lines[(("block", pair.student), ("block", pair.teacher))] = None

    _stack(teacher_boxes, {})
    teacher_y = {box.key: box.y for box in teacher_boxes}
    targets: dict[Key, list[int]] = {}
    for student_key, teacher_key in lines:
        if teacher_key in teacher_y:
            targets.setdefault(student_key, []).append(teacher_y[teacher_key])
    # A stage caption sits level with the caption of its teacher stage.
    for index, stage in enumerate(plan.stages):
        if ("stage", str(index)) in teacher_y and stage.teacher is not None:
            targets[("stage", str(index))] = [teacher_y[("stage", str(index))]]
    _stack(student_boxes, targets)
    drawn = [(s, t) for s, t in lines if t in teacher_y]
    return teacher_boxes, student_boxes, drawn


def _line(teacher: _Box, student: _Box) -> str:
    x1, y1 = TEACHER_X + BOX_WIDTH, teacher.y + teacher.height / 2
    x2, y2 = STUDENT_X, student.y + student.height / 2
    bend = (x2 - x1) / 2
    return (
        f'<path class="edge" d="M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}" '
        f'fill="none" stroke="{EDGE_COLOR}" stroke-width="1.4" opacity="0.8"/>'
    )


def render_block_graph(plan: SelectionPlan) -> str:
    """The teacher and student block graphs of ``plan`` as one ``<svg>`` element."""
    teacher_boxes, student_boxes, lines = _layout(plan)
    height = max(b.y + b.height for b in teacher_boxes + student_boxes) + GAP + MARGIN
    teacher_by_key = {box.key: box for box in teacher_boxes}
    student_by_key = {box.key: box for box in student_boxes}
    parts = [
        f'<svg class="blockgraph" width="{SVG_WIDTH}" height="{height}" '
        f'viewBox="0 0 {SVG_WIDTH} {height}" role="img" aria-label="teacher and student blocks">',
        _text(TEACHER_X, 16, "teacher", class_="heading"),
        _text(TEACHER_X, 29, truncate_middle(plan.teacher_spec, HEADING_CHARS), class_="spec"),
        _text(STUDENT_X, 16, "student", class_="heading"),
        _text(STUDENT_X, 29, truncate_middle(plan.student_spec, HEADING_CHARS), class_="spec"),
    ]
    parts += [_line(teacher_by_key[t], student_by_key[s]) for s, t in lines]
    used = {teacher_key for _, teacher_key in lines}
    for box in teacher_boxes:
        left_behind = box.key not in used
        box.tooltip = f"{box.label}: {len(box.names)} teacher tensors"
        box.tooltip += ", left behind" if left_behind else ""
        fill = "#ffffff" if left_behind else TEACHER_FILL
        right = "left behind" if left_behind else ""
        parts.append(_box_svg(box, TEACHER_X, fill, right, dashed=left_behind))
    records = {r.student: r for r in plan.tensors}
    for box in student_boxes:
        selected, total = from_teacher(records[name] for name in box.names)
        fraction = selected / total if total else 0.0
        box.tooltip = f"{box.label}: {selected:,} of {total:,} params from the teacher"
        parts.append(_box_svg(box, STUDENT_X, _fill(fraction), percent(fraction)))
    parts.append("</svg>")
    return "\n".join(parts)


def render_legend() -> str:
    """An HTML legend for the fills, the dashed boxes and the lines (laid out by the browser)."""
    gradient = ", ".join(f"{_fill(at)} {at:.0%}" for at, _ in SCALE)
    swatch = '<span class="swatch" style="{}"></span>'.format
    return (
        '<div class="legend">'
        f"<span>0% {swatch(f'width: 120px; background: linear-gradient(to right, {gradient})')}"
        " 100% of a student box's params from the teacher</span>"
        f"<span>{swatch(f'background: {TEACHER_FILL}')} teacher, used</span>"
        f"<span>{swatch(f'background: #ffffff; border: 1px dashed {UNUSED_STROKE}')}"
        " teacher, left behind</span>"
        f"<span>{swatch(f'height: 0; border: 0; border-top: 2px solid {EDGE_COLOR}')}"
        " takes weights from</span>"
        "</div>"
    )
