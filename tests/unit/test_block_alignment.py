"""Structure-aware layer selection: student blocks pair with teacher blocks by structure and size,
not position; first-N stands where the structures are equal; poor alignments are refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import wscompile
from wscompile.errors import MatchError
from wscompile.matching.layers import choose_blocks
from wscompile.reports import plan_to_dict, validate_manifest


class Plain(nn.Module):
    """conv -> norm -> conv -> norm with a residual: a block whose width-free structure ignores
    the kernel size, so kernel changes along a stage keep one stage."""

    def __init__(self, c: int, k: int = 3, hidden: int | None = None):
        super().__init__()
        h = hidden or c
        self.conv1, self.bn1 = nn.Conv2d(c, h, k, padding=k // 2, bias=False), nn.BatchNorm2d(h)
        self.conv2, self.bn2 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Gated(Plain):
    """Plain plus a squeeze-excitation gate: a different structure."""

    def __init__(self, c: int, k: int = 3, hidden: int | None = None):
        super().__init__(c, k, hidden)
        h = hidden or c
        self.reduce, self.expand = nn.Conv2d(h, 4, 1), nn.Conv2d(4, h, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y * torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return x + self.bn2(self.conv2(y))


class Stages(nn.Module):
    """A stem, then one ``nn.Sequential`` per stage, each built from ``(block class, kernel, hidden)``.

    With ``widths``, stage ``i`` runs at ``widths[i]`` channels, entered through a 1x1 conv + norm
    where the width changes (stages of real models differ in width)."""

    def __init__(self, stages: list[list[tuple[type, int, int | None]]], c: int = 8, widths: list[int] | None = None):
        super().__init__()
        widths = widths or [c] * len(stages)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]))
        self.stages = nn.ModuleList(
            nn.Sequential(*[kind(w, k, h) for kind, k, h in stage]) for stage, w in zip(stages, widths, strict=True)
        )
        self.transitions = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 1, bias=False), nn.BatchNorm2d(b)) if a != b else nn.Identity()
            for a, b in zip(widths, widths[1:], strict=False)
        )
        self.head = nn.Linear(widths[-1], 10)

    def forward(self, x):
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(self.transitions[i - 1](x) if i else x)
        return self.head(x.mean((2, 3)))


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
P, G = (Plain, 3, None), (Gated, 3, None)


def _pairs(plan) -> list[list[str | None]]:
    return [[b.teacher for b in stage.blocks] for stage in plan.stages]


def _init(teacher, student, **kw):
    torch.manual_seed(0)
    return wscompile.initialize(teacher.eval(), student.eval(), X, select_head=True, **kw)


def test_a_stage_pairs_with_the_teacher_stage_of_its_structure_not_its_position():
    # teacher stages [P P P] [P P P] [G G G]; student [P P] [G G]: the student's second stage is the teacher's third
    teacher, student = Stages([[P] * 3, [P] * 3, [G] * 3]), Stages([[P] * 2, [G] * 2])
    plan = _init(teacher, student)
    assert _pairs(plan) == [["stages.0.0", "stages.0.1"], ["stages.2.0", "stages.2.1"]]
    assert all(b.chosen_by == "policy" and b.cost == 0.0 for s in plan.stages for b in s.blocks)
    assert plan.coverage.fraction_no_head == 1.0
    with torch.no_grad():  # equal widths: the gated student block computes the teacher's block exactly
        y = teacher.stages[2][0](teacher.stem(X))
        torch.testing.assert_close(student.stages[1][0](teacher.stem(X)), y)


def test_blocks_of_one_run_pair_by_structure_inside_a_stage():
    # teacher one run [P P G G G] (structurally different blocks in one Sequential), student [P G G]
    teacher, student = Stages([[P, P, G, G, G]]), Stages([[P, G, G]])
    plan = _init(teacher, student)
    assert [s.blocks[0].teacher for s in plan.stages] == ["stages.0.0", "stages.0.2"]
    assert _pairs(plan)[-1] == ["stages.0.2", "stages.0.3"]
    assert plan.coverage.fraction_no_head == 1.0


def test_a_kernel_change_along_a_stage_keeps_one_stage_and_larger_teacher_blocks_win():
    # teacher [k3 k3 k5 k5 k5], student [k3 k5 k5]: first-N would give the student's 5x5 blocks 3x3 teachers
    k3, k5 = (Plain, 3, None), (Plain, 5, None)
    teacher, student = Stages([[k3, k3, k5, k5, k5]]), Stages([[k3, k5, k5]])
    plan = _init(teacher, student)
    (stage,) = plan.stages
    assert stage.teacher_depth == 5 and stage.student_depth == 3  # one stage on both sides
    assert [b.teacher for b in stage.blocks] == ["stages.0.0", "stages.0.2", "stages.0.3"]
    assert [b.chosen_by for b in stage.blocks] == ["policy", "structure", "structure"]
    assert stage.cost == 0.0 and plan.coverage.fraction_no_head == 1.0
    manifest = plan_to_dict(plan)
    validate_manifest(manifest)
    assert [b["chosen_by"] for b in manifest["stages"][0]["blocks"]] == ["policy", "structure", "structure"]
    with torch.no_grad():  # same widths and kernels: the 5x5 student block is teacher block 2
        torch.testing.assert_close(student.stages[0][1].conv1.weight, teacher.stages[0][2].conv1.weight)


def test_teacher_blocks_at_least_as_wide_are_preferred():
    # one family-equal run whose hidden width grows: [8 8 32 32] -> a student of hidden 24 takes blocks 2, 3
    wide = [(Plain, 3, 8), (Plain, 3, 8), (Plain, 3, 32), (Plain, 3, 32)]
    plan = _init(Stages([wide]), Stages([[(Plain, 3, 24)] * 2]))
    assert _pairs(plan) == [["stages.0.2", "stages.0.3"]]
    assert plan.coverage.fraction_no_head == 1.0


@pytest.mark.parametrize("policy", ["first", "uniform", "last", "drop-middle"])
def test_width_multiplied_copies_keep_the_policy_choice(policy):
    # width-multiplied student of equal structure: every policy's pick stands, by position
    teacher = Stages([[P] * 2, [G] * 6], c=16)
    student = Stages([[P] * 2, [G] * 3], c=8)
    plan = _init(teacher, student, layer_policy=policy)
    assert all(b.chosen_by == "policy" for s in plan.stages for b in s.blocks)
    expected = {"first": [0, 1, 2], "uniform": [0, 2, 4], "last": [3, 4, 5], "drop-middle": [0, 1, 5]}[policy]
    assert _pairs(plan)[1] == [f"stages.1.{i}" for i in expected]
    assert all(b.cost == 0.0 for s in plan.stages for b in s.blocks)


def test_choose_blocks_prefers_score_then_the_policy_then_earlier_blocks():
    flat = [[1.0, 1.0, 1.0]] * 2
    assert choose_blocks(flat) == (2.0, [0, 1])  # equal: first-N
    assert choose_blocks(flat, [0, 2]) == (2.0, [0, 2])  # equal: the policy's pick
    assert choose_blocks([[1.0, 1.0, 3.0], [1.0, 1.0, 1.0]], [0, 1]) == (3.0, [2, None])  # a better score wins
    assert choose_blocks([[1.0, 1.0, 1.0], [0.5, 1.0, 1.0]], [1, 2]) == (2.0, [1, 2])
    assert choose_blocks([[0.0, 2.0], [0.0, 0.0]]) == (2.0, [1, None])  # 0: cannot pair
    assert choose_blocks([[1.0], [1.0], [1.0]]) == (1.0, [0, None, None])  # deeper student: first takes it


class Mixed(nn.Module):
    """The stem and one Plain block of ``Stages``, then a stack of per-pixel Linear + LayerNorm blocks."""

    def __init__(self, depth: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.conv = Plain(8)
        self.mlp = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(depth)])
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv(self.stem(x))
        return self.head(self.mlp(x.permute(0, 2, 3, 1)).mean((1, 2)))


def test_poor_alignment_is_refused_with_the_best_matched_blocks():
    teacher = Stages([[P] * 3])
    with pytest.raises(
        MatchError,
        match=r"^only 33% of the student's layers outside the head align with the teacher "
        r"\(under 50%\); best matched: student conv <- teacher stages\.0\.0 "
        r"\(cost 0\.00\); .* pass --allow-partial",
    ):
        _init(teacher, Mixed())
    plan = _init(teacher, Mixed(), allow_partial=True)
    assert _pairs(plan)[0] == ["stages.0.0"] and plan.stages[0].cost == 0.0
    assert {r.rule for r in plan.tensors if r.student.startswith("mlp.")} == {"student-init"}


def test_mobilenetv3_large_to_small_pairs_stages_by_structure():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    teacher = timm.create_model("mobilenetv3_large_100", pretrained=False).eval()
    student = timm.create_model("mobilenetv3_small_100", pretrained=False).eval()
    plan = wscompile.initialize(teacher, student, torch.randn(1, 3, 64, 64), allow_partial=True)
    # the small model's squeeze-excite stages (blocks.3, blocks.4) take the large one's (blocks.4, blocks.5),
    # skipping its plain blocks.3; by position they took blocks.3 and lost a third of the student
    by_stage = {
        s.blocks[0].student.rsplit(".", 1)[0]: {b.teacher.rsplit(".", 1)[0] for b in s.blocks if b.teacher}
        for s in plan.stages
    }
    assert by_stage == {
        "blocks.1": {"blocks.1"},
        "blocks.2": {"blocks.2"},
        "blocks.3": {"blocks.4"},
        "blocks.4": {"blocks.5"},
    }
    assert all(b.components_matched == b.components_total for s in plan.stages for b in s.blocks)
    assert plan.coverage.fraction_no_head >= 0.90


def _resnets(library: str) -> tuple[nn.Module, nn.Module, str]:
    """A ResNet teacher and a student of one block per stage, as the library builds them, and the
    name pattern of a stage's first block."""
    torch.manual_seed(0)
    if library == "timm":
        timm = pytest.importorskip("timm")
        make = timm.create_model
        return make("resnet50", layers=[3, 4, 6, 3]), make("resnet26", layers=[1, 1, 1, 1]), "layer{}.0"
    transformers = pytest.importorskip("transformers")
    config = dict(embedding_size=16, layer_type="bottleneck")
    teacher = transformers.ResNetModel(
        transformers.ResNetConfig(hidden_sizes=[32, 64, 128, 256], depths=[2] * 4, **config)
    )
    student = transformers.ResNetModel(
        transformers.ResNetConfig(hidden_sizes=[16, 32, 64, 128], depths=[1] * 4, **config)
    )
    return teacher, student, "encoder.stages.{}.layers.0"


@pytest.mark.parametrize("library", ["timm", "hf"])
def test_one_block_stages_pair_with_their_own_teacher_stage(library):
    # one block per stage: the stage containers look like a run of equal blocks (same width-free
    # structure, stride-2 entry blocks); they are four stages, each taking its teacher stage's first block
    teacher, student, block = _resnets(library)
    x = torch.randn(1, 3, 64, 64)
    plan = wscompile.initialize(teacher.eval(), student.eval(), x, allow_partial=True)
    assert [s.student_depth for s in plan.stages] == [1, 1, 1, 1]
    assert [s.blocks[0].teacher for s in plan.stages] == [block.format(i + (library == "timm")) for i in range(4)]
    assert plan.coverage.fraction_no_head == 1.0
    # the paper's rule on a teacher block twice as wide: the student's last conv is every other element
    last = [n for n, p in student.named_parameters() if n.startswith(block.format(3 + (library == "timm")))][-3]
    expected = teacher.state_dict()[last]
    expected = expected[
        tuple(slice(None, None, t // s) for t, s in zip(expected.shape, student.state_dict()[last].shape, strict=True))
    ]
    assert torch.equal(student.state_dict()[last], expected)


@st.composite
def stage_changing_pair(draw) -> tuple[list[list[tuple]], list[list[tuple]]]:
    """Teacher stages made of runs of plain or gated blocks (kinds alternating), and a student that
    keeps 1..n blocks of each stage's first run and 0..n of the others: runs shrink by different
    amounts or vanish, so a student block's teacher counterpart is at another position, and a
    student run can span teacher runs across a run it dropped. (The first run stays: a model with
    no repeated block at all, ``[P G] <- [G]``, has only loose layers, and those pair in execution
    order.)"""
    teacher, student = [], []
    for _ in range(draw(st.integers(1, 2))):
        first = draw(st.sampled_from([0, 1]))
        lengths = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
        kept = [draw(st.integers(0 if i else 1, n)) for i, n in enumerate(lengths)]
        kinds = [(P, G)[(first + i) % 2] for i in range(len(lengths))]
        teacher.append([kind for kind, n in zip(kinds, lengths, strict=True) for _ in range(n)])
        student.append([kind for kind, n in zip(kinds, kept, strict=True) for _ in range(n)])
    return teacher, student


@settings(max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=stage_changing_pair())
def test_stage_changing_students_pair_blocks_of_their_own_structure_in_order(pair):
    """Property: whatever blocks each run loses, each student block takes a teacher block of its own
    structure, teacher blocks in execution order, and (equal widths) all of the student outside the
    head comes from the teacher."""
    teacher_stages, student_stages = pair
    widths = [8, 12][: len(teacher_stages)]  # equal widths would make two one-block stages one stage of two
    teacher, student = Stages(teacher_stages, widths=widths), Stages(student_stages, widths=widths)
    plan = _init(teacher, student)
    order = [name for name, _ in teacher.named_modules()]
    taken = []
    for stage in plan.stages:
        for block in stage.blocks:
            assert block.teacher is not None, (block.student, _pairs(plan))
            # a one-block stage may be named by its container: compare the blocks inside
            s_kinds, t_kinds = (
                _kinds(student.get_submodule(block.student)),
                _kinds(teacher.get_submodule(block.teacher)),
            )
            assert s_kinds == t_kinds, (block.student, block.teacher, _pairs(plan))
            taken.append(order.index(block.teacher))
    assert taken == sorted(taken) and len(set(taken)) == len(taken)
    assert plan.coverage.fraction_no_head == 1.0


def _kinds(module: nn.Module) -> list[type]:
    return [type(m) for m in module.modules() if type(m) in (Plain, Gated)]


def test_a_student_run_across_a_dropped_teacher_run():
    # teacher runs [P P] [G P P] (the gated block opens the second run), student [P P P]: the student
    # run takes both teacher runs as one, skipping the gated block, instead of pairing with [G P P]
    plan = _init(Stages([[P, P, G, P, P]]), Stages([[P, P, P]]))
    assert _pairs(plan) == [["stages.0.0", "stages.0.1", "stages.0.3"]]
    assert plan.stages[0].teacher.startswith("stages 0-1 ")  # the joined teacher stages, named in the manifest
    assert plan.coverage.fraction_no_head == 1.0
