"""What each CLI subcommand does: load specs, run the pipeline, write outputs.

Every output path is checked before any model is built, so bad paths fail in milliseconds and
nothing is half-written; every file is written atomically (``outputs.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from wscompile import pipeline, reports
from wscompile.errors import SpecError
from wscompile.outputs import check_outputs, save_safetensors
from wscompile.plan import SelectionPlan
from wscompile.specs import LoadedModel, load_model, parse_spec
from wscompile.weights import hf_weights_path, open_weights

Log = Callable[[str], None]


@dataclass
class InitOptions:
    """Arguments of ``wscompile init`` (and, with ``out=None``, of ``diff``)."""

    teacher: str  # teacher model spec
    student: str  # student model spec
    out: str | None = None  # student .safetensors
    teacher_weights: str | None = None  # teacher weights file or HF directory
    manifest: str | None = None  # JSON manifest path
    report: str | None = None  # report path, format from the extension
    onnx: str | None = None  # ONNX export of the initialized student
    method: str = "uniform"
    select_head: bool = False
    allow_partial: bool = False
    force: bool = False
    seed: int = 0
    input_shape: tuple[int, ...] | None = None
    trust_remote_code: bool = False
    unsafe_pickle: bool = False
    opset: int | None = None
    fp16: bool = False
    int8: bool = False


def load_pair(options: InitOptions, *, need_values: bool) -> tuple[LoadedModel, LoadedModel]:
    """Teacher (on the meta device when its values come from a file) and student."""
    teacher_spec = parse_spec(options.teacher)
    has_file = options.teacher_weights is not None or (
        teacher_spec.scheme == "hf" and hf_weights_path(teacher_spec.name) is not None
    )
    teacher = load_model(
        options.teacher, role="teacher", weights=options.teacher_weights,
        device="meta" if has_file or not need_values else "cpu", seed=options.seed,
        input_shape=options.input_shape, trust_remote_code=options.trust_remote_code,
        unsafe_pickle=options.unsafe_pickle,
    )
    student = load_model(
        options.student, role="student", seed=options.seed, input_shape=options.input_shape,
        trust_remote_code=options.trust_remote_code,
    )
    return teacher, student


def run_init(options: InitOptions, log: Log = print) -> SelectionPlan:
    paths = [options.out, options.manifest, options.report, options.onnx]
    check_outputs(paths, force=options.force)
    if options.report:
        reports.format_from_path(options.report)
    teacher, student = load_pair(options, need_values=True)
    compiled = pipeline.compile(
        teacher.module, student.module, teacher_inputs=teacher.inputs, student_inputs=student.inputs,
        teacher_source=teacher.source, teacher_spec=options.teacher, student_spec=options.student,
        method=options.method, select_head=options.select_head, allow_partial=options.allow_partial,
    )
    plan, state = compiled.plan, compiled.state_dict
    assert state is not None
    if options.out:
        metadata = {"format": "pt", "wscompile.teacher": options.teacher, "wscompile.student": options.student,
                    "wscompile.method": options.method}
        save_safetensors(options.out, state, metadata, force=options.force)
    if options.manifest:
        reports.write_report(plan, options.manifest, fmt="json", force=options.force)
    if options.report:
        reports.write_report(plan, options.report, force=options.force)
    log(summary(plan))
    for path in (options.out, options.manifest, options.report):
        if path:
            log(f"wrote {path}")
    if options.onnx:
        student.module.load_state_dict(state)
        _export(student, options.onnx, options, log)
    return plan


def run_diff(options: InitOptions, fmt: str | None, output: str | None, log: Log = print) -> SelectionPlan:
    if output:
        check_outputs([output], force=options.force)
        fmt = fmt or reports.format_from_path(output)
    teacher, student = load_pair(options, need_values=False)
    compiled = pipeline.compile(
        teacher.module, student.module, teacher_inputs=teacher.inputs, student_inputs=student.inputs,
        teacher_source=teacher.source, teacher_spec=options.teacher, student_spec=options.student,
        method=options.method, select_head=options.select_head, allow_partial=True, write=False,
    )
    if output:
        reports.write_report(compiled.plan, output, fmt=fmt, force=options.force)
        log(f"wrote {output}")
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        log(reports.render(compiled.plan, fmt or "text", color=color).rstrip("\n"))
    return compiled.plan


def run_export(student_spec: str, weights: str, onnx_path: str, options: InitOptions, log: Log = print):
    check_outputs([onnx_path], force=options.force)
    student = load_model(student_spec, role="student", seed=options.seed, input_shape=options.input_shape,
                         trust_remote_code=options.trust_remote_code)
    source = open_weights(weights, unsafe_pickle=options.unsafe_pickle)
    expected = set(student.module.state_dict())
    missing = sorted(expected - set(source.keys()))
    if missing:
        raise SpecError(f"'{weights}' lacks {len(missing)} tensor(s) of {student_spec}, e.g. {', '.join(missing[:3])}; "
                        "was it written by `wscompile init` for this student spec?")
    state = {key: source.read(key) for key in expected}
    student.module.load_state_dict(state)
    return _export(student, onnx_path, options, log)


def _export(student: LoadedModel, onnx_path: str, options: InitOptions, log: Log):
    from wscompile.backend.export import export_student

    with torch.no_grad():
        return export_student(
            student.module, student.inputs, student.make_inputs, onnx_path, kind=student.kind,
            opset=options.opset, fp16=options.fp16, int8=options.int8, force=options.force, log=log,
        )


def summary(plan: SelectionPlan) -> str:
    """A few lines for the terminal: coverage and layers kept per stage."""
    c = plan.coverage
    assert c is not None
    lines = [
        f"student {plan.student_spec}: {c.selected_params:,} of {c.total_params:,} elements from the teacher "
        f"({c.fraction:.1%}; {c.fraction_no_head:.1%} without the head), method {plan.method}",
    ]
    for stage in plan.stages:
        teacher = stage.teacher or "no teacher stage"
        lines.append(f"  {stage.student} <- {teacher}: first {min(stage.student_depth, stage.teacher_depth)} "
                     f"of {stage.teacher_depth} blocks")
    kept = [r for r in plan.tensors if r.teacher is None]
    if kept:
        lines.append(f"  {len(kept)} tensor(s) kept at the student's init, e.g. {kept[0].student}: {kept[0].reason}")
    return "\n".join(lines)
