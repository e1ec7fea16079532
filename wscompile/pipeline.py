"""The compiler, top to bottom: trace, calibrate (when a method needs it), align, plan, write.

``compile`` is the whole program; each line is one stage, and each stage's result is data the
next one reads. ``initialize`` is the same on in-memory modules, for use from Python.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass

import networkx as nx
import torch
from torch import nn

from wscompile import frontend, specs
from wscompile.errors import InputsError, SelectionError
from wscompile.matching import Alignment, align
from wscompile.matching.layers import parse_layer_policy
from wscompile.passes.apply import apply_plan
from wscompile.passes.calibration import MAX_SAMPLES, Calibrator, describe
from wscompile.passes.select import NEEDS_CALIBRATION, build_plan
from wscompile.plan import SelectionPlan
from wscompile.weights import ModuleSource, TensorSource

Inputs = dict[str, torch.Tensor]


@dataclass
class Compiled:
    """Everything one compilation produced."""

    plan: SelectionPlan  # what was selected from where; feeds manifest and reports
    state_dict: dict[str, torch.Tensor] | None  # the student's full state_dict (None for a dry run)
    teacher_graph: nx.DiGraph  # IR of the teacher
    student_graph: nx.DiGraph  # IR of the student
    alignment: Alignment  # component and layer correspondence


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
    write: bool = True,
) -> Compiled:
    """Run every stage; ``write=False`` stops after planning (``wscompile diff``).

    ``calibration`` (forward keyword arguments, a batch of real inputs) is needed by the activation
    method and the importance layer policy; the teacher then runs once on it, so it must hold its
    weights (not the meta device). ``calibration_label`` says what the inputs are, for the plan.
    """
    source = teacher_source or ModuleSource(teacher)
    policy = parse_layer_policy(layer_policy)
    # 1. frontend: both models into the IR (torch.fx, falling back to torch.export)
    teacher_graph = frontend.trace(teacher, _on_device(teacher_inputs, teacher), label=f"teacher {teacher_spec}")
    student_graph = frontend.trace(student, _on_device(student_inputs, student), label=f"student {student_spec}")
    # 2. calibration: the teacher run on real inputs in bounded batches, observed lazily by hooks (when needed)
    calibrator = None
    if method in NEEDS_CALIBRATION or policy.needs_calibration:
        if calibration is None:
            wants = f"--method {method}" if method in NEEDS_CALIBRATION else f"--layers {policy.text}"
            raise SelectionError(f"{wants} ranks by the teacher's activations on real inputs: pass calibration "
                                 "inputs (--calib FILE_OR_DIR, or calibration= in Python)")
        batch = _on_device(calibration, teacher)
        given = _batch(batch)
        label = calibration_label or describe(min(given, MAX_SAMPLES), given, "samples", "the calibration inputs")
        calibrator = Calibrator(teacher, teacher_graph, batch, channels=method in NEEDS_CALIBRATION, description=label)
    # 3. matching: stages and blocks (layer selection by the policy), then components inside blocks
    alignment = align(teacher_graph, student_graph, layer_policy=policy,
                      block_similarity=calibrator.block_similarity if calibrator else None, allow_partial=allow_partial)
    # 4. selection: per coupled dimension, the teacher indices each student tensor keeps
    student_state = student.state_dict()
    teacher_keys = {key: (source.shape(key), source.dtype(key)) for key in source.keys()}
    plan = build_plan(alignment, teacher_graph, student_graph, student_state, teacher_keys,
                      teacher_spec=teacher_spec, student_spec=student_spec, method=method,
                      select_head=select_head, allow_partial=allow_partial, teacher_source=source,
                      calibration=calibrator, heads=heads, rescale=rescale, seed=seed, layer_policy=policy.text)
    # 5. write: read exactly the planned teacher elements into the student's state_dict
    state = apply_plan(plan, source, student_state) if write else None
    return Compiled(plan, state, teacher_graph, student_graph, alignment)


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
            instead of failing.

    Returns:
        The SelectionPlan: for every student tensor, its teacher source and index rule.

    Raises:
        InputsError: no ``example_inputs`` and neither model's inputs can be told.
        TraceError, MatchError, SelectionError: with a message saying what to change.
    """
    teacher_inputs, student_inputs = example_pair(teacher, student, example_inputs, student_inputs, seed=seed)
    label = "the example inputs" if calibration is None else None
    compiled = compile(
        teacher, student, teacher_inputs=teacher_inputs, student_inputs=student_inputs,
        method=method, layer_policy=layer_policy, heads=heads, rescale=rescale, seed=seed,
        calibration=teacher_inputs if calibration is None else as_inputs(teacher, calibration),
        calibration_label=label, select_head=select_head, allow_partial=allow_partial,
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
