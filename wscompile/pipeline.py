"""The compiler, top to bottom: trace, calibrate, align, plan, write, export, record.

``compile`` is the whole program; each line is one stage, and each stage's result is data the
next one reads. ``wscompile init`` and the Python API run the same stages: the CLI maps its
options to ``Outputs`` and prints, ``initialize`` runs it on in-memory modules.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

from wscompile import frontend, reports, specs
from wscompile.errors import InputsError, MatchError, SelectionError
from wscompile.matching import Alignment, align
from wscompile.matching.layers import LayerPolicy, parse_layer_policy
from wscompile.passes.apply import apply_plan
from wscompile.passes.calibration import MAX_SAMPLES, Calibrator, describe
from wscompile.passes.methods import method_spec
from wscompile.passes.select import SelectionConfig, build_plan
from wscompile.plan import SelectionPlan
from wscompile.progress import Progress
from wscompile.weights import ModuleSource, TensorSource, open_weights
from wscompile.writer import WriteConfig, Written, write_student

Inputs = dict[str, torch.Tensor]
Log = Callable[[str], None]

# Least share of the student's elements outside the head that `wscompile init` requires from the
# teacher (see check_coverage); below it the pair is refused unless --allow-partial.
MIN_MATCHED_SHARE = 0.5


@dataclass(frozen=True)
class ExportConfig:
    """The ONNX export of the initialized student, verified with onnxruntime (``backend.export_student``)."""

    path: str  # the .onnx file
    kind: str  # the student's input kind (specs.KIND_IMAGE, KIND_TEXT, ...): which axes may vary
    make_inputs: Callable[[int, int | None], Inputs]  # (batch, seq_len) -> inputs, for the parity checks
    opset: int | None = None
    fp16: bool = False  # also an fp16 copy
    int8: bool = False  # also an int8 copy
    calibration: Callable[[], list[Inputs]] | None = None  # static int8: onnxruntime calibration batches
    ort: bool = False  # also .ort copies
    optimize: str | None = None  # onnxruntime graph optimizations before saving
    device: str | None = None  # onnxruntime device
    atol: float = 1e-4  # absolute tolerance of the fp32 parity checks
    batch_size: int | None = None  # batch of a static-shape export
    force: bool = False  # replace existing files


@dataclass(frozen=True)
class Outputs:
    """What ``compile`` writes after planning; by default nothing (the student's state_dict stays in memory)."""

    weights: WriteConfig | None = None  # the student's tensors, streamed to a file or folder
    manifest: str | None = None  # the JSON manifest
    report: str | None = None  # a report, its format from the extension
    export: ExportConfig | None = None  # the ONNX export
    force: bool = False  # replace an existing manifest or report


@dataclass(frozen=True)
class TeacherOrigin:
    """Where the teacher's values came from, for the manifest's ``teacher_weights``."""

    pretrained: bool | None  # values loaded; None: unknown (a py: factory may load them)
    weights: str | None  # a path, a hub id, "timm pretrained"; None: its own init


@dataclass
class Traced:
    """Both models in the IR."""

    teacher: nx.DiGraph  # IR of the teacher
    student: nx.DiGraph  # IR of the student


@dataclass
class Compiled:
    """Everything one compilation produced."""

    plan: SelectionPlan  # what was selected from where; feeds the writer, manifest and reports
    state_dict: dict[str, torch.Tensor] | None  # the student's full state_dict (None: streamed or dry run)
    teacher_graph: nx.DiGraph  # IR of the teacher
    student_graph: nx.DiGraph  # IR of the student
    alignment: Alignment  # component and layer correspondence
    written: Written | None = None  # the student's weights file or folder, when Outputs.weights
    recorded: list[str] = field(default_factory=list)  # manifest and report paths written


def compile(
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_inputs: Inputs,
    student_inputs: Inputs,
    teacher_source: TensorSource | None = None,
    teacher_spec: str = "<module>",
    student_spec: str = "<module>",
    method: str = "uniform",
    layer_policy: str = "first",
    heads: str = "split",
    rescale: bool = False,
    seed: int = 0,
    calibration: Inputs | None = None,
    calibration_label: str | None = None,
    select_head: bool = False,
    allow_partial: bool = False,
    growth: str = "widen",
    write: bool = True,
    outputs: Outputs | None = None,
    teacher_origin: TeacherOrigin | None = None,
    min_matched_share: float = 0.0,
    log: Log | None = None,
    warn: Log | None = None,
    student_values: Callable[[SelectionPlan], nn.Module] | None = None,
    progress: Progress | None = None,
) -> Compiled:
    """Run every stage; ``write=False`` keeps the state_dict out of memory (a dry run, or ``outputs.weights``).

    ``calibration`` (forward keyword arguments, a batch of real inputs) is needed by the activation
    method and the importance layer policy; the teacher then runs once on it, so it must hold its
    weights (not the meta device). ``calibration_label`` says what the inputs are, for the plan.
    ``outputs`` says what to write; ``log`` hears the summary and every path written, ``warn``
    the warnings (NaN/inf teacher values). A plan less than ``min_matched_share`` of whose student
    (outside the head) comes from the teacher is refused unless ``allow_partial`` (``wscompile init``
    asks for ``MIN_MATCHED_SHARE``; Python callers get any partial plan by default).
    ``student_values`` gives the student with values for a student planned on the meta device (the CLI
    builds it on the CPU, with its library's seeded init, only when the plan keeps some of that init).
    ``progress`` says on stderr which stage runs and how long each took (by default nothing is shown).
    """
    source = teacher_source or ModuleSource(teacher)
    policy = parse_layer_policy(layer_policy)
    config = SelectionConfig(
        teacher_spec=teacher_spec,
        student_spec=student_spec,
        method=method,
        layer_policy=policy.text,
        heads=heads,
        rescale=rescale,
        seed=seed,
        select_head=select_head,
        allow_partial=allow_partial,
        growth=growth,
    )
    outputs = outputs or Outputs()
    progress = progress or Progress()
    log = progress.lines(log or _quiet)
    warn = progress.lines(warn) if warn else None
    # 1. trace: both models into the IR (torch.fx, falling back to torch.export)
    traced = trace(teacher, student, teacher_inputs, student_inputs, teacher_spec, student_spec, progress=progress)
    # 2. calibrate: the teacher run on real inputs in bounded batches, observed lazily by hooks (when needed)
    calibrator = calibrate(teacher, traced.teacher, config, policy, calibration, calibration_label)
    with progress.stage(planning_label(calibrator)):
        # 3. align: stages and blocks (layer selection by the policy), then components inside blocks
        alignment = align(
            traced.teacher,
            traced.student,
            layer_policy=policy,
            block_similarity=calibrator.block_similarity if calibrator else None,
            allow_partial=allow_partial,
        )
        # 4. plan: per coupled dimension, the teacher indices each student tensor keeps; enough must match
        student_state = student.state_dict()
        teacher_keys = {key: (source.shape(key), source.dtype(key)) for key in source.keys()}
        plan = build_plan(
            alignment,
            traced.teacher,
            traced.student,
            student_state,
            teacher_keys,
            config,
            teacher_source=source,
            calibration=calibrator,
        )
    record_origin(plan, teacher_origin)
    check_coverage(plan, alignment, traced.student, min_share=min_matched_share, allow_partial=allow_partial)
    # 5. write: exactly the planned teacher elements, streamed to the output or into a state_dict
    if student_values is not None:
        student = student_values(plan)
        student_state = student.state_dict()
    state = None
    if write:
        with progress.stage("reading the teacher's selected values"):
            state = apply_plan(plan, source, student_state)
    # (a file or folder is written under its own bar: WriteConfig.progress)
    written = write_student(outputs.weights, plan, source, student) if outputs.weights else None
    if written:
        plan.written_as = outputs.weights.written_as()
    warn_nonfinite(plan, warn)
    log(reports.render_summary(plan))
    if written:
        log(f"wrote {written.path}")
    compiled = Compiled(plan, state, traced.teacher, traced.student, alignment, written)
    try:
        # 6. export: the initialized student to ONNX, checked against PyTorch with onnxruntime
        if outputs.export:
            plan.export = export(
                student, student_inputs, outputs.export, _written_state(compiled, student), log, progress
            )
    finally:
        # 7. record: manifest and report last, so they say what the export wrote (or that nothing was)
        compiled.recorded = write_records(plan, outputs)
        for path in compiled.recorded:
            log(f"wrote {path}")
    return compiled


def trace(
    teacher: nn.Module,
    student: nn.Module,
    teacher_inputs: Inputs,
    student_inputs: Inputs,
    teacher_spec: str = "<module>",
    student_spec: str = "<module>",
    *,
    progress: Progress | None = None,
) -> Traced:
    """Stage 1: both models traced into the IR on their example inputs."""
    progress = progress or Progress()
    graphs = []
    for role, model, inputs, spec in (
        ("teacher", teacher, teacher_inputs, teacher_spec),
        ("student", student, student_inputs, student_spec),
    ):
        with progress.stage(f"tracing {role} {spec}"):
            graphs.append(frontend.trace(model, _on_device(inputs, model), label=f"{role} {spec}"))
    return Traced(*graphs)


def planning_label(calibrator: Calibrator | None) -> str:
    """What stages 3 and 4 say they do; the teacher's calibration run, lazy, happens inside them."""
    if calibrator is None:
        return "matching layers and planning the selection"
    return f"running the teacher on {calibrator.description}, matching layers and planning the selection"


def calibration_wanted(method: str, policy: LayerPolicy) -> str | None:
    """The option that ranks by the teacher's activations on real inputs ("--method activation",
    "--layers importance"), or None when the run needs no calibration inputs."""
    if method_spec(method).needs_calibration:
        return f"--method {method}"
    return f"--layers {policy.text}" if policy.needs_calibration else None


def require_calibration(method: str, policy: LayerPolicy, given: bool, remedy: str) -> None:
    """Raise SelectionError when calibration inputs are needed but not ``given``; ``remedy`` says how to pass them."""
    wants = calibration_wanted(method, policy)
    if wants is not None and not given:
        raise SelectionError(f"{wants} ranks by the teacher's activations on real inputs: {remedy}")


def calibrate(
    teacher: nn.Module,
    teacher_graph: nx.DiGraph,
    config: SelectionConfig,
    policy: LayerPolicy,
    calibration: Inputs | None,
    label: str | None,
) -> Calibrator | None:
    """Stage 2: the teacher observed on calibration inputs, when the method or layer policy ranks by them."""
    require_calibration(
        config.method,
        policy,
        calibration is not None,
        "pass calibration inputs (--calib FILE_OR_DIR, or calibration= in Python)",
    )
    if calibration_wanted(config.method, policy) is None:
        return None
    batch = _on_device(calibration, teacher)
    given = _batch(batch)
    label = label or describe(min(given, MAX_SAMPLES), given, "samples", "the calibration inputs")
    return Calibrator(teacher, teacher_graph, batch, channels=config.method_spec.needs_calibration, description=label)


def record_origin(plan: SelectionPlan, origin: TeacherOrigin | None) -> None:
    """Write where the teacher's values came from into the plan (manifest ``teacher_weights``)."""
    if origin is None:
        return
    plan.teacher_pretrained = origin.pretrained
    if origin.weights is not None:
        plan.teacher_weights = origin.weights
    else:
        plan.teacher_weights = "built by the factory" if origin.pretrained is None else "none (random init)"


def check_coverage(
    plan: SelectionPlan, alignment: Alignment, student_graph: nx.DiGraph, *, min_share: float, allow_partial: bool
) -> None:
    """Refuse a student too little of which has a teacher counterpart.

    Less than ``min_share`` of its elements outside the head come from the teacher (a ResNet's
    stem and one stage paired with a BERT): refused unless ``allow_partial``, which keeps such
    partial maps for the user who wants them. (Nothing matched at all is refused by ``align``.)

    Raises:
        MatchError: naming what matched best.
    """
    if not any(n not in alignment.head for n in student_graph.nodes):
        return
    share = plan.coverage.fraction_no_head if plan.coverage else 1.0
    if share >= min_share or allow_partial:
        return
    matched = [s for s in plan.stages if s.teacher]
    best = f"; best matched: student {matched[0].student} <- teacher {matched[0].teacher}" if matched else ""
    raise MatchError(
        f"only {share:.1%} of the student outside the head has a teacher counterpart (under "
        f"{min_share:.0%}){best}; are they the same family of model? pass --allow-partial to write it anyway"
    )


def export(
    student: nn.Module,
    student_inputs: Inputs,
    config: ExportConfig,
    state: dict[str, torch.Tensor],
    log: Log,
    progress: Progress | None = None,
):
    """Stage 6: ``student`` holding ``state`` exported to ONNX and verified; returns the manifest's ExportSummary."""
    from wscompile.backend.results import export_summary

    student.load_state_dict(state)
    return export_summary(export_onnx(student, student_inputs, config, log, progress))


def export_onnx(
    student: nn.Module, student_inputs: Inputs, config: ExportConfig, log: Log, progress: Progress | None = None
):
    """``backend.export_student`` with ``config``; returns its ExportResult."""
    from wscompile.backend.export import export_student

    with torch.no_grad():
        return export_student(
            student,
            student_inputs,
            config.make_inputs,
            config.path,
            kind=config.kind,
            opset=config.opset,
            fp16=config.fp16,
            int8=config.int8,
            calib=config.calibration() if config.calibration else None,
            force=config.force,
            log=log,
            ort=config.ort,
            optimize=config.optimize,
            device=config.device,
            atol=config.atol,
            batch_size=config.batch_size,
            progress=progress,
        )


def write_records(plan: SelectionPlan, outputs: Outputs) -> list[str]:
    """Stage 7: the manifest and the report, rendered from the plan; returns the paths written."""
    written = []
    if outputs.manifest:
        reports.write_report(plan, outputs.manifest, fmt="json", force=outputs.force)
        written.append(outputs.manifest)
    if outputs.report:
        reports.write_report(plan, outputs.report, force=outputs.force)
        written.append(outputs.report)
    return written


def _written_state(compiled: Compiled, student: nn.Module) -> dict[str, torch.Tensor]:
    """The student's state_dict as written: read back from the output, as ``from_pretrained`` reads a folder."""
    if compiled.written is None:
        assert compiled.state_dict is not None, "export needs the state_dict in memory or written"
        return compiled.state_dict
    from wscompile.checkpoints import hf_checkpoint_source

    folder, saved = compiled.written.folder, open_weights(compiled.written.path)
    state = {key: saved.read(name) for key, name in folder.saved_as.items()}
    if folder.converted:
        fused = hf_checkpoint_source(student, saved)
        state |= {key: fused.read(key) for key in folder.converted}
    return state


def warn_nonfinite(plan: SelectionPlan, warn: Log | None) -> None:
    """One line naming the teacher tensors that gave the student NaN or inf values."""
    found = plan.nonfinite_teacher or []
    if not found or warn is None:
        return
    names = ", ".join(f"{n.teacher} ({n.count})" for n in found[:5]) + (", ..." if len(found) > 5 else "")
    warn(
        f"warning: {len(found)} teacher tensor(s) hold NaN or inf among the values the student took: {names}; "
        "the student inherits them (listed in the manifest's nonfinite_teacher). Pass --strict to make this an "
        "error."
    )


def _quiet(line: str) -> None:
    """A log that says nothing (the Python API)."""


def initialize(
    teacher: nn.Module,
    student: nn.Module,
    example_inputs: torch.Tensor | Inputs | None = None,
    *,
    student_inputs: torch.Tensor | Inputs | None = None,
    method: str = "uniform",
    layer_policy: str = "first",
    heads: str = "split",
    rescale: bool = False,
    seed: int = 0,
    calibration: torch.Tensor | Inputs | None = None,
    select_head: bool = False,
    allow_partial: bool = False,
    growth: str = "widen",
) -> SelectionPlan:
    """Initialize ``student`` in place with weights selected from ``teacher``.

    Args:
        teacher: the larger pretrained model.
        student: the smaller model of the same family; its tensors are overwritten in place.
        example_inputs: one example batch for tracing (a tensor for the first forward argument, or
            keyword arguments). By default each model's are told as the CLI tells them: from a
            transformers ``config`` (every modality), timm's ``pretrained_cfg``, a torchvision default
            image, or an ``example_inputs`` attribute; a model whose inputs cannot be told takes the other's.
        student_inputs: the student's example inputs when they differ from the teacher's.
        method: element-selection method: "uniform" (the paper's rule), "consecutive", "random",
            "magnitude" (teacher weight norms) or "activation" (teacher activations on ``calibration``).
        layer_policy: which teacher blocks each stage takes: "first" (the paper's), "uniform", "last",
            "drop-middle", "importance" (on ``calibration``) or an explicit map like "0:0,2,4;1:0,1".
        heads: "split" (heads and head dims shrink) or "whole" (every student head is a teacher head).
        rescale: scale weights whose input shrank by sqrt(teacher_in / student_in).
        seed: seed of the "random" method.
        calibration: real inputs for "activation" and "importance" (a tensor for the first forward
            argument, or keyword arguments); defaults to ``example_inputs``.
        select_head: also select the classifier head (kept at the student's init by default).
        allow_partial: keep the student's init for tensors larger than their teacher match
            instead of failing; a coupled dimension the student is larger in is grown by ``growth``.
        growth: with ``allow_partial``, how a larger student dimension fills its extra units after
            every teacher unit: "widen" (replicated, function-preserving) or "init" (the student's own).

    Returns:
        The SelectionPlan: for every student tensor, its teacher source and index rule.

    Raises:
        InputsError: no ``example_inputs`` and neither model's inputs can be told.
        TraceError, MatchError, SelectionError: with a message saying what to change.
    """
    teacher_inputs, student_inputs = example_pair(teacher, student, example_inputs, student_inputs, seed=seed)
    label = "the example inputs" if calibration is None else None
    compiled = compile(
        teacher,
        student,
        teacher_inputs=teacher_inputs,
        student_inputs=student_inputs,
        method=method,
        layer_policy=layer_policy,
        heads=heads,
        rescale=rescale,
        seed=seed,
        calibration=teacher_inputs if calibration is None else as_inputs(teacher, calibration),
        calibration_label=label,
        select_head=select_head,
        allow_partial=allow_partial,
        growth=growth,
    )
    assert compiled.state_dict is not None
    student.load_state_dict(compiled.state_dict)
    return compiled.plan


def example_pair(
    teacher: nn.Module,
    student: nn.Module,
    example_inputs: torch.Tensor | Inputs | None,
    student_inputs: torch.Tensor | Inputs | None = None,
    *,
    seed: int = 0,
) -> tuple[Inputs, Inputs]:
    """Teacher and student example inputs: the given ones, else told from each model as the CLI tells them.

    ``student_inputs`` defaults to ``example_inputs``. Without either, each model's inputs come from its
    config (``specs.example_inputs``); a model whose inputs cannot be told takes the other's.

    Raises:
        InputsError: neither model's inputs can be told; the message asks for ``example_inputs``.
    """
    if example_inputs is not None:
        given = student_inputs if student_inputs is not None else example_inputs
        return as_inputs(teacher, example_inputs), as_inputs(student, given)
    student_given = as_inputs(student, student_inputs) if student_inputs is not None else None
    try:
        teacher_told = specs.example_inputs(teacher, seed=seed)
    except InputsError:
        if student_given is not None:
            return student_given, student_given
        student_told = specs.example_inputs(student, seed=seed)  # neither told: this error asks for inputs
        return student_told, student_told
    if student_given is not None:
        return teacher_told, student_given
    try:
        return teacher_told, specs.example_inputs(student, seed=seed)
    except InputsError:
        return teacher_told, teacher_told


def as_inputs(model: nn.Module, inputs: torch.Tensor | Inputs | None) -> Inputs:
    """Forward keyword arguments from a dict, a tensor (the first forward argument), or told from the model."""
    if isinstance(inputs, dict):
        return inputs
    if inputs is None:
        return specs.example_inputs(model)
    first = next(iter(inspect.signature(model.forward).parameters))
    return {first: inputs}


def _on_device(inputs: Inputs, model: nn.Module) -> Inputs:
    devices = [t.device for t in itertools.chain(model.parameters(), model.buffers())]
    # NOTE: a model built on meta may keep a tensor or two on the CPU (legacy constructors such as
    # wav2vec2's `torch.Tensor(n).uniform_()` ignore the device context); it still runs on meta.
    meta = torch.device("meta")
    device = meta if meta in devices else devices[0] if devices else torch.device("cpu")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _batch(inputs: Inputs) -> int:
    first = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()), None)
    return int(first.shape[0]) if first is not None else 1
