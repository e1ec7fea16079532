"""Turn an alignment into a selection plan: which teacher elements fill each student tensor.

For every matched component pair, tensors pair up by role (weight with weight, running_mean with
running_mean). Each student axis gets an ``AxisRule``: the teacher axis it reads, the coupled
group it belongs to (``matching/coupling.py``), fused blocks along it, and the indices chosen by
the selection method for its group. The method only ever sees ``(teacher_size, student_size,
group)``, so importance-based methods plug in here without touching the rest.

Layouts that differ but hold the same numbers are read through a view: a Linear weight
``(O, I)`` feeds a 1x1 convolution ``(O, I, 1, 1)`` and back, and transformers' ``Conv1D`` stores
``(I, O)`` where a Linear stores ``(O, I)``.
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import torch

from wscompile import ir
from wscompile.errors import SelectionError
from wscompile.matching.align import Alignment
from wscompile.matching.coupling import Space, coupled_spaces
from wscompile.passes.heads import RULE as HEADS_RULE
from wscompile.passes.heads import head_layouts
from wscompile.passes.interpolate import RULE as INTERPOLATE
from wscompile.passes.interpolate import resamplable, resample
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
    TensorRecord,
    UnusedTeacher,
)

AXIS_PREFIX = "prefix"  # the first student_size ids of a token/position table

HEAD_REASON = "classifier head: kept at the student's init (pass --select-head to select it)"

# A method maps (teacher_size, student_size, group id) to the kept teacher indices.
Method = Callable[[int, int, str | None], list[int]]


def _uniform(teacher_size: int, student_size: int, group: str | None) -> list[int]:
    return uniform_indices(teacher_size, student_size)


METHODS: dict[str, Method] = {"uniform": _uniform}


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
) -> SelectionPlan:
    """Build the SelectionPlan; raises SelectionError for a student larger than its teacher.

    ``teacher_keys`` maps every teacher state_dict key to (shape, dtype); no teacher data is read.
    """
    if method not in METHODS:
        raise SelectionError(f"unknown selection method {method!r}; choose from {', '.join(METHODS)}")
    choose = METHODS[method]
    spaces = coupled_spaces(student_graph)
    structured = head_layouts(alignment, teacher_graph, student_graph)
    groups: dict[tuple, GroupRecord] = {}
    records: dict[str, TensorRecord] = {}
    too_large: list[str] = []
    used_teacher: set[str] = set()

    def group_for(space: Space | None, t_size: int, s_size: int) -> GroupRecord | None:
        if space is None:
            return None
        key = (spaces.find(space), t_size, s_size)
        if key not in groups:
            gid = f"g{len(groups)}"
            indices = list(range(t_size)) if t_size == s_size else choose(t_size, s_size, gid)
            groups[key] = GroupRecord(gid, t_size, s_size, [], AXIS_FULL if t_size == s_size else method, indices)
        return groups[key]

    def structured_group(space: Space, t_size: int, s_size: int, indices: list[int]) -> GroupRecord:
        key = (spaces.find(space), t_size, s_size, tuple(indices))
        if key not in groups:
            groups[key] = GroupRecord(f"g{len(groups)}", t_size, s_size, [], HEADS_RULE, list(indices))
        return groups[key]

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
                explicit = structured.get((s_node, space.side)) if space and t_size != s_size and k == 1 else None
                if explicit is not None:
                    group = structured_group(space, t_size, s_size, explicit)
                    axes.append(AxisRule(t_size, s_size, HEADS_RULE, group.id, 1, None, explicit, offset))
                else:
                    group = group_for(space, t_size // k, s_size // k)
                    axes.append(_axis_rule(t_size, s_size, k, group, method, choose, offset))
                if group is not None:
                    group.members.append(f"{s_slot.name}:{s_axis}")
            if larger:
                too_large.append(f"{s_slot.name!r} {tuple(s_slot.shape)} vs teacher {t_slot.name!r} {tuple(t_slot.shape)}")
                record.teacher = record.teacher_shape = record.reshape = None
                record.reason = f"larger than its teacher match {t_slot.name} {list(t_slot.shape)} (--allow-partial)"
                continue
            used_teacher.add(t_slot.name)
            record.axes = axes
            record.rule = RULE_COPY if all(a.rule == AXIS_FULL for a in axes) else RULE_SELECT

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
        teacher_spec=teacher_spec, student_spec=student_spec, method=method, layer_policy="first",
        frontend={"teacher": teacher_graph.graph[ir.FRONTEND], "student": student_graph.graph[ir.FRONTEND]},
        tensors=ordered, stages=alignment.stages, groups=sorted(groups.values(), key=lambda g: int(g.id[1:])),
        unused_teacher=unused, teacher_params=sum(_numel(s) for s, _ in teacher_keys.values()),
        student_params=sum(t.numel() for t in student_state.values()),
    )
    plan.coverage = coverage(plan)
    return plan


def _blocks(slot: ir.TensorSlot, axis: int) -> int:
    return dict(getattr(slot, "blocks", ())).get(axis, 1)


def _axis_rule(t_size: int, s_size: int, blocks: int, group: GroupRecord | None, method: str,
               choose: Method, offset: int) -> AxisRule:
    t_block, s_block = t_size // blocks, s_size // blocks
    gid = group.id if group else None
    if t_size == s_size:
        return AxisRule(t_size, s_size, AXIS_FULL, gid, blocks, offset=offset)
    indices = group.indices if group else choose(t_block, s_block, None)
    step = uniform_step(t_block, s_block) if method == AXIS_UNIFORM else None
    return AxisRule(t_size, s_size, method, gid, blocks, step, None if step else list(indices), offset)


def teacher_index(record: TensorRecord, group_indices: dict[str, list[int]]) -> list[list[int] | None]:
    """Teacher indices per *teacher* axis for a planned record (None: whole axis)."""
    assert record.axes is not None and record.teacher_shape is not None
    _, teacher_axes = _view_axes(record)
    index: list[list[int] | None] = [None] * len(record.teacher_shape)
    for rule, t_axis in zip(record.axes, teacher_axes):
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
    """Selected teacher elements in the student's layout (transposed, reshaped, resampled)."""
    if record.reshape == "transpose":
        tensor = tensor.t()
    for axis, rule in enumerate(record.axes or []):
        if rule.rule == INTERPOLATE:
            tensor = resample(tensor, rule.student_size, axis)
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
            record.axes, record.reshape = base.axes, base.reshape
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
    dropped_blocks = {b for s in alignment.stages for b in s.teacher_blocks[s.student_depth:]}
    paired = set(alignment.pairs.values())
    out = []
    for key, (shape, _) in teacher_keys.items():
        if key in used:
            continue
        node = owner.get(key)
        if node is None:
            reason = "not read by any traced operation"
        elif node in alignment.teacher_head and not select_head:
            reason = "classifier head (not selected)"
        elif any(key.startswith(b + ".") for b in dropped_blocks):
            reason = "block beyond the student's depth (layer policy: first-N)"
        elif node in paired:
            reason = "its layer is matched but the student has no tensor in this role or it did not fit"
        else:
            reason = "no student layer matches it structurally"
        out.append(UnusedTeacher(key, list(shape), reason))
    return out


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
