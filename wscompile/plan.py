"""The data that flows between stages: alignment, selection plan, coverage.

A plan is data before it is action: the writer, the manifest and every report read the same
``SelectionPlan``; nothing is computed twice. All fields are plain Python values so that
``dataclasses.asdict`` gives the JSON manifest directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# Values of TensorRecord.rule.
RULE_SELECT = "select"  # subset of teacher elements, per-axis indices in `axes`
RULE_COPY = "copy"  # same shape, copied whole
RULE_STUDENT_INIT = "student-init"  # kept at the student's own initialization

# Values of AxisRule.rule.
AXIS_UNIFORM = "uniform"
AXIS_FULL = "full"  # teacher and student sizes equal: every index
AXIS_EXPLICIT = "explicit"  # indices chosen by a method (magnitude, activation, ...)
# Growth (--allow-partial, a student unit count larger than its teacher's): every teacher unit is read
# and the student's extra units are filled by one of these rules (``passes/grow.py``).
GROW_WIDEN = "widen"  # extra units replicate teacher units; readers divide by the replication count
GROW_INIT = "init"  # extra units keep the student's own init
GROWTH_RULES = (GROW_WIDEN, GROW_INIT)


@dataclass
class AxisRule:
    """How one axis of a student tensor picks teacher indices."""

    teacher_size: int  # size of this axis in the teacher tensor
    student_size: int  # size of this axis in the student tensor
    rule: str  # AXIS_UNIFORM | AXIS_FULL | a method's name ("magnitude", ...) | "<method>-heads" | ...
    group: str | None  # coupled-dimension group id this axis belongs to, None if local
    blocks: int = 1  # logical blocks along the axis (fused q/k/v: 3); indices apply per block
    step: int | None = None  # uniform rule with t % s == 0: indices are arange(s) * step
    indices: list[int] | None = None  # indices within one block when not a plain step
    offset: int = 0  # start of the teacher range read: block 1 of a fused q/k/v for a separate k
    # widen: this axis reads the grown units as input, each read unit divided by its replication count
    divide: bool = False


@dataclass
class TensorRecord:
    """One student state_dict entry and where its values come from."""

    student: str  # student state_dict key
    student_shape: list[int]
    teacher: str | None  # teacher state_dict key, None when kept at student init
    teacher_shape: list[int] | None
    rule: str  # RULE_SELECT | RULE_COPY | RULE_STUDENT_INIT
    component: str | None = None  # student IR component (op) that owns the tensor
    axes: list[AxisRule] | None = None  # per student axis (after any reshape), for RULE_SELECT
    reshape: str | None = None  # e.g. "linear->conv1x1": teacher viewed as the student's layout
    is_head: bool = False  # part of the classifier head
    reason: str | None = None  # why kept at student init, or a note (dtype converted, ...)
    scale: float | None = None  # --rescale: selected values multiplied by sqrt(t_in / s_in); None: not scaled
    # Assembled from several teacher tensors (separate q, k, v into a fused qkv): each part is planned
    # like a tensor of its own and fills one slice; the slices are concatenated along ``parts_axis``.
    parts: list[TensorRecord] = field(default_factory=list)
    parts_axis: int | None = None
    # A block beyond its teacher stage's depth (--allow-partial): the teacher block it repeats; its
    # elements count as grown. None otherwise.
    repeats: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.student_shape:
            n *= d
        return n


@dataclass
class BlockPair:
    """A student block and the teacher block it takes its weights from."""

    student: str  # student module path of the block
    teacher: str | None  # teacher module path, None if the student block has no counterpart
    components_matched: int  # student components mapped inside the block
    components_total: int  # student components in the block
    # 1 - score / best score of the pair (matching.align.BlockScores): 0 when every component matches
    # structurally and the teacher is at least as large on every axis; 1 with no teacher block
    cost: float = 1.0
    chosen_by: str = "policy"  # "policy": the layer policy's pick; "structure": a better-matching block replaced it


@dataclass
class StagePair:
    """A run of repeated blocks in the student and its teacher counterpart (layer selection)."""

    student: str  # id of the student stage, e.g. "stage 2 (stages.2.blocks)"
    teacher: str | None
    student_depth: int
    teacher_depth: int
    policy: (
        str  # layer policy: "first" (the paper's first-N), "uniform", "last", "drop-middle", "importance", "explicit"
    )
    blocks: list[BlockPair] = field(default_factory=list)  # one per student block, in order
    teacher_blocks: list[str] = field(default_factory=list)  # every teacher block path, in order
    cost: float = 1.0  # 1 - summed block scores / their best, over every student block (0: a perfect fit)


@dataclass
class GroupRecord:
    """A coupled dimension: every member axis uses the same teacher indices."""

    id: str
    teacher_size: int
    student_size: int
    members: list[str]  # "tensor_name:axis" of student tensors (after per-block split)
    rule: str  # how the indices were chosen ("widen" or "init" for a group the student is larger in)
    indices: list[int]  # teacher indices, length student_size (growth "init": teacher_size, the first units)
    growth: str | None = None  # the student is larger: GROW_WIDEN or GROW_INIT fills its extra units; None: not larger
    replicas: list[int] | None = None  # widen: how many student units each teacher unit fills
    growth_note: str | None = None  # why the extra units keep the student's init where widen was asked for


@dataclass
class Coverage:
    """How much of the student comes from the teacher."""

    selected_params: int  # student elements filled from the teacher
    total_params: int  # all student elements (parameters and buffers in the state_dict)
    fraction: float
    selected_params_no_head: int
    total_params_no_head: int
    fraction_no_head: float
    grown_params: int = 0  # student elements filled by replicating teacher units (widen), not in selected_params
    grown_params_no_head: int = 0


@dataclass
class NonFinite:
    """A teacher tensor whose elements read for a student tensor hold NaN or infinity."""

    teacher: str
    student: str  # the student tensor the elements were read for
    count: int  # non-finite elements among those read


@dataclass
class UnusedTeacher:
    """A teacher tensor that feeds no student tensor."""

    teacher: str
    teacher_shape: list[int]
    reason: str


@dataclass
class WrittenAs:
    """How the student's weights were written (``init``): what ``apply`` writes again unless told otherwise."""

    dtype: str | None = None  # floating tensors as fp32/fp16/bf16; None: as the student's
    max_shard_size: int | None = None  # largest shard of a directory output, bytes; None: a single file


@dataclass
class ExportSummary:
    """What ``init --onnx`` wrote and how it was checked (the full result is ``backend.ExportResult``)."""

    onnx: str  # file name of the fp32 model (no directory: manifests hold no paths)
    exporter: str  # "dynamo" or "torchscript"
    dynamic_axes: dict[str, list[str]]  # input -> names of its dynamic axes ("batch", "sequence"); [] all static
    static_shapes: dict[str, list[int]]  # input -> the shape a static input is fixed at
    max_abs_diff: float  # largest |onnx - torch| over the parity run's outputs
    fallback_reason: str | None  # why earlier export attempts failed; None when the first one worked
    files: list[str]  # every file written (fp16/int8 copies, .ort), by name


@dataclass
class SelectionPlan:
    """Everything ``init`` decided; the single source for the writer, manifest and reports."""

    teacher_spec: str
    student_spec: str
    method: str  # element-selection method, "uniform" for the paper's rule
    layer_policy: str  # "first" for the paper's first-N; an explicit map as given ("0:0,2,4;1:0,1")
    frontend: dict[str, str]  # which frontend traced each model: {"teacher": "fx", ...}
    tensors: list[TensorRecord]
    stages: list[StagePair]
    groups: list[GroupRecord]
    unused_teacher: list[UnusedTeacher]
    teacher_params: int  # elements in the teacher state_dict
    student_params: int
    coverage: Coverage | None = None
    notes: list[str] = field(default_factory=list)  # global remarks (dtype conversions, ...)
    heads: str = "split"  # attention heads: "split" (heads and head dims shrink) or "whole" (whole teacher heads)
    rescale: bool = False  # weights whose input shrank were scaled (TensorRecord.scale)
    seed: int = 0  # seed of the random method
    calibration: str | None = None  # what activation statistics were computed on, None if none were
    teacher_weights: str | None = None  # where the teacher's values came from (path, hub id, ...); None: not recorded
    teacher_pretrained: bool | None = None  # the teacher had loaded weights; None: unknown (py: factory, Python API)
    # Teacher reads that held NaN/inf, found while writing the student; None: no values read (diff).
    nonfinite_teacher: list[NonFinite] | None = None
    # The ONNX export of the initialized student (init --onnx), as verified; None: not exported.
    export: ExportSummary | None = None
    # How the weights were written; None: none were (diff, the Python API without an output).
    written_as: WrittenAs | None = None

    @classmethod
    def from_dict(cls, manifest: dict[str, Any]) -> SelectionPlan:
        """The plan a manifest (``reports.manifest.plan_to_dict``) records, without tracing anything.

        ``manifest`` is taken as valid: ``reports.manifest.read_manifest`` checks it against the schema
        first. Keys of the manifest that a record has no field for are ignored, and a field the manifest
        lacks keeps its default, so a manifest of a newer minor version still reads.
        """
        model = {role: manifest[role] for role in ("teacher", "student")}
        export = manifest.get("export")
        return cls(
            **_known(
                cls,
                manifest,
                skip={
                    "tensors",
                    "stages",
                    "groups",
                    "unused_teacher",
                    "coverage",
                    "nonfinite_teacher",
                    "export",
                    "written_as",
                },
            ),
            teacher_spec=model["teacher"]["spec"],
            student_spec=model["student"]["spec"],
            teacher_params=model["teacher"]["params"],
            student_params=model["student"]["params"],
            tensors=[_tensor_from_dict(t) for t in manifest["tensors"]],
            stages=[
                StagePair(
                    **_known(StagePair, s, skip={"blocks"}),
                    blocks=[BlockPair(**_known(BlockPair, b)) for b in s.get("blocks", [])],
                )
                for s in manifest["stages"]
            ],
            groups=[GroupRecord(**_known(GroupRecord, g)) for g in manifest["groups"]],
            unused_teacher=[UnusedTeacher(**_known(UnusedTeacher, u)) for u in manifest["unused_teacher"]],
            coverage=None if manifest.get("coverage") is None else Coverage(**_known(Coverage, manifest["coverage"])),
            nonfinite_teacher=None
            if manifest.get("nonfinite_teacher") is None
            else [NonFinite(**_known(NonFinite, n)) for n in manifest["nonfinite_teacher"]],
            export=None if export is None else ExportSummary(**_known(ExportSummary, export)),
            written_as=None
            if manifest.get("written_as") is None
            else WrittenAs(**_known(WrittenAs, manifest["written_as"])),
        )


def _known(record: type, values: dict[str, Any], skip: set[str] = frozenset()) -> dict[str, Any]:
    """The entries of ``values`` that ``record`` (a dataclass) has a field for, minus ``skip``."""
    names = {f.name for f in fields(record)} - skip
    return {key: value for key, value in values.items() if key in names}


def _tensor_from_dict(values: dict[str, Any]) -> TensorRecord:
    """A manifest's tensor entry as a TensorRecord, its axes and parts included."""
    axes = values.get("axes")
    return TensorRecord(
        **_known(TensorRecord, values, skip={"axes", "parts"}),
        axes=None if axes is None else [AxisRule(**_known(AxisRule, a)) for a in axes],
        parts=[_tensor_from_dict(p) for p in values.get("parts", [])],
    )
