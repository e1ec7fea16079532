"""The IR: a networkx graph of parameter-owning operations ("components") and the data flow between them.

Every frontend produces the same graph:

- one node per component: a call of a layer that owns tensors (linear, conv, norm, embedding, a
  fused attention module) or a loose parameter used by plain tensor ops (``cls_token``,
  ``pos_embed``, a layer-scale ``gamma``). Node ids are integers in execution order.
- an edge ``a -> b`` when data flows from ``a``'s output to ``b``'s input through operations that
  own no tensors (activations, reshapes, residual adds, attention arithmetic). Parameter-free
  operations are contracted away, so two implementations of the same layer (``nn.Linear`` vs a
  1x1 conv, fused vs manual attention) give the same shape of graph.

Node attributes are keyed by the constants below (as torch.fx's ShapeProp keys ``node.meta``).
Graph-level attributes (``graph.graph``) describe the module tree the components live in.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from wscompile.errors import TraceError

# Node attributes.
KIND = "kind"  # one of the KIND_* values
OP = "op"  # finer operation name: "linear", "conv2d", "layer_norm", "batch_norm", "add", ...
TENSORS = "tensors"  # list[TensorSlot]: the state_dict tensors the component reads
MODULE = "module"  # dotted path of the module owning the tensors ("" for the root)
ORDER = "order"  # execution order, equal to the node id
OUT_SHAPE = "out_shape"  # shape of the component's output (tuple) or None if unknown
FUSED_BLOCKS = "fused_blocks"  # output channels are k stacked logical blocks (fused q/k/v: 3)
HEADS = "heads"  # attention heads read from the output layout, None if not an attention projection
ROTARY = "rotary"  # the heads' dims are rotated in pairs (i, i + d/2) by rotary position embeddings
CONV_GROUPS = "conv_groups"  # groups of a convolution (depthwise: == channels)

# Edge attributes.
ARG = "arg"  # position of the consuming argument at the target

# Graph attributes.
MODULES = "modules"  # dict[str, list[str]]: module path -> direct child module paths, declaration order
INPUT_NODES = "input_nodes"  # components reading a model input directly
OUTPUT_NODES = "output_nodes"  # components whose output reaches a model output directly
FRONTEND = "frontend"  # name of the frontend that produced the graph

# Component kinds.
KIND_LINEAR = "linear"
KIND_CONV = "conv"
KIND_NORM = "norm"
KIND_EMBEDDING = "embedding"
KIND_ATTENTION = "attention"  # a fused attention module owning its projections (nn.MultiheadAttention)
KIND_PARAM = "param"  # a loose parameter consumed by plain tensor ops
KIND_OTHER = "other"


@dataclass(frozen=True)
class TensorSlot:
    """One state_dict tensor read by a component, and how its axes relate to the data."""

    role: str  # what the tensor is to its op: "weight", "bias", "running_mean", "in_proj_weight", "param"
    name: str  # state_dict key
    shape: tuple[int, ...]
    out_axis: int | None  # axis indexing the component's output channels, None if none
    in_axis: int | None  # axis indexing the component's input channels, None if none
    blocks: tuple[tuple[int, int], ...] = ()  # (axis, k): the axis stacks k logical blocks (fused q/k/v)

    def blocks_on(self, axis: int) -> int:
        """How many logical blocks ``axis`` stacks (1 unless fused)."""
        return dict(self.blocks).get(axis, 1)


def components(graph: nx.DiGraph) -> list[int]:
    """Component node ids in execution order."""
    return sorted(graph.nodes)


def tensor_names(graph: nx.DiGraph) -> set[str]:
    return {slot.name for n in graph.nodes for slot in graph.nodes[n][TENSORS]}


def verify(graph: nx.DiGraph) -> None:
    """Check the invariants every frontend must establish.

    Raises:
        TraceError: an invariant does not hold (a frontend bug on this model), naming the nodes and
            their modules, so the next frontend can be tried and the user told where.
    """

    def where(node: int) -> str:
        data = graph.nodes[node]
        return f"node {node} ({data.get(OP, '?')} in {data.get(MODULE) or 'the root module'})"

    for node, data in graph.nodes(data=True):
        missing = [key for key in (KIND, OP, TENSORS, MODULE, ORDER) if key not in data]
        if missing:
            raise TraceError(f"IR {where(node)} lacks {', '.join(missing)}")
        if data[ORDER] != node:
            raise TraceError(f"IR {where(node)} has execution order {data[ORDER]}")
        if not data[TENSORS]:
            raise TraceError(f"IR {where(node)} owns no tensor")
    for a, b in graph.edges:
        if a >= b:
            raise TraceError(f"IR edge from {where(a)} to {where(b)} goes against execution order")
    if not nx.is_directed_acyclic_graph(graph):
        raise TraceError(f"IR graph has a cycle through {where(nx.find_cycle(graph)[0][0])}")
    missing = [key for key in (MODULES, INPUT_NODES, OUTPUT_NODES, FRONTEND) if key not in graph.graph]
    if missing:
        raise TraceError(f"IR graph lacks {', '.join(missing)}")
