"""Frontends: trace a model into the IR, trying torch.fx first and torch.export second.

Tracing reads shapes, never values, so a model holding data is traced as its meta twin
(``meta_twin``: the same modules, its parameters and buffers without storage); the forward that
propagates shapes then computes nothing. A frontend that fails on the twin (a forward that reads a
value, say) is retried on the model itself before the next frontend is tried, so the frontend
chosen, and the IR, are those the model itself gives.
"""

from __future__ import annotations

import copy
import io
import itertools
from contextlib import redirect_stderr, redirect_stdout

import networkx as nx
import torch
from torch import nn

from wscompile import ir
from wscompile.errors import TraceError
from wscompile.frontend import export as export_frontend
from wscompile.frontend import fx as fx_frontend
from wscompile.frontend import repeated

FRONTENDS = {fx_frontend.NAME: fx_frontend.trace, export_frontend.NAME: export_frontend.trace}


def module_tree(model: nn.Module) -> dict[str, list[str]]:
    """Module path -> direct child paths, in declaration order (root is "")."""
    tree: dict[str, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        tree.setdefault(path, [])
        for child_name, _ in module.named_children():
            tree[path].append(f"{path}.{child_name}" if path else child_name)
    return tree


def trace(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    frontends: list[str] | None = None,
    label: str = "model",
    blocks_once: bool = True,
) -> nx.DiGraph:
    """Trace ``model`` with the first frontend that succeeds.

    With ``blocks_once``, each run of identical blocks is traced as its first ``repeated.KEEP`` and
    the IR of the others copied from them (``frontend.repeated``); where that does not apply, the
    whole model is traced.

    Raises:
        TraceError: no frontend traced the model; the message names each frontend's failure.
    """
    tree = module_tree(model)
    failures = []
    was_training = model.training
    model.eval()
    # NOTE: a decoder's KV cache is an output object torch.export cannot flatten; tracing needs none
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached:
        config.use_cache = False
    try:
        twin = meta_twin(model)  # after use_cache is off: the twin copies the config
        runs = repeated.repeated_runs(model) if blocks_once else []
        for name in frontends or list(FRONTENDS):
            try:
                graph = _trace_cut(FRONTENDS[name], model, twin, inputs, tree, runs) if runs else None
                if graph is None:
                    graph = _trace_twin_first(FRONTENDS[name], model, twin, inputs, tree)
            except Exception as e:  # noqa: BLE001 - each tracer fails in its own way; we report all
                failures.append(f"{name}: {_first_line(e)}")
                continue
            try:
                ir.verify(graph)
            except TraceError as e:  # this frontend built a graph that breaks an invariant: try the next
                failures.append(f"{name}: {e}")
                continue
            if graph.number_of_nodes() == 0:
                failures.append(f"{name}: no operation reads a model tensor")
                continue
            return graph
    finally:
        model.train(was_training)
        if cached:
            config.use_cache = cached
    raise TraceError(
        f"cannot trace {label}: "
        + "; ".join(failures)
        + "; check the example inputs (--input-shape) or make the failing module traceable"
    )


def meta_twin(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no data copied), in eval mode.

    Tied tensors stay tied. None when the model is on meta already or cannot be copied (a module
    holding an object ``copy.deepcopy`` refuses); it is then traced as it is.
    """
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if not tensors or all(t.is_meta for t in tensors):
        return None
    # deepcopy's memo maps each tensor to its meta stand-in, so no storage is ever copied
    memo: dict[int, object] = {}
    for tensor in tensors:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    try:
        twin = copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 - whatever refuses to be copied, the model itself is traced
        return None
    return twin.eval()


def _trace_cut(
    frontend,
    model: nn.Module,
    twin: nn.Module | None,
    inputs: dict[str, torch.Tensor],
    tree: dict[str, list[str]],
    runs: list[repeated.Run],
) -> nx.DiGraph | None:
    """The IR of ``model`` traced with its ``runs`` cut to ``repeated.KEEP`` blocks, then expanded; None when the
    cut model does not trace or its IR does not show the blocks plainly (``repeated.expand``)."""
    with repeated.cut([m for m in (model, twin) if m is not None], runs):
        try:
            graph = _trace_twin_first(frontend, model, twin, inputs, tree)
        except Exception:  # noqa: BLE001 - the whole model is traced next, and says why if it fails
            return None
    return repeated.expand(graph, runs)


def _trace_twin_first(
    frontend, model: nn.Module, twin: nn.Module | None, inputs: dict[str, torch.Tensor], tree: dict[str, list[str]]
) -> nx.DiGraph:
    """``frontend`` on the meta twin; on the model itself when there is no twin or the twin fails."""
    # tracers print partial graphs and tracebacks of their own; the error says enough
    with torch.no_grad(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        if twin is not None:
            meta_inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            try:
                return frontend(twin, meta_inputs, tree)
            except Exception:  # noqa: BLE001, S110 - the model itself says why, below
                pass
        return frontend(model, inputs, tree)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    where = _failing_module(error)
    first = text[0] if text else type(error).__name__
    return f"{type(error).__name__}: {first[:300]}{where}"


def _failing_module(error: BaseException) -> str:
    # torch.fx and torch.export put the user frame at the end of the traceback.
    tb = error.__traceback__
    last = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if "/torch/" not in filename and "/wscompile/" not in filename:
            last = tb.tb_frame
        tb = tb.tb_next
    if last is None:
        return ""
    self_obj = last.f_locals.get("self")
    owner = f" ({type(self_obj).__name__}.{last.f_code.co_name})" if isinstance(self_obj, nn.Module) else ""
    return f" at {last.f_code.co_filename}:{last.f_lineno}{owner}"
