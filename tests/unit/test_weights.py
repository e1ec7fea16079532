from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wscompile import weights
from wscompile.errors import SpecError
from wscompile.specs import load_model
from wscompile.weights import DictSource, RenamedSource, SafetensorsSource, open_weights, take


class CustomConfig:
    """A class a weights_only unpickler refuses to construct."""

    def __init__(self) -> None:
        self.lr = 0.1


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=generator),
        "fc.weight": torch.randn(200, 12, generator=generator),
        "fc.bias": torch.randn(200, generator=generator),
        "half": torch.randn(6, 5, generator=generator).to(torch.bfloat16),
    }


@pytest.fixture
def safetensors_path(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "weights.safetensors"
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    ("key", "index"),
    [
        ("fc.weight", None),
        ("fc.weight", [None, None]),
        ("fc.weight", [range(10, 20)]),
        ("fc.weight", [range(0, 200, 2), None]),
        ("fc.weight", [[0, 1, 2, 100, 101, 199], [3, 7]]),
        ("fc.weight", [[5, 3, 3, 150], None]),
        ("fc.weight", [None, [11, 0]]),
        ("fc.weight", [[], None]),
        ("fc.bias", [range(0, 200, 4)]),
        ("conv.weight", [[1, 5], [0, 3], None, [2]]),
        ("conv.weight", [[1, 5]]),
        ("half", [[0, 5], [1, 2, 3]]),
    ],
)
def test_safetensors_subset_equals_full_read_then_index(
    safetensors_path: Path, tensors: dict[str, torch.Tensor], key: str, index: list | None
) -> None:
    source = open_weights(str(safetensors_path))
    expected = take(tensors[key], index) if index is not None else tensors[key]
    got = source.read(key, index)
    assert got.dtype == tensors[key].dtype
    assert torch.equal(got, expected)


def test_safetensors_metadata_and_bytes_read(safetensors_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = open_weights(str(safetensors_path))
    assert isinstance(source, SafetensorsSource)
    assert set(source.keys()) == {"conv.weight", "fc.weight", "fc.bias", "half"}
    assert source.shape("conv.weight") == (8, 4, 3, 3) and source.dtype("half") == torch.bfloat16
    assert source.bytes_read == 0
    row = 12 * 4  # bytes of one fc.weight row
    monkeypatch.setattr(weights, "_MAX_GAP_BYTES", 97 * row)  # runs 97 rows apart are read apart
    source.read("fc.weight", [[0, 1, 2, 100, 101], None])  # two runs of rows: only those are read
    assert source.bytes_read == 5 * row
    source.read("fc.weight", [range(10, 20), [0, 1]])
    assert source.bytes_read == (5 * 12 + 10 * 2) * 4


def test_safetensors_reads_through_small_gaps(safetensors_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    source = open_weights(str(safetensors_path))
    row = 12 * 4
    assert 97 * row < weights._MAX_GAP_BYTES  # a 4.5 KiB gap is cheaper to read than to skip
    rows = [101, 0, 1, 2, 100]
    assert torch.equal(source.read("fc.weight", [rows, None]), tensors["fc.weight"][rows])
    assert source.bytes_read == 102 * row  # rows 0..101, once


def test_sharded_hf_directory(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    shards = {
        "model-00001-of-00002.safetensors": ["conv.weight", "fc.bias"],
        "model-00002-of-00002.safetensors": ["fc.weight", "half"],
    }
    for name, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / name)
    weight_map = {k: name for name, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    source = open_weights(str(tmp_path))
    assert set(source.keys()) == set(tensors)
    for key, tensor in tensors.items():
        assert source.shape(key) == tuple(tensor.shape)
        assert torch.equal(source.read(key), tensor)
    assert torch.equal(source.read("fc.weight", [[3, 4], None]), tensors["fc.weight"][3:5])
    assert source.bytes_read > 0
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SpecError, match=r"names missing files: .*model-00002-of-00002"):
        open_weights(str(tmp_path))


def test_hf_directory_without_weights(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"has no weights \(looked for model.safetensors"):
        open_weights(str(tmp_path))


def test_pytorch_bin_in_hf_directory(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    source = open_weights(str(tmp_path))
    assert isinstance(source, DictSource)
    assert torch.equal(source.read("fc.bias", [[0, 2]]), tensors["fc.bias"][[0, 2]])


def test_pt_nested_under_state_dict(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {**tensors, "step": 7}, "optimizer": {"lr": 0.1}}, path)
    source = open_weights(str(path))
    assert set(source.keys()) == set(tensors)
    assert torch.equal(source.read("conv.weight"), tensors["conv.weight"])


def test_legacy_pt_format_loads_without_mmap(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"model": tensors}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(open_weights(str(path)).read("fc.bias"), tensors["fc.bias"])


def test_pickle_needing_code_is_refused_unless_unsafe(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": tensors, "config": CustomConfig()}, path)
    with pytest.raises(SpecError, match=r"is a pickle that needs code execution to load; .*--unsafe-pickle"):
        open_weights(str(path))
    source = open_weights(str(path), unsafe_pickle=True)
    assert torch.equal(source.read("fc.weight"), tensors["fc.weight"])


@pytest.mark.parametrize("keep", [4, 20, -30])
def test_truncated_safetensors(safetensors_path: Path, keep: int) -> None:
    data = safetensors_path.read_bytes()
    safetensors_path.write_bytes(data[:keep])
    with pytest.raises(SpecError, match=r"weights.safetensors' is truncated or corrupt"):
        open_weights(str(safetensors_path))


def test_corrupt_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(SpecError, match=r"truncated or corrupt"):
        open_weights(str(garbage))
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(SpecError, match=r"bad.pt' is truncated or corrupt"):
        open_weights(str(bad_pt))


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"weights file '.*nope.safetensors' does not exist"):
        open_weights(str(tmp_path / "nope.safetensors"))
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(SpecError, match=r"cannot tell the format"):
        open_weights(str(other))


def test_renamed_source(tensors: dict[str, torch.Tensor]) -> None:
    source = RenamedSource(DictSource(tensors), {"head.bias": "fc.bias"})
    assert list(source.keys()) == ["head.bias"]
    assert source.shape("head.bias") == (200,)
    assert torch.equal(source.read("head.bias", [[1]]), tensors["fc.bias"][[1]])


NET_PY = """
from torch import nn

def build(width=8):
    net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
    net.register_buffer("scale", __import__("torch").ones(2))
    return net
"""


@pytest.fixture
def net_spec(tmp_path: Path) -> str:
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(NET_PY))
    return f"{path}:build"


def _net_state(width: int = 8, prefix: str = "", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    shapes = {"0.weight": (width, 4), "0.bias": (width,), "2.weight": (2, width), "2.bias": (2,), "scale": (2,)}
    return {prefix + k: torch.randn(s, generator=generator).to(dtype) for k, s in shapes.items()}


@pytest.mark.parametrize("prefix", ["", "module.", "model.", "_orig_mod.module."])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_teacher_weights_with_prefix(tmp_path: Path, net_spec: str, prefix: str, device: str) -> None:
    state = _net_state(prefix=prefix)
    path = tmp_path / "teacher.safetensors"
    save_file(state, path)
    loaded = load_model(net_spec, role="teacher", weights=str(path), device=device, input_shape=(1, 4))
    assert loaded.on_meta == (device == "meta")
    assert sorted(loaded.source.keys()) == sorted(loaded.module.state_dict())
    assert torch.equal(loaded.source.read("0.weight"), state[prefix + "0.weight"])
    if device == "cpu":
        assert torch.equal(loaded.module[2].bias, state[prefix + "2.bias"])


def test_half_precision_file_into_float_module(tmp_path: Path, net_spec: str) -> None:
    state = _net_state(dtype=torch.float16)
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": state}, path)
    loaded = load_model(net_spec, role="teacher", weights=str(path), input_shape=(1, 4))
    assert loaded.module[0].weight.dtype == torch.float32
    assert torch.equal(loaded.module[0].weight, state["0.weight"].float())
    assert loaded.source.dtype("0.weight") == torch.float16


def test_teacher_key_mismatch_lists_keys(tmp_path: Path, net_spec: str) -> None:
    state = _net_state()
    state["extra.weight"] = state.pop("2.weight")
    path = tmp_path / "teacher.safetensors"
    save_file(state, path)
    with pytest.raises(
        SpecError, match=r"do not fit .*1 missing keys \(2\.weight\); 1 unexpected keys \(extra\.weight\)"
    ):
        load_model(net_spec, role="teacher", weights=str(path), input_shape=(1, 4))


def test_teacher_shape_mismatch_lists_shapes(tmp_path: Path, net_spec: str) -> None:
    path = tmp_path / "teacher.safetensors"
    save_file(_net_state(width=16), path)
    with pytest.raises(SpecError, match=r"3 shape mismatches \(0\.weight \(16, 4\) in file vs \(8, 4\) in model"):
        load_model(net_spec, role="teacher", weights=str(path), device="meta", input_shape=(1, 4))
