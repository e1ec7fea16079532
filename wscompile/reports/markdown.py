"""GitHub-flavoured markdown report: the ``Report`` as a bullet summary and pipe tables.

Meant for pull requests and notebooks. Names are code spans so underscores and dots stay literal;
other text is backslash-escaped so a spec or a reason can never break a table.
"""

from __future__ import annotations

import re

from wscompile.reports.records import NAME, NONE_CELL, NUMBER, Report, Table

# Characters that could start emphasis, code, a link or an HTML tag, or split a table cell.
_SPECIAL = re.compile(r"([\\`*_\[\]<|])")
# These matter only first on a line (quote, heading, list), where a list item's text may land.
_LEADING = re.compile(r"^([>#+-])")


def _escape(text: str) -> str:
    return _LEADING.sub(r"\\\1", _SPECIAL.sub(r"\\\1", text))


def _cell(text: str, kind: str) -> str:
    if kind == NAME and text and text != NONE_CELL and "`" not in text:
        # NOTE: GFM splits table cells on '|' even inside code spans; '\|' keeps it literal.
        return "`" + text.replace("|", "\\|") + "`"
    return _escape(text)


def _table(table: Table) -> list[str]:
    lines = [f"### {_escape(table.title)}", ""]
    if not table.rows:
        return [*lines, "none"]
    lines.append("| " + " | ".join(_escape(c.header) for c in table.columns) + " |")
    lines.append("|" + "|".join("---:" if c.kind == NUMBER else "---" for c in table.columns) + "|")
    for row in table.rows:
        cells = [_cell(text, column.kind) for text, column in zip(row, table.columns, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: Report) -> str:
    """The report as GitHub-flavoured markdown."""
    lines = [f"## {_escape(report.title)}", ""]
    shown_label = ""
    for label, value in report.summary:
        # A continuation line repeats its label: a bare continuation would merge into the bullet.
        shown_label = label or shown_label
        lines.append(f"- **{_escape(shown_label)}**: {_escape(value)}")
    for table in report.tables:
        lines += ["", *_table(table)]
    if report.notes:
        lines += ["", "### Notes", ""] + [f"- {_escape(note)}" for note in report.notes]
    return "\n".join(lines) + "\n"
