"""The plan arranged for reading: summary lines and tables that every human-facing renderer shares.

``build_report`` turns a ``SelectionPlan`` into a ``Report``; the text, markdown and HTML renderers
only lay it out, so the three always show the same content. Nothing here decides anything: the only
arithmetic is presentation-level sums (how many parameters of a block came from the teacher), and
coverage is read from the plan, never recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from wscompile.plan import (
    AXIS_FULL,
    AXIS_UNIFORM,
    GROWTH_RULES,
    RULE_COPY,
    RULE_SELECT,
    RULE_STUDENT_INIT,
    SelectionPlan,
    StagePair,
    TensorRecord,
)

# Column kinds: how a cell may be shortened and styled.
NAME = "name"  # a tensor or module path: code in md, truncated in the middle in text
TEXT = "text"  # free text: the first to be shortened in text, cut at the end
FIXED = "fixed"  # short values (shapes, rules): never truncated unless nothing else fits
NUMBER = "number"  # right-aligned
NOTE = "note"  # free text that is mostly empty: a line under its row in text, a column elsewhere

# Row tones: drive colour in text and HTML and the rule filter of the HTML tensor table. The
# tensor rules double as tones so the filter matches TensorRecord.rule exactly.
TONE_SELECT = RULE_SELECT
TONE_COPY = RULE_COPY
TONE_INIT = RULE_STUDENT_INIT
TONE_UNUSED = "unused"  # teacher tensors and blocks left behind
TONE_GROWN = "grown"  # tensors and groups the student is larger in (--allow-partial growth)

NONE_CELL = "—"  # an absent value (no teacher tensor, no teacher block)


@dataclass
class Column:
    """One table column."""

    header: str
    kind: str = TEXT  # NAME | TEXT | FIXED | NUMBER | NOTE


@dataclass
class Table:
    """A titled table; the same record becomes a text, markdown or HTML table."""

    id: str  # stable anchor: "tensors", "unused", "layers-0", ...
    title: str
    columns: list[Column]
    rows: list[list[str]]
    tones: list[str | None]  # one per row, TONE_* or None
    tone_column: int | None = None  # column coloured by its row's tone in text


@dataclass
class Report:
    """Everything a human-facing report shows, in display order."""

    title: str
    summary: list[tuple[str, str]]  # (label, value) lines; an empty label continues the one above
    tables: list[Table]
    notes: list[str]


def format_shape(shape: list[int] | None) -> str:
    """``[1152, 384]`` -> ``"1152x384"``; a scalar is ``"()"``, no tensor is ``NONE_CELL``."""
    if shape is None:
        return NONE_CELL
    return "x".join(str(d) for d in shape) if shape else "()"


def percent(fraction: float) -> str:
    return f"{fraction:.1%}"


def from_teacher(records: Iterable[TensorRecord]) -> tuple[int, int]:
    """(elements filled from the teacher, all elements) over ``records``."""
    selected = total = 0
    for record in records:
        total += record.numel
        if record.teacher is not None:
            selected += record.numel
    return selected, total


def grows(record: TensorRecord) -> bool:
    """Whether ``record`` repeats a teacher block, or some axis of it is larger than its teacher's and grown."""
    return record.repeats is not None or any(
        a.rule in GROWTH_RULES for planned in record.parts or [record] for a in planned.axes or []
    )


def block_records(plan: SelectionPlan, block: str) -> list[TensorRecord]:
    """The student tensors inside the module at path ``block``."""
    prefix = block + "."
    return [r for r in plan.tensors if r.student.startswith(prefix)]


def rule_label(record: TensorRecord) -> str:
    """A short description of how a tensor is filled: "uniform step 2", "uniform idx", "copy".

    Only the axes that actually shrink are described: a full axis takes every index and says
    nothing about the rule. Differing steps are listed in axis order ("uniform step 2/4").
    """
    if record.rule != RULE_SELECT:
        return record.rule
    shrinking = [a for planned in record.parts or [record] for a in planned.axes or [] if a.rule != AXIS_FULL]
    if not shrinking:
        return "select full"
    methods = list(dict.fromkeys(a.rule for a in shrinking))
    if any(m in GROWTH_RULES for m in methods):
        return "grown " + "/".join(methods)
    if methods == [AXIS_UNIFORM] and all(a.step is not None for a in shrinking):
        steps = list(dict.fromkeys(str(a.step) for a in shrinking))
        return f"uniform step {'/'.join(steps)}"
    return "/".join(methods) + " idx"


def _reason(record: TensorRecord) -> str:
    parts = []
    if record.is_head:
        parts.append("head")
    if record.reshape:
        parts.append(f"reshape {record.reshape}")
    if record.parts:
        parts.append("parts side by side: " + " + ".join(p.teacher or NONE_CELL for p in record.parts))
    if record.reason:
        parts.append(record.reason)
    return "; ".join(parts)


def _blocks(count: int) -> str:
    return f"{count} block" if count == 1 else f"{count} blocks"


def _stage_line(stage: StagePair) -> str:
    if stage.teacher is None:
        return f"{stage.student}: no teacher stage ({_blocks(stage.student_depth)})"
    return (
        f"{stage.student} <- {stage.teacher}: {stage.student_depth} of {_blocks(stage.teacher_depth)} ({stage.policy}"
        f"{_by_structure(stage)}; alignment cost {stage.cost:.2f})"
    )


def _by_structure(stage: StagePair) -> str:
    replaced = sum(pair.chosen_by == "structure" for pair in stage.blocks)
    return f", {replaced} by structure" if replaced else ""


def _summary(plan: SelectionPlan) -> list[tuple[str, str]]:
    frontends = ", ".join(f"{model}={name}" for model, name in plan.frontend.items())
    lines = [
        ("teacher", f"{plan.teacher_spec} ({plan.teacher_params:,} params)"),
        ("student", f"{plan.student_spec} ({plan.student_params:,} params)"),
        ("method", f"{plan.method}; layer policy {plan.layer_policy}"),
        ("frontend", frontends or "n/a"),
    ]
    if plan.teacher_weights is not None:
        lines.insert(1, ("teacher weights", plan.teacher_weights))
    if plan.export is not None:
        e = plan.export
        axes = "; ".join(f"{name}: {', '.join(names)}" for name, names in e.dynamic_axes.items()) or "none"
        fixed = "; ".join(f"{name} {shape}" for name, shape in e.static_shapes.items())
        lines.append(
            (
                "onnx export",
                f"{e.onnx} ({e.exporter}); dynamic axes {axes}"
                + (f"; static {fixed}" if fixed else "")
                + f"; max |onnx - torch| {e.max_abs_diff:.2g}",
            )
        )
    coverage = plan.coverage
    if coverage is None:
        lines.append(("from teacher", "not computed (the plan has no coverage)"))
    else:
        lines.append(
            (
                "from teacher",
                f"{coverage.selected_params:,} of {coverage.total_params:,} student params "
                f"({percent(coverage.fraction)})",
            )
        )
        lines.append(
            (
                "without head",
                f"{coverage.selected_params_no_head:,} of {coverage.total_params_no_head:,} "
                f"({percent(coverage.fraction_no_head)})",
            )
        )
        grown = [g for g in plan.groups if g.growth]
        if grown or coverage.grown_params:
            rules = ", ".join(f"{g.id} {g.growth}" + (f" ({g.growth_note})" if g.growth_note else "") for g in grown)
            lines.append(
                (
                    "grown",
                    f"{coverage.grown_params:,} student params replicated from teacher units "
                    f"(not in 'from teacher'); {len(grown)} group(s) larger than the teacher"
                    + (f": {rules}" if rules else "")
                    + (
                        "; deeper blocks repeat their teacher stage's last block"
                        if any(r.repeats for r in plan.tensors)
                        else ""
                    ),
                )
            )
    for i, stage in enumerate(plan.stages):
        lines.append(("layers" if i == 0 else "", _stage_line(stage)))
    return lines


def _layer_table(plan: SelectionPlan, index: int, stage: StagePair) -> Table:
    rows, tones = [], []
    taken = set()
    for pair in stage.blocks:
        selected, total = from_teacher(block_records(plan, pair.student))
        share = percent(selected / total) if total else "no params"
        if pair.teacher is None:
            status = f"no teacher block; {share} from teacher"
        else:
            taken.add(pair.teacher)
            chosen = "; chosen by structure" if pair.chosen_by == "structure" else ""
            status = (
                f"{pair.components_matched}/{pair.components_total} components; {share} from teacher; "
                f"cost {pair.cost:.2f}{chosen}"
            )
        rows.append([pair.student, pair.teacher or NONE_CELL, status])
        tones.append(TONE_SELECT if pair.teacher is not None else TONE_INIT)
    for teacher_block in stage.teacher_blocks:
        if teacher_block not in taken:
            rows.append([NONE_CELL, teacher_block, "left behind"])
            tones.append(TONE_UNUSED)
    return Table(
        id=f"layers-{index}",
        title=f"Layer map: {_stage_line(stage)}",
        columns=[Column("student block", NAME), Column("teacher block", NAME), Column("status")],
        rows=rows,
        tones=tones,
        tone_column=2,
    )


def _tensor_table(plan: SelectionPlan) -> Table:
    n_init = sum(1 for r in plan.tensors if r.teacher is None)
    return Table(
        id="tensors",
        title=(f"Tensors ({len(plan.tensors)}: {len(plan.tensors) - n_init} from teacher, {n_init} at student init)"),
        columns=[
            Column("student", NAME),
            Column("shape", FIXED),
            Column("teacher", NAME),
            Column("shape", FIXED),
            Column("rule", FIXED),
            Column("reason", NOTE),
        ],
        rows=[
            [
                r.student,
                format_shape(r.student_shape),
                r.teacher or NONE_CELL,
                format_shape(r.teacher_shape),
                rule_label(r),
                _reason(r),
            ]
            for r in plan.tensors
        ],
        tones=[TONE_GROWN if grows(r) else r.rule for r in plan.tensors],
        tone_column=4,
    )


def _unused_table(plan: SelectionPlan) -> Table:
    return Table(
        id="unused",
        title=f"Unused teacher tensors ({len(plan.unused_teacher)})",
        columns=[Column("teacher", NAME), Column("shape", FIXED), Column("reason")],
        rows=[[u.teacher, format_shape(u.teacher_shape), u.reason] for u in plan.unused_teacher],
        tones=[TONE_UNUSED] * len(plan.unused_teacher),
        tone_column=0,
    )


def _group_table(plan: SelectionPlan) -> Table:
    return Table(
        id="groups",
        title=f"Coupled dimensions ({len(plan.groups)})",
        columns=[
            Column("group", NAME),
            Column("student <- teacher", FIXED),
            Column("rule", FIXED),
            Column("members", NUMBER),
        ],
        rows=[[g.id, f"{g.student_size} <- {g.teacher_size}", g.rule, str(len(g.members))] for g in plan.groups],
        tones=[TONE_GROWN if g.growth else None for g in plan.groups],
    )


def build_report(plan: SelectionPlan) -> Report:
    """Arrange ``plan`` as summary lines and tables, in the order every renderer shows them."""
    tables = [_layer_table(plan, i, stage) for i, stage in enumerate(plan.stages)]
    tables += [_tensor_table(plan), _unused_table(plan), _group_table(plan)]
    return Report(
        title="wscompile selection plan",
        summary=_summary(plan),
        tables=tables,
        notes=list(plan.notes),
    )
