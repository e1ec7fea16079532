"""Reports of a selection plan: what was mapped, what was selected, what was left behind.

Every report reads one ``SelectionPlan`` and computes nothing of its own beyond sums for display:

- ``json``: the manifest (``plan_to_dict``), versioned by ``SCHEMA_VERSION`` and documented by
  ``schema.json``; ``validate_manifest`` checks a document against it.
- ``text``: aligned tables for a terminal, at most 100 columns, ANSI colour on request.
- ``md``: the same content as GitHub markdown, for pull requests and notebooks.
- ``html``: one offline file with the teacher and student block graphs side by side (inline SVG)
  and a filterable tensor table.

``render_summary`` is the few lines ``wscompile init`` prints.
"""

from __future__ import annotations

import os

from wscompile.errors import OutputError
from wscompile.plan import SelectionPlan
from wscompile.reports.htmlpage import render_html
from wscompile.reports.manifest import (
    SCHEMA_VERSION,
    load_schema,
    plan_to_dict,
    render_json,
    validate_manifest,
)
from wscompile.reports.markdown import render_markdown
from wscompile.reports.records import build_report
from wscompile.reports.text import render_summary, render_text

__all__ = [
    "FORMATS",
    "SCHEMA_VERSION",
    "format_from_path",
    "load_schema",
    "plan_to_dict",
    "render",
    "render_summary",
    "validate_manifest",
    "write_report",
]

FORMATS = ("text", "md", "json", "html")
EXTENSIONS = {".txt": "text", ".md": "md", ".json": "json", ".html": "html", ".htm": "html"}


def render(plan: SelectionPlan, fmt: str, *, color: bool = False) -> str:
    """Render ``plan`` as a report.

    Args:
        plan: The selection plan to report.
        fmt: One of ``FORMATS``: "text", "md", "json" or "html".
        color: ANSI colour in the text report (pass ``sys.stdout.isatty()``); other formats
            ignore it.

    Returns:
        The whole report, ending in a newline.

    Raises:
        OutputError: ``fmt`` is not a known format.
    """
    if fmt == "json":
        return render_json(plan)
    if fmt not in FORMATS:
        raise OutputError(f"unknown report format '{fmt}'; use one of {', '.join(FORMATS)}")
    report = build_report(plan)
    if fmt == "text":
        return render_text(report, color=color)
    if fmt == "md":
        return render_markdown(report)
    return render_html(plan, report)


def format_from_path(path: str, *, format_flag: bool = True) -> str:
    """The report format a file name asks for, from its extension (case-insensitive).

    Args:
        path: Output file path, e.g. "plan.html".
        format_flag: whether the command takes ``--format`` (``diff``), so the error may suggest it.

    Returns:
        "text" for .txt, "md" for .md, "json" for .json, "html" for .html or .htm.

    Raises:
        OutputError: The extension is missing or unknown.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in EXTENSIONS:
        known = ", ".join(EXTENSIONS)
        got = f"extension '{extension}'" if extension else "no extension"
        raise OutputError(
            f"cannot tell the report format of '{path}': {got}, expected one of {known}; rename the file"
            + (
                f" or pass --format {'|'.join(FORMATS)}"
                if format_flag
                else f" (e.g. '{os.path.splitext(path)[0]}.html')"
            )
        )
    return EXTENSIONS[extension]


def write_report(plan: SelectionPlan, path: str, *, fmt: str | None = None, force: bool = False) -> None:
    """Render ``plan`` and write it to ``path`` atomically (``wscompile.outputs.atomic_output``).

    Args:
        plan: The selection plan to report.
        path: Output file; its extension picks the format unless ``fmt`` is given.
        fmt: One of ``FORMATS``, overriding the extension.
        force: Overwrite an existing file.

    Raises:
        OutputError: The file exists and ``force`` is false, the format is unknown, or the file
            cannot be written.
    """
    # NOTE: imported here because wscompile.outputs imports torch, which reading and validating
    # manifests does not need.
    from wscompile.outputs import atomic_output

    content = render(plan, fmt or format_from_path(path))
    try:
        with atomic_output(path, force=force) as temp:
            temp.write_text(content, encoding="utf-8", newline="\n")
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write report '{path}': {e.strerror or e}") from e
