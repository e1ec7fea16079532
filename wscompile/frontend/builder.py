"""Build the IR from an fx-style graph, whichever tracer produced it.

Both frontends hand over a ``torch.fx.Graph`` plus two facts per node: which nodes are model
tensors (``get_attr`` in torch.fx, lifted placeholders in torch.export) and which are calls of
leaf layers that own tensors (``call_module`` in torch.fx only). The builder walks the graph once
in topological order and keeps, per fx node:

- ``tensor_expr[n]``: the model tensors ``n`` is computed from when it reads no model input
  (``self.gamma.reshape(1, -1, 1, 1)``, a standardized conv weight). Such nodes are not data.
- ``frontier[n]``: the components whose outputs reach ``n`` through tensor-free operations.

A node becomes a component when it is a leaf layer with tensors, or a known functional op
(``linear``, ``conv2d``, ``layer_norm``, ``embedding``, ...) reading model tensors in a tensor role
(weight, bias, running stats), or an RMSNorm written with tensor ops (``weight * x *
rsqrt(mean(x^2) + eps)``, as HF Llama and T5 write it), which becomes the ``rms_norm`` component
``nn.RMSNorm`` is. A model tensor reaching any other op becomes a loose-parameter component of its own. Edges run from every component in ``frontier`` of a data input to the
component consuming it, labelled with the argument positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx
import torch
import torch.fx

from wscompile import ir
from wscompile.frontend.layout_rules import projection_layout

MODEL_INPUT = -1  # frontier marker for "a model input"

# Argument names of functional ops that read tensors, by op name (aten schemas use the same names).
FUNCTIONAL_ARGS: dict[str, tuple[str, ...]] = {
    "linear": ("input", "weight", "bias"),
    "conv1d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv3d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
    "rms_norm": ("input", "normalized_shape", "weight", "eps"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "instance_norm": ("input", "running_mean", "running_var", "weight", "bias"),
    # torch.nn.functional.embedding takes (input, weight); aten.embedding takes (weight, indices).
    "embedding": ("input", "weight"),
    "addmm": ("bias", "input", "weight"),  # transformers' Conv1D: bias + x @ weight, weight is (in, out)
    # Stacked experts (MoE): tokens grouped by expert times one (in, out) matrix per expert.
    "grouped_mm_fallback": ("input", "weight", "offs"),  # transformers' grouped matmul
    "_grouped_mm": ("input", "weight", "offs"),  # aten
}
# Ops multiplying by a stack of per-expert matrices: the weight's axis 0 indexes experts.
GROUPED_MATMULS = {"grouped_mm_fallback", "_grouped_mm"}
ATEN_ALIASES = {
    "_native_batch_norm_legit_no_training": "batch_norm",
    "_native_batch_norm_legit": "batch_norm",
    "native_batch_norm": "batch_norm",
    "native_layer_norm": "layer_norm",
    "native_group_norm": "group_norm",
    "_fused_rms_norm": "rms_norm",
}
# Roles that carry data into the op, not tensors of the op.
DATA_ROLES = {"input"}

MODULE_OPS: dict[type, str] = {
    torch.nn.Linear: "linear",
    torch.nn.Conv1d: "conv1d",
    torch.nn.Conv2d: "conv2d",
    torch.nn.Conv3d: "conv3d",
    torch.nn.ConvTranspose1d: "conv_transpose1d",
    torch.nn.ConvTranspose2d: "conv_transpose2d",
    torch.nn.ConvTranspose3d: "conv_transpose3d",
    torch.nn.LayerNorm: "layer_norm",
    torch.nn.GroupNorm: "group_norm",
    torch.nn.BatchNorm1d: "batch_norm",
    torch.nn.BatchNorm2d: "batch_norm",
    torch.nn.BatchNorm3d: "batch_norm",
    torch.nn.SyncBatchNorm: "batch_norm",
    torch.nn.InstanceNorm1d: "instance_norm",
    torch.nn.InstanceNorm2d: "instance_norm",
    torch.nn.InstanceNorm3d: "instance_norm",
    torch.nn.Embedding: "embedding",
    torch.nn.MultiheadAttention: "multihead_attention",
    torch.nn.PReLU: "prelu",
}
if hasattr(torch.nn, "RMSNorm"):
    MODULE_OPS[torch.nn.RMSNorm] = "rms_norm"


def op_kind(op: str) -> str:
    if op in ("linear", "addmm") or op in GROUPED_MATMULS:
        return ir.KIND_LINEAR
    if op.startswith("conv"):
        return ir.KIND_CONV
    if op.endswith("_norm"):
        return ir.KIND_NORM
    if op == "embedding":
        return ir.KIND_EMBEDDING
    if op == "multihead_attention":
        return ir.KIND_ATTENTION
    return ir.KIND_OTHER


def slot_axes(op: str, role: str, shape: tuple[int, ...]) -> tuple[int | None, int | None]:
    """(out_axis, in_axis) of a tensor with ``role`` in ``op``: which axes index channels."""
    rank = len(shape)
    if rank == 0:
        return None, None
    kind = op_kind(op)
    if op == "addmm":
        return (1, 0) if role == "weight" else (0, None)
    if kind in (ir.KIND_LINEAR, ir.KIND_CONV):
        if role != "weight":
            return 0, None  # bias: one entry per output channel
        if op.startswith("conv_transpose"):
            return 1, 0
        return 0, (1 if rank > 1 else None)
    if kind == ir.KIND_EMBEDDING and role == "weight":
        return rank - 1, None  # axis 0 indexes the vocabulary, not channels
    if kind == ir.KIND_ATTENTION:
        if role.startswith("in_proj"):
            return None, (1 if rank > 1 else None)  # output axis is the internal q/k/v space
        if role == "out_proj.weight":
            return 0, None
        if role == "out_proj.bias":
            return 0, None
        return None, None
    if kind == ir.KIND_NORM or role in ("bias", "weight"):
        return 0, 0
    return rank - 1, None


def slot_blocks(op: str, role: str) -> tuple[tuple[int, int], ...]:
    # nn.MultiheadAttention stacks q, k and v along axis 0 of its input projection.
    if op == "multihead_attention" and role.startswith("in_proj"):
        return ((0, 3),)
    return ()


@dataclass
class Source:
    """What a frontend knows about its fx graph beyond the graph itself."""

    graph: torch.fx.Graph
    tensor_name: Callable[[torch.fx.Node], str | None]  # state_dict key if the node is a model tensor
    leaf_module: Callable[[torch.fx.Node], tuple[str, str, list[tuple[str, str, tuple[int, ...]]]] | None]
    # ^ for a call of a tensor-owning leaf layer: (op, module path, [(role, key, shape)])
    op_name: Callable[[torch.fx.Node], str | None]  # normalized op name of call_function/call_method
    shape: Callable[[torch.fx.Node], tuple[int, ...] | None]  # output shape of a node if known
    tensor_shape: Callable[[str], tuple[int, ...]]  # shape of a model tensor by key
    frontend: str
    module_tree: dict[str, list[str]]
    arg_names: dict[str, tuple[str, ...]] | None = None  # per-op argument names overriding FUNCTIONAL_ARGS


def _flat_inputs(node: torch.fx.Node, names: tuple[str, ...] | None) -> Iterator[tuple[int, str | None, torch.fx.Node]]:
    """(position, argument name, input node) for every fx node among the node's inputs."""
    position = 0
    for i, arg in enumerate(node.args):
        for sub in _nodes_in(arg):
            yield position, (names[i] if names and i < len(names) else None), sub
        position += 1
    for key, arg in node.kwargs.items():
        index = names.index(key) if names and key in names else position
        for sub in _nodes_in(arg):
            yield index, key, sub
        position += 1


def _nodes_in(arg: Any) -> Iterator[torch.fx.Node]:
    if isinstance(arg, torch.fx.Node):
        yield arg
    elif isinstance(arg, (list, tuple)):
        for a in arg:
            yield from _nodes_in(a)
    elif isinstance(arg, dict):
        for a in arg.values():
            yield from _nodes_in(a)


def _owner(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def build_ir(src: Source) -> nx.DiGraph:
    graph = nx.DiGraph()
    tensor_expr: dict[torch.fx.Node, frozenset[str]] = {}
    frontier: dict[torch.fx.Node, frozenset[int]] = {}
    shape_expr: set[torch.fx.Node] = set()  # sizes read off tensors: they carry no data
    loose: dict[str, int] = {}  # tensor key -> loose-parameter component id
    fx_of: dict[int, torch.fx.Node] = {}
    outputs: set[int] = set()

    def add_component(op: str, module: str, slots: list[ir.TensorSlot], fx_node: torch.fx.Node) -> int:
        cid = len(fx_of)
        graph.add_node(
            cid,
            **{
                ir.KIND: op_kind(op) if op != "param" else ir.KIND_PARAM,
                ir.OP: op,
                ir.TENSORS: slots,
                ir.MODULE: module,
                ir.ORDER: cid,
                ir.OUT_SHAPE: src.shape(fx_node),
                ir.HEADS: None,
                ir.ROTARY: False,
                ir.CONV_GROUPS: None,
            },
        )
        fx_of[cid] = fx_node
        return cid

    def loose_component(key: str, fx_node: torch.fx.Node) -> int:
        if key not in loose:
            shape = src.tensor_shape(key)
            out_axis, in_axis = slot_axes("param", "param", shape)
            loose[key] = add_component(
                "param", _owner(key), [ir.TensorSlot("param", key, shape, out_axis, in_axis)], fx_node
            )
        return loose[key]

    for node in src.graph.nodes:
        if node.op == "placeholder":
            key = src.tensor_name(node)
            if key is None:
                frontier[node] = frozenset({MODEL_INPUT})
            else:
                tensor_expr[node] = frozenset({key})
            continue
        if node.op == "get_attr":
            key = src.tensor_name(node)
            tensor_expr[node] = frozenset({key} if key else ())
            continue
        if node.op == "output":
            for _, _, sub in _flat_inputs(node, None):
                outputs |= frontier.get(sub, frozenset())
                for key in tensor_expr.get(sub, ()):
                    outputs.add(loose_component(key, node))
            continue

        leaf = src.leaf_module(node)
        op = leaf[0] if leaf else src.op_name(node)
        if op in SHAPE_OPS or (node.op == "call_function" and op == "getattr" and "shape" in node.args):
            shape_expr.add(node)
            continue
        names = ((src.arg_names or {}).get(op) or FUNCTIONAL_ARGS.get(op)) if op else None
        inputs = [(p, r, sub) for p, r, sub in _flat_inputs(node, names) if sub not in shape_expr]
        if leaf is None and node.all_input_nodes and all(sub in shape_expr for sub in node.all_input_nodes):
            shape_expr.add(node)  # arithmetic on sizes
            continue
        data = [(p, sub) for p, _, sub in inputs if sub not in tensor_expr]
        if (
            not data
            and leaf is None
            and not (names and any(r not in DATA_ROLES for _, r, s in inputs if s in tensor_expr and tensor_expr[s]))
        ):
            # Computed from model tensors and constants only: a tensor expression, not data.
            tensor_expr[node] = frozenset().union(*(tensor_expr[s] for _, _, s in inputs)) if inputs else frozenset()
            continue

        rms = None if leaf is not None or names is not None else _rms_norm_weight(op, inputs, tensor_expr, src)
        if rms is not None and rms[0] not in loose:
            # an RMSNorm written with tensor ops is the same component as nn.RMSNorm
            key, normalized = rms
            shape = src.tensor_shape(key)
            slot = ir.TensorSlot("weight", key, shape, *slot_axes("rms_norm", "weight", shape))
            cid = add_component("rms_norm", _owner(key), [slot], node)
            for source in frontier.get(normalized, frozenset()):
                _add_edge(graph, source, cid, 0)
            frontier[node] = frozenset({cid})
            continue

        slots: list[ir.TensorSlot] = []
        module = ""
        if leaf is not None:
            op, module, tensors = leaf
            for role, key, shape in tensors:
                out_axis, in_axis = slot_axes(op, role, shape)
                slots.append(ir.TensorSlot(role, key, shape, out_axis, in_axis, slot_blocks(op, role)))
        elif names is not None:
            for _, role, sub in inputs:
                if sub in tensor_expr and role not in DATA_ROLES:
                    for key in sorted(tensor_expr[sub]):
                        shape = src.tensor_shape(key)
                        if op in GROUPED_MATMULS:
                            out_axis, in_axis = _expert_axes(shape, src.shape(node))
                        else:
                            out_axis, in_axis = slot_axes(op, role or "weight", shape)
                        slots.append(ir.TensorSlot(role or "weight", key, shape, out_axis, in_axis))
            if slots:
                module = _owner(slots[0].name)

        if slots:
            # model tensors read in the data role (a weight used as input, e.g. an attention-pooling
            # probe) are loose parameters; made first, so they precede their consumer in execution order
            loose_inputs = [
                (position, loose_component(key, sub))
                for position, role, sub in inputs
                if sub in tensor_expr and role in DATA_ROLES
                for key in sorted(tensor_expr[sub])
            ]
            cid = add_component(op, module, slots, node)
            for position, sub in data:
                for source in frontier.get(sub, frozenset()):
                    _add_edge(graph, source, cid, position)
            for position, source in loose_inputs:
                _add_edge(graph, source, cid, position)
            frontier[node] = frozenset({cid})
        else:
            reach: set[int] = set()
            for _, _, sub in inputs:
                if sub in tensor_expr:
                    reach |= {loose_component(key, sub) for key in sorted(tensor_expr[sub])}
                else:
                    reach |= frontier.get(sub, frozenset())
            frontier[node] = frozenset(reach)

    input_nodes = sorted({b for a, b in graph.edges if a == MODEL_INPUT})
    if graph.has_node(MODEL_INPUT):
        graph.remove_node(MODEL_INPUT)
    graph.graph.update(
        {
            ir.MODULES: src.module_tree,
            ir.INPUT_NODES: input_nodes,
            ir.OUTPUT_NODES: sorted(o for o in outputs if o != MODEL_INPUT),
            ir.FRONTEND: src.frontend,
        }
    )
    _annotate_layouts(graph, fx_of, src)
    return graph


CASTS = {"to", "float", "type_as", "_to_copy", "contiguous", "clone"}


def _rms_norm_weight(
    op: str | None,
    inputs: list[tuple[int, str | None, torch.fx.Node]],
    tensor_expr: dict[torch.fx.Node, frozenset[str]],
    src: Source,
) -> tuple[str, torch.fx.Node] | None:
    """(weight key, normalized input) when the op is ``weight * x * rsqrt(mean(x^2) + eps)`` (HF Llama,
    T5) or ``weight * x / sqrt(...)``: one 1-D model tensor, read as it is, times RMS-normalized data."""
    if op != "mul" or len(inputs) != 2:
        return None
    weights = [sub for _, _, sub in inputs if sub in tensor_expr]
    data = [sub for _, _, sub in inputs if sub not in tensor_expr]
    if len(weights) != 1 or len(data) != 1:
        return None
    key = src.tensor_name(weights[0])
    if key is None or len(src.tensor_shape(key)) != 1 or not _rms_normalized(data[0], src):
        return None
    return key, data[0]


def _through_casts(node: Any, src: Source) -> Any:
    while isinstance(node, torch.fx.Node) and (src.op_name(node) or "") in CASTS and node.args:
        node = node.args[0]
    return node


def _rms_normalized(node: torch.fx.Node, src: Source) -> bool:
    """``node`` computes ``x * rsqrt(mean(x^2) + eps)`` or ``x / sqrt(mean(x^2) + eps)``, casts aside."""
    node = _through_casts(node, src)
    name = src.op_name(node)
    args = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if name not in ("mul", "div") or len(args) != 2:
        return False
    orders = [args, args[::-1]] if name == "mul" else [args]
    for x, scale in orders:
        root = _through_casts(scale, src)
        if src.op_name(root) != ("rsqrt" if name == "mul" else "sqrt") or not root.args:
            continue
        mean = _through_casts(root.args[0], src)
        if src.op_name(mean) == "add":  # + eps
            mean = next((_through_casts(a, src) for a in mean.args if isinstance(a, torch.fx.Node)), None)
        if mean is None or src.op_name(mean) != "mean" or not mean.args:
            continue
        square = _through_casts(mean.args[0], src)
        sq_name, sq_args = src.op_name(square), getattr(square, "args", ())
        squared = len(sq_args) == 2 and (
            sq_name == "pow" and sq_args[1] == 2 or sq_name == "mul" and sq_args[0] is sq_args[1]
        )
        if squared and _through_casts(sq_args[0], src) is _through_casts(x, src):
            return True
    return False


def _expert_axes(shape: tuple[int, ...], out_shape: tuple[int, ...] | None) -> tuple[int | None, int | None]:
    """(out_axis, in_axis) of a stacked experts weight ``(E, A, B)`` in a grouped matmul.

    The output's last axis says which of A and B is the output width: transformers stores experts as
    ``(E, out, in)`` and transposes them for the matmul, others store ``(E, in, out)``. Axis 0 indexes
    experts and is selected on its own.
    """
    if len(shape) != 3:
        return None, None
    width = out_shape[-1] if out_shape else None
    if width == shape[2] and width != shape[1]:
        return 2, 1
    return 1, 2


def _add_edge(graph: nx.DiGraph, source: int, target: int, position: int) -> None:
    if source == target:
        return
    if source == MODEL_INPUT:
        graph.add_node(MODEL_INPUT)
    if graph.has_edge(source, target):
        graph.edges[source, target][ir.ARG] = graph.edges[source, target][ir.ARG] | {position}
    else:
        graph.add_edge(source, target, **{ir.ARG: frozenset({position})})


# Ops whose result depends only on their input's size (a size, or a new tensor of constants such as
# the attention mask torchvision's shifted windows build with ``x.new_zeros``): an edge through them
# would say a layer reads another's output.
SHAPE_OPS = {
    "size",
    "dim",
    "sym_size",
    "numel",
    "sym_numel",
    "sym_stride",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
}


def _annotate_layouts(graph: nx.DiGraph, fx_of: dict[int, torch.fx.Node], src: Source) -> None:
    """Annotate convolution groups, and the fused blocks, heads and rotary pairs of each linear
    projection's output as the rules of ``layout_rules`` read them off the ops consuming it."""
    for cid, node in fx_of.items():
        data = graph.nodes[cid]
        if data[ir.KIND] == ir.KIND_CONV:
            weight = next((s for s in data[ir.TENSORS] if s.role == "weight"), None)
            out_shape = data[ir.OUT_SHAPE]
            if weight is not None and len(weight.shape) > 1 and out_shape is not None and len(out_shape) > 1:
                in_channels = _conv_in_channels(node, src)
                if in_channels:
                    data[ir.CONV_GROUPS] = max(1, in_channels // weight.shape[1])
        if data[ir.KIND] != ir.KIND_LINEAR:
            continue
        out_shape = data[ir.OUT_SHAPE]
        if not out_shape:
            continue
        layout = projection_layout(node, src)
        if layout.heads:
            data[ir.HEADS] = layout.heads
            data[ir.ROTARY] = layout.rotary
        if layout.blocks > 1:
            data[ir.TENSORS] = [
                replace(s, blocks=((s.out_axis, layout.blocks),)) if s.out_axis is not None else s
                for s in data[ir.TENSORS]
            ]


def _conv_in_channels(node: torch.fx.Node, src: Source) -> int | None:
    for sub in node.all_input_nodes:
        shape = src.shape(sub)
        if shape and src.tensor_name(sub) is None and len(shape) >= 2:
            return shape[1]
    return None
