"""Property tests: random MLPs, CNNs and small transformers, teacher at least as large as the student.

For every drawn pair, ``wscompile.initialize`` must produce a student whose every planned tensor
equals the teacher tensor read at the plan's indices (rebuilt here from ``TensorRecord.axes`` and
``SelectionPlan.groups``, independently of ``passes/select.py``), whose coupled axes share indices,
and whose outputs are finite. Two oracles on top: identity (student architecture == teacher's =>
same function) and renaming (renamed, re-nested student => same values).

Models are a few hundred to a few thousand parameters; examples are derandomized so CI is
deterministic. 210 examples in total.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import wscompile
from wscompile.passes.uniform import uniform_indices
from wscompile.plan import AXIS_FULL, RULE_COPY, RULE_SELECT, RULE_STUDENT_INIT, SelectionPlan, TensorRecord


def _settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# ---- models: each family is built from a config, in a "plain" or a "renamed" style ----------------
# The renamed style computes the same function with other attribute names and nesting, and
# registers its tensors in the same order, so state_dict values can be compared by position.


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.wrapped = inner

    def forward(self, x):
        return self.wrapped(x)


class RenamedMLP(nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({f"dense_{i}": nn.Linear(a, b) for i, (a, b) in enumerate(pairwise(sizes))})

    def forward(self, x):
        layers = list(self.layers.values())
        for layer in layers[:-1]:
            x = F.relu(layer(x))
        return layers[-1](x)


def build_mlp(cfg: dict, renamed: bool = False) -> nn.Module:
    sizes = [cfg["d_in"], *cfg["widths"], cfg["classes"]]
    if renamed:
        return Wrapper(RenamedMLP(sizes))
    layers: list[nn.Module] = []
    for a, b in pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class ConvBlock(nn.Module):
    def __init__(self, c: int, renamed: bool) -> None:
        super().__init__()
        self.renamed = renamed
        if renamed:
            # NOTE: not one child holding every layer: ``test_block_whose_layers_sit_in_one_child_is_repeated``
            self.first = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)])
            self.second = nn.ModuleDict({"conv": nn.Conv2d(c, c, 3, padding=1, bias=False), "norm": nn.BatchNorm2d(c)})
        else:
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        if self.renamed:
            conv1, bn1 = self.first
            return F.relu(x + self.second["norm"](self.second["conv"](F.relu(bn1(conv1(x))))))
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class CNN(nn.Module):
    def __init__(self, cfg: dict, renamed: bool = False) -> None:
        super().__init__()
        c1, c2 = cfg["channels"]
        d1, d2 = cfg["depths"]
        parts = {
            "stem": nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU()),
            "stage1": nn.Sequential(*[ConvBlock(c1, renamed) for _ in range(d1)]),
            "down": nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            "stage2": nn.Sequential(*[ConvBlock(c2, renamed) for _ in range(d2)]),
            "head": nn.Linear(c2, cfg["classes"]),
        }
        if renamed:
            self.body = nn.ModuleDict({k: v for k, v in parts.items() if k != "head"})
            self.classifier = parts["head"]
        else:
            for name, module in parts.items():
                setattr(self, name, module)

    def forward(self, x):
        body = self.body if hasattr(self, "body") else self
        x = body.stage2(body.down(body.stage1(body.stem(x))))
        head = self.classifier if hasattr(self, "classifier") else self.head
        return head(x.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, renamed: bool) -> None:
        super().__init__()
        if renamed:
            self.pre_mixer = nn.ModuleDict({"norm": nn.LayerNorm(dim)})
            self.mixer = Attention(dim, heads)
            self.pre_ffn = nn.ModuleList([nn.LayerNorm(dim)])
            self.ffn = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, dim)])
        else:
            self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim)
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        if hasattr(self, "mixer"):
            x = x + self.mixer(self.pre_mixer["norm"](x))
            return x + self.ffn[1](F.gelu(self.ffn[0](self.pre_ffn[0](x))))
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    def __init__(self, cfg: dict, renamed: bool = False) -> None:
        super().__init__()
        dim = cfg["heads"] * cfg["head_dim"]
        self.embed = nn.Embedding(cfg["vocab"], dim)
        self.blocks = nn.Sequential(*[Block(dim, cfg["heads"], cfg["hidden"], renamed) for _ in range(cfg["depth"])])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, cfg["classes"])

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


def build_transformer(cfg: dict, renamed: bool = False) -> nn.Module:
    model = Transformer(cfg, renamed)
    return Wrapper(model) if renamed else model


FAMILIES = {"mlp": build_mlp, "cnn": CNN, "transformer": build_transformer}


def example_input(family: str, cfg: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if family == "mlp":
        return torch.randn(3, cfg["d_in"], generator=generator)
    if family == "cnn":
        return torch.randn(2, 3, 6, 6, generator=generator)
    return torch.randint(0, cfg["vocab"], (2, 5), generator=generator)


# ---- strategies: a teacher config, and a student config no larger anywhere -------------------------

sizes = st.integers(1, 10)


@st.composite
def no_larger(draw, teacher_size: int, low: int = 1) -> int:
    return draw(st.integers(min(low, teacher_size), teacher_size))


@st.composite
def mlp_pair(draw) -> tuple[dict, dict]:
    widths = draw(st.lists(sizes, min_size=1, max_size=4))
    teacher = {"d_in": draw(st.integers(1, 6)), "widths": widths, "classes": draw(st.integers(2, 6))}
    student = dict(teacher, widths=[draw(no_larger(w)) for w in widths], classes=draw(no_larger(teacher["classes"], 2)))
    return teacher, student


@st.composite
def cnn_pair(draw) -> tuple[dict, dict]:
    channels = [draw(st.integers(1, 6)) for _ in range(2)]
    depths = [draw(st.integers(1, 3)) for _ in range(2)]
    teacher = {"channels": channels, "depths": depths, "classes": draw(st.integers(2, 5))}
    student = {
        "channels": [draw(no_larger(c)) for c in channels],
        "depths": [draw(no_larger(d)) for d in depths],
        "classes": draw(no_larger(teacher["classes"], 2)),
    }
    return teacher, student


@st.composite
def transformer_pair(draw) -> tuple[dict, dict]:
    teacher = {
        "heads": draw(st.integers(1, 3)),
        "head_dim": draw(st.integers(1, 4)),
        "hidden": draw(st.integers(1, 16)),
        "depth": draw(st.integers(1, 3)),
        "vocab": draw(st.integers(2, 12)),
        "classes": draw(st.integers(2, 5)),
    }
    student = dict(
        teacher,
        heads=draw(no_larger(teacher["heads"])),
        head_dim=draw(no_larger(teacher["head_dim"])),
        hidden=draw(no_larger(teacher["hidden"])),
        depth=draw(no_larger(teacher["depth"])),
        classes=draw(no_larger(teacher["classes"], 2)),
    )
    return teacher, student


PAIRS = {"mlp": mlp_pair(), "cnn": cnn_pair(), "transformer": transformer_pair()}


def random_model(family: str, cfg: dict, seed: int, renamed: bool = False) -> nn.Module:
    """A model with every tensor random (BatchNorm statistics too), so selections are visible."""
    torch.manual_seed(seed)
    model = FAMILIES[family](cfg, renamed).eval()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if key.endswith("running_var") else torch.randn_like(tensor))
    return model


# ---- the oracle: rebuild each planned tensor from the plan's own index rules ------------------------


def axis_indices(record: TensorRecord, plan: SelectionPlan, teacher_shape: list[int]) -> list[list[int] | None]:
    """Teacher indices per student axis (None: the whole axis), from ``axes`` and ``groups``.

    ``teacher_shape`` is the teacher tensor's shape seen in the student's layout. An axis reads
    ``rule.teacher_size`` teacher elements from ``rule.offset`` on (a part of a fused tensor), as
    ``rule.blocks`` equal blocks, each selected with the same indices.
    """
    groups = {g.id: g for g in plan.groups}
    out: list[list[int] | None] = []
    assert record.axes is not None and len(record.axes) == len(record.student_shape) == len(teacher_shape)
    for size, rule, teacher_size in zip(record.student_shape, record.axes, teacher_shape, strict=True):
        assert rule.student_size == size
        offset = rule.offset
        assert offset >= 0 and offset + rule.teacher_size <= teacher_size
        if rule.rule == AXIS_FULL:
            assert rule.teacher_size == rule.student_size
            whole = offset == 0 and rule.teacher_size == teacher_size
            out.append(None if whole else list(range(offset, offset + rule.teacher_size)))
            continue
        teacher_block, student_block = rule.teacher_size // rule.blocks, rule.student_size // rule.blocks
        candidates = []
        if rule.group is not None:
            candidates.append(groups[rule.group].indices)
        if rule.step is not None:
            candidates.append(list(range(0, teacher_block, rule.step)))
        if rule.indices is not None:
            candidates.append(rule.indices)
        assert candidates, f"{record.student}: an axis with no index rule"
        within = candidates[0]
        assert all(c == within for c in candidates), f"{record.student}: step, indices and group disagree"
        assert len(within) == student_block and within == sorted(set(within))
        assert all(0 <= i < teacher_block for i in within)
        # The method is the paper's uniform rule, applied per logical block.
        assert within == uniform_indices(teacher_block, student_block)
        out.append([offset + b * teacher_block + i for b in range(rule.blocks) for i in within])
    return out


def teacher_view(tensor: torch.Tensor, record: TensorRecord) -> torch.Tensor:
    rank = len(record.student_shape)
    if record.reshape is None:
        return tensor
    if record.reshape == "transpose":
        return tensor.t()
    if record.reshape == "linear->conv1x1":
        return tensor.reshape(*tensor.shape, *[1] * (rank - tensor.dim()))
    assert record.reshape == "conv1x1->linear", record.reshape
    return tensor.reshape(tensor.shape[:2])


def check_plan(teacher: nn.Module, before: dict[str, torch.Tensor], student: nn.Module, plan: SelectionPlan) -> None:
    """Every student tensor is either its teacher tensor at the plan's indices or untouched."""
    teacher_state, after = teacher.state_dict(), student.state_dict()
    assert [r.student for r in plan.tensors] == list(after)
    for record in plan.tensors:
        value = after[record.student]
        if record.rule == RULE_STUDENT_INIT:
            assert record.teacher is None
            assert torch.equal(value, before[record.student]), record.student
            continue
        assert record.rule in (RULE_COPY, RULE_SELECT)
        expected = teacher_view(teacher_state[record.teacher], record)
        for axis, index in enumerate(axis_indices(record, plan, list(expected.shape))):
            if index is not None:
                expected = expected.index_select(axis, torch.tensor(index, dtype=torch.long))
        assert (record.rule == RULE_COPY) == all(r.rule == AXIS_FULL for r in record.axes)
        assert torch.equal(value, expected.to(value.dtype)), record.student
    # Coupled groups: every member axis refers to its group, so all members read the same indices.
    for group in plan.groups:
        assert group.indices == (
            list(range(group.teacher_size))
            if group.teacher_size == group.student_size
            else uniform_indices(group.teacher_size, group.student_size)
        )
        for member in group.members:
            name, _, axis = member.rpartition(":")
            record = next(r for r in plan.tensors if r.student == name)
            assert record.axes[int(axis)].group == group.id, member


def indices_of(plan: SelectionPlan, name: str, axis: int) -> list[int] | None:
    """Teacher indices student tensor ``name`` reads along ``axis``; None: the whole axis."""
    record = next(r for r in plan.tensors if r.student == name)
    teacher_shape = record.teacher_shape
    if record.reshape is not None:
        teacher_shape = list(teacher_view(torch.empty(record.teacher_shape, device="meta"), record).shape)
    return axis_indices(record, plan, teacher_shape)[axis]


def run(family: str, teacher_cfg: dict, student_cfg: dict, *, select_head: bool, renamed: bool = False):
    teacher = random_model(family, teacher_cfg, seed=1)
    student = random_model(family, student_cfg, seed=2, renamed=renamed)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = example_input(family, teacher_cfg)
    plan = wscompile.initialize(teacher, student, x, select_head=select_head)
    check_plan(teacher, before, student, plan)
    with torch.no_grad():
        assert torch.isfinite(student(x)).all()
    return teacher, student, plan


def assert_same_name_selection(plan: SelectionPlan) -> None:
    """Teacher and student are the same class: every selected tensor reads its namesake (first-N)."""
    for record in plan.tensors:
        if record.teacher is not None:
            assert record.teacher == record.student
        else:
            assert record.is_head, f"{record.student} kept at init: {record.reason}"


# ---- the properties ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # NOTE: tiny ops are much slower with several intra-op threads on a shared 2-core CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@_settings(70)
@given(pair=mlp_pair(), select_head=st.booleans())
def test_mlp_selection_follows_the_plan(pair, select_head):
    teacher_cfg, student_cfg = pair
    _, _, plan = run("mlp", teacher_cfg, student_cfg, select_head=select_head)
    assert_same_name_selection(plan)
    linears = [r.student for r in plan.tensors if r.student.endswith(".weight")]
    for a, b in pairwise(linears):
        # layer i's outputs are layer i+1's inputs: the same teacher channels on both sides
        if select_head or b != linears[-1]:
            assert indices_of(plan, a, 0) == indices_of(plan, b, 1), (a, b)
        assert indices_of(plan, a, 0) == indices_of(plan, a.replace("weight", "bias"), 0)


@_settings(45)
@given(pair=cnn_pair(), select_head=st.booleans())
def test_cnn_selection_follows_the_plan(pair, select_head):
    teacher_cfg, student_cfg = pair
    _, _, plan = run("cnn", teacher_cfg, student_cfg, select_head=select_head)
    assert_same_name_selection(plan)
    # a residual stage is one channel space: the stem's (or downsampling conv's) outputs, every block's
    # input and output; inside a block, conv1's outputs are bn1's channels and conv2's inputs
    for stage, source, depth in (
        ("stage1", "stem.0", student_cfg["depths"][0]),
        ("stage2", "down", student_cfg["depths"][1]),
    ):
        stream = indices_of(plan, f"{source}.weight", 0)
        for i in range(depth):
            block = f"{stage}.{i}"
            for name, axis in (("conv1.weight", 1), ("conv2.weight", 0), ("bn2.weight", 0), ("bn2.running_mean", 0)):
                assert indices_of(plan, f"{block}.{name}", axis) == stream, (block, name)
            inner = indices_of(plan, f"{block}.conv1.weight", 0)
            for name, axis in (("bn1.bias", 0), ("bn1.running_var", 0), ("conv2.weight", 1)):
                assert indices_of(plan, f"{block}.{name}", axis) == inner, (block, name)
    assert indices_of(plan, "down.weight", 1) == indices_of(plan, "stem.0.weight", 0)
    if select_head:
        assert indices_of(plan, "head.weight", 1) == indices_of(plan, "down.weight", 0)


@_settings(45)
@given(pair=transformer_pair(), select_head=st.booleans())
def test_transformer_selection_follows_the_plan(pair, select_head):
    teacher_cfg, student_cfg = pair
    _, _, plan = run("transformer", teacher_cfg, student_cfg, select_head=select_head)
    assert_same_name_selection(plan)
    stream = indices_of(plan, "embed.weight", 1)  # the residual stream's channels
    readers = [("norm.weight", 0)] + ([("head.weight", 1)] if select_head else [])
    for i in range(student_cfg["depth"]):
        readers += [
            (f"blocks.{i}.norm1.weight", 0),
            (f"blocks.{i}.attn.qkv.weight", 1),
            (f"blocks.{i}.attn.proj.weight", 0),
            (f"blocks.{i}.fc1.weight", 1),
            (f"blocks.{i}.fc2.weight", 0),
        ]
        assert_qkv_selected_per_part(plan, teacher_cfg, student_cfg, i)
    for name, axis in readers:
        assert indices_of(plan, name, axis) == stream, name


def assert_qkv_selected_per_part(plan: SelectionPlan, teacher_cfg: dict, student_cfg: dict, block: int) -> None:
    """q, k and v are selected alike, never across each other; the projection reads v's channels."""
    qkv = indices_of(plan, f"blocks.{block}.attn.qkv.weight", 0)
    if qkv is not None:
        t_dim, s_dim = (c["heads"] * c["head_dim"] for c in (teacher_cfg, student_cfg))
        within = uniform_indices(t_dim, s_dim)
        assert qkv == [part * t_dim + j for part in range(3) for j in within]
        assert indices_of(plan, f"blocks.{block}.attn.proj.weight", 1) == within


@_settings(25)
@given(family=st.sampled_from(sorted(FAMILIES)), data=st.data())
def test_identity_when_student_equals_teacher(family, data):
    teacher_cfg, _ = data.draw(PAIRS[family])
    teacher, student, plan = run(family, teacher_cfg, teacher_cfg, select_head=True)
    assert plan.coverage.fraction == 1.0
    assert all(r.rule == RULE_COPY for r in plan.tensors)
    x = example_input(family, teacher_cfg)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


@_settings(25)
@given(family=st.sampled_from(sorted(FAMILIES)), data=st.data(), select_head=st.booleans())
def test_renaming_and_renesting_the_student_changes_nothing(family, data, select_head):
    teacher_cfg, student_cfg = data.draw(PAIRS[family])
    _, plain, plain_plan = run(family, teacher_cfg, student_cfg, select_head=select_head)
    _, renamed, renamed_plan = run(family, teacher_cfg, student_cfg, select_head=select_head, renamed=True)
    plain_state, renamed_state = plain.state_dict(), renamed.state_dict()
    assert len(plain_state) == len(renamed_state) and list(plain_state) != list(renamed_state)
    for (name, value), (new_name, new_value) in zip(plain_state.items(), renamed_state.items(), strict=True):
        assert value.shape == new_value.shape and torch.equal(value, new_value), (name, new_name)
    assert plain_plan.coverage == renamed_plan.coverage
    x = example_input(family, teacher_cfg)
    with torch.no_grad():
        assert torch.equal(plain(x), renamed(x))


# ---- minimal reproducers of matcher bugs the properties found (fixed) ----


def test_lone_teacher_block_is_a_stage_when_the_student_repeats_nothing():
    teacher_cfg = {"channels": [4, 6], "depths": [1, 2], "classes": 3}
    student_cfg = {"channels": [2, 3], "depths": [1, 1], "classes": 3}
    _, _, plan = run("cnn", teacher_cfg, student_cfg, select_head=False)
    assert_same_name_selection(plan)  # stage1.0.*: "no teacher stage matches stage 0 (stage1, 1 blocks)"


def test_fused_qkv_with_one_head_is_selected_per_part():
    teacher_cfg = {"heads": 3, "head_dim": 3, "hidden": 4, "depth": 1, "vocab": 5, "classes": 2}
    student_cfg = dict(teacher_cfg, heads=1, head_dim=2)
    _, _, plan = run("transformer", teacher_cfg, student_cfg, select_head=False)
    assert_qkv_selected_per_part(plan, teacher_cfg, student_cfg, 0)  # got [0, 5, 10, 16, 21, 26]


class ResidualPair(nn.Module):
    def __init__(self, width: int, in_one_child: bool) -> None:
        super().__init__()
        if in_one_child:
            self.layers = nn.ModuleList([nn.Linear(width, width), nn.Linear(width, width)])
        else:
            self.first, self.second = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        first, second = self.layers if hasattr(self, "layers") else (self.first, self.second)
        return x + second(F.relu(first(x)))


class NormsTogether(nn.Module):
    """norm -> dense -> norm -> dense, with both norms in one ModuleList (run apart in time)."""

    def __init__(self, width: int, together: bool) -> None:
        super().__init__()
        if together:
            self.norms = nn.ModuleList([nn.LayerNorm(width), nn.LayerNorm(width)])
            self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        else:
            self.norm1, self.fc1 = nn.LayerNorm(width), nn.Linear(width, width)
            self.norm2, self.fc2 = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        norm1, norm2 = self.norms if hasattr(self, "norms") else (self.norm1, self.norm2)
        return self.fc2(norm2(self.fc1(norm1(x))))


def test_block_whose_layers_sit_in_one_child_is_repeated():
    teacher = nn.Sequential(nn.Linear(4, 6), *[ResidualPair(6, in_one_child=False) for _ in range(3)])
    student = nn.Sequential(nn.Linear(4, 6), *[ResidualPair(6, in_one_child=True) for _ in range(2)])
    plan = wscompile.initialize(teacher, student, torch.randn(3, 4))
    assert plan.coverage.fraction == 1.0  # 0.58: block 2 "no teacher stage matches stage 1 (2, 1 blocks)"


def test_module_run_in_two_places_keeps_execution_order():
    torch.manual_seed(0)
    teacher, student = NormsTogether(6, together=False).eval(), NormsTogether(6, together=True).eval()
    x = torch.randn(3, 6)
    wscompile.initialize(teacher, student, x, select_head=True)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


# ---- growing students (--allow-partial): wider than the teacher in some channel dimension -----------


@st.composite
def no_smaller(draw, teacher_size: int, high: int = 8) -> int:
    return draw(st.integers(teacher_size, teacher_size + high))


@st.composite
def growing_pair(draw) -> tuple[str, dict, dict]:
    """A teacher and a student no smaller anywhere and wider in at least one channel dimension."""
    family = draw(st.sampled_from(["mlp", "cnn"]))
    if family == "mlp":
        teacher = {
            "d_in": draw(st.integers(1, 6)),
            "widths": draw(st.lists(sizes, min_size=1, max_size=3)),
            "classes": draw(st.integers(2, 6)),
        }
        student = dict(teacher, widths=[draw(no_smaller(w)) for w in teacher["widths"]])
        grown = student["widths"] != teacher["widths"]
    else:
        teacher = {
            "channels": [draw(st.integers(1, 5)) for _ in range(2)],
            "depths": [draw(st.integers(1, 2)) for _ in range(2)],
            "classes": draw(st.integers(2, 5)),
        }
        student = dict(teacher, channels=[draw(no_smaller(c, 6)) for c in teacher["channels"]])
        grown = student["channels"] != teacher["channels"]
    if not grown:
        key = "widths" if family == "mlp" else "channels"
        student[key] = [student[key][0] + draw(st.integers(1, 6)), *student[key][1:]]
    return family, teacher, student


@_settings(12)
@given(pair=growing_pair())
def test_widening_a_teacher_preserves_its_function(pair):
    family, teacher_cfg, student_cfg = pair
    teacher = random_model(family, teacher_cfg, seed=1)
    student = random_model(family, student_cfg, seed=2)
    x = example_input(family, teacher_cfg)
    with pytest.raises(wscompile.SelectionError, match="larger than their teacher match"):
        wscompile.initialize(teacher, student, x, select_head=True)
    plan = wscompile.initialize(teacher, student, x, select_head=True, allow_partial=True)
    assert [g.growth for g in plan.groups if g.student_size > g.teacher_size] == ["widen"] * sum(
        g.student_size > g.teacher_size for g in plan.groups
    )
    coverage = plan.coverage
    assert coverage.grown_params > 0 and coverage.selected_params + coverage.grown_params == coverage.total_params
    with torch.no_grad():
        expected = teacher(x)
        # NOTE: random weights through residual stages give outputs in the thousands: float32 rounding of
        # the reordered sums is relative to their scale
        torch.testing.assert_close(student(x), expected, atol=1e-5 * (1 + expected.abs().max().item()), rtol=1e-5)


@_settings(8)
@given(pair=growing_pair())
def test_growing_by_init_copies_the_teacher_part_and_keeps_the_rest(pair):
    family, teacher_cfg, student_cfg = pair
    teacher = random_model(family, teacher_cfg, seed=1)
    student = random_model(family, student_cfg, seed=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    plan = wscompile.initialize(
        teacher, student, example_input(family, teacher_cfg), select_head=True, allow_partial=True, growth="init"
    )
    teacher_state, after = teacher.state_dict(), student.state_dict()
    left = 0
    for record in plan.tensors:
        value, expected = after[record.student], teacher_state[record.teacher]
        part = tuple(slice(0, d) for d in expected.shape)  # same-class models: the teacher part comes first
        assert torch.equal(value[part], expected), record.student
        rest = torch.ones_like(value, dtype=torch.bool)
        rest[part] = False
        assert torch.equal(value[rest], before[record.student][rest]), record.student
        left += int(rest.sum())
    assert plan.coverage.grown_params == 0 and plan.coverage.selected_params + left == plan.coverage.total_params
