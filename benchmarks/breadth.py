"""Breadth: teacher -> student pairs the zoo registry does not name, each through ``wscompile init``.

The zoo (``tests/zoo/registry.py``) is what wscompile is tested on; this matrix is what a new user
would try next. Each pair runs in its own process (a crash or a runaway pair cannot take the others
down), as ``wscompile init`` with a random teacher (``--allow-random-teacher``): first as is, and, when
that fails because the student is larger somewhere, again with ``--allow-partial``. Then, in the same
process, the written file is loaded strictly into an independently built student and its outputs
are checked to be finite, and the student is exported to ONNX and checked (``wscompile export``). Pairs marked ``refuse`` are unrelated models that must be refused.

    python benchmarks/breadth.py [--only SUBSTRING] [--timeout 300]

Writes ``benchmarks/results/breadth.md`` and ``breadth.csv``: per pair, the outcome, coverage outside
the head, whether ``--allow-partial`` was needed, strict load and finite outputs; failures grouped by
the first words of their error.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
IMG64 = "1,3,64,64"


@dataclass(frozen=True)
class Case:
    id: str
    teacher: str  # spec; "{name}" is an HF config directory written from HF_CONFIGS
    student: str
    input_shape: str | None = None
    expect: str = "init"  # "init" or "refuse" (unrelated models)


def _hf(name: str, **overrides) -> str:
    return f"hf:{{{name}}}" + ("?" + "&".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "")


# HF teacher configs: (config class, kwargs); students override sizes in their specs.
LM = dict(vocab_size=256, max_position_embeddings=64)
PATCH_TRANSFORMER = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, image_size=32, patch_size=8
)
HF_CONFIGS = {
    "bert": (
        "BertConfig",
        dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, **LM),
    ),
    "roberta": (
        "RobertaConfig",
        dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
            vocab_size=256,
            max_position_embeddings=66,
        ),
    ),
    "distilbert": ("DistilBertConfig", dict(dim=128, n_layers=4, n_heads=4, hidden_dim=512, **LM)),
    "electra": (
        "ElectraConfig",
        dict(
            hidden_size=128, embedding_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, **LM
        ),
    ),
    "deberta": (
        "DebertaV2Config",
        dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, **LM),
    ),
    "albert": (
        "AlbertConfig",
        dict(
            hidden_size=128, embedding_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, **LM
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(n_embd=128, n_layer=4, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0),
    ),
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=344,
            **LM,
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=344,
            **LM,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=344,
            **LM,
        ),
    ),
    "gemma": (
        "GemmaConfig",
        dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=344,
            **LM,
        ),
    ),
    "phi": (
        "PhiConfig",
        dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, **LM),
    ),
    "opt": (
        "OPTConfig",
        dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, ffn_dim=512, word_embed_proj_dim=128, **LM),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, **LM),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=256,
            num_local_experts=4,
            **LM,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=256,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_experts=4,
            **LM,
        ),
    ),
    "t5": (
        "T5Config",
        dict(
            d_model=128,
            d_kv=32,
            num_heads=4,
            d_ff=512,
            num_layers=4,
            vocab_size=256,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
    ),
    "bart": (
        "BartConfig",
        dict(
            d_model=128,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=512,
            decoder_ffn_dim=512,
            **LM,
        ),
    ),
    "whisper": (
        "WhisperConfig",
        dict(
            d_model=128,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=512,
            decoder_ffn_dim=512,
            vocab_size=256,
            num_mel_bins=16,
            max_source_positions=32,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
    ),
    "wav2vec2": (
        "Wav2Vec2Config",
        dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
            conv_dim=(32, 32),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
        ),
    ),
    "vit": (
        "ViTConfig",
        PATCH_TRANSFORMER,
    ),
    "siglip": (
        "SiglipVisionConfig",
        PATCH_TRANSFORMER,
    ),
    "deit": (
        "DeiTConfig",
        PATCH_TRANSFORMER,
    ),
    "dinov2": (
        "Dinov2Config",
        dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
            image_size=56,
            patch_size=14,
        ),
    ),
    "swin": (
        "SwinConfig",
        dict(embed_dim=32, depths=[2, 2], num_heads=[2, 4], image_size=64, patch_size=4, window_size=4),
    ),
    "convnext": ("ConvNextConfig", dict(hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 4, 2])),
    "resnet": ("ResNetConfig", dict(hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2], embedding_size=16)),
    "segformer": (
        "SegformerConfig",
        dict(
            hidden_sizes=[16, 32, 64, 128],
            depths=[2, 2, 2, 2],
            num_attention_heads=[1, 2, 2, 4],
            decoder_hidden_size=64,
        ),
    ),
    "clip": (
        "CLIPConfig",
        dict(
            text_config=dict(
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=256,
                vocab_size=256,
                max_position_embeddings=32,
            ),
            vision_config=dict(
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=256,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=32,
        ),
    ),
}

BERTISH = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=256)
DECODER = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=172)
# fmt: off
CASES = [
    # ---- timm ----
    Case("timm-vit-small->tiny", "timm:vit_small_patch16_224?img_size=64", "timm:vit_tiny_patch16_224?img_size=64"),
    Case("timm-vit-base->small", "timm:vit_base_patch16_224?img_size=64&depth=4",
         "timm:vit_small_patch16_224?img_size=64&depth=2"),
    Case("timm-deit3-small->small-half", "timm:deit3_small_patch16_224?img_size=64",
         "timm:deit3_small_patch16_224?img_size=64&depth=6"),
    Case("timm-beit-base->tiny", "timm:beit_base_patch16_224?img_size=64&depth=4",
         "timm:beit_base_patch16_224?img_size=64&depth=2&embed_dim=384&num_heads=6"),
    Case("timm-vit-relpos", "timm:vit_relpos_small_patch16_224?img_size=64",
         "timm:vit_relpos_small_patch16_224?img_size=64&depth=6&embed_dim=192&num_heads=3"),
    Case("timm-cait-xxs24->xxs12", "timm:cait_xxs24_224?img_size=64", "timm:cait_xxs24_224?img_size=64&depth=12"),
    Case("timm-xcit-tiny->nano", "timm:xcit_tiny_12_p16_224", "timm:xcit_nano_12_p16_224", IMG64),
    Case("timm-convnext-tiny->atto", "timm:convnext_tiny", "timm:convnext_atto", IMG64),
    Case("timm-convnextv2-nano->atto", "timm:convnextv2_nano", "timm:convnextv2_atto", IMG64),
    Case("timm-resnet50->resnet26d", "timm:resnet50d", "timm:resnet26d", IMG64),
    Case("timm-resnet101->resnet50", "timm:resnet101", "timm:resnet50", IMG64),
    Case("timm-wide-resnet50->resnet50", "timm:wide_resnet50_2", "timm:resnet50", IMG64),
    Case("timm-seresnet50->26", "timm:seresnext50_32x4d", "timm:seresnext26d_32x4d", IMG64),
    Case("timm-nf-resnet50->26", "timm:nf_resnet50", "timm:nf_resnet26", IMG64),
    Case("timm-efficientnet-b2->b0", "timm:efficientnet_b2", "timm:efficientnet_b0", IMG64),
    Case("timm-mobilenetv3-large->small", "timm:mobilenetv3_large_100", "timm:mobilenetv3_small_100", IMG64),
    Case("timm-mobilenetv2-140->100", "timm:mobilenetv2_140", "timm:mobilenetv2_100", IMG64),
    Case("timm-regnety-008->004", "timm:regnety_008", "timm:regnety_004", IMG64),
    Case("timm-regnetx-008->004", "timm:regnetx_008", "timm:regnetx_004", IMG64),
    Case("timm-mixer-b->s", "timm:mixer_b16_224?img_size=64", "timm:mixer_s16_224?img_size=64"),
    Case("timm-swin-small->tiny", "timm:swin_small_patch4_window7_224?img_size=64&window_size=4",
         "timm:swin_tiny_patch4_window7_224?img_size=64&window_size=4"),
    Case("timm-swinv2-tiny", "timm:swinv2_tiny_window8_256?img_size=64&window_size=4",
         "timm:swinv2_tiny_window8_256?img_size=64&window_size=4&embed_dim=48&depths=2,2,2,2"),
    Case("timm-edgenext-s->xs", "timm:edgenext_small", "timm:edgenext_x_small", IMG64),
    Case("timm-levit-192->128", "timm:levit_192?img_size=64", "timm:levit_128?img_size=64"),
    Case("timm-efficientformer-l3->l1", "timm:efficientformer_l3", "timm:efficientformer_l1", "1,3,224,224"),
    Case("timm-pvt-v2-b1->b0", "timm:pvt_v2_b1", "timm:pvt_v2_b0", IMG64),
    Case("timm-poolformer-s24->s12", "timm:poolformer_s24", "timm:poolformer_s12", IMG64),
    Case("timm-convmixer", "py:timm.models.convmixer:ConvMixer?dim=256&depth=4",
         "py:timm.models.convmixer:ConvMixer?dim=128&depth=2", IMG64),
    Case("timm-ghostnet-130->100", "timm:ghostnet_130", "timm:ghostnet_100", IMG64),
    Case("timm-mobilevit-s->xs", "timm:mobilevit_s", "timm:mobilevit_xs", IMG64),
    Case("timm-dla60->34", "timm:dla60", "timm:dla34", IMG64),
    Case("timm-densenet169->121", "timm:densenet169", "timm:densenet121", IMG64),
    Case("timm-coatnet-1->0", "timm:coatnet_1_rw_224?img_size=64", "timm:coatnet_0_rw_224?img_size=64"),
    Case("timm-hrnet-small-v2->small", "timm:hrnet_w18_small_v2", "timm:hrnet_w18_small", IMG64),
    # ---- torchvision ----
    Case("tv-resnet101->50", "torchvision:resnet101", "torchvision:resnet50", IMG64),
    Case("tv-wide-resnet50->resnet50", "torchvision:wide_resnet50_2", "torchvision:resnet50", IMG64),
    Case("tv-mobilenet-v2->0.5", "torchvision:mobilenet_v2", "torchvision:mobilenet_v2?width_mult=0.5", IMG64),
    Case("tv-mobilenet-v3-large->small", "torchvision:mobilenet_v3_large", "torchvision:mobilenet_v3_small", IMG64),
    Case("tv-efficientnet-b3->b0", "torchvision:efficientnet_b3", "torchvision:efficientnet_b0", IMG64),
    Case("tv-efficientnet-v2-m->s", "torchvision:efficientnet_v2_m", "torchvision:efficientnet_v2_s", IMG64),
    Case("tv-convnext-small->tiny", "torchvision:convnext_small", "torchvision:convnext_tiny", IMG64),
    Case("tv-swin-s->t", "torchvision:swin_s", "torchvision:swin_t", IMG64),
    Case("tv-swin-v2-s->t", "torchvision:swin_v2_s", "torchvision:swin_v2_t", IMG64),
    Case("tv-regnet-y-800mf->400mf", "torchvision:regnet_y_800mf", "torchvision:regnet_y_400mf", IMG64),
    Case("tv-shufflenet-x1->x0.5", "torchvision:shufflenet_v2_x1_0", "torchvision:shufflenet_v2_x0_5", IMG64),
    Case("tv-vit-l->b", "torchvision:vit_l_16?image_size=64", "torchvision:vit_b_16?image_size=64", IMG64),
    Case("tv-densenet169->121", "torchvision:densenet169", "torchvision:densenet121", IMG64),
    # ---- Hugging Face ----
    *[Case(f"hf-{name}", _hf(name), _hf(name, **BERTISH)) for name in ("bert", "roberta", "electra", "deberta")],
    Case("hf-albert", _hf("albert"), _hf("albert", hidden_size=64, num_attention_heads=2, intermediate_size=256)),
    Case("hf-distilbert", _hf("distilbert"), _hf("distilbert", dim=64, n_layers=2, n_heads=2, hidden_dim=256)),
    Case("hf-gpt2", _hf("gpt2"), _hf("gpt2", n_embd=64, n_layer=2, n_head=2)),
    *[Case(f"hf-{name}", _hf(name), _hf(name, **DECODER)) for name in ("llama", "mistral", "qwen2")],
    Case("hf-gemma", _hf("gemma"), _hf("gemma", num_hidden_layers=2, hidden_size=64, intermediate_size=172)),
    Case("hf-phi", _hf("phi"), _hf("phi", **BERTISH, num_key_value_heads=2)),
    Case("hf-opt", _hf("opt"), _hf("opt", num_hidden_layers=2, hidden_size=64, num_attention_heads=2, ffn_dim=256,
                                   word_embed_proj_dim=64)),
    Case("hf-gpt-neox", _hf("gpt_neox"), _hf("gpt_neox", **BERTISH)),
    Case("hf-mixtral", _hf("mixtral"), _hf("mixtral", num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=96, num_local_experts=3)),
    Case("hf-qwen2-moe", _hf("qwen2_moe"), _hf("qwen2_moe", num_hidden_layers=1, hidden_size=64,
                                               num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
                                               moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                               num_experts=2, num_experts_per_tok=1)),
    Case("hf-t5", _hf("t5"), _hf("t5", d_model=64, num_heads=2, d_ff=256, num_layers=2, num_decoder_layers=2)),
    Case("hf-bart", _hf("bart"), _hf("bart", d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256)),
    Case("hf-whisper", _hf("whisper"), _hf("whisper", d_model=64, encoder_layers=2, decoder_layers=2,
                                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=256,
                                           decoder_ffn_dim=256)),
    Case("hf-wav2vec2", _hf("wav2vec2"), _hf("wav2vec2", **BERTISH)),
    *[Case(f"hf-{name}", _hf(name), _hf(name, **BERTISH)) for name in ("vit", "deit", "dinov2", "siglip")],
    Case("hf-swin", _hf("swin"), _hf("swin", embed_dim=16, depths="1,1", num_heads="1,2")),
    Case("hf-convnext", _hf("convnext"), _hf("convnext", hidden_sizes="16,32,64,128", depths="1,1,2,1"), IMG64),
    Case("hf-resnet", _hf("resnet"), _hf("resnet", hidden_sizes="16,32,64,128", depths="1,1,1,1"), IMG64),
    Case("hf-segformer", _hf("segformer"), _hf("segformer", hidden_sizes="8,16,32,64", depths="1,1,1,1",
                                               decoder_hidden_size=32), IMG64),
    Case("hf-clip", _hf("clip"), _hf("clip")),
    # ---- across libraries ----
    Case("cross-timm-vit->hf-vit", "timm:vit_small_patch16_224?img_size=32&patch_size=8&depth=4",
         _hf("vit", **BERTISH)),
    Case("cross-hf-vit->timm-vit", _hf("vit"),
         "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2&embed_dim=64&num_heads=2"),
    Case("cross-tv-swin-t->timm-swin-t", "torchvision:swin_t", "timm:swin_tiny_patch4_window7_224?img_size=224",
         "1,3,224,224"),
    Case("cross-tv-resnet50->timm-resnet26", "torchvision:resnet50", "timm:resnet26", IMG64),
    Case("cross-tv-convnext-t->timm-convnext-atto", "torchvision:convnext_tiny", "timm:convnext_atto", IMG64),
    # ---- unrelated: must be refused ----
    Case("refuse-resnet18->bert", "timm:resnet18", _hf("bert", **BERTISH), expect="refuse"),
    Case("refuse-bert->resnet18", _hf("bert"), "timm:resnet18", expect="refuse"),
    Case("refuse-resnet18->gpt2", "timm:resnet18", _hf("gpt2", n_embd=64, n_layer=2, n_head=2), expect="refuse"),
    # a text transformer into a vision transformer: the blocks are alike, so this maps (by design)
    Case("cross-hf-gpt2->hf-vit", _hf("gpt2"), _hf("vit", **BERTISH)),
]
# fmt: on

COLUMNS = [
    "pair",
    "expect",
    "outcome",
    "partial",
    "coverage_no_head_pct",
    "selected_no_head_pct",
    "grown_no_head_pct",
    "strict_load",
    "finite",
    "onnx",
    "seconds",
    "error",
]


def write_configs(root: Path) -> dict[str, str]:
    import transformers

    places = {}
    for name, (class_name, kwargs) in HF_CONFIGS.items():
        getattr(transformers, class_name)(**kwargs).save_pretrained(root / name)
        places[name] = str(root / name)
    return places


def run_one(case: Case, places: dict[str, str], work: Path) -> dict[str, object]:
    """One pair, in this process: init (retried with --allow-partial), strict load, finite outputs."""
    import torch

    from wscompile.cli import main
    from wscompile.specs import load_model

    teacher, student = case.teacher.format(**places), case.student.format(**places)
    out, manifest = work / f"{case.id}.safetensors", work / f"{case.id}.json"
    base = [
        "init",
        "--teacher",
        teacher,
        "--student",
        student,
        "--out",
        str(out),
        "--manifest",
        str(manifest),
        "--allow-random-teacher",
        "--no-progress",
        "--force",
    ]
    if case.input_shape:
        base += ["--input-shape", case.input_shape]
    row: dict[str, object] = {"partial": False}
    code = main(base)
    if code != 0 and case.expect == "init":
        row["partial"] = True
        code = main([*base, "--allow-partial"])
    if code != 0:
        row["outcome"] = "refused" if case.expect == "refuse" else "failed"
        return row
    row["outcome"] = "initialized"
    coverage = json.loads(manifest.read_text())["coverage"]
    total = max(1, coverage["total_params_no_head"])
    row["selected_no_head_pct"] = round(100 * coverage["selected_params_no_head"] / total, 1)
    row["grown_no_head_pct"] = round(100 * coverage.get("grown_params_no_head", 0) / total, 1)
    # from the teacher: selected, or grown (widened channels, repeated blocks) from teacher values
    row["coverage_no_head_pct"] = round(row["selected_no_head_pct"] + row["grown_no_head_pct"], 1)
    from safetensors.torch import load_file

    shape = tuple(int(x) for x in case.input_shape.split(",")) if case.input_shape else None
    built = load_model(student, role="student", seed=1, input_shape=shape)
    built.module.load_state_dict(load_file(out), strict=True)
    row["strict_load"] = True
    with torch.no_grad():
        output = built.module(**built.make_inputs(2, None))
    tensors = _tensors(output)
    row["finite"] = bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    # ONNX: exported and checked by onnxruntime against the student at another batch size
    export = ["export", "--student", student, "--weights", str(out), "--onnx", str(work / f"{case.id}.onnx"), "--force"]
    row["onnx"] = main(export + (["--input-shape", case.input_shape] if case.input_shape else [])) == 0
    return row


def _tensors(output: object) -> list:
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    if hasattr(output, "to_tuple"):
        return _tensors(output.to_tuple())
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the pairs whose id contains this")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per pair")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one pair, print its row as JSON
    parser.add_argument("--places", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        case = next(c for c in CASES if c.id == args.one)
        import io
        from contextlib import redirect_stdout

        with redirect_stdout(io.StringIO()):
            row = run_one(case, json.loads(args.places), Path(args.work))
        print("ROW " + json.dumps(row))
        return

    cases = [c for c in CASES if not args.only or args.only in c.id]
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        places = write_configs(Path(tmp) / "hf")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        for case in cases:
            start = time.perf_counter()
            row: dict[str, object] = {"pair": case.id, "expect": case.expect}
            try:
                done = subprocess.run(
                    [sys.executable, __file__, "--one", case.id, "--places", json.dumps(places), "--work", tmp],
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                    env=env,
                )
                found = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
                if found:
                    row.update(json.loads(found[-1][4:]))
                else:
                    row["outcome"] = "crashed"
                errors = [line for line in done.stderr.splitlines() if "error:" in line or "Error" in line]
                if row.get("outcome") in ("failed", "crashed", "refused") and errors:
                    row["error"] = errors[-1].strip()[:300]
            except subprocess.TimeoutExpired:
                row["outcome"] = "timeout"
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(
                f"{case.id}: {row.get('outcome')} {row.get('coverage_no_head_pct', '')} onnx={row.get('onnx')} {row.get('error', '')}",
                flush=True,
            )
    if not args.only:
        _write(rows, time.time() - started)


def _cause(error: str) -> str:
    text = re.sub(r"^wscompile init: error: ", "", error)
    text = re.sub(r"'[^']*'|\([^)]*\)|\d+", "_", text)
    return " ".join(text.split()[:8]) or "(no message)"


def _write(rows: list[dict[str, object]], seconds: float) -> None:
    import torch
    import transformers

    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "breadth.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    expected_init = [r for r in rows if r["expect"] == "init"]
    ok = [r for r in expected_init if r.get("outcome") == "initialized" and r.get("strict_load") and r.get("finite")]
    coverages = [float(r["coverage_no_head_pct"]) for r in ok]
    selected = [float(r["selected_no_head_pct"]) for r in ok]
    refused = [r for r in rows if r["expect"] == "refuse" and r.get("outcome") == "refused"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    lines = [
        "# Breadth: pairs the zoo registry does not name",
        "",
        f"`python benchmarks/breadth.py` ({seconds / 60:.0f} min; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {platform.machine()}; wscompile at commit {commit.strip()}). Random teachers; "
        "each pair in its own process; `--allow-partial` retried when the plain run fails.",
        "",
        f"- initialized soundly (strict load into an independently built student, finite outputs): "
        f"**{len(ok)} of {len(expected_init)}** ({100 * len(ok) / max(1, len(expected_init)):.0f}%), "
        f"{sum(1 for r in ok if r.get('partial'))} of them with `--allow-partial`",
        f"- mean coverage outside the head over those (selected + grown from teacher values): "
        f"**{sum(coverages) / max(1, len(coverages)):.1f}%**; {sum(1 for c in coverages if c >= 95)} at >= 95%; "
        f"selected alone {sum(selected) / max(1, len(selected)):.1f}% "
        f"({sum(1 for c in selected if c >= 95)} at >= 95%)",
        f"- ONNX: **{sum(1 for r in ok if r.get('onnx'))} of {len(ok)}** of those export and match the student "
        "in onnxruntime at another batch size (`wscompile export`)",
        f"- unrelated pairs refused: **{len(refused)} of {sum(1 for r in rows if r['expect'] == 'refuse')}**",
        "",
        "| pair | outcome | --allow-partial | coverage no head % | selected % | grown % | left % | strict load | finite "
        "| onnx | s | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['pair']} | {r.get('outcome', '')} | {'yes' if r.get('partial') else ''} | "
            f"{r.get('coverage_no_head_pct', '')} | {r.get('selected_no_head_pct', '')} | "
            f"{r.get('grown_no_head_pct', '')} | {_left(r)} | {r.get('strict_load', '')} | {r.get('finite', '')} | "
            f"{r.get('onnx', '')} | "
            f"{r.get('seconds', '')} | {str(r.get('error', '')).replace('|', '/')} |"
        )
    causes = Counter(_cause(str(r.get("error", ""))) for r in expected_init if r.get("outcome") != "initialized")
    if causes:
        lines += ["", "## Failures by cause", "", "| cause | pairs |", "| --- | --- |"]
        lines += [f"| {cause} | {count} |" for cause, count in causes.most_common()]
    (RESULTS / "breadth.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'breadth.md'}")


def _left(row: dict) -> str:
    """Share of the student outside the head left at its own init, as text ('' when not initialized)."""
    covered = row.get("coverage_no_head_pct", "")
    return "" if covered == "" else f"{100 - float(covered):.1f}"


if __name__ == "__main__":
    main()
