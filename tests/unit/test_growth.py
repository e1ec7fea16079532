"""Growth (--allow-partial): a student wider than its teacher reads every teacher unit and fills the rest."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wscompile
from wscompile.errors import SelectionError
from wscompile.reports.manifest import plan_to_dict, validate_manifest


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, norm: str | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.norm = nn.LayerNorm(width) if norm == "layer" else nn.Identity()
        self.fc2 = nn.Linear(width, hidden)
        self.fc3 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


class ConvStack(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x))))))


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_()
    return model.eval()


X = torch.randn(5, 8)
IMAGE = torch.randn(2, 3, 8, 8)


def test_widened_mlp_computes_the_teacher_function():
    teacher, student = _seeded(MLP(6, 5), 0), _seeded(MLP(10, 5), 1)
    plan = wscompile.initialize(teacher, student, X, allow_partial=True, select_head=True)
    grown = [g for g in plan.groups if g.growth]
    assert len(grown) == 1 and grown[0].growth == "widen"
    assert grown[0].indices == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3] and grown[0].replicas == [2, 2, 2, 2, 1, 1]
    with torch.no_grad():
        torch.testing.assert_close(student(X), teacher(X), atol=1e-5, rtol=1e-5)
    assert plan.coverage.grown_params == 4 * 8 + 4 + 5 * 4  # fc1 rows and bias, fc2 columns
    assert plan.coverage.selected_params + plan.coverage.grown_params == plan.coverage.total_params
    validate_manifest(plan_to_dict(plan))


def test_widened_conv_stack_computes_the_teacher_function():
    teacher, student = _seeded(ConvStack(4), 0), _seeded(ConvStack(7), 1)
    wscompile.initialize(teacher, student, IMAGE, allow_partial=True, select_head=True)
    with torch.no_grad():
        torch.testing.assert_close(student(IMAGE), teacher(IMAGE), atol=1e-5, rtol=1e-5)


def test_a_layer_norm_over_the_grown_channels_widens_only_when_every_unit_is_replicated_equally():
    teacher = _seeded(MLP(4, 5, norm="layer"), 0)
    even = _seeded(MLP(8, 5, norm="layer"), 1)
    wscompile.initialize(teacher, even, X, allow_partial=True, select_head=True)
    with torch.no_grad():
        torch.testing.assert_close(even(X), teacher(X), atol=1e-5, rtol=1e-5)
    uneven = _seeded(MLP(6, 5, norm="layer"), 1)
    plan = wscompile.initialize(teacher, uneven, X, allow_partial=True, select_head=True)
    group = next(g for g in plan.groups if g.growth)
    assert group.growth == "init" and "layer_norm" in group.growth_note


def test_init_growth_copies_the_teacher_part_and_keeps_the_rest():
    teacher, student = _seeded(MLP(6, 5), 0), _seeded(MLP(10, 5), 1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    plan = wscompile.initialize(teacher, student, X, allow_partial=True, growth="init")
    assert next(g for g in plan.groups if g.growth).growth == "init"
    assert torch.equal(student.fc1.weight[:6], teacher.fc1.weight)
    assert torch.equal(student.fc1.weight[6:], before["fc1.weight"][6:])
    assert torch.equal(student.fc2.weight[:, :6], teacher.fc2.weight)
    assert torch.equal(student.fc2.weight[:, 6:], before["fc2.weight"][:, 6:])
    assert plan.coverage.grown_params == 0
    assert plan.coverage.selected_params_no_head == 6 * 8 + 6 + 5 * 6 + 5


def test_a_wider_student_is_still_refused_without_allow_partial():
    with pytest.raises(SelectionError, match=r"larger than their teacher match.*pass --allow-partial"):
        wscompile.initialize(_seeded(MLP(6, 5), 0), _seeded(MLP(10, 5), 1), X)


def test_reports_show_grown_tensors_and_groups_in_their_own_tone():
    from wscompile.reports.records import TONE_GROWN, build_report

    teacher, student = _seeded(MLP(6, 5), 0), _seeded(MLP(10, 5), 1)
    plan = wscompile.initialize(teacher, student, X, allow_partial=True)
    report = build_report(plan)
    tensors = next(t for t in report.tables if t.id == "tensors")
    grown = {row[0] for row, tone in zip(tensors.rows, tensors.tones, strict=True) if tone == TONE_GROWN}
    assert grown == {"fc1.weight", "fc1.bias", "fc2.weight"}
    groups = next(t for t in report.tables if t.id == "groups")
    assert groups.tones.count(TONE_GROWN) == 1
    assert any(label == "grown" for label, _ in report.summary)


class Deep(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 6)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6)) for _ in range(depth)]
        )
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_a_deeper_student_stage_repeats_the_teacher_stages_last_block():
    teacher, student = _seeded(Deep(2), 0), _seeded(Deep(4), 1)
    with pytest.raises(SelectionError, match="deeper than teacher"):
        wscompile.initialize(teacher, student, X)
    plan = wscompile.initialize(teacher, student, X, allow_partial=True)
    for i in (2, 3):
        for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
            assert torch.equal(
                student.get_submodule(f"blocks.{i}").state_dict()[name], teacher.blocks[1].state_dict()[name]
            ), (i, name)
    repeated = [r for r in plan.tensors if r.repeats]
    assert {r.repeats for r in repeated} == {"blocks.1"} and len(repeated) == 8
    assert plan.coverage.grown_params == sum(r.numel for r in repeated)
    assert [b.teacher for b in plan.stages[0].blocks] == ["blocks.0", "blocks.1", "blocks.1", "blocks.1"]
    validate_manifest(plan_to_dict(plan))
    kept = _seeded(Deep(4), 1)
    plan = wscompile.initialize(teacher, kept, X, allow_partial=True, growth="init")
    assert not any(r.repeats for r in plan.tensors)
    assert torch.equal(kept.blocks[3][0].weight, _seeded(Deep(4), 1).blocks[3][0].weight)


def test_widening_timm_models_preserves_their_function():
    import timm

    torch.manual_seed(0)
    image = torch.randn(2, 3, 32, 32)

    def vit(mlp_ratio):
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, mlp_ratio=mlp_ratio)

    def convnext(dims):
        model = timm.create_model("convnext_atto", dims=dims, depths=(1, 1, 1, 1), ls_init_value=0.5).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)  # outputs of order 1: the 1e-5 tolerance is float32 rounding, not a scale
        return model

    # a ViT wider in its MLP only (GELU between), a ConvNeXt twice as wide everywhere (layer norms over the
    # stream, layer scale, depthwise convolutions: every channel replicated equally)
    for teacher, student in (
        (vit(4).eval(), vit(8).eval()),
        (convnext((16, 32, 64, 128)), convnext((32, 64, 128, 256))),
    ):
        plan = wscompile.initialize(teacher, student, image, allow_partial=True, select_head=True)
        assert [g.growth for g in plan.groups if g.growth] and all(g.growth == "widen" for g in plan.groups if g.growth)
        with torch.no_grad():
            torch.testing.assert_close(student(image), teacher(image), atol=1e-5, rtol=1e-5)
    # unevenly wider: the layer norms over the stream would see other statistics, so the stream keeps init
    plan = wscompile.initialize(convnext((16, 32, 64, 128)), convnext((24, 32, 64, 128)), image, allow_partial=True)
    stream = next(g for g in plan.groups if g.growth)
    assert stream.growth == "init" and "unevenly" in stream.growth_note


def test_a_grouped_convolution_over_the_grown_channels_keeps_them_at_init():
    def grouped(width):
        return nn.Sequential(
            nn.Conv2d(3, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(width, 4, 1),
        ).eval()

    plan = wscompile.initialize(grouped(4), grouped(8), IMAGE, allow_partial=True)
    grown = [g for g in plan.groups if g.growth]
    assert grown and all(g.growth == "init" and g.growth_note for g in grown)
    assert "2 reads 0's outputs in another layout" in grown[0].growth_note
