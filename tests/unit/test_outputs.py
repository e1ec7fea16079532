from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wscompile.errors import OutputError
from wscompile.outputs import atomic_output, check_output, check_outputs, save_safetensors, write_json


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_existing_file_needs_force(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(OutputError, match=r"out.json' exists; pass --force to overwrite it"):
        write_json(path, {"a": 1}, force=False)
    assert path.read_text() == "old"
    write_json(path, {"a": 1}, force=True)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert _entries(tmp_path) == ["out.json"]


def test_write_json_is_deterministic(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"b": [1, 2], "a": {"z": 1, "y": None}}, force=False)
    write_json(tmp_path / "b.json", {"a": {"y": None, "z": 1}, "b": [1, 2]}, force=False)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_inside_atomic_output_keeps_old_file(tmp_path: Path, error: BaseException) -> None:
    path = tmp_path / "student.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_output(path, force=True) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".student.safetensors.tmp-")
        temp.write_bytes(b"half a fi")
        raise error
    assert path.read_bytes() == b"old"
    assert _entries(tmp_path) == ["student.safetensors"]


def test_atomic_output_requires_a_written_file(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"nothing was written"), atomic_output(tmp_path / "out.bin", force=False):
        pass
    assert _entries(tmp_path) == []


def test_atomic_output_refuses_file_created_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    with pytest.raises(OutputError, match=r"exists; pass --force"), atomic_output(path, force=False) as temp:
        temp.write_bytes(b"new")
        path.write_bytes(b"someone else's")
    assert path.read_bytes() == b"someone else's"
    assert _entries(tmp_path) == ["out.bin"]


def test_missing_parent_or_parent_is_a_file(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"directory '.*missing' of '.*' does not exist; create it first"):
        check_output(tmp_path / "missing" / "out.json", force=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"is not a directory"):
        check_output(tmp_path / "file" / "out.json", force=True)
    with pytest.raises(OutputError, match=r"is a directory; give a file path"):
        check_output(tmp_path, force=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_non_writable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(OutputError, match=r"is not writable"):
            check_output(locked / "out.json", force=False)
    finally:
        locked.chmod(0o700)


def test_check_outputs_rejects_duplicates_and_reports_everything(tmp_path: Path) -> None:
    (tmp_path / "taken.json").write_text("")
    paths = [tmp_path / "a.onnx", None, tmp_path / "sub" / ".." / "a.onnx", tmp_path / "taken.json"]
    with pytest.raises(OutputError, match=r"are the same file.*; .*taken.json' exists"):
        check_outputs(paths, force=False)
    assert check_outputs([tmp_path / "a.onnx", None, tmp_path / "taken.json"], force=True) == [
        tmp_path / "a.onnx",
        tmp_path / "taken.json",
    ]


def test_save_safetensors_tied_and_views(tmp_path: Path) -> None:
    embed = torch.randn(5, 3)
    tensors = {"embed.weight": embed, "head.weight": embed, "t": embed.t(), "row": embed[1]}
    path = tmp_path / "student.safetensors"
    save_safetensors(path, tensors, {"teacher": "timm:x"}, force=False)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_save_safetensors_bytes_are_deterministic(tmp_path: Path) -> None:
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    # Many keys: safetensors itself writes metadata in a different order on every call.
    metadata = {f"key{i}": str(i) for i in range(16)}
    for name in ("one", "two", "three"):
        save_safetensors(tmp_path / name, tensors, metadata, force=False)
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes() == (tmp_path / "three").read_bytes()
    assert torch.equal(load_file(tmp_path / "one")["b"], tensors["b"])
    with safe_open(tmp_path / "one", framework="pt") as reader:
        assert reader.metadata() == metadata
