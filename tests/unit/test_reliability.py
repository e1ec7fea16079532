"""Robustness catalogue, round 2: hostile model folders and spec strings.

Each case: the command, its exit status, the one line it prints, no output file, and nothing read
from outside the model folder (a teacher folder is untrusted input).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from wscompile.cli import main


def _init(tmp_path: Path, teacher: str, student: str, *extra: str) -> int:
    return main(
        ["init", "--teacher", teacher, "--student", student, "--out", str(tmp_path / "out.safetensors"), *extra]
    )


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("wscompile init: error: "), err
    return lines[0]


@pytest.fixture
def sharded_teacher(tmp_path: Path) -> tuple[Path, Path]:
    """A BERT folder with a two-shard index, and a "secret" tensor file outside it with the same keys."""
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    folder = tmp_path / "teacher"
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, folder / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[1::2]}, folder / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    secret = tmp_path / "elsewhere" / "secret.safetensors"
    secret.parent.mkdir()
    save_file({k: torch.full_like(v, 7.0) for k, v in state.items() if k in keys[1::2]}, secret)
    return folder, secret


STUDENT = "?num_hidden_layers=1&hidden_size=8&num_attention_heads=1&intermediate_size=16"


def _point_second_shard_at(folder: Path, target: str) -> None:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: (target if v.startswith("model-00002") else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


def test_the_sharded_folder_itself_initializes(tmp_path, sharded_teacher):
    folder, _ = sharded_teacher
    assert _init(tmp_path, f"hf:{folder}", f"hf:{folder}{STUDENT}") == 0


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_a_shard_index_cannot_read_outside_its_folder(tmp_path, sharded_teacher, capsys, how):
    folder, secret = sharded_teacher
    if how == "relative":
        _point_second_shard_at(folder, "../elsewhere/secret.safetensors")
    elif how == "absolute":
        _point_second_shard_at(folder, str(secret))
    else:
        os.remove(folder / "model-00002-of-00002.safetensors")
        os.symlink(secret, folder / "model-00002-of-00002.safetensors")
    assert _init(tmp_path, f"hf:{folder}", f"hf:{folder}{STUDENT}") == 2
    line = _error_line(capsys)
    assert "outside the model folder" in line and "--allow-outside-paths" in line
    assert not (tmp_path / "out.safetensors").exists()
    # The user who trusts the folder can say so; then the file outside is read.
    assert _init(tmp_path, f"hf:{folder}", f"hf:{folder}{STUDENT}", "--allow-outside-paths") == 0


def test_a_weights_file_symlinked_out_of_the_folder_is_refused(tmp_path, capsys):
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    folder = tmp_path / "teacher"
    transformers.BertModel(config).save_pretrained(folder)
    outside = tmp_path / "outside.safetensors"
    os.replace(folder / "model.safetensors", outside)
    os.symlink(outside, folder / "model.safetensors")
    capsys.readouterr()  # save_pretrained's progress bar
    assert _init(tmp_path, f"hf:{folder}", f"hf:{folder}{STUDENT}") == 2
    assert "outside the model folder" in _error_line(capsys)


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        ({"weight_map": ["model-00001-of-00002.safetensors"]}, "not a valid shard index"),
        ({"weight_map": {"embeddings.word_embeddings.weight": 3}}, "not a valid shard index"),
    ],
    ids=["list", "non-string-file"],
)
def test_a_malformed_shard_index_is_one_line(tmp_path, sharded_teacher, capsys, index, expected):
    folder, _ = sharded_teacher
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _init(tmp_path, f"hf:{folder}", f"hf:{folder}{STUDENT}") == 2
    assert expected in _error_line(capsys)


def test_a_shard_missing_a_tensor_its_index_names(tmp_path, sharded_teacher, capsys):
    folder, _ = sharded_teacher
    shard = folder / "model-00002-of-00002.safetensors"
    state = load_file(shard)
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, shard)
    assert _init(tmp_path, f"hf:{folder}", f"hf:{folder}{STUDENT}") == 2
    line = _error_line(capsys)
    assert "lacks 1 tensor(s)" in line and dropped in line


def test_the_scheme_decides_before_a_py_suffix(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / "timm:evil.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f():\n    pass\n")
    assert _init(tmp_path, "timm:evil.py:f", "timm:vit_tiny_patch16_224") == 2
    assert "unknown timm model 'evil.py:f'" in _error_line(capsys)
    assert not marker.exists()
    # A file whose name has a colon is named explicitly, from the current directory.
    assert _init(tmp_path, "timm:evil.py:f".replace("timm:", "odd:"), "timm:vit_tiny_patch16_224") == 2
    assert "write it as ./odd:evil.py:f" in _error_line(capsys)
    assert not marker.exists()


def test_an_unrelated_pair_is_refused_even_with_allow_partial(tmp_path, capsys):
    folder = tmp_path / "bert"
    transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    ).save_pretrained(folder)
    student = f"hf:{folder}?hidden_size=16&num_attention_heads=1"
    # Stages pair by structure: no ResNet stage has BERT's structure, so nothing pairs at all, and a
    # student written entirely at its own init is refused whatever --allow-partial says.
    for partial in ((), ("--allow-partial",)):
        assert _init(tmp_path, "timm:resnet18", student, "--allow-random-teacher", *partial) == 2
        line = _error_line(capsys)
        assert "nothing in the student matched the teacher" in line and "same family" in line
        assert not (tmp_path / "out.safetensors").exists()
