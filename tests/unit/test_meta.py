"""Meta-device builds skip the init's computations and nothing else (``wscompile.meta``)."""

from __future__ import annotations

import timm
import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from wscompile import specs
from wscompile.meta import skip_meta_init


class _Dispatched(TorchDispatchMode):
    """The aten ops that reach dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_value_writes_on_meta_are_skipped_and_metadata_changes_are_not() -> None:
    weight = torch.empty(4, 3, device="meta")
    with _Dispatched() as plain:
        trunc_normal_(weight, std=0.02)  # timm's: uniform_, erfinv_, mul_, add_, clamp_
    assert "clamp_.default" in plain.ops  # without it, the init runs its meta kernels
    with skip_meta_init(), _Dispatched() as skipped:
        assert trunc_normal_(weight, std=0.02) is weight
        assert nn.init.kaiming_uniform_(weight) is weight
        assert weight.uniform_().clamp_(-1, 1) is weight
        assert skipped.ops == []
        weight.unsqueeze_(0)  # changes the shape: still applied
        weight.requires_grad_(True)
    assert weight.shape == (1, 4, 3) and weight.requires_grad
    assert skipped.ops == ["unsqueeze_.default"]


def test_tensors_off_meta_are_computed_as_usual() -> None:
    with skip_meta_init():
        torch.manual_seed(0)
        values = torch.empty(5).uniform_()
    torch.manual_seed(0)
    assert torch.equal(values, torch.empty(5).uniform_())
    with skip_meta_init():
        values.zero_().add_(2)
    assert torch.equal(values, torch.full((5,), 2.0))


def test_meta_build_has_the_same_tensors_and_leaves_the_generator_alone() -> None:
    with torch.device("meta"):
        full = timm.create_model("convnext_atto")
    torch.manual_seed(3)
    built = specs._construct(
        lambda: timm.create_model("convnext_atto"), specs.parse_spec("timm:convnext_atto"), device="meta", seed=0
    )
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3))  # the build drew nothing from the CPU generator
    expected = {k: (t.shape, t.dtype, t.is_meta) for k, t in full.state_dict().items()}
    assert {k: (t.shape, t.dtype, t.is_meta) for k, t in built.state_dict().items()} == expected
