"""torch.fx frontend: ``symbolic_trace`` with torch's own layers as leaves, shapes by ShapeProp.

Layers defined in ``torch.nn`` (Linear, Conv2d, LayerNorm, ...) stay ``call_module`` leaves; every
other module is traced through, so a custom norm that calls ``F.layer_norm`` on its own
parameters shows up as a functional op reading ``get_attr`` tensors. Both become components.

A function kept opaque by ``torch.fx.wrap`` (torchvision's ``shifted_window_attention``) hides what
it does with the model tensors handed to it, so a trace holding one fails here and torch.export,
which traces through it, takes the model.
"""

from __future__ import annotations

import types

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from wscompile.errors import TraceError
from wscompile.frontend.builder import MODULE_OPS, Source, build_ir

NAME = "fx"


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in MODULE_OPS or super().is_leaf_module(m, module_qualified_name)


def _function_name(node: torch.fx.Node) -> str | None:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return None


def _refuse_opaque_calls(graph: torch.fx.Graph, state: dict[str, torch.Tensor]) -> None:
    """Raise TraceError for a call of a Python function outside torch (kept whole by ``torch.fx.wrap``)
    that reads model tensors: which of them are weights of which projection is hidden inside it."""
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, types.FunctionType):
            continue
        if (target.__module__ or "").split(".")[0] == "torch":
            continue
        read = [str(a.target) for a in node.all_input_nodes if a.op == "get_attr" and a.target in state]
        if read:
            raise TraceError(
                f"torch.fx keeps {target.__module__}.{target.__name__} opaque, and it reads {', '.join(read[:3])}"
            )


def trace(model: nn.Module, inputs: dict[str, torch.Tensor], module_tree: dict[str, list[str]]):
    """Trace ``model`` into the IR; raises whatever torch.fx raises."""
    graph = _Tracer().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    args = []
    for p in placeholders:
        name = str(p.target).lstrip("*")
        if name in inputs:
            args.append(inputs[name])
        elif p.args:  # default value baked into the placeholder
            args.append(p.args[0])
        else:
            raise TypeError(f"no example input for forward argument {name!r}")
    ShapeProp(gm).propagate(*args)

    state = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules())
    _refuse_opaque_calls(graph, state)

    def tensor_name(node: torch.fx.Node) -> str | None:
        if node.op == "get_attr" and node.target in state:
            return str(node.target)
        return None

    def leaf_module(node: torch.fx.Node):
        if node.op != "call_module":
            return None
        module = modules[str(node.target)]
        op = MODULE_OPS.get(type(module))
        prefix = f"{node.target}."
        tensors = [(key[len(prefix) :], key, tuple(state[key].shape)) for key in state if key.startswith(prefix)]
        if not tensors:
            return None
        return op or type(module).__name__.lower(), str(node.target), tensors

    def shape(node: torch.fx.Node):
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    return build_ir(
        Source(
            graph=graph,
            tensor_name=tensor_name,
            leaf_module=leaf_module,
            op_name=_function_name,
            shape=shape,
            tensor_shape=lambda key: tuple(state[key].shape),
            frontend=NAME,
            module_tree=module_tree,
        )
    )
