"""What each CLI subcommand does: check the outputs, load the specs, hand ``pipeline.compile`` a config, print.

Every output path is checked before any model is built, so bad paths fail in milliseconds and
nothing is half-written; every file is written atomically (``outputs.py``). Before a model is
built in memory, the bytes it will take are counted on the meta device and compared with the
memory available (``check_memory``), so a run too large for the machine fails with the sizes
instead of being killed by the kernel.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from wscompile import pipeline, reports
from wscompile.errors import InputsError, ResourceError, SpecError
from wscompile.folders import DTYPES, check_teacher_files
from wscompile.outputs import check_not_inputs, check_output_dir, check_outputs, is_directory_output
from wscompile.passes.apply import check_plan
from wscompile.passes.methods import method_spec
from wscompile.plan import GROW_INIT, RULE_STUDENT_INIT, SelectionPlan, WrittenAs
from wscompile.progress import Progress, shown
from wscompile.specs import (
    LoadedModel,
    build_module,
    build_on_meta,
    has_tied_tensors,
    init_kept,
    is_on_meta,
    load_model,
    parse_spec,
    resolve_hub,
    spec_files,
)
from wscompile.weights import ModuleSource, TensorSource, hf_weights_path, open_weights
from wscompile.writer import MAX_SHARD_SIZE, WriteConfig, metadata, size_text, write_student

Log = Callable[[str], None]
CALIB_BATCH = 8  # calibration inputs per onnxruntime calibration batch

# Environment variable: bytes of memory a run may use, replacing the detected available memory.
MEMORY_LIMIT_ENV = "WSCOMPILE_MEMORY_LIMIT"
# Copies of the student's tensors alive at once during `init`: the built module (the selected
# tensors are streamed to --out one at a time, see `writer.write_student`).
STUDENT_COPIES_INIT = 1


@dataclass
class ExportSettings:
    """The ONNX options beyond --opset/--fp16/--int8 (``wscompile init --onnx`` and ``export``)."""

    ort: bool = False  # also write .ort copies and their reduced-operator configs
    optimize: str | None = None  # onnxruntime graph optimizations before saving: "basic", "extended"
    device: str | None = None  # onnxruntime device: "cpu", "cuda"; None: cuda when available
    atol: float = 1e-4  # absolute tolerance of the fp32 parity checks
    batch_size: int | None = None  # batch of a static-shape export; None: the example input's

    @classmethod
    def from_args(cls, args: object) -> ExportSettings:
        """The settings from parsed arguments; defaults for a subcommand without ONNX options."""
        names = [f.name for f in fields(cls)]
        return cls(**{name: getattr(args, name) for name in names if getattr(args, name, None) is not None})


@dataclass
class InitOptions:
    """Arguments of ``wscompile init`` (and, with ``out=None``, of ``diff``)."""

    teacher: str  # teacher model spec
    student: str  # student model spec
    out: str | None = None  # student .safetensors, or a directory (ending in '/' or existing): HF shards
    teacher_weights: str | None = None  # teacher weights file or HF directory
    manifest: str | None = None  # JSON manifest path
    report: str | None = None  # report path, format from the extension
    onnx: str | None = None  # ONNX export of the initialized student
    method: str = "uniform"  # element selection: uniform, consecutive, random, magnitude, activation
    layers: str = "first"  # layer policy: first, uniform, last, drop-middle, importance, or "0:0,2,4;1:0,1"
    heads: str = "split"  # attention heads: split (heads and head dims shrink) or whole
    rescale: bool = False  # scale weights whose input shrank by sqrt(teacher_in / student_in)
    calib: str | None = None  # calibration inputs (activation, importance): tensor file, image folder, text file
    select_head: bool = False
    allow_partial: bool = False
    growth: str = "widen"  # with allow_partial: "widen" or "init" for the extra units of a wider student dimension
    force: bool = False
    seed: int = 0
    input_shape: tuple[int, ...] | None = None
    trust_remote_code: bool = False
    unsafe_pickle: bool = False
    allow_outside_paths: bool = False  # a model folder may name files outside itself
    opset: int | None = None
    fp16: bool = False
    int8: bool = False
    progress: bool | None = None  # stage lines and a bar on stderr; None: when stderr is a terminal
    quiet: bool = False  # no progress and nothing on stdout but diff's report; warnings and errors still shown
    max_shard_size: int = MAX_SHARD_SIZE  # bytes per shard of a directory --out
    dtype: str | None = None  # floating tensors written as fp32, fp16 or bf16; None: as the student's
    allow_random_teacher: bool = False  # no warning for a teacher without pretrained weights
    strict: bool = False  # NaN/inf among the teacher values read is an error, not a warning
    export: ExportSettings = field(default_factory=ExportSettings)  # further ONNX options


def progress_of(options: InitOptions) -> Progress:
    """The stage lines ``options`` asks for: none with --quiet, else per --progress, else when stderr is a terminal."""
    return Progress(shown(options.progress, quiet=options.quiet))


def _silent(line: str) -> None:
    """The log of --quiet."""


def load_pair(
    options: InitOptions, *, need_values: bool, progress: Progress | None = None
) -> tuple[LoadedModel, LoadedModel]:
    """Teacher (on the meta device when its values come from a file and it never runs) and student."""
    progress = progress or Progress()
    teacher_spec = resolve_hub(parse_spec(options.teacher), role="teacher", weights=options.teacher_weights is None)
    has_file = options.teacher_weights is not None or (
        teacher_spec.scheme == "hf" and hf_weights_path(teacher_spec.name) is not None
    )
    teacher_device = "meta" if (has_file or not need_values) and not needs_calibration(options) else "cpu"
    with progress.stage("counting the memory the run needs"):
        counted = check_memory(
            options, teacher_in_memory=teacher_device == "cpu", student_copies=STUDENT_COPIES_INIT if need_values else 1
        )

    def load_teacher(inputs_from: LoadedModel | None = None) -> LoadedModel:
        with progress.stage(f"building teacher {options.teacher}"):
            return load_model(
                options.teacher,
                role="teacher",
                weights=options.teacher_weights,
                device=teacher_device,
                seed=options.seed,
                input_shape=options.input_shape,
                trust_remote_code=options.trust_remote_code,
                unsafe_pickle=options.unsafe_pickle,
                allow_outside_paths=options.allow_outside_paths,
                inputs_from=inputs_from,
            )

    def load_student(inputs_from: LoadedModel | None = None) -> LoadedModel:
        # Shapes are all the plan needs of the student (its values: student_with_values, after planning)
        with progress.stage(f"building student {options.student}"):
            student = build_student(
                options, device="cpu" if options.onnx else "meta", inputs_from=inputs_from, built=counted
            )
            if student.on_meta and has_tied_tensors(student.module):  # ties are told apart by their storage
                return reload_student(options, student)
            return student

    # A model whose inputs cannot be told (a py: factory without example_inputs) takes the other's;
    # when neither can be told, the student's InputsError says what to pass.
    try:
        teacher = load_teacher()
    except InputsError:
        student = load_student()
        return load_teacher(inputs_from=student), student
    return teacher, load_student(inputs_from=teacher)


def build_student(
    options: InitOptions, *, device: str, inputs_from: LoadedModel | None, built: torch.nn.Module | None = None
) -> LoadedModel:
    """The student ``options`` name, built on ``device`` with its library's init under ``options.seed``
    (on meta, ``built`` when given: the module ``check_memory`` counted)."""
    return load_model(
        options.student,
        role="student",
        device=device,
        seed=options.seed,
        input_shape=options.input_shape,
        trust_remote_code=options.trust_remote_code,
        inputs_from=inputs_from,
        built=built,
    )


def reload_student(options: InitOptions, student: LoadedModel) -> LoadedModel:
    """``student`` built again on the CPU with its library's init under ``options.seed``."""
    return build_student(options, device="cpu", inputs_from=student)


def student_with_values(
    options: InitOptions, plan: SelectionPlan, student: LoadedModel, progress: Progress | None = None
) -> LoadedModel:
    """The student whose values are written where the plan keeps the student's own init.

    The student is planned on the meta device. Where the plan keeps some of its tensors at init,
    a transformers student computes the init of those tensors only (``specs.init_kept``); any other
    is built on the CPU with its library's seeded init, for those values. A student whose every
    tensor comes from the teacher never computes its random init.
    """
    if not student.on_meta or values_at_init(student.module, plan, options.seed):
        return student
    with (progress or Progress()).stage(f"building student {options.student} with its own init"):
        return reload_student(options, student)


def values_at_init(module: torch.nn.Module, plan: SelectionPlan, seed: int) -> bool:
    """Give a student built on meta the values ``plan`` keeps at its own init, where those tensors
    alone can be initialized (``specs.init_kept``; nothing to do when none are kept). False when
    the whole student must be built instead: units grown at init sit inside selected tensors, or
    ``init_kept`` does not apply (another library, a kept buffer, tied tensors)."""
    if any(group.growth == GROW_INIT for group in plan.groups):
        return False
    kept = {record.student for record in plan.tensors if record.rule == RULE_STUDENT_INIT}
    return not kept or init_kept(module, kept, seed)


def check_memory(options: InitOptions, *, teacher_in_memory: bool, student_copies: int) -> torch.nn.Module:
    """Refuse a run whose tensors would not fit in memory, before allocating any of them; return the
    student it built on the meta device to count it (``build_on_meta``), for the run to plan with.

    Counted (``memory.py``): the student's tensors, the teacher's when it is built in memory (a
    teacher read from a weights file is streamed and not counted), both models' example inputs and
    the peak activations of one forward on them, all on the meta device (a ``py:`` factory runs
    twice). A construction that runs long with more bytes than available is stopped midway.

    Raises:
        ResourceError: the estimate exceeds ``available_memory()``; the message gives the sizes.
    """
    available, origin = available_memory()
    where = f"{size_text(available)} is available ({origin})"
    module, (student, student_inputs, student_peak) = _measure(options.student, "student", options, available, where)
    teacher, teacher_inputs, teacher_peak = 0, student_inputs, None
    if teacher_in_memory:
        _, (teacher, teacher_inputs, teacher_peak) = _measure(options.teacher, "teacher", options, available, where)
    # The example inputs of both models exist together; the forwards run one at a time.
    inputs = student_inputs + teacher_inputs
    activations = max(student_peak or 0, teacher_peak or 0)
    needed = student_copies * student + teacher + inputs + activations
    if needed <= available:
        return module
    parts = [f"{student_copies} x {size_text(student)} for student {options.student}"]
    advice = "use a smaller student or a machine with more memory"
    if teacher:
        parts.append(f"{size_text(teacher)} for teacher {options.teacher} built in memory")
        if student_copies * student + inputs + activations <= available:
            advice = "pass --teacher-weights so the teacher is read from disk instead of built in memory"
    if inputs + activations >= available / 100:
        shape = ",".join(map(str, options.input_shape)) if options.input_shape else "the default shape"
        parts.append(
            f"{size_text(inputs + activations)} for the example inputs ({shape}) and the activations of a "
            "forward on them"
        )
        if student_copies * student + teacher <= available:
            advice = "pass a smaller --input-shape"
    raise ResourceError(
        f"not enough memory: this run needs about {size_text(needed)} ({' + '.join(parts)}) but {where}; {advice}, "
        f"or set {MEMORY_LIMIT_ENV}=BYTES if the estimate is wrong"
    )


def available_memory() -> tuple[int, str]:
    """Bytes this process may allocate, and where the number comes from.

    ``WSCOMPILE_MEMORY_LIMIT`` (bytes) when set; otherwise the smallest of MemAvailable in
    /proc/meminfo, the room left under a cgroup v2 ``memory.max``, and physical memory.
    """
    limit = os.environ.get(MEMORY_LIMIT_ENV)
    if limit:
        try:
            return int(limit), MEMORY_LIMIT_ENV
        except ValueError:
            raise SpecError(f"{MEMORY_LIMIT_ENV} must be a whole number of bytes, got {limit!r}") from None
    found = [(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory")]
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            cgroup_max = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as fh:
            cgroup_current = int(fh.read())
        if cgroup_max != "max":
            found.append((int(cgroup_max) - cgroup_current, "cgroup memory.max"))
    except (OSError, ValueError):
        pass
    return min(found)


def _measure(
    spec: str, role: str, options: InitOptions, available: int, where: str
) -> tuple[torch.nn.Module, tuple[int, int, int | None]]:
    """The model built on meta, and (bytes of its state_dict, of its example inputs, peak bytes of its
    forward's activations).

    A tied tensor counts once. The construction runs under ``memory.construction_guard``; a model
    whose inputs its spec does not tell counts none (it takes the other model's, counted there).
    """
    from wscompile.memory import construction_guard, nbytes, peak_activation_bytes

    with construction_guard(available, f"{role} {spec}", where):
        module, inputs = build_on_meta(
            spec,
            role=role,
            seed=options.seed,
            input_shape=options.input_shape,
            trust_remote_code=options.trust_remote_code,
        )
    tensors = nbytes(list({id(t): t for t in module.state_dict(keep_vars=True).values()}.values()))
    if inputs is None:
        return module, (tensors, 0, None)
    return module, (tensors, nbytes(inputs), peak_activation_bytes(module, inputs))


def run_init(options: InitOptions, log: Log = print) -> SelectionPlan:
    """``wscompile init``: check the outputs, load the pair, and compile it into the files asked for."""
    check_init_outputs(options)
    check_selection(options)
    progress = progress_of(options)
    teacher, student = load_pair(options, need_values=True, progress=progress)
    warn_random_teacher(options, teacher)
    # With --out the student's tensors go straight to the file, never all in memory.
    compiled = compile_pair(
        options,
        teacher,
        student,
        progress,
        allow_partial=options.allow_partial,
        growth=options.growth,
        write=not options.out,
        outputs=init_outputs(options, student),
        min_matched_share=pipeline.MIN_MATCHED_SHARE,
        log=_silent if options.quiet else log,
        warn=_warn,
        student_values=lambda plan: student_with_values(options, plan, student, progress).module,
    )
    return compiled.plan


def compile_pair(
    options: InitOptions, teacher: LoadedModel, student: LoadedModel, progress: Progress, **stage_options: Any
) -> pipeline.Compiled:
    """``pipeline.compile`` of a loaded pair with what ``options`` say of it (specs, head, selection);
    ``stage_options`` are the rest of ``compile``'s keyword arguments, which differ by command."""
    return pipeline.compile(
        teacher.module,
        student.module,
        teacher_inputs=teacher.inputs,
        student_inputs=student.inputs,
        teacher_source=teacher.source,
        teacher_spec=options.teacher,
        student_spec=options.student,
        select_head=options.select_head,
        teacher_origin=teacher_origin(teacher),
        progress=progress,
        **selection_options(options, teacher, progress),
        **stage_options,
    )


def init_outputs(options: InitOptions, student: LoadedModel) -> pipeline.Outputs:
    """What ``options`` asks ``init`` to write."""
    weights = None
    if options.out:
        weights = WriteConfig(
            options.out,
            options.teacher,
            options.student,
            options.method,
            hub_weights=options.teacher_weights is None,
            dtype=options.dtype,
            force=options.force,
            progress=shown(options.progress, quiet=options.quiet),
            max_shard_size=options.max_shard_size,
            strict=options.strict,
        )
    export = export_config(options.onnx, options, student) if options.onnx else None
    return pipeline.Outputs(weights, options.manifest, options.report, export, force=options.force)


def export_config(onnx_path: str, options: InitOptions, student: LoadedModel) -> pipeline.ExportConfig:
    """The ONNX options of ``init --onnx`` and ``export``; --int8 with --calib calibrates on those inputs."""
    calibration = None
    if options.int8 and options.calib:

        def calibration() -> list[dict[str, torch.Tensor]]:
            # static int8: onnxruntime calibrates activation ranges on these inputs, a few batches at a time
            from wscompile.calib import load_calibration

            inputs, _ = load_calibration(options.calib, student)
            count = len(next(iter(inputs.values())))
            return [{k: v[i : i + CALIB_BATCH] for k, v in inputs.items()} for i in range(0, count, CALIB_BATCH)]

    settings = options.export
    return pipeline.ExportConfig(
        onnx_path,
        student.kind,
        student.make_inputs,
        opset=options.opset,
        fp16=options.fp16,
        int8=options.int8,
        calibration=calibration,
        ort=settings.ort,
        optimize=settings.optimize,
        device=settings.device,
        atol=settings.atol,
        batch_size=settings.batch_size,
        force=options.force,
    )


def teacher_origin(teacher: LoadedModel) -> pipeline.TeacherOrigin:
    """Where the loaded teacher's values came from."""
    return pipeline.TeacherOrigin(teacher.pretrained, teacher.weights_origin)


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def check_init_outputs(options: InitOptions) -> None:
    """Fail on an output that would overwrite an input (even with --force), that exists (without --force)
    or whose report format is unknown, before any work."""
    written = [
        ("--out", options.out),
        ("--manifest", options.manifest),
        ("--report", options.report),
        *onnx_outputs(options.onnx, options),
    ]
    check_not_inputs(written, run_inputs(options))
    out_dir = options.out is not None and is_directory_output(options.out)
    paths = [None if out_dir else options.out, options.manifest, options.report, options.onnx]
    check_outputs(paths, force=options.force)
    if out_dir:
        check_output_dir(options.out, force=options.force)
        if parse_spec(options.student).scheme == "hf":
            check_teacher_files(parse_spec(options.teacher))
    if options.dtype is not None and options.dtype not in DTYPES:
        raise SpecError(f"unknown --dtype {options.dtype!r}; use one of {', '.join(DTYPES)}")
    if options.report:
        reports.format_from_path(options.report, format_flag=False)


def run_inputs(options: InitOptions) -> list[tuple[str, str | None]]:
    """What a run reads, as (what, path): no output may overwrite any of it."""
    found: list[tuple[str, str | None]] = [("--teacher-weights", options.teacher_weights), ("--calib", options.calib)]
    for role, text in (("teacher", options.teacher), ("student", options.student)):
        found += spec_files(text, role=role)
    return found


def onnx_outputs(onnx_path: str | None, options: InitOptions) -> list[tuple[str, str]]:
    """The ONNX files an export writes, as ("--onnx", path): the model and its --fp16 and --int8 copies."""
    if onnx_path is None:
        return []
    from wscompile.backend.variants import FP16, INT8, variant_path

    copies = [name for name, wanted in ((FP16, options.fp16), (INT8, options.int8)) if wanted]
    return [("--onnx", onnx_path), *(("--onnx", variant_path(onnx_path, name)) for name in copies)]


def save(
    plan: SelectionPlan,
    student: torch.nn.Module,
    out: str | None = None,
    *,
    manifest: str | None = None,
    report: str | None = None,
    force: bool = False,
    max_shard_size: int = MAX_SHARD_SIZE,
) -> None:
    """Write a student initialized in Python, as ``wscompile init`` writes it.

    ``plan = wscompile.initialize(teacher, student)`` then ``wscompile.save(plan, student, "student.safetensors",
    manifest="student.json", report="student.html")``. The student's tensors are written as they are now
    (``initialize`` put the selected values in place), by the same writers the CLI uses.

    Args:
        plan: the plan ``initialize`` returned for this student.
        student: the student module; its ``state_dict`` is written.
        out: a ``.safetensors`` file, or a directory (ending in '/') for a Hugging Face-style folder.
        manifest: JSON manifest path.
        report: report path; the format is told from the extension (.txt, .md, .json, .html).
        force: replace existing files.
        max_shard_size: largest shard of a directory ``out``, in bytes.

    Raises:
        OutputError: an output exists without ``force`` or cannot be written.
        SpecError: the student lacks a tensor the plan names (it is not the plan's student).
    """
    options = InitOptions(
        teacher=plan.teacher_spec,
        student=plan.student_spec,
        out=out,
        manifest=manifest,
        report=report,
        method=plan.method,
        force=force,
        progress=False,
        max_shard_size=max_shard_size,
    )
    check_init_outputs(options)
    state = student.state_dict()
    missing = [r.student for r in plan.tensors if r.student not in state]
    if missing:
        raise SpecError(
            f"the student has no {missing[0]!r} ({len(missing)} of the plan's tensors missing); "
            "pass the student module the plan was made for"
        )
    if out:
        # The student already holds the selected values, so the weights writer is given a plan that keeps
        # every tensor as it is; the manifest and report describe the real plan.
        as_is = replace(plan, tensors=[replace(r, rule=RULE_STUDENT_INIT) for r in plan.tensors])
        config = WriteConfig(
            out,
            plan.teacher_spec,
            plan.student_spec,
            plan.method,
            force=force,
            progress=False,
            max_shard_size=max_shard_size,
        )
        write_student(config, as_is, ModuleSource(student), student)
        plan = replace(plan, written_as=config.written_as())  # the caller's plan is left as it was
    pipeline.write_records(plan, pipeline.Outputs(manifest=manifest, report=report, force=force))


def student_metadata(options: InitOptions) -> dict[str, str]:
    """The ``__metadata__`` of the student's safetensors file: where its weights came from."""
    return metadata(options.teacher, options.student, options.method)


def warn_random_teacher(options: InitOptions, teacher: LoadedModel) -> None:
    """Say on stderr that a timm, torchvision or hf teacher has no pretrained weights (unless --allow-random-teacher).

    A ``py:``/file teacher is never called out: its factory may have loaded weights itself.
    """
    if teacher.pretrained is not False or options.allow_random_teacher:
        return
    pretrained = {
        "timm": f"timm:{teacher.spec.name}?pretrained=True, ",
        "hf": "an hf: directory or hub id with weights, ",
    }.get(teacher.spec.scheme, "")
    print(
        f"warning: teacher {options.teacher} has no pretrained weights (random init); the student will inherit "
        f"random numbers. Pass --teacher-weights FILE, {pretrained}or --allow-random-teacher to silence this.",
        file=sys.stderr,
    )


def needs_calibration(options: InitOptions) -> bool:
    """Whether the teacher runs on calibration inputs (activation method, importance layer policy)."""
    from wscompile.matching.layers import parse_layer_policy

    return pipeline.calibration_wanted(options.method, parse_layer_policy(options.layers)) is not None


def check_selection(options: InitOptions) -> None:
    """Fail on a bad --layers or a missing --calib before any model is built."""
    from wscompile.matching.layers import parse_layer_policy

    pipeline.require_calibration(
        options.method,
        parse_layer_policy(options.layers),
        bool(options.calib),
        "pass --calib with a .pt/.safetensors file of input tensors, a folder of images or a text file",
    )


def selection_options(options: InitOptions, teacher: LoadedModel, progress: Progress | None = None) -> dict:
    """The selection keyword arguments of ``pipeline.compile``, calibration inputs loaded."""
    calibration, label = None, None
    if needs_calibration(options):
        from wscompile.calib import load_calibration

        with (progress or Progress()).stage(f"reading the calibration inputs {options.calib}"):
            calibration, label = load_calibration(options.calib, teacher)
    return dict(
        method=options.method,
        layer_policy=options.layers,
        heads=options.heads,
        rescale=options.rescale,
        seed=options.seed,
        calibration=calibration,
        calibration_label=label,
    )


def run_diff(options: InitOptions, fmt: str | None, output: str | None, log: Log = print) -> SelectionPlan:
    if output:
        check_not_inputs([("--output", output)], run_inputs(options))
        check_outputs([output], force=options.force)
        fmt = fmt or reports.format_from_path(output)
    check_selection(options)
    progress = progress_of(options)
    # magnitude reads teacher weights: from the file if there is one, else from the built teacher
    needs_weights = method_spec(options.method).needs_weights
    teacher, student = load_pair(options, need_values=needs_weights, progress=progress)
    if needs_weights or needs_calibration(options):
        # Only these selections read the teacher's values; the structure is the same for any values.
        warn_random_teacher(options, teacher)
    compiled = compile_pair(options, teacher, student, progress, allow_partial=True, write=False)
    if output:
        reports.write_report(compiled.plan, output, fmt=fmt, force=options.force)
        if not options.quiet:
            log(f"wrote {output}")
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        log(reports.render(compiled.plan, fmt or "text", color=color).rstrip("\n"))
    return compiled.plan


def run_export(
    student_spec: str,
    weights: str,
    onnx_path: str,
    options: InitOptions,
    log: Log = print,
    *,
    verify_only: bool = False,
):
    """Export the student with ``weights`` to ``onnx_path`` and verify it, or only verify an existing file."""
    if verify_only and not os.path.isfile(onnx_path):
        raise SpecError(f"'{onnx_path}' does not exist; drop --verify-only to export it")
    if not verify_only:
        check_not_inputs(onnx_outputs(onnx_path, options), [("--weights", weights), *run_inputs(options)])
        check_outputs([onnx_path], force=options.force)
    progress = progress_of(options)
    log = progress.lines(_silent if options.quiet else log)
    with progress.stage(f"building student {student_spec}"):
        student = load_model(
            student_spec,
            role="student",
            seed=options.seed,
            input_shape=options.input_shape,
            trust_remote_code=options.trust_remote_code,
        )
    source = open_weights(weights, unsafe_pickle=options.unsafe_pickle, allow_outside_paths=options.allow_outside_paths)
    expected = set(student.module.state_dict())
    missing = sorted(expected - set(source.keys()))
    if missing:
        raise SpecError(
            f"'{weights}' lacks {len(missing)} tensor(s) of {student_spec}, e.g. {', '.join(missing[:3])}; "
            "was it written by `wscompile init` for this student spec?"
        )
    with progress.stage(f"reading the student's weights {weights}"):
        state = {key: source.read(key) for key in expected}
        student.module.load_state_dict(state)
    if verify_only:
        from wscompile.backend import verify_onnx

        with (
            progress.holding(f"checking {onnx_path} against PyTorch with onnxruntime", log) as step_log,
            torch.no_grad(),
        ):
            return verify_onnx(
                onnx_path,
                student.module,
                student.make_inputs,
                kind=student.kind,
                log=step_log,
                atol=options.export.atol,
                device=options.export.device,
            )
    return pipeline.export_onnx(
        student.module, student.inputs, export_config(onnx_path, options, student), log, progress
    )


def summary(plan: SelectionPlan) -> str:
    """The lines ``init`` prints (``reports.render_summary``)."""
    return reports.render_summary(plan)


@dataclass
class ApplyOptions:
    """Arguments of ``wscompile apply``: a manifest, the teacher's weights, where to write the student."""

    manifest: str  # JSON manifest written by `wscompile init`
    out: str  # student .safetensors, or a directory (ending in '/' or existing): a model folder
    teacher_weights: str | None = None  # teacher weights file or HF directory; None: from the teacher spec
    student: str | None = None  # student spec; None: the manifest's (a py:/file one only when given here)
    teacher: str | None = None  # teacher spec, to build it when its weights need it; None: the manifest's
    seed: int | None = None  # the student's own init; None: the manifest's seed
    force: bool = False
    input_shape: tuple[int, ...] | None = None
    trust_remote_code: bool = False
    unsafe_pickle: bool = False
    allow_outside_paths: bool = False
    progress: bool | None = None
    max_shard_size: int | None = None  # None: the manifest's (written_as), else MAX_SHARD_SIZE
    dtype: str | None = None  # None: the manifest's (written_as)
    strict: bool = False


def run_apply(options: ApplyOptions, log: Log = print) -> SelectionPlan:
    """``wscompile apply``: rebuild the student a manifest records, without tracing either model.

    The plan is read back from the manifest (schema-checked), the student built with its seeded init,
    the teacher's tensors opened, the plan checked against both, and the student written by the writer
    ``init`` uses, so the file is byte for byte the one ``init`` wrote.
    """
    plan = load_manifest(options.manifest)
    student_spec = trusted_spec(options.student, plan.student_spec, "student")
    # NOTE: finding a py: spec's file imports its package; a manifest's code spec not named is never looked at.
    teacher_spec = options.teacher or (None if runs_code(plan.teacher_spec) else plan.teacher_spec)
    check_not_inputs(
        [("--out", options.out)],
        [
            ("--manifest", options.manifest),
            ("--teacher-weights", options.teacher_weights),
            *spec_files(student_spec, role="student"),
            *(spec_files(teacher_spec, role="teacher") if teacher_spec else []),
        ],
    )
    if is_directory_output(options.out):
        check_output_dir(options.out, force=options.force)
    else:
        check_outputs([options.out], force=options.force)
    if options.dtype is not None and options.dtype not in DTYPES:
        raise SpecError(f"unknown --dtype {options.dtype!r}; use one of {', '.join(DTYPES)}")
    seed = plan.seed if options.seed is None else options.seed
    recorded = plan.written_as or WrittenAs()  # as init wrote it, unless the options say otherwise
    dtype = recorded.dtype if options.dtype is None else options.dtype
    max_shard_size = options.max_shard_size or recorded.max_shard_size or MAX_SHARD_SIZE

    def build(device: str) -> torch.nn.Module:
        return build_module(
            student_spec,
            role="student",
            device=device,
            seed=seed,
            input_shape=options.input_shape,
            trust_remote_code=options.trust_remote_code,
        )

    # As init: shapes only, and the student's own init where the plan keeps it (ties are told apart by storage).
    student = build("meta")  # a constructor computing on tensor data builds on the CPU instead
    if is_on_meta(student) and (has_tied_tensors(student) or not values_at_init(student, plan, seed)):
        student = build("cpu")
    source = apply_teacher_source(options, plan)
    check_plan(plan, source, student.state_dict())
    config = WriteConfig(
        options.out,
        plan.teacher_spec,
        plan.student_spec,
        plan.method,
        hub_weights=options.teacher_weights is None,
        dtype=dtype,
        force=options.force,
        progress=options.progress,
        max_shard_size=max_shard_size,
        strict=options.strict,
    )
    written = write_student(config, plan, source, student)
    pipeline.warn_nonfinite(plan, _warn)
    log(f"wrote {written.path} ({len(plan.tensors)} tensors, from {options.manifest})")
    return plan


def load_manifest(path: str) -> SelectionPlan:
    """The plan recorded in the manifest file at ``path`` (``reports.manifest.read_manifest``)."""
    from wscompile.reports.manifest import read_manifest

    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read --manifest '{path}': {e}") from e
    return read_manifest(text, where=f"--manifest '{path}'")


def trusted_spec(given: str | None, recorded: str, role: str) -> str:
    """The spec to build a model from: ``given`` on the command line, else the manifest's ``recorded`` one.

    A manifest is data from anywhere: a ``py:`` or file spec in it runs code, so it is used only when the
    user names that same spec on the command line.

    Raises:
        SpecError: the recorded spec runs code and was not given.
    """
    if given is not None:
        return given
    if runs_code(recorded):
        raise SpecError(
            f"the manifest's {role} spec {recorded!r} runs code; pass --{role} {recorded!r} "
            f"if you trust it (a manifest's code specs are never run on its word)"
        )
    return recorded


def runs_code(spec: str) -> bool:
    """Whether building ``spec`` imports and runs code it names (a ``py:`` or file spec)."""
    return parse_spec(spec).scheme in ("py", "file")


def apply_teacher_source(options: ApplyOptions, plan: SelectionPlan) -> TensorSource:
    """The teacher's tensors under the names the plan reads.

    ``--teacher-weights`` is opened as it is when it holds every tensor the plan reads; otherwise (other
    names, a checkpoint's layout) the teacher is built on the meta device and the file fitted to it as
    ``init`` does. Without ``--teacher-weights``, a teacher spec naming pretrained weights (an ``hf:`` model
    with weights, ``timm:...?pretrained=True``) is built with them.

    Raises:
        SpecError: the teacher's weights are not given and its spec names none.
    """
    read = {
        piece.teacher
        for record in plan.tensors
        if record.rule != RULE_STUDENT_INIT
        for piece in (record.parts or [record])
    }
    if options.teacher_weights is not None:
        stored = open_weights(
            options.teacher_weights,
            unsafe_pickle=options.unsafe_pickle,
            allow_outside_paths=options.allow_outside_paths,
        )
        if read <= set(stored.keys()):
            return stored
    elif not names_pretrained_weights(options.teacher or plan.teacher_spec):
        raise SpecError(
            f"teacher {plan.teacher_spec!r} names no pretrained weights; pass --teacher-weights with "
            "the teacher's weights file or folder (the one `wscompile init` read)"
        )
    teacher_spec = trusted_spec(options.teacher, plan.teacher_spec, "teacher")
    has_file = options.teacher_weights is not None or (
        parse_spec(teacher_spec).scheme == "hf" and hf_weights_path(parse_spec(teacher_spec).name) is not None
    )
    teacher = load_model(
        teacher_spec,
        role="teacher",
        weights=options.teacher_weights,
        device="meta" if has_file else "cpu",
        seed=plan.seed,
        input_shape=options.input_shape,
        trust_remote_code=options.trust_remote_code,
        unsafe_pickle=options.unsafe_pickle,
        allow_outside_paths=options.allow_outside_paths,
    )
    if teacher.pretrained is not True:
        raise SpecError(f"teacher {teacher_spec!r} loaded no pretrained weights; pass --teacher-weights")
    return teacher.source


def names_pretrained_weights(text: str) -> bool:
    """Whether a teacher spec names its own pretrained weights (so ``apply`` needs no --teacher-weights)."""
    spec = parse_spec(text)
    if spec.scheme == "hf":
        return True  # a hub id or a folder: whether it holds weights is told when it is loaded
    if spec.scheme == "timm":
        return bool(spec.overrides.get("pretrained")) or "pretrained_file" in spec.overrides
    if spec.scheme == "torchvision":
        return spec.overrides.get("weights") not in (None, "None", "none")
    return False
