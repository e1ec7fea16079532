"""Turn an alignment into a selection plan: which teacher elements fill each student tensor.

Planning is three passes over data, each in its own file, run in order by ``build_plan``:

0. deepen (``deepen.py``, ``--allow-partial`` only): student blocks beyond their teacher stage's
   depth repeat the stage's last matched teacher block;
1. collect (``collect.py``): pair tensors by role and axes by layout; local axes are settled,
   every grouped axis becomes a ``Pending`` axis and a ``Member`` of its coupled dimension;
2. choose (``choose.py``): the method (a ``MethodSpec`` of ``methods.py``) keeps one index set per
   coupled dimension, seeing every member; attention laid out by heads is chosen per head
   (``heads.py``); a dimension the student is larger in (``--allow-partial``) keeps every teacher
   unit and grows the rest (``grow.py``);
3. settle (``settle.py``): groups are numbered in the order their first axis occurs, every pending
   axis gets a new rule reading its group's indices, and ties, dtypes, untraced tensors, unused
   teacher tensors and coverage are accounted for.

Which channel spaces are coupled is the matching stage's analysis (``matching/coupling.py``),
read here and nowhere else. How a record's rules read the teacher's layout is ``layout.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import networkx as nx
import torch

from wscompile import ir
from wscompile.errors import SelectionError
from wscompile.matching.align import Alignment
from wscompile.matching.coupling import coupled_dimensions
from wscompile.passes.calibration import Calibrator
from wscompile.passes.choice import Evidence, MethodSpec, Scorer
from wscompile.passes.choose import choose
from wscompile.passes.collect import collect
from wscompile.passes.deepen import REPEAT_REASON, deepen
from wscompile.passes.grow import grow
from wscompile.passes.heads import HEAD_MODES, SPLIT, WHOLE, attention_layouts, rule_name
from wscompile.passes.layout import teacher_index, to_student_layout
from wscompile.passes.methods import METHODS, method_spec
from wscompile.passes.settle import (
    TeacherKeys,
    add_untraced,
    check_sizes,
    coverage,
    note_dtypes,
    settle_groups,
    unify_ties,
    untraced_pairs,
    unused_teacher,
)
from wscompile.plan import GROW_WIDEN, GROWTH_RULES, RULE_STUDENT_INIT, SelectionPlan
from wscompile.weights import TensorSource

__all__ = ["METHODS", "SelectionConfig", "build_plan", "teacher_index", "to_student_layout"]


@dataclass(frozen=True)
class SelectionConfig:
    """How to select: everything ``build_plan`` needs besides the models, graphs and alignment."""

    teacher_spec: str = "<module>"  # recorded in the plan
    student_spec: str = "<module>"  # recorded in the plan
    method: str = "uniform"  # a key of ``methods.METHODS``
    layer_policy: str = "first"  # the --layers text, recorded in the plan (applied by matching)
    heads: str = SPLIT  # "split": heads and head dims shrink; "whole": every student head is a teacher head
    rescale: bool = False  # scale weights whose input shrank by sqrt(t_in / s_in)
    seed: int = 0  # seed of the random method
    select_head: bool = False  # also select the classifier head
    allow_partial: bool = False  # keep the student's init for tensors larger than their teacher match
    growth: str = GROW_WIDEN  # with allow_partial: how a dimension the student is larger in fills its extra units

    def __post_init__(self) -> None:
        method_spec(self.method)
        if self.growth not in GROWTH_RULES:
            raise SelectionError(f"unknown growth rule {self.growth!r}; choose from {', '.join(GROWTH_RULES)}")
        if self.heads not in HEAD_MODES:
            raise SelectionError(f"unknown head mode {self.heads!r}; choose from {', '.join(HEAD_MODES)}")

    @property
    def method_spec(self) -> MethodSpec:
        return METHODS[self.method]


def build_plan(
    alignment: Alignment,
    teacher_graph: nx.DiGraph,
    student_graph: nx.DiGraph,
    student_state: dict[str, torch.Tensor],
    teacher_keys: TeacherKeys,
    config: SelectionConfig,
    *,
    teacher_source: TensorSource | None = None,
    calibration: Calibrator | None = None,
) -> SelectionPlan:
    """Build the SelectionPlan; raises SelectionError for a student larger than its teacher.

    ``teacher_keys`` maps every teacher state_dict key to (shape, dtype). Teacher data is read only
    by methods that need the weights (through ``teacher_source``); the activation method reads the
    channel means of ``calibration``.
    """
    method = config.method_spec
    evidence = Evidence(teacher_source, calibration.channel_means if calibration else None)
    scorer = _scorer(method, evidence)
    dimensions = coupled_dimensions(student_graph)
    sized = alignment  # the layer map as matching made it: the sizes are checked against it
    repeated: dict[str, str] = {}
    if config.allow_partial and config.growth == GROW_WIDEN:
        # 0. deepen: blocks beyond their teacher stage's depth repeat its last block (``deepen.py``)
        alignment, repeated = deepen(alignment, student_graph)
    layouts = attention_layouts(alignment, teacher_graph, student_graph, heads=config.heads)
    # 1. collect: tensors paired by role, axes by layout; grouped axes wait for their indices
    collected = collect(
        alignment,
        teacher_graph,
        student_graph,
        select_head=config.select_head,
        structured_axes={axis for attention in layouts for axis in attention.axes()},
        grow=config.allow_partial,
    )
    # 2. choose: one index set per coupled dimension, and per head for attention laid out by heads;
    #    a dimension the student is larger in keeps every teacher unit and grows the rest
    chosen = choose(
        collected.pending,
        dimensions.linked,
        layouts,
        method,
        scorer,
        seed=config.seed,
        unobserved=evidence.unobserved,
        whole_heads=config.heads == WHOLE,
    )
    grown = grow(collected.pending, dimensions.linked, student_graph, rule=config.growth)
    # 3. settle: rules read their group's indices; sizes checked; untraced, ties, dtypes, unused accounted
    records, groups = settle_groups(
        collected,
        chosen,
        dimensions.spaces,
        dimensions.linked,
        method=config.method,
        heads_rule=rule_name(config.method, config.heads),
        rescale=config.rescale,
        grown=grown,
    )
    for key, block in repeated.items():
        if key in records and records[key].rule != RULE_STUDENT_INIT:
            records[key] = replace(records[key], repeats=block, reason=REPEAT_REASON.format(block=block))
    check_sizes(sized, collected.too_large, allow_partial=config.allow_partial)
    untraced = untraced_pairs(
        alignment, teacher_graph, student_graph, [k for k in student_state if k not in records], teacher_keys
    )
    add_untraced(records, student_state, untraced, teacher_keys)
    unify_ties(records, student_state)
    note_dtypes(records, student_state, teacher_keys)
    tensors = [records[k] for k in student_state if k in records]
    return SelectionPlan(
        teacher_spec=config.teacher_spec,
        student_spec=config.student_spec,
        method=config.method,
        layer_policy=config.layer_policy,
        frontend={"teacher": teacher_graph.graph[ir.FRONTEND], "student": student_graph.graph[ir.FRONTEND]},
        tensors=tensors,
        stages=alignment.stages,
        groups=groups,
        unused_teacher=unused_teacher(
            alignment, teacher_graph, teacher_keys, collected.used_teacher, config.select_head
        ),
        teacher_params=sum(_numel(s) for s, _ in teacher_keys.values()),
        student_params=sum(t.numel() for t in student_state.values()),
        notes=chosen.notes,
        heads=config.heads,
        rescale=config.rescale,
        seed=config.seed,
        calibration=calibration.description if calibration else None,
        coverage=coverage(tensors),
    )


def _scorer(method: MethodSpec, evidence: Evidence) -> Scorer | None:
    """The method's importance scorer from the run's evidence, None for methods that do not rank."""
    if method.scorer is None:
        return None
    if method.needs_weights and evidence.weights is None:
        raise SelectionError(f"--method {method.name} reads the teacher's weights: give build_plan the teacher_source")
    if method.needs_calibration and evidence.channel_means is None:
        raise SelectionError(
            f"--method {method.name} ranks channels by the teacher's activations on real inputs: "
            "pass calibration inputs (--calib FILE_OR_DIR)"
        )
    return method.scorer(evidence)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
