"""Element-selection methods beyond uniform: consistency across coupled dimensions, whole heads,
importance by weights and activations, rescaling, and reproducibility from the manifest."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import wscompile
from wscompile.commands import InitOptions, run_init
from wscompile.errors import SelectionError
from wscompile.passes.select import teacher_index, to_student_layout
from wscompile.plan import AxisRule, GroupRecord, SelectionPlan, TensorRecord
from wscompile.reports import plan_to_dict, validate_manifest
from wscompile.weights import DictSource, open_weights, take

IDS = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))}


def _llama(hidden, heads, kv_heads, head_dim, layers=2):
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=100,
        max_position_embeddings=32,
        use_cache=False,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _vit(width, heads, depth=2):
    return VisionTransformer(
        img_size=16, patch_size=4, embed_dim=width, depth=depth, num_heads=heads, num_classes=10
    ).eval()


def _convnext(dims, depths):
    return timm.create_model("convnext_atto", dims=dims, depths=depths, num_classes=10).eval()


def _taken(plan: SelectionPlan, name: str, axis: int) -> list[int]:
    """Teacher indices a student tensor reads along ``axis`` (same layout in teacher and student)."""
    record = next(r for r in plan.tensors if r.student == name)
    assert record.reshape is None, name
    index = teacher_index(record, {g.id: g.indices for g in plan.groups})[axis]
    return list(range(record.teacher_shape[axis])) if index is None else index


def _replay(plan: SelectionPlan, teacher_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every planned student tensor, recomputed from the plan's indices alone."""
    groups = {g.id: g.indices for g in plan.groups}
    out = {}
    for record in plan.tensors:
        if record.teacher is not None:
            values = take(teacher_state[record.teacher], teacher_index(record, groups))
            out[record.student] = to_student_layout(values, record)
    return out


def _assert_replays(plan: SelectionPlan, teacher: nn.Module, student: nn.Module) -> None:
    state = student.state_dict()
    replayed = _replay(plan, teacher.state_dict())
    assert replayed
    for key, value in replayed.items():
        torch.testing.assert_close(state[key], value.to(state[key].dtype), rtol=0, atol=0, msg=key)


def _assert_groups_consistent(plan: SelectionPlan) -> None:
    """Every member axis of a group reads exactly the group's indices."""
    records = {r.student: r for r in plan.tensors}
    for group in plan.groups:
        for member in group.members:
            name, axis = member.rsplit(":", 1)
            record = records[name]
            if record.axes is None or record.axes[int(axis)].group != group.id:
                continue  # a tensor too large for its teacher, or re-planned as a tie
            rule = record.axes[int(axis)]
            within = rule.indices if rule.step is None else list(range(0, group.teacher_size, rule.step))
            assert within is None or within == group.indices, member


def _plan(method, teacher, student, inputs, **kwargs):
    plan = wscompile.initialize(teacher, student, inputs, method=method, **kwargs)
    _assert_groups_consistent(plan)
    _assert_replays(plan, teacher, student)
    return plan


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_llama_gqa_glu_tied_dimensions_share_indices(method):
    torch.manual_seed(0)
    teacher, student = _llama(64, 8, 4, head_dim=8), _llama(32, 4, 2, head_dim=4)
    plan = _plan(method, teacher, student, IDS)
    residual = _taken(plan, "model.embed_tokens.weight", 1)
    assert len(residual) == 32 and residual == sorted(set(residual))
    reads = [("model.norm.weight", 0)]
    for i in range(2):
        layer = f"model.layers.{i}"
        reads += [
            (f"{layer}.input_layernorm.weight", 0),
            (f"{layer}.post_attention_layernorm.weight", 0),
            (f"{layer}.self_attn.o_proj.weight", 0),
            (f"{layer}.mlp.down_proj.weight", 0),
        ]
        reads += [(f"{layer}.self_attn.{p}_proj.weight", 1) for p in "qkv"]
        reads += [(f"{layer}.mlp.{p}_proj.weight", 1) for p in ("gate", "up")]
        # GLU: gate and up rows and down columns are one dimension
        hidden = _taken(plan, f"{layer}.mlp.gate_proj.weight", 0)
        assert _taken(plan, f"{layer}.mlp.up_proj.weight", 0) == hidden
        assert _taken(plan, f"{layer}.mlp.down_proj.weight", 1) == hidden
        _assert_heads_consistent(plan, layer, d_t=8, d_s=4, r_t=2, r_s=2)
    for name, axis in reads:
        assert _taken(plan, name, axis) == residual, name
    # tied embeddings: the output embedding is the input embedding, planned once
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, residual])


def _heads(indices: list[int], d_t: int, d_s: int) -> list[tuple[int, list[int]]]:
    """(teacher head, teacher dims) of each student head; asserts each reads one teacher head."""
    out = []
    for h in range(len(indices) // d_s):
        chunk = indices[h * d_s : (h + 1) * d_s]
        teacher_heads = {i // d_t for i in chunk}
        assert len(teacher_heads) == 1, f"student head {h} reads teacher heads {teacher_heads}"
        out.append((teacher_heads.pop(), [i % d_t for i in chunk]))
    return out


def _assert_heads_consistent(plan, layer, *, d_t, d_s, r_t, r_s):
    attn = f"{layer}.self_attn"
    q = _heads(_taken(plan, f"{attn}.q_proj.weight", 0), d_t, d_s)
    k = _heads(_taken(plan, f"{attn}.k_proj.weight", 0), d_t, d_s)
    v = _heads(_taken(plan, f"{attn}.v_proj.weight", 0), d_t, d_s)
    o = _heads(_taken(plan, f"{attn}.o_proj.weight", 1), d_t, d_s)
    assert o == [(head, v[0][1]) for head, _ in q]  # o reads the query heads with the value dims
    for h, (head, dims) in enumerate(q):
        kv_head, kv_dims = k[h // r_s]
        assert head // r_t == kv_head  # a student query head stays in the kv group it reads
        assert dims == kv_dims  # q and k dims match (a dot product)
        half = d_t // 2
        assert dims[d_s // 2 :] == [half + i for i in dims[: d_s // 2]]  # rotary pairs stay pairs
    assert [head for head, _ in v] == [head for head, _ in k]


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_vit_residual_fused_qkv_and_projection_share_indices(method):
    torch.manual_seed(0)
    teacher, student = _vit(64, 4), _vit(32, 2)
    plan = _plan(method, teacher, student, torch.randn(2, 3, 16, 16))
    residual = _taken(plan, "patch_embed.proj.weight", 0)
    reads = [("cls_token", 2), ("pos_embed", 2), ("norm.weight", 0)]
    for i in range(2):
        block = f"blocks.{i}"
        reads += [
            (f"{block}.norm1.weight", 0),
            (f"{block}.norm2.weight", 0),
            (f"{block}.attn.qkv.weight", 1),
            (f"{block}.attn.proj.weight", 0),
            (f"{block}.mlp.fc1.weight", 1),
            (f"{block}.mlp.fc2.weight", 0),
        ]
        qkv = _taken(plan, f"{block}.attn.qkv.weight", 0)
        q, k, v = (qkv[p * 32 : (p + 1) * 32] for p in range(3))
        assert [i - 64 for i in k] == q and [i - 128 for i in v] == q  # one index set for q, k and v
        assert _taken(plan, f"{block}.attn.proj.weight", 1) == q  # ... and the output projection
        assert _taken(plan, f"{block}.mlp.fc2.weight", 1) == _taken(plan, f"{block}.mlp.fc1.weight", 0)
    for name, axis in reads:
        assert _taken(plan, name, axis) == residual, name
    if method == "random":
        assert residual != list(range(0, 64, 2))


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_convnext_depthwise_channels_share_indices(method):
    torch.manual_seed(0)
    teacher, student = _convnext((16, 32, 64, 128), (1, 1, 2, 1)), _convnext((8, 16, 32, 64), (1, 1, 1, 1))
    plan = _plan(method, teacher, student, torch.randn(2, 3, 32, 32))
    for stage in range(4):
        channels = _taken(plan, f"stages.{stage}.blocks.0.conv_dw.weight", 0)  # depthwise: out == in channels
        reads = [
            (f"stages.{stage}.blocks.0.{name}", axis)
            for name, axis in [
                ("conv_dw.bias", 0),
                ("norm.weight", 0),
                ("mlp.fc1.weight", 1),
                ("mlp.fc2.weight", 0),
                ("gamma", 0),
            ]
        ]
        reads += (
            [("stem.0.weight", 0), ("stem.1.weight", 0)] if stage == 0 else [(f"stages.{stage}.downsample.1.weight", 0)]
        )
        if stage < 3:
            reads += [(f"stages.{stage + 1}.downsample.0.weight", 0), (f"stages.{stage + 1}.downsample.1.weight", 1)]
        for name, axis in reads:
            assert _taken(plan, name, axis) == channels, name


def test_magnitude_keeps_the_units_with_the_largest_weight_norms():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 6))
    student = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 6))
    plan = wscompile.initialize(teacher, student, torch.randn(3, 6), method="magnitude", select_head=True)
    w1, b1, w2 = teacher[0].weight, teacher[0].bias, teacher[2].weight
    scores = w1.norm(dim=1) + b1.abs() + w2.norm(dim=0)
    expected = sorted(scores.topk(5).indices.tolist())
    assert _taken(plan, "0.weight", 0) == expected == _taken(plan, "2.weight", 1)
    assert torch.equal(student[0].weight, w1[expected])


def test_activation_keeps_the_units_most_active_on_calibration_inputs():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 6))
    student = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 6))
    calibration = torch.randn(64, 6)
    plan = wscompile.initialize(
        teacher, student, torch.randn(3, 6), method="activation", calibration=calibration, select_head=True
    )
    with torch.no_grad():
        pre = teacher[0](calibration)
    scores = pre.abs().mean(0) + pre.relu().abs().mean(0)  # fc1's output + fc2's input
    expected = sorted(scores.topk(5).indices.tolist())
    assert _taken(plan, "0.weight", 0) == expected == _taken(plan, "2.weight", 1)
    assert plan.calibration == "64 samples from the calibration inputs (at most 512 samples, batches of 16)"
    by_weight = wscompile.initialize(teacher, student, torch.randn(3, 6), method="magnitude", select_head=True)
    assert _taken(by_weight, "0.weight", 0) != expected  # the two rankings differ on this teacher


def test_consecutive_keeps_the_first_units_and_heads():
    teacher, student = _llama(64, 8, 4, head_dim=8), _llama(32, 4, 2, head_dim=4)
    plan = _plan("consecutive", teacher, student, IDS)
    assert _taken(plan, "model.embed_tokens.weight", 1) == list(range(32))
    assert _taken(plan, "model.layers.0.mlp.up_proj.weight", 0) == list(range(64))
    # kv heads 0, 1; their first query heads 0, 1 and 2, 3; rotary pairs (0, 4) and (1, 5)
    assert _taken(plan, "model.layers.0.self_attn.q_proj.weight", 0) == [
        h * 8 + i for h in (0, 1, 2, 3) for i in (0, 1, 4, 5)
    ]


def test_random_is_seeded_and_reproducible():
    def residual(seed):
        plan = wscompile.initialize(_vit(64, 4), _vit(32, 2), torch.randn(1, 3, 16, 16), method="random", seed=seed)
        assert plan.seed == seed
        return _taken(plan, "norm.weight", 0)

    assert residual(1) == residual(1) != residual(2)


def test_whole_heads_are_teacher_heads_gqa():
    torch.manual_seed(0)
    teacher, student = _llama(64, 8, 4, head_dim=8), _llama(32, 4, 2, head_dim=8)
    with torch.no_grad():  # make kv group 3 (kv head 3, query heads 6 and 7) the largest by far
        attn = teacher.model.layers[0].self_attn
        for proj in (attn.k_proj, attn.v_proj):
            proj.weight[24:32] *= 50
        attn.q_proj.weight[48:64] *= 50
    plan = _plan("magnitude", teacher, student, IDS, heads="whole")
    assert plan.heads == "whole" and {g.rule for g in plan.groups} >= {"magnitude-whole-heads"}
    residual = _taken(plan, "model.embed_tokens.weight", 1)

    def teacher_head(s_weight, t_weight, h, rows=True):
        """The teacher head a student head's weight slice equals exactly (rows: out axis; else in axis)."""
        if rows:
            part, heads = (
                s_weight[h * 8 : (h + 1) * 8],
                [t_weight[t * 8 : (t + 1) * 8][:, residual] for t in range(len(t_weight) // 8)],
            )
        else:
            part, heads = (
                s_weight[:, h * 8 : (h + 1) * 8],
                [t_weight[residual][:, t * 8 : (t + 1) * 8] for t in range(t_weight.shape[1] // 8)],
            )
        found = [t for t, head in enumerate(heads) if torch.equal(part, head)]
        assert len(found) == 1, (h, found)
        return found[0]

    for i in range(2):
        t_attn, s_attn = teacher.model.layers[i].self_attn, student.model.layers[i].self_attn
        q = [teacher_head(s_attn.q_proj.weight, t_attn.q_proj.weight, h) for h in range(4)]
        k = [teacher_head(s_attn.k_proj.weight, t_attn.k_proj.weight, g) for g in range(2)]
        v = [teacher_head(s_attn.v_proj.weight, t_attn.v_proj.weight, g) for g in range(2)]
        o = [teacher_head(s_attn.o_proj.weight, t_attn.o_proj.weight, h, rows=False) for h in range(4)]
        assert k == v and o == q
        assert [h // 2 for h in q] == [g for g in k for _ in range(2)]  # query heads inside their kv group
        if i == 0:
            assert 3 in k and {6, 7} <= set(q)  # the amplified kv group is kept, with its query heads


def test_whole_heads_are_teacher_heads_fused_qkv():
    torch.manual_seed(0)
    teacher, student = _vit(64, 4), _vit(32, 2)  # head_dim 16 in both
    plan = _plan("magnitude", teacher, student, torch.randn(2, 3, 16, 16), heads="whole")
    qkv = _taken(plan, "blocks.0.attn.qkv.weight", 0)
    for part in range(3):
        for h in range(2):
            chunk = qkv[part * 32 + h * 16 : part * 32 + (h + 1) * 16]
            assert chunk == list(range(chunk[0], chunk[0] + 16)) and chunk[0] % 16 == 0  # one whole head
    assert _taken(plan, "blocks.0.attn.proj.weight", 1) == qkv[:32]


def test_whole_heads_need_equal_head_dim():
    with pytest.raises(SelectionError, match=r"--heads whole .* head_dim 4 .* teacher 8.*--heads split"):
        wscompile.initialize(_llama(64, 8, 4, head_dim=8), _llama(32, 4, 2, head_dim=4), IDS, heads="whole")


def test_rescale_multiplies_weights_whose_input_shrank():
    torch.manual_seed(0)
    teacher, student = _vit(64, 4), _vit(32, 2)
    plan = wscompile.initialize(teacher, student, torch.randn(1, 3, 16, 16), rescale=True)
    records = {r.student: r for r in plan.tensors}
    assert records["blocks.0.mlp.fc2.weight"].scale == math.sqrt(2)  # input 128 -> 64
    assert records["blocks.0.mlp.fc1.bias"].scale is None and records["blocks.0.norm1.weight"].scale is None
    assert records["patch_embed.proj.weight"].scale is None  # its input (pixels) keeps its size
    fc1 = teacher.blocks[0].mlp.fc1
    assert torch.equal(student.blocks[0].mlp.fc1.weight, fc1.weight[::2, ::2] * math.sqrt(2))
    assert torch.equal(student.blocks[0].mlp.fc1.bias, fc1.bias[::2])
    manifest = plan_to_dict(plan)
    assert manifest["rescale"] is True
    assert next(t for t in manifest["tensors"] if t["student"] == "blocks.0.mlp.fc2.weight")["scale"] == math.sqrt(2)


def _plan_from_manifest(manifest: dict) -> SelectionPlan:
    tensors = []
    for entry in manifest["tensors"]:
        fields = dict(entry)
        fields["axes"] = None if entry["axes"] is None else [AxisRule(**a) for a in entry["axes"]]
        tensors.append(TensorRecord(**fields))
    return SelectionPlan(
        manifest["teacher"]["spec"],
        manifest["student"]["spec"],
        manifest["method"],
        manifest["layer_policy"],
        manifest["frontend"],
        tensors,
        [],
        [GroupRecord(**g) for g in manifest["groups"]],
        [],
        0,
        0,
    )


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("magnitude", {"heads": "whole", "rescale": True, "layer_policy": "last"}),
        ("activation", {"layer_policy": "importance"}),
        ("random", {"layer_policy": "0:0,2"}),
    ],
)
def test_manifest_alone_reproduces_the_student(method, options):
    torch.manual_seed(0)
    teacher, student = _llama(64, 8, 4, head_dim=8, layers=3), _llama(32, 4, 2, head_dim=8)
    plan = wscompile.initialize(teacher, student, IDS, method=method, **options)
    manifest = json.loads(json.dumps(plan_to_dict(plan)))
    validate_manifest(manifest)
    _assert_replays(_plan_from_manifest(manifest), teacher, student)
    assert manifest["method"] == method and all(g["rule"].startswith((method, "full")) for g in manifest["groups"])


TINY_MODEL = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, width=32, depth=3):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                                    nn.Linear(2 * width, width)) for _ in range(depth)])
        self.example_inputs = torch.randn(2, 5, 8)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return h


def tiny(**kwargs):
    return Tiny(**kwargs)
"""


def test_cli_options_reach_the_plan(tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(TINY_MODEL)
    calib = tmp_path / "calib.pt"
    torch.save({"x": torch.randn(16, 5, 8)}, calib)
    options = InitOptions(
        teacher=f"{model}:tiny?depth=4",
        student=f"{model}:tiny?width=16&depth=2",
        out=str(tmp_path / "s.safetensors"),
        manifest=str(tmp_path / "s.json"),
        method="activation",
        layers="drop-middle",
        rescale=True,
        calib=str(calib),
        progress=False,
    )
    plan = run_init(options, log=lambda line: None)
    manifest = json.loads((tmp_path / "s.json").read_text())
    validate_manifest(manifest)
    assert (manifest["method"], manifest["layer_policy"], manifest["rescale"]) == ("activation", "drop-middle", True)
    assert manifest["calibration"] == "16 samples from calib.pt (at most 512 samples, batches of 16)"
    assert [b["teacher"] for b in manifest["stages"][0]["blocks"]] == ["blocks.0", "blocks.3"]
    assert "activation" in {g["rule"] for g in manifest["groups"]} <= {"activation", "full"}
    written = open_weights(str(tmp_path / "s.safetensors"))
    assert plan.tensors and all(written.read(r.student).shape == tuple(r.student_shape) for r in plan.tensors)


def test_activation_without_calibration_inputs_is_refused(tmp_path):
    from wscompile.commands import check_selection

    with pytest.raises(SelectionError, match="--method activation .* pass --calib"):
        check_selection(
            InitOptions(teacher="timm:vit_tiny_patch16_224", student="timm:vit_tiny_patch16_224", method="activation")
        )
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 6))
    student = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 6))
    x = {"input": torch.randn(2, 6)}
    with pytest.raises(SelectionError, match="pass calibration inputs"):
        wscompile.compile(teacher, student, teacher_inputs=x, student_inputs=x, method="activation")
    with torch.device("meta"):
        on_meta = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 6))
    with pytest.raises(SelectionError, match="meta device"):
        wscompile.compile(
            on_meta,
            student,
            teacher_inputs=x,
            student_inputs=x,
            method="activation",
            teacher_source=DictSource(teacher.state_dict()),
            calibration=x,
        )
