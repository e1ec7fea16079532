"""Turn an alignment into a selection plan: which teacher elements fill each student tensor.

For every matched component pair, tensors pair up by role (weight with weight, running_mean with
running_mean). Each student axis gets an ``AxisRule``: the teacher axis it reads, the coupled
group it belongs to (``matching/coupling.py``), fused blocks along it, and the indices chosen by
the selection method for its group. Planning runs in three steps:

1. collect: pair tensors and axes; every grouped axis becomes a pending rule and a ``Member`` of
   its dimension (the teacher tensor axis it reads, with offset and fused blocks);
2. choose: the method (``METHODS``) picks one index set per coupled dimension, seeing every
   member (importance methods score the units from the members' teacher tensors or activations);
   attention laid out by heads is chosen per head (``heads.py``);
3. settle: groups are numbered in the order their first axis occurs and every pending rule gets its
   group's indices (or, for the uniform rule with ``t % s == 0``, its step).

A fused q/k/v output is one group per logical block (``t/3``), while the attention output
projection's input has the full width ``t/3``: they are different channel spaces to the coupling
analysis, but read the same heads, so a method chooses them together. Local axes (a conv kernel,
a vocabulary or position table) are not coupled to anything and keep the uniform or prefix rule
whatever the method.

Layouts that differ but hold the same numbers are read through a view: a Linear weight
``(O, I)`` feeds a 1x1 convolution ``(O, I, 1, 1)`` and back, and transformers' ``Conv1D`` stores
``(I, O)`` where a Linear stores ``(O, I)``. With ``rescale`` a weight whose input axis shrank is
multiplied by ``sqrt(t_in / s_in)`` (``rescale.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch

from wscompile import ir
from wscompile.errors import SelectionError
from wscompile.matching.align import Alignment
from wscompile.matching.coupling import Space, UnionFind, coupled_spaces, space_size
from wscompile.passes import activation, consecutive, magnitude, random_select, uniform
from wscompile.passes.calibration import Calibrator
from wscompile.passes.choice import Choice, Member, Method, Scorer
from wscompile.passes.heads import HEAD_MODES, SPLIT, WHOLE, attention_layouts, choose_heads, rule_name
from wscompile.passes.interpolate import RULE as INTERPOLATE
from wscompile.passes.interpolate import resamplable, resample
from wscompile.passes.rescale import input_scale, rescale_tensor, rescales
from wscompile.passes.uniform import uniform_indices, uniform_step
from wscompile.plan import (
    AXIS_FULL,
    AXIS_UNIFORM,
    RULE_COPY,
    RULE_SELECT,
    RULE_STUDENT_INIT,
    AxisRule,
    Coverage,
    GroupRecord,
    SelectionPlan,
    StagePair,
    TensorRecord,
    UnusedTeacher,
)
from wscompile.weights import TensorSource

AXIS_PREFIX = "prefix"  # the first student_size ids of a token/position table

HEAD_REASON = "classifier head: kept at the student's init (pass --select-head to select it)"

# Element-selection methods: each keeps s of t teacher units of a coupled dimension (``choice.py``).
METHODS: dict[str, Method] = {
    uniform.NAME: uniform.choose,
    consecutive.NAME: consecutive.choose,
    random_select.NAME: random_select.choose,
    magnitude.NAME: magnitude.choose,
    activation.NAME: activation.choose,
}
NEEDS_CALIBRATION = {activation.NAME}  # methods ranking by the teacher's activations on real inputs


@dataclass
class _Pending:
    """A grouped student axis whose indices are chosen once every dimension is known."""

    rule: AxisRule  # in the record's axes; group, rule, step and indices are settled last
    student: str  # student tensor key
    axis: int  # student axis
    space: Space  # its channel space in the student graph
    member: Member  # the teacher tensor axis it reads
    structured: bool  # its indices come from the attention head layout


def layout(teacher: ir.TensorSlot, student: ir.TensorSlot) -> tuple[str | None, list[int | None]] | None:
    """How student axes read teacher axes: (reshape name, teacher axis per student axis), or None."""
    t_shape, s_shape = teacher.shape, student.shape
    if len(t_shape) == len(s_shape):
        if (len(s_shape) == 2 and teacher.out_axis is not None and student.out_axis is not None
                and teacher.out_axis != student.out_axis):
            return "transpose", [1, 0]
        return None, list(range(len(s_shape)))
    if len(t_shape) == 2 and len(s_shape) > 2 and all(d == 1 for d in s_shape[2:]):
        return "linear->conv1x1", [0, 1] + [None] * (len(s_shape) - 2)
    if len(s_shape) == 2 and len(t_shape) > 2 and all(d == 1 for d in t_shape[2:]):
        return "conv1x1->linear", [0, 1]
    return None


def build_plan(
    alignment: Alignment,
    teacher_graph: nx.DiGraph,
    student_graph: nx.DiGraph,
    student_state: dict[str, torch.Tensor],
    teacher_keys: dict[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    teacher_spec: str,
    student_spec: str,
    method: str = "uniform",
    select_head: bool = False,
    allow_partial: bool = False,
    teacher_source: TensorSource | None = None,
    calibration: Calibrator | None = None,
    heads: str = SPLIT,
    rescale: bool = False,
    seed: int = 0,
    layer_policy: str = "first",
) -> SelectionPlan:
    """Build the SelectionPlan; raises SelectionError for a student larger than its teacher.

    ``teacher_keys`` maps every teacher state_dict key to (shape, dtype). Teacher data is read only
    by the magnitude method (through ``teacher_source``); the activation method reads the channel
    means of ``calibration``. ``heads="whole"`` keeps whole attention heads, ``rescale`` scales
    weights whose input shrank, ``seed`` seeds the random method.
    """
    if method not in METHODS:
        raise SelectionError(f"unknown selection method {method!r}; choose from {', '.join(METHODS)}")
    if heads not in HEAD_MODES:
        raise SelectionError(f"unknown head mode {heads!r}; choose from {', '.join(HEAD_MODES)}")
    notes: list[str] = []
    unobserved: list[str] = []  # activation: dimensions no observed layer reads or writes
    scorer = _scorer(method, teacher_source, calibration, unobserved)
    spaces = coupled_spaces(student_graph)
    layouts = attention_layouts(alignment, teacher_graph, student_graph, heads=heads)
    structured_axes = {axis for attention in layouts for axis in attention.axes()}
    records: dict[str, TensorRecord] = {}
    pending: list[_Pending] = []
    rescalable: dict[str, int] = {}  # student tensor -> its input axis, for weights --rescale may scale
    too_large: list[str] = []
    used_teacher: set[str] = set()

    # 1. collect: pair tensors by role, axes by layout; grouped axes wait for their indices
    for s_node in sorted(student_graph.nodes):
        s_data = student_graph.nodes[s_node]
        t_node = alignment.pairs.get(s_node)
        is_head = s_node in alignment.head
        for s_slot in s_data[ir.TENSORS]:
            if s_slot.name in records:
                continue  # a tensor read by several components is planned once
            record = TensorRecord(s_slot.name, list(s_slot.shape), None, None, RULE_STUDENT_INIT,
                                  component=s_data[ir.MODULE], is_head=is_head)
            records[s_slot.name] = record
            if t_node is None:
                record.reason = alignment.unmatched.get(s_node, "no teacher counterpart")
                continue
            if is_head and not select_head:
                record.reason = HEAD_REASON
                continue
            if s_node in alignment.assembled:
                # a fused student projection read from separate teacher ones: one planned part each
                parts, part_pending, problem, larger_part = _assembled_parts(
                    alignment.assembled[s_node], teacher_graph, s_node, s_slot, structured_axes)
                if problem is not None:
                    record.reason = problem
                    too_large += [larger_part] if larger_part else []
                    continue
                record.parts, record.parts_axis, record.rule = parts, s_slot.out_axis, RULE_SELECT
                record.teacher, record.teacher_shape = parts[0].teacher, parts[0].teacher_shape
                pending += part_pending
                used_teacher.update(part.teacher for part in parts)
                if rescales(s_data[ir.KIND], s_slot):
                    rescalable[s_slot.name] = s_slot.in_axis
                continue
            t_data = teacher_graph.nodes[t_node]
            t_slot = next((t for t in t_data[ir.TENSORS] if t.role == s_slot.role), None)
            if t_slot is None:
                record.reason = f"teacher layer {t_data[ir.MODULE]} has no {s_slot.role!r} tensor"
                continue
            record.teacher, record.teacher_shape = t_slot.name, list(t_slot.shape)
            view = layout(t_slot, s_slot)
            if view is None:
                record.reason = f"teacher layout {list(t_slot.shape)} cannot be read as {list(s_slot.shape)}"
                record.teacher = None
                continue
            record.reshape, teacher_axes = view
            part, parts = alignment.parts.get(s_node, (0, 1))
            axes: list[AxisRule] = []
            larger = False
            for s_axis, t_axis in enumerate(teacher_axes):
                s_size = s_slot.shape[s_axis]
                t_size = 1 if t_axis is None else t_slot.shape[t_axis]
                offset = 0
                fused_in_teacher = t_axis is not None and _blocks(t_slot, t_axis)
                if parts > 1 and t_axis == t_slot.out_axis:
                    # this student layer is one part of a fused teacher layer (k of q/k/v)
                    t_size //= parts
                    offset = part * t_size
                    fused_in_teacher = 1
                kind = s_data[ir.KIND]
                if kind == ir.KIND_PARAM and len(s_slot.shape) == 3 and s_axis == 1 and resamplable(t_size, s_size):
                    axes.append(AxisRule(t_size, s_size, INTERPOLATE, None))  # a position grid
                    continue
                if s_size > t_size:
                    larger = True
                    break
                if kind == ir.KIND_EMBEDDING and s_axis == 0 and s_size < t_size:
                    # rows are token or position ids: a smaller table keeps the first ids
                    axes.append(AxisRule(t_size, s_size, AXIS_PREFIX, None, indices=list(range(s_size))))
                    continue
                k = _blocks(s_slot, s_axis)
                if k > 1 and (fused_in_teacher != k or t_size % k):
                    k = 1
                space = None
                if s_axis == s_slot.out_axis:
                    space = Space(s_node, "out")
                elif s_axis == s_slot.in_axis and s_size > 1:
                    space = Space(s_node, "in")
                if space is None:
                    axes.append(_axis_rule(t_size, s_size, k, None, AXIS_UNIFORM, offset))
                    continue
                rule = AxisRule(t_size, s_size, AXIS_FULL, None, k, offset=offset)  # settled in step 3
                axes.append(rule)
                member = Member(t_slot.name, t_axis, t_slot.shape[t_axis], offset, k, t_size // k,
                                t_data[ir.MODULE], space.side)
                structured = (s_node, space.side) in structured_axes and t_size != s_size
                pending.append(_Pending(rule, s_slot.name, s_axis, space, member, structured))
            if larger:
                too_large.append(f"{s_slot.name!r} {tuple(s_slot.shape)} vs teacher {t_slot.name!r} {tuple(t_slot.shape)}")
                record.teacher = record.teacher_shape = record.reshape = None
                record.reason = f"larger than its teacher match {t_slot.name} {list(t_slot.shape)} (--allow-partial)"
                continue
            used_teacher.add(t_slot.name)
            record.axes = axes
            if rescales(s_data[ir.KIND], s_slot):
                rescalable[s_slot.name] = s_slot.in_axis

    # 2. choose: one index set per coupled dimension (fused parts with the projection reading
    # them), and per head for attention laid out by heads
    pick = METHODS[method]
    linked = _link_fused_parts(coupled_spaces(student_graph), student_graph)
    dimensions: dict[tuple, list[_Pending]] = {}
    for p in pending:
        if not p.structured and p.member.size != p.rule.student_size // p.rule.blocks:
            dimensions.setdefault(_dimension(linked, p), []).append(p)
    chosen: dict[tuple, list[int]] = {}
    for key, members in dimensions.items():
        first = members[0]
        scores = None if scorer is None else (lambda m=members: scorer([p.member for p in m]))
        choice = Choice(first.member.size, first.rule.student_size // first.rule.blocks,
                        f"{first.student}:{first.axis}", seed, scores)
        chosen[key] = _checked(pick(choice), choice, method)
    by_axis: dict[tuple[int, str], list[Member]] = {}
    for p in pending:
        if p.structured:
            by_axis.setdefault((p.space.node, p.space.side), []).append(p.member)
    channel_cache: dict[tuple[int, str], torch.Tensor | None] = {}

    def channel_scores(node: int, side: str) -> torch.Tensor | None:
        if (node, side) not in channel_cache:
            members = by_axis.get((node, side))
            channel_cache[(node, side)] = scorer(members) if scorer is not None and members else None
        return channel_cache[(node, side)]

    head_indices: dict[tuple[int, str], list[int]] = {}
    for attention in layouts:
        head_indices.update(choose_heads(attention, pick, channel_scores, seed))
    if unobserved:
        notes.append(f"activation: {len(unobserved)} dimension(s) read by no observed layer (loose parameters "
                     f"only, e.g. {unobserved[0]}) were ranked by weight magnitude")
    if heads == WHOLE and not layouts:
        notes.append("--heads whole: no attention with a known head layout was found; heads were selected "
                     "as flat channels")

    # 3. settle: groups numbered in order of first use, every pending rule gets its indices
    groups: dict[tuple, GroupRecord] = {}
    heads_rule = rule_name(method, heads)
    for p in pending:
        rule, t_block, s_block = p.rule, p.member.size, p.rule.student_size // p.rule.blocks
        root = spaces.find(p.space)
        if p.structured:
            indices = head_indices[(p.space.node, p.space.side)]
            key = (root, t_block, s_block, tuple(indices))
            if key not in groups:
                groups[key] = GroupRecord(f"g{len(groups)}", t_block, s_block, [], heads_rule, list(indices))
            rule.rule, rule.group, rule.indices = heads_rule, groups[key].id, list(indices)
        else:
            key = (root, t_block, s_block)
            if key not in groups:
                equal = t_block == s_block
                indices = list(range(t_block)) if equal else chosen[_dimension(linked, p)]
                groups[key] = GroupRecord(f"g{len(groups)}", t_block, s_block, [], AXIS_FULL if equal else method,
                                          indices)
            settled = _axis_rule(rule.teacher_size, rule.student_size, rule.blocks, groups[key], method, rule.offset)
            rule.rule, rule.group, rule.step, rule.indices = settled.rule, settled.group, settled.step, settled.indices
        if f"{p.student}:{p.axis}" not in groups[key].members:  # the parts of an assembled tensor share it
            groups[key].members.append(f"{p.student}:{p.axis}")
    for record in records.values():
        for planned in (*record.parts, record):
            if planned.axes is not None:
                planned.rule = RULE_COPY if all(a.rule == AXIS_FULL for a in planned.axes) else RULE_SELECT
    if rescale:
        for name, in_axis in rescalable.items():
            for planned in records[name].parts or [records[name]]:
                planned.scale = input_scale(planned.axes[in_axis])

    deeper = [n for n, r in alignment.unmatched.items() if "has no teacher block" in r]
    problems = []
    if too_large:
        problems.append(f"{len(too_large)} student tensor(s) larger than their teacher match: " + "; ".join(too_large[:4])
                        + (" ..." if len(too_large) > 4 else ""))
    if deeper:
        stage = next(s for s in alignment.stages if any(b.teacher is None for b in s.blocks))
        problems.append(f"student {stage.student} is deeper than teacher {stage.teacher} "
                        f"({stage.student_depth} vs {stage.teacher_depth} blocks)")
    if problems and not allow_partial:
        raise SelectionError("; ".join(problems) + "; pass --allow-partial to keep the student's init for them")

    _add_untraced(records, student_state, _untraced_sources(alignment, teacher_graph, student_graph),
                  teacher_keys)
    _unify_ties(records, student_state)
    _check_dtypes(records, student_state, teacher_keys)
    ordered = [records[k] for k in student_state if k in records]
    unused = _unused_teacher(alignment, teacher_graph, teacher_keys, used_teacher, select_head)
    plan = SelectionPlan(
        teacher_spec=teacher_spec, student_spec=student_spec, method=method, layer_policy=layer_policy,
        frontend={"teacher": teacher_graph.graph[ir.FRONTEND], "student": student_graph.graph[ir.FRONTEND]},
        tensors=ordered, stages=alignment.stages, groups=sorted(groups.values(), key=lambda g: int(g.id[1:])),
        unused_teacher=unused, teacher_params=sum(_numel(s) for s, _ in teacher_keys.values()),
        student_params=sum(t.numel() for t in student_state.values()), notes=notes, heads=heads,
        rescale=rescale, seed=seed, calibration=calibration.description if calibration else None,
    )
    plan.coverage = coverage(plan)
    return plan


def _assembled_parts(t_nodes: list[int], teacher_graph: nx.DiGraph, s_node: int, s_slot: ir.TensorSlot,
                     structured_axes: set[tuple[int, str]]) -> tuple[list[TensorRecord], list[_Pending], str | None, str | None]:
    """Plan a fused student tensor (k blocks along its out axis) from k separate teacher layers.

    Part ``i`` is the student's ``i``-th block, read from the same-role tensor of ``t_nodes[i]`` as a
    whole teacher layer: its out and in axes are the student layer's channel spaces (so every part
    takes the indices its coupled dimension takes: the fused q/k/v rows follow the attention output
    projection's input), any other axis is local. Returns (parts, their pending axes, why the tensor
    keeps its init or None, the too-large entry or None).
    """
    k = len(t_nodes)
    shape = list(s_slot.shape)
    shape[s_slot.out_axis] //= k
    part_slot = ir.TensorSlot(s_slot.role, s_slot.name, tuple(shape), s_slot.out_axis, s_slot.in_axis)
    parts, pending = [], []
    for t_node in t_nodes:
        t_data = teacher_graph.nodes[t_node]
        t_slot = next((t for t in t_data[ir.TENSORS] if t.role == s_slot.role), None)
        view = None if t_slot is None else layout(t_slot, part_slot)
        if view is None:
            return [], [], f"teacher layer {t_data[ir.MODULE]} has no {s_slot.role!r} tensor to read a part from", None
        reshape, teacher_axes = view
        axes = []
        for s_axis, t_axis in enumerate(teacher_axes):
            s_size, t_size = shape[s_axis], 1 if t_axis is None else t_slot.shape[t_axis]
            if s_size > t_size:
                return [], [], (f"a part {shape} is larger than its teacher match {t_slot.name} {list(t_slot.shape)} "
                                "(--allow-partial)"), f"{s_slot.name!r} part {tuple(shape)} vs teacher {t_slot.name!r} {t_slot.shape}"
            side = "out" if s_axis == s_slot.out_axis else "in" if s_axis == s_slot.in_axis and s_size > 1 else None
            if side is None:
                axes.append(_axis_rule(t_size, s_size, 1, None, AXIS_UNIFORM, 0))
                continue
            axes.append(AxisRule(t_size, s_size, AXIS_FULL, None))  # settled with every other pending axis
            member = Member(t_slot.name, t_axis, t_size, 0, 1, t_size, t_data[ir.MODULE], side)
            pending.append(_Pending(axes[-1], s_slot.name, s_axis, Space(s_node, side), member,
                                    (s_node, side) in structured_axes and t_size != s_size))
        parts.append(TensorRecord(s_slot.name, shape, t_slot.name, list(t_slot.shape), RULE_SELECT,
                                  axes=axes, reshape=reshape))
    return parts, pending, None, None


def _scorer(method: str, source: TensorSource | None, calibration: Calibrator | None,
            unobserved: list[str]) -> Scorer | None:
    """Importance of a dimension's units for the methods that rank them, else None. Activation
    falls back to magnitude for a dimension without observed layers, appending it to ``unobserved``."""
    if method not in (magnitude.NAME, activation.NAME):
        return None
    if source is None:
        raise SelectionError(f"--method {method} reads the teacher's weights: give build_plan the teacher_source")
    by_weight = magnitude.scorer(source)
    if method == magnitude.NAME:
        return by_weight
    if calibration is None:
        raise SelectionError("--method activation ranks channels by the teacher's activations on real inputs: "
                             "pass calibration inputs (--calib FILE_OR_DIR)")
    by_activation = activation.scorer(calibration.channel_means())

    def scores(members: list[Member]) -> torch.Tensor | None:
        found = by_activation(members)
        if found is None:
            unobserved.append(f"{members[0].teacher}:{members[0].axis}")
            found = by_weight(members)
        return found

    return scores


def _link_fused_parts(spaces: UnionFind, graph: nx.DiGraph) -> UnionFind:
    """Couple each block of a fused projection's output with the layer reading the blocks' width
    (a fused q/k/v output with the attention output projection's input)."""
    for a, b in graph.edges:
        weight = next((s for s in graph.nodes[a][ir.TENSORS] if s.role == "weight"), None)
        k = _blocks(weight, weight.out_axis) if weight is not None and weight.out_axis is not None else 1
        out_size, in_size = space_size(graph, a, "out"), space_size(graph, b, "in")
        if k > 1 and out_size is not None and out_size == k * (in_size or 0):
            spaces.union(Space(a, "out"), Space(b, "in"))
    return spaces


def _dimension(linked: UnionFind, p: _Pending) -> tuple:
    return linked.find(p.space), p.member.size, p.rule.student_size // p.rule.blocks


def _checked(indices: list[int], choice: Choice, method: str) -> list[int]:
    assert len(indices) == choice.student_size and indices == sorted(set(indices)), \
        f"method {method} returned {len(indices)} indices for {choice.key}, expected {choice.student_size} ascending"
    assert not indices or (indices[0] >= 0 and indices[-1] < choice.teacher_size), f"{method}: index out of range"
    return indices


def _blocks(slot: ir.TensorSlot, axis: int) -> int:
    return dict(getattr(slot, "blocks", ())).get(axis, 1)


def _axis_rule(t_size: int, s_size: int, blocks: int, group: GroupRecord | None, method: str,
               offset: int) -> AxisRule:
    """The rule of a flat axis: its group's indices, or uniform ones for a local axis (group None)."""
    t_block, s_block = t_size // blocks, s_size // blocks
    gid = group.id if group else None
    if t_size == s_size:
        return AxisRule(t_size, s_size, AXIS_FULL, gid, blocks, offset=offset)
    indices = group.indices if group else uniform_indices(t_block, s_block)
    step = uniform_step(t_block, s_block) if method == AXIS_UNIFORM else None
    return AxisRule(t_size, s_size, method, gid, blocks, step, None if step else list(indices), offset)


def teacher_index(record: TensorRecord, group_indices: dict[str, list[int]]) -> list[list[int] | None]:
    """Teacher indices per *teacher* axis for a planned record (None: whole axis)."""
    assert record.axes is not None and record.teacher_shape is not None
    _, teacher_axes = _view_axes(record)
    index: list[list[int] | None] = [None] * len(record.teacher_shape)
    for rule, t_axis in zip(record.axes, teacher_axes, strict=True):
        if t_axis is None:
            continue
        if rule.rule == AXIS_FULL and rule.offset == 0 and rule.teacher_size == record.teacher_shape[t_axis]:
            continue  # the whole teacher axis
        if rule.rule == AXIS_FULL:
            index[t_axis] = list(range(rule.offset, rule.offset + rule.teacher_size))
            continue
        if rule.rule == INTERPOLATE:
            continue  # read whole, resized by to_student_layout
        if rule.group is not None:
            within = group_indices[rule.group]
        elif rule.step is not None:
            within = list(range(0, rule.teacher_size // rule.blocks, rule.step))
        else:
            within = rule.indices or []
        block = rule.teacher_size // rule.blocks
        index[t_axis] = [rule.offset + b * block + i for b in range(rule.blocks) for i in within]
    return index


def _view_axes(record: TensorRecord) -> tuple[str | None, list[int | None]]:
    rank = len(record.student_shape)
    if record.reshape == "transpose":
        return record.reshape, [1, 0]
    if record.reshape == "linear->conv1x1":
        return record.reshape, [0, 1] + [None] * (rank - 2)
    if record.reshape == "conv1x1->linear":
        return record.reshape, [0, 1]
    return None, list(range(rank))


def to_student_layout(tensor: torch.Tensor, record: TensorRecord) -> torch.Tensor:
    """Selected teacher elements in the student's layout (transposed, reshaped, resampled, rescaled)."""
    if record.reshape == "transpose":
        tensor = tensor.t()
    for axis, rule in enumerate(record.axes or []):
        if rule.rule == INTERPOLATE:
            tensor = resample(tensor, rule.student_size, axis)
    if record.scale is not None:
        tensor = rescale_tensor(tensor, record.scale)
    return tensor.reshape(record.student_shape)


def _untraced_sources(alignment: Alignment, teacher_graph: nx.DiGraph, student_graph: nx.DiGraph) -> dict[str, str]:
    """Student module path -> matched teacher module path, for tensors no traced op reads.

    A BatchNorm's ``num_batches_tracked`` only changes in training mode, so an eval-mode trace never
    reads it; it still belongs to the module whose other tensors were matched.
    """
    modules = {}
    for s_node, t_node in alignment.pairs.items():
        modules.setdefault(student_graph.nodes[s_node][ir.MODULE], teacher_graph.nodes[t_node][ir.MODULE])
    return modules


def _add_untraced(records: dict[str, TensorRecord], student_state: dict[str, torch.Tensor],
                  module_pairs: dict[str, str], teacher_keys: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Student tensors no traced op reads: a tensor of a matched module takes the same-role
    tensor of its teacher module when shapes agree; the rest keep init (tied aliases are settled
    afterwards by ``_unify_ties``)."""
    for key, tensor in student_state.items():
        if key in records:
            continue
        module, _, local = key.rpartition(".")
        teacher_module = module_pairs.get(module)
        teacher_key = None if teacher_module is None else f"{teacher_module}.{local}".lstrip(".")
        if teacher_key in teacher_keys and teacher_keys[teacher_key][0] == tuple(tensor.shape):
            full = [AxisRule(d, d, AXIS_FULL, None) for d in tensor.shape]
            records[key] = TensorRecord(key, list(tensor.shape), teacher_key, list(tensor.shape), RULE_COPY,
                                        module, full, reason="buffer of a matched layer, not read in eval mode")
        else:
            records[key] = TensorRecord(key, list(tensor.shape), None, None, RULE_STUDENT_INIT,
                                        reason="not read by any traced operation")


def _unify_ties(records: dict[str, TensorRecord], student_state: dict[str, torch.Tensor]) -> None:
    """Keys sharing one tensor (tied embeddings, an LM head tied to the input embedding) get one plan.

    Loading the student writes the storage once per key, so differing plans would overwrite each
    other; the member filled from the teacher (outside the head first) decides for all.
    """
    tied: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for key, tensor in student_state.items():
        if tensor.numel() and tensor.device.type != "meta":
            tied.setdefault((tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
                             tuple(tensor.shape)), []).append(key)
    for keys in tied.values():
        if len(keys) < 2:
            continue
        ranked = sorted(keys, key=lambda k: (records[k].teacher is None, records[k].is_head, keys.index(k)))
        base = records[ranked[0]]
        for key in ranked[1:]:
            record = records[key]
            record.teacher, record.teacher_shape, record.rule = base.teacher, base.teacher_shape, base.rule
            record.axes, record.reshape, record.scale = base.axes, base.reshape, base.scale
            record.parts, record.parts_axis = base.parts, base.parts_axis
            record.reason = f"tied to {base.student}"


def _check_dtypes(records: dict[str, TensorRecord], student_state: dict[str, torch.Tensor],
                  teacher_keys: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    for record in records.values():
        if record.teacher is None or record.teacher not in teacher_keys:
            continue
        t_dtype, s_dtype = teacher_keys[record.teacher][1], student_state[record.student].dtype
        if t_dtype != s_dtype:
            note = f"converted {str(t_dtype).removeprefix('torch.')} -> {str(s_dtype).removeprefix('torch.')}"
            record.reason = f"{record.reason}; {note}" if record.reason else note


def _unused_teacher(alignment: Alignment, teacher_graph: nx.DiGraph,
                    teacher_keys: dict[str, tuple[tuple[int, ...], torch.dtype]], used: set[str],
                    select_head: bool) -> list[UnusedTeacher]:
    owner: dict[str, int] = {}
    for n in teacher_graph.nodes:
        for slot in teacher_graph.nodes[n][ir.TENSORS]:
            owner.setdefault(slot.name, n)
    dropped_blocks = {block: _dropped_reason(stage) for stage in alignment.stages for block in _dropped(stage)}
    paired = set(alignment.pairs.values())
    out = []
    for key, (shape, _) in teacher_keys.items():
        if key in used:
            continue
        node = owner.get(key)
        dropped = next((reason for b, reason in dropped_blocks.items() if key.startswith(b + ".")), None)
        if node is None:
            reason = "not read by any traced operation"
        elif node in alignment.teacher_head and not select_head:
            reason = "classifier head (not selected)"
        elif dropped is not None:
            reason = dropped
        elif node in paired:
            reason = "its layer is matched but the student has no tensor in this role or it did not fit"
        else:
            reason = "no student layer matches it structurally"
        out.append(UnusedTeacher(key, list(shape), reason))
    return out


def _dropped(stage: StagePair) -> list[str]:
    """Teacher blocks of a stage no student block takes."""
    taken = {b.teacher for b in stage.blocks}
    return [b for b in stage.teacher_blocks if b not in taken]


def _dropped_reason(stage: StagePair) -> str:
    if stage.policy == "first":
        return "block beyond the student's depth (layer policy: first-N)"
    return f"block not selected (layer policy: {stage.policy})"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def coverage(plan: SelectionPlan) -> Coverage:
    selected = sum(r.numel for r in plan.tensors if r.rule != RULE_STUDENT_INIT)
    total = sum(r.numel for r in plan.tensors)
    selected_nh = sum(r.numel for r in plan.tensors if r.rule != RULE_STUDENT_INIT and not r.is_head)
    total_nh = sum(r.numel for r in plan.tensors if not r.is_head)
    return Coverage(selected, total, selected / total if total else 0.0, selected_nh, total_nh,
                    selected_nh / total_nh if total_nh else 0.0)
