"""Models from a hub cache, offline: ``hf:org/name`` snapshots, timm pretrained weights, random teachers.

Nothing is downloaded: each test lays out a Hugging Face hub cache in ``tmp_path`` the way
huggingface_hub writes one (``models--org--name/{blobs,refs,snapshots}``, snapshot files symlinked
to content-addressed blobs) and runs with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from wscompile.cli import main
from wscompile.errors import SpecError
from wscompile.reports import validate_manifest
from wscompile.specs import load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_VIT = "vit_tiny_patch16_224?depth=2&img_size=32"
VIT_STUDENT = "timm:vit_tiny_patch16_224?depth=1&img_size=32&embed_dim=96&num_heads=3"
# The hub repo timm's pretrained cfg for vit_tiny_patch16_224 names (hf_hub_id).
TIMM_VIT_REPO = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
BERT = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}
BERT_STUDENT = "num_hidden_layers=1&hidden_size=16&num_attention_heads=2&intermediate_size=32"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache that huggingface_hub (and so transformers and timm) uses, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # NOTE: huggingface_hub reads these variables once, at import.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def lay_out_repo(cache: Path, repo_id: str, files: Path, *, commit: str = COMMIT, ref: str = "main") -> Path:
    """Put every file of the directory ``files`` into ``cache`` as a downloaded snapshot of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def tiny_bert(directory: Path) -> dict[str, torch.Tensor]:
    """Save a tiny BertModel with save_pretrained into ``directory``; returns its state_dict."""
    import transformers

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**BERT))
    model.save_pretrained(directory)
    return model.state_dict()


def tiny_vit_state(path: Path | None = None, **overrides: int) -> dict[str, torch.Tensor]:
    """A seeded tiny timm ViT's state_dict, saved to ``path`` (.safetensors or .pth) when given."""
    torch.manual_seed(1)
    state = timm.create_model("vit_tiny_patch16_224", **{"depth": 2, "img_size": 32, **overrides}).state_dict()
    if path is not None and path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif path is not None:
        torch.save(state, path)
    return state


def init(tmp_path: Path, teacher: str, student: str, *extra: str) -> int:
    return main(
        [
            "init",
            "--teacher",
            teacher,
            "--student",
            student,
            "--out",
            str(tmp_path / "student.safetensors"),
            "--manifest",
            str(tmp_path / "manifest.json"),
            *extra,
        ]
    )


def manifest(tmp_path: Path) -> dict:
    document = json.loads((tmp_path / "manifest.json").read_text())
    validate_manifest(document)
    return document


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wscompile init: error: "), err
    return lines[0]


def assert_state_equal(module: torch.nn.Module, expected: dict[str, torch.Tensor], *, skip: tuple[str, ...] = ()):
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        if key not in skip:
            assert torch.equal(state[key], tensor), key


# ---- hf:org/name from the hub cache --------------------------------------------------------------


def test_hf_hub_id_loads_the_cached_snapshot_offline(tmp_path, hub_cache):
    state = tiny_bert(tmp_path / "bert")
    snapshot = lay_out_repo(hub_cache, "org/tiny-bert", tmp_path / "bert")

    teacher = load_model("hf:org/tiny-bert", role="teacher")
    assert teacher.spec.name == str(snapshot) and teacher.spec.origin == f"org/tiny-bert@{COMMIT}"
    assert (teacher.weights_origin, teacher.pretrained) == (f"hf hub org/tiny-bert@{COMMIT}", True)
    assert_state_equal(teacher.module, state)

    student = load_model(f"hf:org/tiny-bert?{BERT_STUDENT}", role="student")
    assert student.module.config.hidden_size == 16 and not student.pretrained


def test_hf_hub_revision_and_cache_dir_overrides(tmp_path, hub_cache):
    state = tiny_bert(tmp_path / "bert")
    other_cache = tmp_path / "other-cache"
    lay_out_repo(other_cache, "org/tiny-bert", tmp_path / "bert", ref="v1")

    # Not in the default cache, and the default branch is not cached: found only through the overrides.
    teacher = load_model(f"hf:org/tiny-bert?revision=v1&cache_dir={other_cache}", role="teacher")
    assert teacher.spec.origin == f"org/tiny-bert@{COMMIT}" and "revision" not in teacher.spec.overrides
    assert_state_equal(teacher.module, state)
    by_commit = load_model(f"hf:org/tiny-bert?revision={COMMIT}&cache_dir={other_cache}", role="teacher")
    assert by_commit.spec.name == teacher.spec.name
    with pytest.raises(SpecError, match=r"'org/tiny-bert': offline .* not in the hub cache .*hf:/path/to/dir"):
        load_model("hf:org/tiny-bert", role="teacher")
    with pytest.raises(SpecError, match=r"choose a Hugging Face hub snapshot, but '.*bert' is a local path"):
        load_model(f"hf:{tmp_path / 'bert'}?revision=v1", role="teacher")


def test_hf_hub_teacher_init_streams_from_the_snapshot(tmp_path, hub_cache, capsys):
    state = tiny_bert(tmp_path / "bert")
    lay_out_repo(hub_cache, "org/tiny-bert", tmp_path / "bert")
    capsys.readouterr()  # save_pretrained's progress bar

    assert init(tmp_path, "hf:org/tiny-bert", f"hf:org/tiny-bert?{BERT_STUDENT}") == 0
    assert capsys.readouterr().err == ""
    document = manifest(tmp_path)
    assert document["teacher_weights"] == f"hf hub org/tiny-bert@{COMMIT}" and document["teacher_pretrained"] is True
    student = safetensors.torch.load_file(tmp_path / "student.safetensors")
    # uniform selection, 32 -> 16: every other hidden unit of the teacher's embedding
    assert torch.equal(student["embeddings.word_embeddings.weight"], state["embeddings.word_embeddings.weight"][:, ::2])


def test_hf_hub_id_not_cached_offline_is_one_line(tmp_path, hub_cache, capsys):
    assert init(tmp_path, "hf:org/not-cached", f"hf:org/not-cached?{BERT_STUDENT}") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot load 'org/not-cached': offline (HF_HUB_OFFLINE is set)" in line
    assert "hf:/path/to/dir" in line and "HF_HUB_CACHE" in line
    assert not (tmp_path / "student.safetensors").exists()


def test_hub_fetches_only_the_files_it_reads(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    from wscompile import hub

    remote = tmp_path / "remote"  # a repo with no safetensors
    remote.mkdir()
    for name in ("config.json", "pytorch_model.bin", "README.md"):
        (remote / name).write_text("{}")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    requested: list[list[str]] = []

    def snapshot_download(repo_id, *, revision, cache_dir, allow_patterns):
        """Online: "download" the remote files the patterns select into the snapshot."""
        requested.append(allow_patterns)
        if repo_id == "org/unreachable":
            raise LocalEntryNotFoundError("connection error and no cached snapshot")
        for name in filter_repo_objects([p.name for p in remote.iterdir()], allow_patterns=allow_patterns):
            (snapshot / name).write_bytes((remote / name).read_bytes())
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cache = str(tmp_path / "cache")
    repo = [
        "config.json",
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "onnx/model.safetensors",
        "tf_model.h5",
        "flax_model.msgpack",
        "tokenizer.json",
        "vocab.txt",
        "README.md",
        "modeling_custom.py",
    ]

    assert hub.hub_snapshot("org/bin-only", cache_dir=cache) == str(snapshot)
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "pytorch_model.bin"]
    safetensors_first, pickle_fallback = requested
    assert sorted(filter_repo_objects(repo, allow_patterns=safetensors_first)) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors",
        "model.safetensors.index.json",
        "modeling_custom.py",
        "tokenizer.json",
        "vocab.txt",
    ]
    assert sorted(filter_repo_objects(repo, allow_patterns=pickle_fallback)) == [
        "config.json",
        "modeling_custom.py",
        "pytorch_model.bin",
        "tokenizer.json",
        "vocab.txt",
    ]
    requested.clear()
    hub.hub_snapshot("org/student-only", cache_dir=cache, weights=False)
    assert [sorted(filter_repo_objects(repo, allow_patterns=p)) for p in requested] == [
        ["config.json", "modeling_custom.py", "tokenizer.json", "vocab.txt"]
    ]
    with pytest.raises(SpecError, match=r"'org/unreachable': the Hugging Face hub cannot be reached and it is not"):
        hub.hub_snapshot("org/unreachable", cache_dir=cache)
    # A teacher whose weights come from --teacher-weights fetches no hub weights.
    from wscompile.specs import parse_spec, resolve_hub

    requested.clear()
    resolve_hub(parse_spec(f"hf:org/given-weights?cache_dir={cache}"), role="teacher", weights=False)
    assert [sorted(filter_repo_objects(repo, allow_patterns=p)) for p in requested] == [
        ["config.json", "modeling_custom.py", "tokenizer.json", "vocab.txt"]
    ]


# ---- timm: pretrained=True through the hub cache, pretrained_file, pretrained_cfg_overlay ----------


def test_timm_pretrained_loads_from_the_hub_cache(tmp_path, hub_cache):
    files = tmp_path / "timm-repo"
    files.mkdir()
    state = tiny_vit_state(files / "model.safetensors")
    (files / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    lay_out_repo(hub_cache, TIMM_VIT_REPO, files)

    teacher = load_model(f"timm:{TINY_VIT}&pretrained=True", role="teacher")
    assert (teacher.weights_origin, teacher.pretrained) == (f"timm pretrained hf hub {TIMM_VIT_REPO}", True)
    assert_state_equal(teacher.module, state)
    # on the meta device (diff, memory check) nothing is read
    assert load_model(f"timm:{TINY_VIT}&pretrained=True", role="teacher", device="meta").on_meta


def test_timm_pretrained_not_cached_offline_is_one_line(tmp_path, hub_cache, capsys):
    assert init(tmp_path, f"timm:{TINY_VIT}&pretrained=True", VIT_STUDENT) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"pretrained weights of timm model 'vit_tiny_patch16_224' (timm pretrained hf hub {TIMM_VIT_REPO})" in line
    assert "offline" in line and "pretrained_file=PATH" in line and "--teacher-weights" in line
    with pytest.raises(SpecError, match=r"timm registers no pretrained weights for 'botnet50ts_256'"):
        load_model("timm:botnet50ts_256?pretrained=True", role="teacher")


def test_timm_pretrained_file_goes_through_the_checkpoint_filter(tmp_path, hub_cache):
    # Saved at 64 px: timm's checkpoint_filter_fn resamples pos_embed to the 32 px model's grid.
    original = tiny_vit_state(tmp_path / "vit64.pth", img_size=64)
    teacher = load_model(f"timm:{TINY_VIT}&pretrained_file={tmp_path / 'vit64.pth'}", role="teacher")
    assert teacher.weights_origin == f"timm pretrained_file {tmp_path / 'vit64.pth'}"
    assert original["pos_embed"].shape == (1, 17, 192) and teacher.module.pos_embed.shape == (1, 5, 192)
    assert_state_equal(teacher.module, original | {"pos_embed": teacher.module.pos_embed}, skip=("pos_embed",))
    assert torch.equal(teacher.module.pos_embed[:, 0], original["pos_embed"][:, 0])  # class token kept

    state = tiny_vit_state(tmp_path / "vit.safetensors")
    overlay = f"dict(file='{tmp_path / 'vit.safetensors'}',custom_load=False)"
    assert_state_equal(load_model(f"timm:{TINY_VIT}&pretrained_cfg_overlay={overlay}", role="teacher").module, state)
    with pytest.raises(SpecError, match=r"pretrained_cfg_overlay .* must be dict\(key=literal, ...\)"):
        load_model(f"timm:{TINY_VIT}&pretrained_cfg_overlay=dict(file=/x.pth)", role="teacher")
    with pytest.raises(SpecError, match=r"pretrained file '/nonexistent.pth' .* does not exist"):
        load_model(f"timm:{TINY_VIT}&pretrained_file=/nonexistent.pth", role="teacher")


# ---- teachers without pretrained weights are called out ------------------------------------------


def test_random_teacher_warning_and_manifest(tmp_path, hub_cache, capsys):
    assert init(tmp_path, f"timm:{TINY_VIT}", VIT_STUDENT) == 0
    err = capsys.readouterr().err
    assert f"warning: teacher timm:{TINY_VIT} has no pretrained weights (random init)" in err
    assert "timm:vit_tiny_patch16_224?pretrained=True" in err and "--allow-random-teacher" in err
    document = manifest(tmp_path)
    assert (document["teacher_weights"], document["teacher_pretrained"]) == ("none (random init)", False)

    assert init(tmp_path, f"timm:{TINY_VIT}", VIT_STUDENT, "--force", "--allow-random-teacher") == 0
    assert capsys.readouterr().err == ""

    # structure alone needs no weights: diff says nothing, unless the selection reads teacher values
    assert main(["diff", "--teacher", f"timm:{TINY_VIT}", "--student", VIT_STUDENT]) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and "teacher weights  none (random init)" in printed.out
    assert main(["diff", "--teacher", f"timm:{TINY_VIT}", "--student", VIT_STUDENT, "--method", "magnitude"]) == 0
    assert "has no pretrained weights" in capsys.readouterr().err


def test_pretrained_teachers_are_not_called_out(tmp_path, hub_cache, capsys):
    file = tmp_path / "vit.safetensors"
    state = tiny_vit_state(file)
    assert init(tmp_path, f"timm:{TINY_VIT}&pretrained_file={file}", VIT_STUDENT) == 0
    assert capsys.readouterr().err == ""
    document = manifest(tmp_path)
    assert (document["teacher_weights"], document["teacher_pretrained"]) == (f"timm pretrained_file {file}", True)
    student = safetensors.torch.load_file(tmp_path / "student.safetensors")
    assert torch.equal(student["cls_token"], state["cls_token"][..., ::2])

    assert init(tmp_path, f"timm:{TINY_VIT}", VIT_STUDENT, "--teacher-weights", str(file), "--force") == 0
    assert capsys.readouterr().err == ""
    assert manifest(tmp_path)["teacher_weights"] == str(file)


def test_python_factory_teacher_is_not_called_out(tmp_path, capsys):
    models = tmp_path / "models.py"
    models.write_text(
        "import torch\n"
        "def net(width=8):\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))\n"
        "    model.example_inputs = torch.zeros(1, 4)\n"
        "    return model\n"
    )
    assert init(tmp_path, f"{models}:net?width=8", f"{models}:net?width=4") == 0
    assert capsys.readouterr().err == ""
    document = manifest(tmp_path)
    assert (document["teacher_weights"], document["teacher_pretrained"]) == ("built by the factory", None)


def test_hf_hub_teacher_folder_output_takes_the_snapshot_tokenizer(tmp_path, hub_cache):
    import transformers

    tiny_bert(tmp_path / "bert")
    vocab = tmp_path / "bert" / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat"]) + "\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(tmp_path / "bert")
    lay_out_repo(hub_cache, "org/tiny-bert", tmp_path / "bert")

    out = tmp_path / "student"
    assert (
        main(
            [
                "init",
                "--teacher",
                "hf:org/tiny-bert",
                "--student",
                f"hf:org/tiny-bert?{BERT_STUDENT}",
                "--out",
                f"{out}/",
            ]
        )
        == 0
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("the cat")["input_ids"] == [2, 5, 6, 3]
    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
