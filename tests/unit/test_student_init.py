"""The student's own init, computed only for the tensors a plan keeps at it (``specs.init_kept``).

A transformers student planned on the meta device gets its kept tensors from ``_init_weights`` of
their modules only, after ``torch.manual_seed(seed)``; every other tensor stays on meta. Other
libraries, kept buffers and tied tensors are left to a whole-model build.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from wscompile.cli import main
from wscompile.specs import init_kept

transformers = pytest.importorskip("transformers")

LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


def _llama_on_meta(**overrides) -> nn.Module:
    config = transformers.LlamaConfig(**{**LLAMA, "vocab_size": 500, "initializer_range": 0.05, **overrides})
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def test_only_the_kept_tensors_are_computed_with_the_library_init():
    student = _llama_on_meta()
    assert init_kept(student, {"lm_head.weight"}, seed=0)
    head = student.lm_head.weight
    assert head.device.type == "cpu" and head.shape == (500, 64)
    # LlamaPreTrainedModel._init_weights: normal(0, initializer_range) for a Linear
    assert abs(head.std().item() - 0.05) < 0.005 and abs(head.mean().item()) < 0.005
    assert all(p.is_meta for name, p in student.named_parameters() if name != "lm_head.weight")


def test_the_values_are_a_function_of_the_seed_alone():
    values = {}
    for seed in (0, 0, 1):
        student = _llama_on_meta()
        torch.manual_seed(1234 + len(values))  # the global RNG before the call does not matter
        assert init_kept(student, {"lm_head.weight", "model.norm.weight"}, seed=seed)
        values.setdefault(seed, []).append(student.lm_head.weight.clone())
        assert torch.equal(student.model.norm.weight, torch.ones(64))  # RMSNorm: ones
    assert torch.equal(values[0][0], values[0][1])
    assert not torch.equal(values[0][0], values[1][0])


def test_where_the_rule_does_not_apply_nothing_changes():
    with torch.device("meta"):
        plain = nn.Sequential(nn.Linear(4, 4))
    assert not init_kept(plain, {"0.weight"}, seed=0)  # not a transformers model: build it whole
    assert plain[0].weight.is_meta
    tied = _llama_on_meta(tie_word_embeddings=True)
    assert not init_kept(tied, {"lm_head.weight"}, seed=0)  # shared with the input embedding
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with torch.device("meta"):
        model = transformers.BertModel(bert)
    assert not init_kept(model, {"embeddings.position_ids"}, seed=0)  # a buffer its constructor fills
    assert model.embeddings.word_embeddings.weight.is_meta


def test_init_writes_the_kept_head_by_the_rule_and_apply_rebuilds_it(tmp_path):
    config = transformers.LlamaConfig(**LLAMA, vocab_size=300)
    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(teacher_dir)
    student = f"hf:{teacher_dir}?task=causal-lm&hidden_size=32&num_hidden_layers=1"
    out, manifest, rebuilt = tmp_path / "s.safetensors", tmp_path / "m.json", tmp_path / "r.safetensors"
    assert main(["init", "--teacher", f"hf:{teacher_dir}?task=causal-lm", "--student", student, "--out", str(out),
                 "--manifest", str(manifest), "--seed", "3", "--quiet"]) == 0  # fmt: skip
    kept = [t["student"] for t in json.loads(manifest.read_text())["tensors"] if t["teacher"] is None]
    assert kept == ["lm_head.weight"]
    expected = _llama_on_meta(vocab_size=300, hidden_size=32, num_hidden_layers=1, initializer_range=0.02)
    assert init_kept(expected, kept, seed=3)
    written = load_file(out)
    assert torch.equal(written["lm_head.weight"], expected.lm_head.weight)
    assert main(["apply", "--manifest", str(manifest), "--teacher-weights", str(teacher_dir), "--out", str(rebuilt),
                 "--quiet"]) == 0  # fmt: skip
    assert load_file(rebuilt).keys() == written.keys()
    assert all(torch.equal(load_file(rebuilt)[k], v) for k, v in written.items())
