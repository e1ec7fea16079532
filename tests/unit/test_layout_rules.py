"""Layout rules (``wscompile/frontend/layout_rules.py``): fused blocks, heads and rotary pairs are read
off a projection's consumers only on graph evidence, through both frontends.

Each model is a tiny module written here and traced by the real frontend; the assertions read the
IR fields the rules set (``ir.HEADS``, ``ir.ROTARY``, ``TensorSlot.blocks``). The last test is the
end-to-end oracle: a four-part fused projection initialized by ``wscompile.initialize`` takes each
student part from the matching teacher part.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wscompile
from wscompile import frontend, ir
from wscompile.indices import uniform_indices

FRONTENDS = ["fx", "torch.export"]
X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


def _layout(model: nn.Module, via: str, module: str = "proj", x: torch.Tensor = X) -> tuple[int | None, bool, tuple]:
    """(heads, rotary, weight blocks) of the component of ``module`` traced by frontend ``via``."""
    graph = frontend.trace(model.eval(), {"x": x}, frontends=[via])
    assert graph.graph[ir.FRONTEND] == via
    (node,) = [n for n in graph.nodes if n != -1 and graph.nodes[n][ir.MODULE] == module]
    data = graph.nodes[node]
    weight = next(s for s in data[ir.TENSORS] if s.role == "weight")
    return data[ir.HEADS], data[ir.ROTARY], weight.blocks


# ---- fused projections: k parts, any k, when the parts are used apart ----------------------------


class _FusedHeads(nn.Module):
    """One Linear producing ``parts`` blocks of ``heads`` heads, reshaped to [B, T, k, H, d] and taken apart."""

    def __init__(self, parts: int, width: int = 16, heads: int = 2, take: str = "unbind") -> None:
        super().__init__()
        self.parts, self.heads, self.take = parts, heads, take
        self.proj = nn.Linear(width, parts * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        stacked = self.proj(x).reshape(b, t, self.parts, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.take == "unbind":
            parts = stacked.unbind(0)
        elif self.take == "index":
            parts = [stacked[i] for i in range(self.parts)]
        else:  # in place: the k axis stays third
            stacked = stacked.permute(1, 2, 0, 3, 4)  # [B, H, k, T, d]
            parts = [stacked[:, :, i] for i in range(self.parts)]
        y = parts[0]
        for i in range(1, self.parts):
            y = y * torch.sigmoid(parts[i])
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("via", FRONTENDS)
@pytest.mark.parametrize(("parts", "take"), [(4, "unbind"), (5, "index"), (4, "index-moved")])
def test_fused_projection_with_k_parts_used_apart(via, parts, take):
    heads, rotary, blocks = _layout(_FusedHeads(parts, take=take), via)
    assert blocks == ((0, parts),)
    assert heads == 2 and rotary is False


class _StackedNotTakenApart(nn.Module):
    """A reshape to [B, T, k, H, d] whose k axis is reduced, never indexed: k is no block count."""

    def __init__(self, parts: int, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.parts, self.heads = parts, heads
        self.proj = nn.Linear(width, parts * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        stacked = self.proj(x).reshape(b, t, self.parts, self.heads, -1)
        return self.out(stacked.sum(2).reshape(b, t, -1))


class _TokensFromVector(nn.Module):
    """A projection of a pooled vector to [B, T, H, d]: ends in ``k, H, d`` with k = T = 3, not fused."""

    def __init__(self, width: int = 16, tokens: int = 3, heads: int = 2) -> None:
        super().__init__()
        self.tokens, self.heads = tokens, heads
        self.proj = nn.Linear(width, tokens * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        tokens = self.proj(x.mean(1)).reshape(b, self.tokens, self.heads, -1)
        return self.out(tokens.softmax(1).reshape(b, self.tokens, -1))


@pytest.mark.parametrize("via", FRONTENDS)
@pytest.mark.parametrize(
    "model", [_StackedNotTakenApart(4), _StackedNotTakenApart(2), _TokensFromVector()], ids=["k4", "k2", "tokens"]
)
def test_a_reshape_that_looks_fused_is_not_without_its_parts_taken_apart(via, model):
    heads, rotary, blocks = _layout(model, via)
    assert blocks == ()
    assert heads is None and rotary is False


class _Chunked(nn.Module):
    """One Linear cut into equal parts along the features (a fused gate/up with more parts)."""

    def __init__(self, parts: int, how: str, used: int | None = None, width: int = 16) -> None:
        super().__init__()
        self.parts, self.how, self.used, self.width = parts, how, used or parts, width
        self.proj = nn.Linear(width, parts * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.proj(x)
        cut = fused.chunk(self.parts, dim=-1) if self.how == "chunk" else fused.split(self.width, dim=-1)
        y = cut[0]
        for i in range(1, self.used):
            y = y * torch.sigmoid(cut[i])
        return self.out(y)


@pytest.mark.parametrize("via", FRONTENDS)
@pytest.mark.parametrize(("parts", "how"), [(4, "chunk"), (5, "split"), (2, "chunk")])
def test_chunk_into_k_parts_used_apart_is_fused(via, parts, how):
    assert _layout(_Chunked(parts, how), via) == (None, False, ((0, parts),))


@pytest.mark.parametrize("via", FRONTENDS)
def test_a_chunk_whose_parts_are_not_all_used_says_nothing(via):
    assert _layout(_Chunked(4, "chunk", used=2), via) == (None, False, ())


# ---- rotary: rotate_half along the data flow, however many layout ops in between -----------------


def _rotate_half(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "chunk":
        first, second = x.chunk(2, dim=-1)
    else:
        first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    if how == "swap":  # halves swapped back, none negated: not a rotation
        return torch.cat((second, first), dim=-1)
    return torch.cat((-second, first), dim=-1)


class _Attention(nn.Module):
    """q/k/v heads of 8 dims; q and k go through ``hops`` layout-only ops, then ``position``."""

    def __init__(self, position: str, how: str = "slice", hops: int = 8, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.position, self.how, self.hops, self.heads = position, how, hops, heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)
        angle = torch.arange(5.0)[:, None] * torch.ones(width // heads)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def _layout_ops(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.hops):  # transposes in pairs, casts, copies: the same data laid out again
            x = x.transpose(1, 2) if i % 4 < 2 else (x.contiguous() if i % 4 == 2 else x.float())
        return x

    def _position(self, x: torch.Tensor) -> torch.Tensor:
        if self.position == "rotary":
            return x * self.cos + _rotate_half(x, self.how) * self.sin
        if self.position == "halves-multiplied":  # a slice at d/2, no cat, no mix
            half = x.shape[-1] // 2
            return torch.cat((x[..., :half] * x[..., half:], x[..., half:]), dim=-1)
        if self.position == "rotate-half-alone":  # the rotation, never mixed with x
            return _rotate_half(x, self.how)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = (self._position(self._layout_ops(z)) for z in (q, k))
        y = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("via", FRONTENDS)
@pytest.mark.parametrize(("how", "hops"), [("slice", 8), ("chunk", 10), ("slice", 0)])
def test_rotate_half_after_many_layout_ops_is_rotary(via, how, hops):
    model = _Attention("rotary", how=how, hops=hops)
    for name in ("q", "k"):
        assert _layout(model, via, name) == (2, True, ())
    assert _layout(model, via, "v") == (2, False, ())  # heads, never rotated


@pytest.mark.parametrize("via", FRONTENDS)
@pytest.mark.parametrize(
    ("position", "how"), [("halves-multiplied", "slice"), ("rotate-half-alone", "slice"), ("rotary", "swap")]
)
def test_a_slice_at_half_the_head_dim_without_the_rotation_is_not_rotary(via, position, how):
    model = _Attention(position, how=how, hops=0)  # the slice right after the head reshape
    assert _layout(model, via, "q") == (2, False, ())


# ---- end to end: each part of a fused student projection from the same teacher part --------------


class _FourParts(nn.Module):
    """A residual block whose one Linear writes four parts of ``heads`` heads (q, k, v and a gate)."""

    def __init__(self, width: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(4, width)
        self.proj = nn.Linear(width, 4 * width)
        self.out = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.embed(x)
        q, k, v, gate = self.proj(h).reshape(b, t, 4, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v * torch.sigmoid(gate)
        return self.out(h + y.transpose(1, 2).reshape(b, t, -1))


def test_a_four_part_student_takes_each_part_from_the_matching_teacher_part():
    torch.manual_seed(0)
    teacher, student = _FourParts(16), _FourParts(12)
    x = torch.randn(2, 5, 4)
    plan = wscompile.initialize(teacher, student, x)
    assert plan.coverage.fraction_no_head == 1.0

    part = uniform_indices(16, 12)  # within one teacher part of 16 -> one student part of 12
    residual = uniform_indices(16, 12)
    across = uniform_indices(64, 48)  # the flat rule over the fused width, crossing part boundaries
    assert across != [p * 16 + i for p in range(4) for i in part]  # the sizes tell the two apart
    weight, bias = teacher.proj.weight.detach(), teacher.proj.bias.detach()
    for p in range(4):
        rows = torch.tensor([p * 16 + i for i in part])
        expected = weight[rows][:, residual]
        torch.testing.assert_close(student.proj.weight[p * 12 : (p + 1) * 12], expected, rtol=0, atol=0)
        torch.testing.assert_close(student.proj.bias[p * 12 : (p + 1) * 12], bias[rows], rtol=0, atol=0)
