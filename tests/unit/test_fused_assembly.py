"""Separate teacher projections assembled into a fused student one, and layer forms across libraries.

HF ViT writes attention with separate query/key/value projections, timm with one fused ``qkv``; the
reverse direction (a fused teacher into separate student projections) is covered by the zoo's
``cross-timm-vit->hf-vit``. Also: an RMSNorm written with tensor ops pairs with ``nn.RMSNorm``, and
torchvision's Swin (attention in an fx-opaque function) pairs with timm's.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
import transformers
from torch import nn

from wscompile import frontend
from wscompile.errors import SelectionError
from wscompile.pipeline import initialize
from wscompile.plan import AxisRule, SelectionPlan, TensorRecord
from wscompile.reports.manifest import plan_to_dict, validate_manifest

IMAGE = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _hf_vit(hidden: int, heads: int) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def _timm_vit(hidden: int, heads: int) -> nn.Module:
    torch.manual_seed(1)
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=hidden,
        num_heads=heads,
        num_classes=0,
        global_pool="",
    ).eval()


def _assembled(plan: SelectionPlan) -> dict[str, TensorRecord]:
    return {r.student: r for r in plan.tensors if r.parts}


def _indices(plan: SelectionPlan, rule: AxisRule) -> list[int]:
    groups = {g.id: g.indices for g in plan.groups}
    return list(groups[rule.group])


def test_hf_vit_into_timm_vit_computes_the_teacher():
    """Identity oracle: the same size, fused student qkv from separate teacher q, k, v."""
    teacher, student = _hf_vit(64, 2), _timm_vit(64, 2)
    plan = initialize(teacher, student, IMAGE, select_head=True)

    assembled = _assembled(plan)
    assert sorted(assembled) == [f"blocks.{i}.attn.qkv.{role}" for i in range(2) for role in ("bias", "weight")]
    for name, record in assembled.items():
        block = name.split(".")[1]
        role = name.rsplit(".", 1)[1]
        assert [p.teacher for p in record.parts] == [
            f"layers.{block}.attention.{proj}.{role}" for proj in ("q_proj", "k_proj", "v_proj")
        ]
        assert record.parts_axis == 0
    assert plan.coverage.fraction_no_head == 1.0
    with torch.no_grad():
        expected = teacher(pixel_values=IMAGE).last_hidden_state
        torch.testing.assert_close(student.forward_features(IMAGE), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "method, heads",
    [
        ("uniform", "split"),
        ("magnitude", "split"),
        ("random", "split"),
        ("activation", "split"),
        ("magnitude", "whole"),
    ],
)
def test_smaller_fused_rows_are_the_teacher_projections_at_the_plan_indices(method, heads):
    teacher, student = _hf_vit(128, 4), _timm_vit(64, 2)
    plan = initialize(teacher, student, IMAGE, method=method, heads=heads)
    records = {r.student: r for r in plan.tensors}
    t_state, s_state = teacher.state_dict(), student.state_dict()

    assert plan.coverage.fraction_no_head >= 0.95
    for block in range(2):
        weight, bias = records[f"blocks.{block}.attn.qkv.weight"], records[f"blocks.{block}.attn.qkv.bias"]
        # the heads the attention output projection reads are the q, k and v rows every part keeps
        heads = _indices(plan, records[f"blocks.{block}.attn.proj.weight"].axes[1])
        residual = _indices(plan, records[f"blocks.{block}.norm1.weight"].axes[0])
        assert len(weight.parts) == len(bias.parts) == 3
        fused_w = s_state[f"blocks.{block}.attn.qkv.weight"].reshape(3, 64, 64)
        fused_b = s_state[f"blocks.{block}.attn.qkv.bias"].reshape(3, 64)
        for part, (w_part, b_part) in enumerate(zip(weight.parts, bias.parts, strict=True)):
            assert _indices(plan, w_part.axes[0]) == _indices(plan, b_part.axes[0]) == heads
            assert _indices(plan, w_part.axes[1]) == residual
            t_weight, t_bias = t_state[w_part.teacher], t_state[b_part.teacher]
            assert torch.equal(fused_w[part], t_weight[heads][:, residual])
            assert torch.equal(fused_b[part], t_bias[heads])
    validate_manifest(plan_to_dict(plan))  # parts are part of the manifest's schema


def test_uniform_parts_match_the_fused_teacher_rule():
    """The paper's rule on the assembled tensor: every part keeps the even rows and columns (t = 2 s)."""
    teacher, student = _hf_vit(128, 4), _timm_vit(64, 2)
    initialize(teacher, student, IMAGE)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    keep = list(range(0, 128, 2))
    for block in range(2):
        parts = [t_state[f"layers.{block}.attention.{p}.weight"][keep][:, keep] for p in ("q_proj", "k_proj", "v_proj")]
        assert torch.equal(s_state[f"blocks.{block}.attn.qkv.weight"], torch.cat(parts))


class _TensorOpRMSNorm(nn.Module):
    """RMSNorm as HF Llama and T5 write it."""

    def __init__(self, width: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight + self.offset) * normalized if self.offset else self.weight * normalized


class _Net(nn.Module):
    def __init__(self, width: int, norm) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(8, width), norm(width), nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.up(x)))


def _module_rms(width: int) -> nn.Module:
    norm = nn.RMSNorm(width, eps=1e-6)
    nn.init.normal_(norm.weight)
    return norm


@pytest.mark.parametrize(
    "teacher_norm, student_norm",
    [(_TensorOpRMSNorm, _module_rms), (_module_rms, _TensorOpRMSNorm)],
    ids=["tensor-ops->nn.RMSNorm", "nn.RMSNorm->tensor-ops"],
)
def test_rms_norm_forms_pair(teacher_norm, student_norm):
    torch.manual_seed(0)
    teacher, student = _Net(16, teacher_norm), _Net(16, student_norm)
    x = torch.randn(4, 8)
    plan = initialize(teacher, student, x, select_head=True)
    records = {r.student: r for r in plan.tensors}
    assert records["norm.weight"].teacher == "norm.weight"
    assert plan.coverage.fraction == 1.0
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=1e-6)


def test_rms_norm_of_a_shifted_weight_stays_a_loose_parameter():
    """``(weight + 1) * x_normed`` (Gemma) does not hold nn.RMSNorm's weight: no norm component."""
    graph = frontend.trace(_Net(16, lambda w: _TensorOpRMSNorm(w, offset=1.0)), {"x": torch.randn(2, 8)})
    kinds = {graph.nodes[n]["module"]: graph.nodes[n]["kind"] for n in graph.nodes}
    assert kinds["norm"] == "param"
    tensor_ops = frontend.trace(_Net(16, _TensorOpRMSNorm), {"x": torch.randn(2, 8)})
    assert {tensor_ops.nodes[n]["op"] for n in tensor_ops.nodes} == {"linear", "rms_norm"}


def _swin_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10
    ).eval()
    student = timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=4,
        num_classes=10,
    ).eval()
    return teacher, student


def test_torchvision_swin_pairs_with_timm_swin():
    teacher, student = _swin_pair()
    # torchvision computes attention in shifted_window_attention, kept opaque by torch.fx.wrap
    assert frontend.trace(teacher, {"x": IMAGE}).graph["frontend"] == "torch.export"
    plan = initialize(teacher, student, IMAGE, select_head=True)
    assert plan.coverage.fraction_no_head == 1.0
    stages = [(s.student_depth, s.teacher_depth) for s in plan.stages]
    assert stages == [(2, 2), (2, 2)]  # shifted and plain blocks are one stage (the mask reads no data)
    with torch.no_grad():
        torch.testing.assert_close(student(IMAGE), teacher(IMAGE), rtol=0, atol=1e-5)


def test_a_wider_fused_student_keeps_its_init_and_says_why():
    teacher, student = _hf_vit(64, 2), _timm_vit(128, 4)
    with pytest.raises(SelectionError, match="larger than their teacher match"):
        initialize(teacher, student, IMAGE)
    plan = initialize(teacher, student, IMAGE, allow_partial=True)
    record = next(r for r in plan.tensors if r.student == "blocks.0.attn.qkv.weight")
    assert record.teacher is None and not record.parts
    assert record.reason.startswith(
        "a part [128, 128] is larger than its teacher match layers.0.attention.q_proj.weight"
    )
