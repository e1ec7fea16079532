"""The JSON manifest: a versioned, deterministic record of a ``SelectionPlan``.

Field by field the manifest mirrors the plan (``wscompile/plan.py``); ``schema.json`` next to this
file documents every field and is what ``validate_manifest`` checks against. The mapping is spelled
out here rather than taken from ``dataclasses.asdict`` so that a new plan field only reaches the
manifest together with a schema update and a ``SCHEMA_VERSION`` bump. No timestamps or paths of
the machine: the same plan always gives the same bytes.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from wscompile.errors import MissingDependencyError, SpecError, ValidationError
from wscompile.plan import AxisRule, SelectionPlan, StagePair, TensorRecord

# Major: a field removed, renamed or changing meaning. Minor: a field added.
SCHEMA_VERSION = "1.8"
MAX_LISTED_PROBLEMS = 20  # a wholly wrong document would otherwise give thousands


def _axis(axis: AxisRule) -> dict[str, Any]:
    return {
        "teacher_size": axis.teacher_size,
        "student_size": axis.student_size,
        "rule": axis.rule,
        "group": axis.group,
        "blocks": axis.blocks,
        "step": axis.step,
        "indices": None if axis.indices is None else list(axis.indices),
        "offset": axis.offset,
        **({"divide": True} if axis.divide else {}),  # only on an input axis grown by widen
    }


def _tensor(record: TensorRecord) -> dict[str, Any]:
    return {
        "student": record.student,
        "teacher": record.teacher,
        "student_shape": list(record.student_shape),
        "teacher_shape": None if record.teacher_shape is None else list(record.teacher_shape),
        "rule": record.rule,
        "reason": record.reason,
        "component": record.component,
        "is_head": record.is_head,
        "reshape": record.reshape,
        "axes": None if record.axes is None else [_axis(a) for a in record.axes],
        "scale": record.scale,
        # only an assembled tensor has parts (absent otherwise)
        **({"parts": [_tensor(p) for p in record.parts], "parts_axis": record.parts_axis} if record.parts else {}),
        # only a tensor of a student block beyond its teacher stage's depth (absent otherwise)
        **({"repeats": record.repeats} if record.repeats is not None else {}),
    }


def _stage(stage: StagePair) -> dict[str, Any]:
    return {
        "student": stage.student,
        "teacher": stage.teacher,
        "student_depth": stage.student_depth,
        "teacher_depth": stage.teacher_depth,
        "policy": stage.policy,
        "blocks": [
            {
                "student": pair.student,
                "teacher": pair.teacher,
                "components_matched": pair.components_matched,
                "components_total": pair.components_total,
                "cost": pair.cost,
                "chosen_by": pair.chosen_by,
            }
            for pair in stage.blocks
        ],
        "teacher_blocks": list(stage.teacher_blocks),
        "cost": stage.cost,
    }


def plan_to_dict(plan: SelectionPlan) -> dict[str, Any]:
    """The manifest of ``plan``: plain JSON values, in the layout ``schema.json`` documents.

    Args:
        plan: The selection plan to record.

    Returns:
        A dict ready for ``json.dumps``; equal plans give equal dicts, with keys in a fixed order.
    """
    coverage = plan.coverage
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": {"spec": plan.teacher_spec, "params": plan.teacher_params},
        "student": {"spec": plan.student_spec, "params": plan.student_params},
        "method": plan.method,
        "layer_policy": plan.layer_policy,
        "heads": plan.heads,
        "rescale": plan.rescale,
        "seed": plan.seed,
        "calibration": plan.calibration,
        "teacher_weights": plan.teacher_weights,
        "teacher_pretrained": plan.teacher_pretrained,
        "nonfinite_teacher": None
        if plan.nonfinite_teacher is None
        else [{"teacher": n.teacher, "student": n.student, "count": n.count} for n in plan.nonfinite_teacher],
        "export": None
        if plan.export is None
        else {
            "onnx": plan.export.onnx,
            "exporter": plan.export.exporter,
            "dynamic_axes": {k: list(v) for k, v in plan.export.dynamic_axes.items()},
            "static_shapes": {k: list(v) for k, v in plan.export.static_shapes.items()},
            "max_abs_diff": plan.export.max_abs_diff,
            "fallback_reason": plan.export.fallback_reason,
            "files": list(plan.export.files),
        },
        "written_as": None
        if plan.written_as is None
        else {"dtype": plan.written_as.dtype, "max_shard_size": plan.written_as.max_shard_size},
        "frontend": dict(plan.frontend),
        "coverage": None
        if coverage is None
        else {
            "selected_params": coverage.selected_params,
            "total_params": coverage.total_params,
            "fraction": coverage.fraction,
            "selected_params_no_head": coverage.selected_params_no_head,
            "total_params_no_head": coverage.total_params_no_head,
            "fraction_no_head": coverage.fraction_no_head,
            # only when some group grows (absent otherwise)
            **(
                {"grown_params": coverage.grown_params, "grown_params_no_head": coverage.grown_params_no_head}
                if any(g.growth for g in plan.groups) or any(r.repeats for r in plan.tensors)
                else {}
            ),
        },
        "stages": [_stage(s) for s in plan.stages],
        "groups": [
            {
                "id": g.id,
                "teacher_size": g.teacher_size,
                "student_size": g.student_size,
                "members": list(g.members),
                "rule": g.rule,
                "indices": list(g.indices),
                # only a group the student is larger in (absent otherwise)
                **({"growth": g.growth, "replicas": g.replicas, "growth_note": g.growth_note} if g.growth else {}),
            }
            for g in plan.groups
        ],
        "tensors": [_tensor(r) for r in plan.tensors],
        "unused_teacher": [
            {"teacher": u.teacher, "teacher_shape": list(u.teacher_shape), "reason": u.reason}
            for u in plan.unused_teacher
        ],
        "notes": list(plan.notes),
    }


def render_json(plan: SelectionPlan) -> str:
    """The manifest as indented JSON text with a trailing newline."""
    return json.dumps(plan_to_dict(plan), indent=2, ensure_ascii=False) + "\n"


@cache
def load_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (draft 2020-12), shipped as package data."""
    text = resources.files("wscompile.reports").joinpath("schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _document_order(error: Any) -> list[tuple[int, int, str]]:
    # Array indices compare as numbers so that tensors/10 comes after tensors/2.
    return [(0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in error.absolute_path]


def validate_manifest(obj: dict[str, Any]) -> None:
    """Check a manifest against ``schema.json``, reporting every problem at once.

    Args:
        obj: A decoded manifest, e.g. ``plan_to_dict(plan)`` or ``json.load(file)``.

    Raises:
        ValidationError: The manifest breaks the schema; the message lists each problem with
            its location (``tensors/3/axes/0/step``).
        MissingDependencyError: ``jsonschema`` is not installed.
    """
    try:
        import jsonschema
    except ImportError as e:
        raise MissingDependencyError(
            "validating a manifest needs jsonschema; install it with `pip install jsonschema`"
        ) from e
    validator = jsonschema.Draft202012Validator(load_schema())
    problems = sorted(validator.iter_errors(obj), key=_document_order)
    if not problems:
        return
    listed = [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(top level)'}: {error.message}"
        for error in problems[:MAX_LISTED_PROBLEMS]
    ]
    if len(problems) > MAX_LISTED_PROBLEMS:
        listed.append(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    raise ValidationError(
        f"manifest does not match wscompile schema {SCHEMA_VERSION} "
        f"({len(problems)} problem{'s' if len(problems) != 1 else ''}): " + "; ".join(listed)
    )


def read_manifest(text: str, where: str = "manifest") -> SelectionPlan:
    """The plan a manifest's JSON text records, checked against ``schema.json`` first.

    Args:
        text: the manifest file's contents.
        where: how messages name the document (its path).

    Raises:
        SpecError: not JSON, a ``schema_version`` of another major version, or a schema violation;
            one line saying which.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{where} is not JSON ({e}); pass the --manifest file `wscompile init` wrote") from e
    if not isinstance(obj, dict):
        raise SpecError(f"{where} is a JSON {type(obj).__name__}, not a wscompile manifest (an object)")
    version = obj.get("schema_version")
    major = SCHEMA_VERSION.split(".")[0]
    if not isinstance(version, str) or version.split(".")[0] != major:
        raise SpecError(
            f"{where} has schema_version {version!r}; this wscompile reads manifests of major version "
            f"{major} ({SCHEMA_VERSION}); rewrite it with this version's `wscompile init`"
        )
    try:
        validate_manifest(obj)
    except ValidationError as e:
        raise SpecError(f"{where}: {e}") from e
    return SelectionPlan.from_dict(obj)
