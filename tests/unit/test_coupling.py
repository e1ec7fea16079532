"""Coupled dimensions of real model families: heads, GQA, rotary, ties, position grids, buffers."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from timm.layers import resample_abs_pos_embed

import wscompile
from wscompile.passes.uniform import uniform_indices


def _llama(hidden, heads, kv_heads, layers=2, head_dim=None):
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=200,
        max_position_embeddings=64,
        head_dim=head_dim,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = {"input_ids": torch.randint(0, 200, (1, 12))}


def test_gqa_student_query_heads_stay_inside_their_kv_groups():
    teacher, student = _llama(128, 8, 4), _llama(64, 4, 2)
    wscompile.initialize(teacher, student, IDS)
    t_attn, s_attn = teacher.model.layers[0].self_attn, student.model.layers[0].self_attn
    d = 16
    kv = uniform_indices(4, 2)  # teacher kv heads kept: [0, 2]
    queries = [g * 2 + j for g in kv for j in range(2)]  # their query heads: [0, 1, 4, 5]
    cols = uniform_indices(128, 64)

    def heads(weight, chosen):
        return torch.cat([weight[h * d : (h + 1) * d] for h in chosen])[:, cols]

    assert torch.equal(s_attn.k_proj.weight, heads(t_attn.k_proj.weight, kv))
    assert torch.equal(s_attn.v_proj.weight, heads(t_attn.v_proj.weight, kv))
    assert torch.equal(s_attn.q_proj.weight, heads(t_attn.q_proj.weight, queries))
    o_cols = [h * d + i for h in queries for i in range(d)]
    assert torch.equal(s_attn.o_proj.weight, t_attn.o_proj.weight[cols][:, o_cols])


def test_rotary_pairs_stay_pairs_when_head_dim_shrinks():
    teacher, student = _llama(128, 4, 4, head_dim=32), _llama(64, 4, 4, head_dim=16)
    plan = wscompile.initialize(teacher, student, IDS)
    q = next(r for r in plan.tensors if r.student == "model.layers.0.self_attn.q_proj.weight")
    v = next(r for r in plan.tensors if r.student == "model.layers.0.self_attn.v_proj.weight")
    half = uniform_indices(16, 8)
    assert q.axes[0].indices[:16] == half + [16 + i for i in half]  # head 0: dims i and i + 16 together
    assert v.axes[0].indices[:16] == uniform_indices(32, 16)  # values are not rotated


def test_identity_oracle_llama():
    teacher, student = _llama(64, 4, 2), _llama(64, 4, 2)
    wscompile.initialize(teacher, student, IDS, select_head=True)
    with torch.no_grad():
        assert torch.equal(student(**IDS).logits, teacher(**IDS).logits)


@pytest.mark.parametrize("task", ["bert-mlm", "gpt2"])
def test_tied_output_embedding_follows_the_selected_input_embedding(task):
    if task == "gpt2":

        def make(w, n):
            config = transformers.GPT2Config(
                n_embd=w, n_layer=n, n_head=2, vocab_size=200, n_positions=32, bos_token_id=0, eos_token_id=0
            )
            return transformers.GPT2LMHeadModel(config)

        emb, out = "transformer.wte.weight", "lm_head.weight"
    else:

        def make(w, n):
            config = transformers.BertConfig(
                hidden_size=w, num_hidden_layers=n, num_attention_heads=2, intermediate_size=2 * w, vocab_size=200
            )
            return transformers.BertForMaskedLM(config)

        emb, out = "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"
    teacher, student = make(64, 2).eval(), make(32, 1).eval()
    plan = wscompile.initialize(teacher, student, IDS)
    state = student.state_dict()
    assert torch.equal(state[emb], state[out])
    assert torch.equal(state[emb], teacher.state_dict()[emb][:, ::2])
    records = {r.student: r for r in plan.tensors}
    assert records[emb].teacher is not None and records[out].teacher == records[emb].teacher


def test_position_grid_is_resampled_like_timm():
    teacher = timm.create_model("vit_small_patch16_224", img_size=96).eval()
    student = timm.create_model("vit_tiny_patch16_224", img_size=64).eval()
    plan = wscompile.initialize(teacher, student)
    record = next(r for r in plan.tensors if r.student == "pos_embed")
    assert [a.rule for a in record.axes] == ["full", "interpolate", "uniform"]
    selected = teacher.pos_embed[:, :, uniform_indices(384, 192)]
    expected = resample_abs_pos_embed(selected, new_size=(4, 4), old_size=(6, 6), num_prefix_tokens=1)
    assert torch.equal(student.pos_embed, expected)


def test_text_position_table_keeps_the_first_positions():
    def bert(width, positions):
        return transformers.BertModel(
            transformers.BertConfig(
                hidden_size=width,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=2 * width,
                vocab_size=200,
                max_position_embeddings=positions,
            )
        ).eval()

    teacher, student = bert(64, 64), bert(32, 32)
    wscompile.initialize(teacher, student, IDS)
    table = teacher.embeddings.position_embeddings.weight
    assert torch.equal(student.embeddings.position_embeddings.weight, table[:32, ::2])


def test_timm_vit_into_hf_vit_with_separate_qkv_is_the_same_function():
    teacher = timm.create_model("vit_small_patch16_224", img_size=64).eval()
    config = transformers.ViTConfig(
        image_size=64,
        hidden_size=384,
        num_attention_heads=6,
        intermediate_size=1536,
        num_hidden_layers=12,
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    student = transformers.ViTModel(config, add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 64, 64)
    plan = wscompile.initialize(teacher, student, x, student_inputs={"pixel_values": x})
    assert plan.coverage.fraction == 1.0
    key = next(r for r in plan.tensors if r.student == "layers.0.attention.k_proj.weight")
    assert key.teacher == "blocks.0.attn.qkv.weight" and key.axes[0].offset == 384
    with torch.no_grad():
        assert torch.equal(student(pixel_values=x).last_hidden_state, teacher.forward_features(x))


def test_batchnorm_buffers_come_from_the_teacher():
    teacher = timm.create_model("resnet34").eval()
    student = timm.create_model("resnet18").eval()
    teacher.bn1.num_batches_tracked.fill_(7)
    teacher.bn1.running_var.uniform_(0.5, 2.0)
    plan = wscompile.initialize(teacher, student)
    assert student.bn1.num_batches_tracked.item() == 7
    assert torch.equal(student.bn1.running_var, teacher.bn1.running_var)
    assert all(r.teacher is not None for r in plan.tensors if not r.is_head)
