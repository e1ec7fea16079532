"""torch.export frontend (non-strict): the fallback for models torch.fx cannot trace.

Hugging Face transformers models fail under ``symbolic_trace`` but export in non-strict mode.
Model tensors arrive as placeholders; ``graph_signature`` names them with their state_dict keys,
so parameters used functionally (torchvision's attention ``out_proj``) are still attributed to
the right tensor. Every op is an ATen op; shapes come from each node's ``meta["val"]``.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from wscompile.frontend.builder import ATEN_ALIASES, Source, build_ir

NAME = "torch.export"


def _op_name(node: torch.fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    target = node.target
    name = getattr(getattr(target, "_overloadpacket", None), "__name__", None) or getattr(
        target, "__name__", str(target)
    )
    return ATEN_ALIASES.get(name, name)


def trace(model: nn.Module, inputs: dict[str, torch.Tensor], module_tree: dict[str, list[str]]):
    """Export ``model`` (non-strict) and build the IR; raises whatever torch.export raises."""
    program = torch.export.export(model, args=(), kwargs=dict(inputs), strict=False)
    signature = program.graph_signature
    state = model.state_dict(keep_vars=True)
    names: dict[str, str] = {}
    names.update(signature.inputs_to_parameters)
    names.update({p: b for p, b in signature.inputs_to_buffers.items() if b in state})

    def tensor_name(node: torch.fx.Node) -> str | None:
        if node.op == "placeholder":
            return names.get(node.name)
        return None

    def shape(node: torch.fx.Node):
        val = node.meta.get("val")
        return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None

    def tensor_shape(key: str):
        return tuple(state[key].shape)

    return build_ir(
        Source(
            graph=program.graph_module.graph,
            tensor_name=tensor_name,
            leaf_module=lambda node: None,
            op_name=_op_name,
            shape=shape,
            tensor_shape=tensor_shape,
            frontend=NAME,
            module_tree=module_tree,
            arg_names={"embedding": ("weight", "input")},  # aten.embedding(weight, indices)
        )
    )
