"""Hugging Face checkpoints read as ``from_pretrained`` reads them.

Every teacher directory here is written by the family's own ``save_pretrained`` (transformers 5 writes
the checkpoint's keys, which it renames and fuses again on load). The oracle is the library itself:
each tensor wscompile reads lazily equals the tensor of ``from_pretrained(dir).state_dict()``.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.zoo.registry import CHECKPOINT_FAMILIES as FAMILIES
from tests.zoo.registry import SMALL_LM, write_checkpoints
from wscompile.cli import main
from wscompile.commands import InitOptions, run_init
from wscompile.passes.select import teacher_index, to_student_layout
from wscompile.specs import load_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """family -> a teacher directory written by that family's save_pretrained (seeded weights)."""
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


def _reference(directory: str) -> tuple[type, dict[str, torch.Tensor]]:
    model = transformers.AutoConfig.from_pretrained(directory).architectures[0]
    loaded = getattr(transformers, model).from_pretrained(directory)
    return type(loaded), loaded.state_dict()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_tensor_reads_as_from_pretrained_loads_it(family: str, checkpoints: dict[str, str]) -> None:
    model_class, expected = _reference(checkpoints[family])
    teacher = load_model(f"hf:{checkpoints[family]}", role="teacher", device="meta")
    assert type(teacher.module) is model_class  # config.architectures, as from_pretrained picks it
    assert teacher.on_meta and set(teacher.source.keys()) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(teacher.source.read(key), tensor), key
        strided = [list(range(0, size, 2)) for size in tensor.shape]
        picked = tensor[torch.meshgrid(*[torch.tensor(axis) for axis in strided], indexing="ij")] if strided else tensor
        assert torch.equal(teacher.source.read(key, strided), picked), key


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2-moe", "gpt-neox", "dinov2", "segformer", "t5"])
def test_init_from_a_save_pretrained_directory_without_hints(
    family: str, checkpoints: dict[str, str], tmp_path
) -> None:
    teacher = checkpoints[family]
    out = tmp_path / "student.safetensors"
    options = InitOptions(
        teacher=f"hf:{teacher}", student=f"hf:{teacher}?{FAMILIES[family][2]}", out=str(out), progress=False
    )
    plan = run_init(options, log=lambda line: None)
    assert plan.coverage.fraction_no_head >= 0.95
    # Every selected tensor is the from_pretrained teacher's tensor at the indices the plan reports.
    _, state = _reference(teacher)
    student = load_file(out)
    groups = {group.id: group.indices for group in plan.groups}
    selected = [record for record in plan.tensors if record.teacher is not None]
    for record in selected:
        values = state[record.teacher]
        for axis, index in enumerate(teacher_index(record, groups)):
            if index is not None:
                values = values.index_select(axis, torch.tensor(index, dtype=torch.long))
        assert torch.equal(student[record.student], to_student_layout(values, record)), record.student
    assert len(selected) >= 5

    # The same student as a folder: from_pretrained loads it with nothing missing and the same tensors.
    folder = tmp_path / "folder"
    run_init(
        InitOptions(teacher=options.teacher, student=options.student, out=f"{folder}/", progress=False),
        log=lambda line: None,
    )
    model_class = getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])
    model, info = model_class.from_pretrained(folder, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    state = model.state_dict()
    assert all(torch.equal(state[key], tensor) for key, tensor in student.items())


def test_fused_experts_read_only_the_selected_experts(checkpoints: dict[str, str]) -> None:
    teacher = load_model(f"hf:{checkpoints['mixtral']}", role="teacher", device="meta")
    key = "model.layers.0.mlp.experts.gate_up_proj"  # 4 experts x (w1; w3) stacked and concatenated
    assert teacher.source.shape(key) == (4, 256, 64)
    before = teacher.source.bytes_read
    part = teacher.source.read(key, [[1, 3], None, None])
    assert teacher.source.bytes_read - before == part.numel() * part.element_size()  # two of four experts
    _, state = _reference(checkpoints["mixtral"])
    assert torch.equal(part, state[key][[1, 3]])
    # Rows across the w1/w3 seam come from both parts, in the order asked for.
    rows = [130, 5, 127, 128]
    assert torch.equal(teacher.source.read(key, [None, rows, None]), state[key][:, rows])


@pytest.mark.parametrize("method", ["uniform", "magnitude"])
def test_fused_experts_keep_gate_up_and_down_channels_together(
    checkpoints: dict[str, str], tmp_path, method: str
) -> None:
    # 128 -> 48 intermediate channels: not a divisor, so a rule over the fused 256 rows would mix gate and
    # up rows; the grouped matmul's chunk(2) makes them two blocks coupled with down_proj's input.
    student = (
        "num_hidden_layers=1&hidden_size=48&intermediate_size=48&num_attention_heads=2"
        "&num_key_value_heads=1&num_local_experts=3"
    )
    options = InitOptions(
        teacher=f"hf:{checkpoints['mixtral']}",
        student=f"hf:{checkpoints['mixtral']}?{student}",
        out=str(tmp_path / "s.safetensors"),
        progress=False,
        method=method,
    )
    plan = run_init(options, log=lambda line: None)
    groups = {group.id: group.indices for group in plan.groups}
    index = {r.student: teacher_index(r, groups) for r in plan.tensors if r.teacher is not None}
    gate_up, down = index["model.layers.0.mlp.experts.gate_up_proj"], index["model.layers.0.mlp.experts.down_proj"]
    gate, up = gate_up[1][:48], gate_up[1][48:]
    assert [i - 128 for i in up] == gate == down[2]
    assert gate_up[0] == down[0] and len(gate_up[0]) == 3  # the same experts in both


def test_base_model_prefix_both_ways(checkpoints: dict[str, str], tmp_path, capsys) -> None:
    _, lm = _reference(checkpoints["llama"])
    base = teacher = load_model(f"hf:{checkpoints['llama']}?task=base", role="teacher", device="meta")
    assert type(base.module) is transformers.LlamaModel
    assert torch.equal(base.source.read("layers.0.mlp.up_proj.weight"), lm["model.layers.0.mlp.up_proj.weight"])
    assert "lm_head.weight" in capsys.readouterr().err  # in the file, unused by a base model: said, not fatal

    transformers.LlamaForCausalLM.from_pretrained(checkpoints["llama"]).model.save_pretrained(tmp_path / "base")
    teacher = load_model(f"hf:{tmp_path / 'base'}?task=causal-lm", role="teacher", device="meta")
    assert torch.equal(teacher.source.read("model.norm.weight"), lm["model.norm.weight"])
    err = capsys.readouterr().err
    assert "holds the base model only" in err and "lm_head.weight" in err
    head = teacher.source.read("lm_head.weight")  # the model's own fresh init, as from_pretrained gives it
    assert head.shape == lm["lm_head.weight"].shape and head.std() > 0


def test_tied_embeddings_and_a_legacy_bin_checkpoint(tmp_path) -> None:
    config = transformers.LlamaConfig(**SMALL_LM, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    expected = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "tied").state_dict()
    teacher = load_model(f"hf:{tmp_path / 'tied'}", role="teacher", device="meta")
    assert torch.equal(teacher.source.read("lm_head.weight"), expected["model.embed_tokens.weight"])

    # The same checkpoint as a legacy pickle (read with weights_only), keys as stored.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "tied" / "config.json").read_text())
    torch.save(load_file(tmp_path / "tied" / "model.safetensors"), legacy / "pytorch_model.bin")
    teacher = load_model(f"hf:{legacy}", role="teacher", device="meta")
    assert all(torch.equal(teacher.source.read(k), v) for k, v in expected.items())


def test_a_checkpoint_of_another_model_still_fails_with_the_keys(checkpoints: dict[str, str], tmp_path, capsys) -> None:
    code = main(
        [
            "init",
            "--out",
            str(tmp_path / "s.safetensors"),
            "--teacher",
            f"hf:{checkpoints['llama']}",
            "--teacher-weights",
            f"{checkpoints['bert']}/model.safetensors",
            "--student",
            f"hf:{checkpoints['llama']}?{FAMILIES['llama'][2]}",
        ]
    )
    assert code != 0 and not list(tmp_path.iterdir())
    err = capsys.readouterr().err.strip().splitlines()
    assert "missing keys" in err[-1] and "model.embed_tokens.weight" in err[-1]


def test_an_op_without_a_lazy_form_is_run_by_transformers_on_read() -> None:
    from transformers.core_model_loading import Transpose

    from wscompile.checkpoints import _apply, _Leaf
    from wscompile.weights import DictSource

    stored = torch.arange(12.0).reshape(3, 4)
    kwargs = dict(source_patterns=["w"], target_patterns=["wt"], full_layer_name="wt", model=None, config=None)
    node = _apply(Transpose(0, 1), {"w": [_Leaf(DictSource({"w": stored}), "w")]}, kwargs)["wt"]
    assert node.shape == (4, 3) and node.dtype == torch.float32  # from a run on meta tensors
    assert torch.equal(node.read([[1, 3], None]), stored.t()[[1, 3]])
