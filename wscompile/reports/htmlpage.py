"""Self-contained HTML report: summary, block graph (inline SVG), and filterable tables.

One file that works offline: the CSS, the SVG and the script are inline, and a Content Security
Policy forbids loading anything else, so a stray external reference fails loudly instead of
silently phoning home. The script filters the tensor table by substring and by rule; the URL
fragment can preset both (``report.html#q=qkv&rule=select``). It marks the page
``data-ready="1"`` on ``<body>`` when it has run and ``data-error`` on ``<html>`` if any script
fails, so a headless browser can check the page without a debugging protocol.
"""

from __future__ import annotations

from html import escape

from wscompile.plan import RULE_COPY, RULE_SELECT, RULE_STUDENT_INIT, SelectionPlan
from wscompile.reports.blockgraph import render_block_graph, render_legend
from wscompile.reports.records import NAME, NONE_CELL, NUMBER, TONE_GROWN, Report, Table

TENSOR_TABLE = "tensors"  # Table.id that gets the filter controls
RULE_CHOICES = (RULE_SELECT, RULE_COPY, RULE_STUDENT_INIT, TONE_GROWN)  # options of the rule filter

CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

STYLE = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1b1f24;
       margin: 24px auto; max-width: 1180px; padding: 0 16px; background: #ffffff; }
h1 { font-size: 22px; margin: 0 0 12px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #d8dee4; padding-bottom: 4px; }
code, .mono, svg text { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
dl.summary { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.summary dt { font-weight: 600; color: #57606a; }
dl.summary dd { margin: 0; }
.graph { overflow-x: auto; border: 1px solid #d8dee4; border-radius: 6px; padding: 8px; }
svg text { font-size: 12px; }
svg text.heading { font-size: 13px; font-weight: 700; font-family: system-ui, sans-serif; }
svg text.spec { fill: #57606a; }
svg text.caption { font-weight: 700; fill: #57606a; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #eaeef2;
         vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; }
td.number, th.number { text-align: right; }
td code { word-break: break-all; }
tr.tone-select td:first-child { box-shadow: inset 3px 0 #2171b5; }
tr.tone-copy td:first-child { box-shadow: inset 3px 0 #2da44e; }
tr.tone-student-init td:first-child { box-shadow: inset 3px 0 #d4a72c; }
tr.tone-unused { color: #6e7781; }
tr.tone-grown td:first-child { box-shadow: inset 3px 0 #8250df; }
.controls { display: flex; gap: 12px; align-items: center; margin: 4px 0 8px; }
.controls input { flex: 1; max-width: 420px; padding: 4px 8px; font: inherit; }
.controls select { padding: 4px; font: inherit; }
#tensor-count { color: #57606a; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 24px; margin: 0 0 8px; color: #57606a; }
.legend span { display: inline-flex; align-items: center; gap: 6px; }
.swatch { display: inline-block; width: 28px; height: 12px; border: 1px solid #51627a;
          border-radius: 3px; }
"""

SCRIPT = """
window.addEventListener("error", function (event) {
  document.documentElement.dataset.error = String(event.message || "script error");
});
(function () {
  "use strict";
  const table = document.getElementById("table-tensors");
  const input = document.getElementById("tensor-filter");
  const rule = document.getElementById("tensor-rule");
  const count = document.getElementById("tensor-count");
  const rows = Array.from(table.tBodies[0].rows);
  const texts = rows.map(function (row) { return row.textContent.toLowerCase(); });
  function apply() {
    const query = input.value.trim().toLowerCase();
    let shown = 0;
    rows.forEach(function (row, i) {
      const keep = (!query || texts[i].includes(query)) &&
        (!rule.value || row.dataset.tone === rule.value);
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " tensors";
  }
  const preset = new URLSearchParams(window.location.hash.slice(1));
  if (preset.has("q")) { input.value = preset.get("q"); }
  if (preset.has("rule")) { rule.value = preset.get("rule"); }
  input.addEventListener("input", apply);
  rule.addEventListener("change", apply);
  apply();
  document.body.dataset.ready = "1";
})();
"""


def _cell(text: str, kind: str) -> str:
    if kind == NAME and text and text != NONE_CELL:
        return f"<td><code>{escape(text)}</code></td>"
    css = ' class="number"' if kind == NUMBER else ""
    return f"<td{css}>{escape(text)}</td>"


def _table(table: Table) -> str:
    parts = [f'<section id="{escape(table.id)}"><h2>{escape(table.title)}</h2>']
    if table.id == TENSOR_TABLE:
        options = "".join(f'<option value="{r}">{r}</option>' for r in RULE_CHOICES)
        parts.append(
            '<div class="controls">'
            '<input id="tensor-filter" type="search" placeholder="filter by name, shape, rule, '
            'reason…" aria-label="filter tensors">'
            f'<select id="tensor-rule" aria-label="rule"><option value="">all rules</option>'
            f"{options}</select>"
            '<span id="tensor-count"></span></div>'
        )
    if not table.rows:
        parts.append("<p>none</p></section>")
        return "".join(parts)
    header = "".join(f"<th{' class=number' if c.kind == NUMBER else ''}>{escape(c.header)}</th>" for c in table.columns)
    parts.append(f'<table id="table-{escape(table.id)}"><thead><tr>{header}</tr></thead><tbody>')
    for row, tone in zip(table.rows, table.tones, strict=True):
        attrs = f' class="tone-{escape(tone)}" data-tone="{escape(tone)}"' if tone else ""
        cells = "".join(_cell(text, c.kind) for text, c in zip(row, table.columns, strict=True))
        parts.append(f"<tr{attrs}>{cells}</tr>")
    parts.append("</tbody></table></section>")
    return "\n".join(parts)


def render_html(plan: SelectionPlan, report: Report) -> str:
    """One self-contained HTML page for ``plan``; ``report`` is ``build_report(plan)``."""
    summary = "".join(f"<dt>{escape(label)}</dt><dd>{escape(value)}</dd>" for label, value in report.summary)
    notes = ""
    if report.notes:
        items = "".join(f"<li>{escape(note)}</li>" for note in report.notes)
        notes = f'<section id="notes"><h2>Notes</h2><ul>{items}</ul></section>'
    title = f"wscompile: {plan.student_spec} <- {plan.teacher_spec}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            "<body>",
            f"<h1>{escape(report.title)}</h1>",
            f'<section id="summary"><dl class="summary">{summary}</dl></section>',
            '<section id="graph"><h2>Block map</h2>',
            render_legend(),
            f'<div class="graph">{render_block_graph(plan)}</div></section>',
            *(_table(table) for table in report.tables),
            notes,
            f"<script>{SCRIPT}</script>",
            "</body>",
            "</html>",
            "",
        ]
    )
