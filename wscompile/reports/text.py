"""Terminal report: the ``Report`` as aligned plain-text tables at most ``WIDTH`` columns wide.

Cells that do not fit are cut in the middle with '…', which keeps both the module prefix and the
parameter name of a state_dict key (``blocks.11.mlp.fc1.weight`` -> ``blocks.1….fc1.weight``).
A stage's name is never cut across its block count: only the module path inside it shrinks
(``stage 1 (stages.1.blocks, 3 blocks)`` -> ``stage 1 (sta…ks, 3 blocks)``). ANSI colour is added
after the layout so it never changes a column's width.
"""

from __future__ import annotations

import re
import textwrap

from wscompile.plan import SelectionPlan
from wscompile.reports.records import (
    NAME,
    NOTE,
    NUMBER,
    TEXT,
    TONE_COPY,
    TONE_GROWN,
    TONE_INIT,
    TONE_SELECT,
    TONE_UNUSED,
    Column,
    Report,
    Table,
)

WIDTH = 100
INDENT = "  "
COLUMN_GAP = "  "
MIN_SHRUNK_WIDTH = 8  # below this a truncated name stops being recognisable
SHRINK_ORDER = (TEXT, NAME)  # prose gives way first, then names; other kinds only as a last resort

# A stage's name as matching/blocks.py spells it: the module path (group 2) is all that may be shortened.
STAGE_NAME = re.compile(r"(stage \d+ \()([^(),]+)(, \d+ blocks?\))")

BOLD = "1"
TONE_COLORS = {TONE_SELECT: "36", TONE_COPY: "32", TONE_INIT: "33", TONE_UNUSED: "2", TONE_GROWN: "35"}


def truncate_middle(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by replacing a middle part with '…'.

    Two thirds of what is kept is the end: in a state_dict key the end (block index, layer,
    parameter) tells rows apart, the start is mostly a prefix they share. In a text holding stage
    names, what follows the last one is cut first; then the names' module paths shrink
    (``_shrink_stage_paths``); if that is not enough, the end is cut instead, before any stage name
    it would split, so every stage name left keeps its block count.
    """
    if len(text) <= width:
        return text
    if STAGE_NAME.search(text):
        last_end = max(m.end() for m in STAGE_NAME.finditer(text))
        if width - 1 >= last_end:  # the words after the last stage name give way first
            return text[: width - 1] + "…"
        text = _shrink_stage_paths(text, width)
        if len(text) <= width:
            return text
        # A stage name the cut would split goes whole, so no block count is left cut in two.
        cut = max(width - 1, 0)
        cut = next((m.start() for m in STAGE_NAME.finditer(text) if m.start() < cut < m.end()), cut)
        return text[:cut] + "…"[:width]
    if width <= 1:
        return "…"[:width]
    head = (width - 1) // 3
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def _shrink_stage_paths(text: str, width: int) -> str:
    """``text`` with the module paths of its stage names cut in the middle, the longest first, until
    it fits ``width`` or every path is down to '…'."""
    paths = [m[2] for m in STAGE_NAME.finditer(text)]
    lengths = [len(p) for p in paths]
    excess = len(text) - width
    while excess > 0 and max(lengths) > 1:
        lengths[lengths.index(max(lengths))] -= 1
        excess -= 1
    shrunk = iter(truncate_middle(p, n) for p, n in zip(paths, lengths, strict=True))
    return STAGE_NAME.sub(lambda m: m[1] + next(shrunk) + m[3], text)


def _truncate(text: str, width: int, kind: str) -> str:
    if kind == TEXT and len(text) > width:
        return text[: max(width - 1, 0)] + "…"[:width]
    return truncate_middle(text, width)


def _paint(text: str, code: str | None, color: bool) -> str:
    if not color or code is None or not text:
        return text
    return f"\x1b[{code}m{text}\x1b[0m"


def _fit_widths(columns: list[Column], rows: list[list[str]], budget: int) -> list[int]:
    """Column widths whose sum (with gaps) fits ``budget``, shrinking in ``SHRINK_ORDER``."""
    widths = [max([len(column.header)] + [len(row[i]) for row in rows]) for i, column in enumerate(columns)]
    tiers = [([i for i, c in enumerate(columns) if c.kind == kind], MIN_SHRUNK_WIDTH) for kind in SHRINK_ORDER]
    tiers.append((list(range(len(columns))), 1))
    for tier, floor in tiers:
        while sum(widths) + len(COLUMN_GAP) * (len(widths) - 1) > budget:
            candidates = [i for i in tier if widths[i] > floor]
            if not candidates:
                break
            widths[max(candidates, key=lambda i: widths[i])] -= 1
    return widths


def _table_lines(table: Table, color: bool, width: int) -> list[str]:
    lines = [_paint(truncate_middle(table.title, width), BOLD, color)]
    if not table.rows:
        return [*lines, INDENT + "none"]
    # NOTE columns leave the grid: their text goes on a line of its own under the row.
    grid = [i for i, column in enumerate(table.columns) if column.kind != NOTE]
    notes = [i for i, column in enumerate(table.columns) if column.kind == NOTE]
    columns = [table.columns[i] for i in grid]
    rows = [[row[i] for i in grid] for row in table.rows]
    widths = _fit_widths(columns, rows, width - len(INDENT))

    def cells(texts: list[str]) -> list[str]:
        return [
            _truncate(text, width, column.kind).rjust(width)
            if column.kind == NUMBER
            else _truncate(text, width, column.kind).ljust(width)
            for text, width, column in zip(texts, widths, columns, strict=True)
        ]

    header = COLUMN_GAP.join(cells([c.header for c in columns])).rstrip()
    rule = COLUMN_GAP.join("-" * w for w in widths)
    lines += [INDENT + _paint(header, BOLD, color), INDENT + rule]
    tone_at = grid.index(table.tone_column) if table.tone_column in grid else None
    note_indent = INDENT * 2
    for full_row, row, tone in zip(table.rows, rows, table.tones, strict=True):
        padded = cells(row)
        if tone_at is not None:
            # Colour the text only, so the padding after it stays plain.
            text = padded[tone_at].rstrip()
            code = TONE_COLORS.get(tone or "")
            padded[tone_at] = _paint(text, code, color) + padded[tone_at][len(text) :]
        lines.append((INDENT + COLUMN_GAP.join(padded)).rstrip())
        for i in notes:
            if full_row[i]:
                lines += textwrap.wrap(
                    f"{table.columns[i].header}: {full_row[i]}",
                    width,
                    initial_indent=note_indent,
                    subsequent_indent=note_indent + "  ",
                )
    return lines


def render_text(report: Report, *, color: bool = False, width: int = WIDTH) -> str:
    """The report as plain text at most ``width`` columns wide; ANSI colour only when ``color``."""
    lines = [_paint(report.title, BOLD, color)]
    label_width = max(len(label) for label, _ in report.summary)
    for label, value in report.summary:
        line = truncate_middle(f"{INDENT}{label.ljust(label_width)}  {value}", width)
        lines.append(line.rstrip())
    for table in report.tables:
        lines += ["", *_table_lines(table, color, width)]
    if report.notes:
        lines += ["", _paint("Notes", BOLD, color)]
        for note in report.notes:
            lines += textwrap.wrap(note, width, initial_indent=INDENT + "- ", subsequent_indent=INDENT + "  ")
    return "\n".join(lines) + "\n"


def render_summary(plan: SelectionPlan) -> str:
    """A few lines for the terminal: coverage and layers kept per stage."""
    c = plan.coverage
    assert c is not None
    lines = [
        f"student {plan.student_spec}: {c.selected_params:,} of {c.total_params:,} elements from the teacher "
        f"({c.fraction:.1%}; {c.fraction_no_head:.1%} without the head), method {plan.method}"
        + (f"; {c.grown_params:,} more grown from teacher units (--allow-partial)" if c.grown_params else ""),
    ]
    for stage in plan.stages:
        teacher = stage.teacher or "no teacher stage"
        taken = [stage.teacher_blocks.index(b.teacher) for b in stage.blocks if b.teacher is not None]
        which = (
            f"first {len(taken)} of {stage.teacher_depth} blocks"
            if stage.policy == "first"
            else f"{stage.policy}: blocks {', '.join(map(str, taken))} of {stage.teacher_depth}"
        )
        if len(set(taken)) < len(taken):  # deeper than the teacher stage: its last block repeated (deepen.py)
            which = f"blocks {', '.join(map(str, taken))} of {stage.teacher_depth} (the last repeated)"
        lines.append(f"  {stage.student} <- {teacher}: {which}")
    kept = [r for r in plan.tensors if r.teacher is None]
    if kept:
        lines.append(f"  {len(kept)} tensor(s) kept at the student's init, e.g. {kept[0].student}: {kept[0].reason}")
    return "\n".join(lines)
