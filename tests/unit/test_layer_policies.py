"""Layer policies: which teacher blocks each student stage takes (first, uniform, last, drop-middle,
importance, explicit maps), entry blocks pinned, and errors on bad maps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import wscompile
from wscompile.commands import InitOptions, check_selection, summary
from wscompile.errors import MatchError, SelectionError
from wscompile.matching.layers import parse_layer_policy, teacher_blocks
from wscompile.reports import plan_to_dict


def _blocks(policy: str, n_teacher: int, n_student: int, *, entry: bool = False, similarity=None) -> list[int]:
    name, chosen = teacher_blocks(
        parse_layer_policy(policy), 0, "stage 0", n_teacher, n_student, entry=entry, similarity=lambda: similarity
    )
    assert name == ("explicit" if ":" in policy else policy)
    return chosen


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("first", [0, 1, 2, 3, 4, 5]),
        ("uniform", [0, 2, 4, 6, 8, 10]),  # DistilBERT: every other layer
        ("last", [6, 7, 8, 9, 10, 11]),
        ("drop-middle", [0, 1, 2, 9, 10, 11]),
    ],
)
def test_policies_pick_the_documented_blocks(policy, expected):
    assert _blocks(policy, 12, 6) == expected
    assert _blocks(policy, 3, 3) == [0, 1, 2] and _blocks(policy, 3, 5) == [0, 1, 2]  # not shallower: all


def test_drop_middle_and_importance():
    assert _blocks("drop-middle", 12, 5) == [0, 1, 2, 10, 11]
    assert _blocks("drop-middle", 6, 1) == [0]
    similarity = [0.1, 0.9, 0.2, 0.95, 0.3, 0.5]
    assert _blocks("importance", 6, 3, similarity=similarity) == [0, 2, 4]  # the three least similar, in order


def test_entry_block_is_pinned():
    assert _blocks("last", 4, 2, entry=True) == [0, 3]
    assert _blocks("uniform", 7, 3, entry=True) == [0, 1, 4]  # [0] + 1 + uniform(6, 2)
    assert _blocks("drop-middle", 6, 3, entry=True) == [0, 1, 5]
    assert _blocks("importance", 4, 2, entry=True, similarity=[0.99, 0.2, 0.1, 0.9]) == [0, 2]
    assert _blocks("first", 4, 2, entry=True) == [0, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fastest", "unknown layer policy 'fastest'; use one of first, uniform, last, drop-middle, importance"),
        ("0:a,b", r"bad layer map entry '0:a,b'"),
        ("0:2,1", r"must be distinct and ascending, e.g. 0:1,2"),
        ("0:1,1", r"must be distinct and ascending"),
        ("0:0;0:1", r"names stage 0 twice"),
        ("-1:0", r"indices are >= 0"),
        ("0:", r"bad layer map entry '0:'"),
    ],
)
def test_explicit_map_syntax_errors(text, message):
    with pytest.raises(MatchError, match=message):
        parse_layer_policy(text)


def test_explicit_map():
    policy = parse_layer_policy(" 0:0,2,4; 1:0,1 ")
    assert policy.explicit == {0: [0, 2, 4], 1: [0, 1]}
    assert _blocks("0:0,2,4", 6, 3) == [0, 2, 4]
    with pytest.raises(
        MatchError, match=r"gives 2 teacher block\(s\) for student stage 0, which has 3; list exactly 3"
    ):
        _blocks("0:0,2", 6, 3)
    with pytest.raises(MatchError, match=r"names teacher block 7 .* has 6 blocks \(0..5\)"):
        _blocks("0:0,2,7", 6, 3)
    with pytest.raises(MatchError, match=r"opens with an entry block .* start the map with 0:0"):
        _blocks("0:1,2", 6, 2, entry=True)


# A pre-norm transformer whose blocks can be removed: equal widths make the truncation oracle exact.
class Block(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class Net(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


X = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))


def _kept(teacher: nn.Module, blocks: list[int]) -> nn.Module:
    kept = copy.deepcopy(teacher)
    kept.blocks = nn.Sequential(*[teacher.blocks[i] for i in blocks])
    return kept


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("uniform", [0, 2, 4]),
        ("last", [3, 4, 5]),
        ("drop-middle", [0, 1, 5]),
        ("0:1,3,4", [1, 3, 4]),
    ],
)
def test_student_computes_the_teacher_with_only_the_chosen_blocks(policy, expected):
    torch.manual_seed(0)
    teacher, student = Net(6).eval(), Net(3).eval()
    plan = wscompile.initialize(teacher, student, X, layer_policy=policy, select_head=True)
    stage = plan.stages[0]
    assert [b.teacher for b in stage.blocks] == [f"blocks.{i}" for i in expected]
    assert stage.policy == ("explicit" if ":" in policy else policy) and plan.layer_policy == policy
    with torch.no_grad():
        assert torch.equal(student(X), _kept(teacher, expected)(X))
    manifest = plan_to_dict(plan)
    assert [b["teacher"] for b in manifest["stages"][0]["blocks"]] == [f"blocks.{i}" for i in expected]
    dropped = {u["teacher"].split(".")[1] for u in manifest["unused_teacher"] if u["teacher"].startswith("blocks.")}
    assert dropped == {str(i) for i in range(6) if i not in expected}
    unused = next(u for u in manifest["unused_teacher"] if u["teacher"].startswith("blocks."))
    assert unused["reason"] == f"block not selected (layer policy: {stage.policy})"
    assert f"{stage.policy}: blocks {', '.join(map(str, expected))} of 6" in summary(plan)


def test_importance_drops_the_blocks_that_change_their_input_least():
    torch.manual_seed(0)
    teacher, student = Net(6).eval(), Net(4).eval()
    with torch.no_grad():  # blocks 1 and 4 pass their input through unchanged
        for i in (1, 4):
            for layer in (teacher.blocks[i].proj, teacher.blocks[i].fc2):
                layer.weight.zero_()
                layer.bias.zero_()
    plan = wscompile.initialize(teacher, student, X, layer_policy="importance", select_head=True)
    assert [b.teacher for b in plan.stages[0].blocks] == ["blocks.0", "blocks.2", "blocks.3", "blocks.5"]
    assert plan.calibration == "the example inputs"
    with torch.no_grad():
        assert torch.equal(student(X), teacher(X))  # the dropped blocks were identities


def test_importance_needs_calibration_inputs():
    with pytest.raises(SelectionError, match="--layers importance .* pass --calib"):
        check_selection(InitOptions(teacher="t", student="s", layers="importance"))
    with pytest.raises(SelectionError, match="--layers importance ranks by the teacher's activations"):
        wscompile.compile(Net(3), Net(2), teacher_inputs={"x": X}, student_inputs={"x": X}, layer_policy="importance")
    with pytest.raises(MatchError, match="unknown layer policy"):
        check_selection(InitOptions(teacher="t", student="s", layers="best"))


# A two-stage ResNet-like CNN: stage 1 opens with a downsampling entry block.
class Basic(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self, depths):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.stage1 = nn.Sequential(*[Basic(8, 8) for _ in range(depths[0])])
        self.stage2 = nn.Sequential(Basic(8, 16, 2), *[Basic(16, 16) for _ in range(depths[1] - 1)])
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.stage2(self.stage1(torch.relu(self.stem(x)))).mean((2, 3)))


def test_entry_blocks_stay_first_in_hierarchical_models():
    torch.manual_seed(0)
    teacher, student = TinyResNet((3, 5)).eval(), TinyResNet((2, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    plan = wscompile.initialize(teacher, student, x, layer_policy="last", select_head=True)
    assert [[b.teacher for b in s.blocks] for s in plan.stages] == [
        ["stage1.1", "stage1.2"],
        ["stage2.0", "stage2.3", "stage2.4"],
    ]
    kept = copy.deepcopy(teacher)
    kept.stage1 = nn.Sequential(*[teacher.stage1[i] for i in (1, 2)])
    kept.stage2 = nn.Sequential(*[teacher.stage2[i] for i in (0, 3, 4)])
    with torch.no_grad():
        assert torch.equal(student(x), kept(x))
    with pytest.raises(MatchError, match=r"student stage 1 .* opens with an entry block .* start the map with 1:0"):
        wscompile.initialize(teacher, student, x, layer_policy="1:1,2,3")
    with pytest.raises(
        MatchError,
        match=r"names student stage\(s\) \[5\], but the student's stages with a teacher "
        r"stage are \[0, 1\]",
    ):
        wscompile.initialize(teacher, student, x, layer_policy="0:0,1;5:0,1")
