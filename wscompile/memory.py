"""Memory estimates made before anything is allocated: parameters while a model is built, activations of a forward.

``check_memory`` (commands.py) compares three numbers with the memory available:

- the bytes of each model built in memory, counted on the meta device. While such a model is
  being constructed, ``construction_guard`` counts every parameter and buffer as it is registered
  and stops the construction once it has run for ``GUARD_SECONDS`` with more bytes counted than
  are available: ``timm:vit_tiny_patch16_224?depth=1000000`` is refused within seconds instead of
  spending minutes building a model that could never be allocated (a fast build is left to finish,
  so the error can give its exact size);
- the example inputs, made on the CPU for every model;
- the activations of one forward of a model on its example inputs: the forward runs on the meta
  device and ``peak_activation_bytes`` follows every tensor the ops allocate (views and in-place
  results allocate nothing) until it is freed, keeping the peak. The forward runs without gradients,
  as wscompile's own forwards do; a model whose forward cannot run on meta has its activations
  uncounted (its inputs still count).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode

from wscompile.errors import ResourceError

GUARD_SECONDS = 1.0  # a model construction may run this long before its byte count is held to the limit


def nbytes(tensors: Mapping[str, torch.Tensor] | list[torch.Tensor]) -> int:
    """Bytes of the tensors' elements (a tensor given twice counts twice)."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return sum(t.numel() * t.element_size() for t in values)


@contextmanager
def construction_guard(limit: int, label: str, available: str) -> Iterator[None]:
    """Stop a model construction that runs long and has registered more than ``limit`` bytes of tensors.

    Args:
        limit: bytes of parameters and buffers the model may have.
        label: what is built, for the message (``student timm:vit_tiny...``).
        available: the limit as the message says it (``22.1 GB is available (MemAvailable ...)``).

    Raises:
        ResourceError: from inside the construction, when it has run ``GUARD_SECONDS`` with more
            than ``limit`` bytes registered.
    """
    seen: set[int] = set()
    counted = 0
    start: float | None = None  # the first registration: imports before it do not count

    def hook(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        nonlocal counted, start
        if tensor is None or id(tensor) in seen:
            return
        start = time.monotonic() if start is None else start
        seen.add(id(tensor))
        counted += tensor.numel() * tensor.element_size()
        if counted > limit and time.monotonic() - start > GUARD_SECONDS:
            raise ResourceError(
                f"not enough memory: {label} has more than {counted / 1e9:.2f} GB of parameters (counted while "
                f"building it on the meta device, stopped there) but {available}; use a smaller model (fewer "
                "layers or narrower ones)"
            )

    handles = [register_module_parameter_registration_hook(hook), register_module_buffer_registration_hook(hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _PeakBytes(TorchDispatchMode):
    """Follows the bytes of live tensors produced by ops, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A return with alias info is a view or an in-place result: no new storage.
        if all(r.alias_info is None for r in func._schema.returns):
            for tensor in _tensors(out):
                size = tensor.numel() * tensor.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def _tensors(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def peak_activation_bytes(module: nn.Module, inputs: Mapping[str, torch.Tensor]) -> int | None:
    """Peak bytes of the tensors one forward of ``module`` (on meta) holds at once; None if it cannot run on meta."""
    if not inputs or any(not t.is_meta for t in [*module.parameters(), *module.buffers(), *inputs.values()]):
        return None
    mode = _PeakBytes()
    try:
        with torch.no_grad(), mode:
            module(**inputs)
    except Exception:
        return None
    return mode.peak
