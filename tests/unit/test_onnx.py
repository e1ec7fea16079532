"""ONNX backend: export, onnxruntime parity at other shapes, variants, output safety."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from wscompile.backend import ExportResult, export_student, verify_onnx
from wscompile.backend import export as export_module
from wscompile.errors import OutputError, ValidationError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
timm = pytest.importorskip("timm")

IMAGE_SIZE = 32
VOCAB = 500

MakeInputs = Callable[[int, int | None], dict[str, torch.Tensor]]


def image_inputs(batch: int, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)}


def text_inputs(batch: int, seq_len: int | None) -> dict[str, torch.Tensor]:
    seq_len = seq_len or 8
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[1:, seq_len // 2 :] = 0  # padded rows, so the mask is exercised
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq_len)), "attention_mask": attention_mask}


# Tiny students; the init options make every block contribute (timm zero-inits some by default).
IMAGE_STUDENTS = {
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=8, depth=2),
    "convnext": lambda: timm.create_model(
        "convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), ls_init_value=1.0
    ),
    "resnet": lambda: timm.create_model(
        "resnet18", layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), zero_init_last=False
    ),
    "mobilenetv3": lambda: timm.create_model("mobilenetv3_small_050"),
}


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=VOCAB
    )
    return BertModel(config)


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)))


class DataDependentBranch(TinyClassifier):
    """A Python branch on a tensor value: torch.export cannot capture it, TorchScript traces through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() >= 0:
            return super().forward(x)
        return -super().forward(x)


def export(model: nn.Module, path: str, make_inputs: MakeInputs = image_inputs, **options: object) -> ExportResult:
    torch.manual_seed(0)
    model.eval()
    kind = options.pop("kind", "image")
    example = make_inputs(1, 8 if kind == "text" else None)
    return export_student(model, example, make_inputs, path, kind=kind, latency_runs=0, log=lambda _: None, **options)


def files(directory: os.PathLike) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("name", IMAGE_STUDENTS)
def test_image_students_match_at_another_batch(name: str, tmp_path: os.PathLike) -> None:
    path = str(tmp_path / "student.onnx")
    result = export(IMAGE_STUDENTS[name](), path)

    assert files(tmp_path) == ["student.onnx"]
    assert (result.exporter, result.fallback_reason, result.data_path) == ("dynamo", None, None)
    assert (result.input_names, result.output_names) == (["x"], ["logits"])
    assert result.verify_shapes == {"x": [3, 3, IMAGE_SIZE, IMAGE_SIZE]}
    assert [(c.name, c.shape, c.ok) for c in result.checks] == [("logits", [3, 1000], True)]
    assert result.checks[0].max_abs < 1e-4
    graph = onnx.load(path).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "", ""]
    json.dumps(result.to_dict())


def test_bert_matches_at_another_batch_and_sequence_length(tmp_path: os.PathLike) -> None:
    path = str(tmp_path / "student.onnx")
    result = export(tiny_bert(), path, text_inputs, kind="text", opset=18)

    assert result.opset == 18
    assert result.input_names == ["input_ids", "attention_mask"]
    assert result.output_names == ["last_hidden_state", "pooler_output"]
    assert result.verify_shapes == {"input_ids": [3, 5], "attention_mask": [3, 5]}
    assert [(c.name, c.shape, c.ok) for c in result.checks] == [
        ("last_hidden_state", [3, 5, 64], True),
        ("pooler_output", [3, 64], True),
    ]
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in onnx.load(path).graph.output]
    assert dims == [["batch", "sequence", 64], ["batch", 64]]


def test_corrupted_initializer_fails_verification_naming_the_output(tmp_path: os.PathLike) -> None:
    path = str(tmp_path / "student.onnx")
    torch.manual_seed(0)
    model = TinyClassifier()
    export(model, path)
    proto = onnx.load(path)
    weight = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    corrupted = onnx.numpy_helper.to_array(weight) + 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(corrupted, weight.name))
    onnx.save(proto, path)

    with pytest.raises(ValidationError, match=r"'logits' \(3, 10\) max abs diff [0-9.e+-]+, max rel diff") as error:
        verify_onnx(path, model, image_inputs, kind="image", log=lambda _: None)
    assert error.value.exit_code == 1


def test_fp16_and_int8_variants_are_smaller_and_agree(tmp_path: os.PathLike) -> None:
    path = str(tmp_path / "student.onnx")
    lines: list[str] = []
    model = IMAGE_STUDENTS["vit"]().eval()
    result = export_student(
        model, image_inputs(1), image_inputs, path, kind="image", fp16=True, int8=True, latency_runs=3, log=lines.append
    )

    assert files(tmp_path) == ["student.fp16.onnx", "student.int8.onnx", "student.onnx"]
    assert [(v.name, v.method, v.path) for v in result.variants] == [
        ("fp16", "float16, fp32 inputs/outputs", str(tmp_path / "student.fp16.onnx")),
        ("int8", "dynamic", str(tmp_path / "student.int8.onnx")),
    ]
    for variant in result.variants:
        assert variant.size_bytes < 0.6 * result.size_bytes
        assert variant.cosine > 0.9
        assert variant.top1_agreement is not None and variant.ort_ms is not None
    assert result.latency is not None and result.latency.ort_ms > 0 and result.latency.torch_ms > 0
    assert any(line.startswith("latency at batch 1") for line in lines)


def test_int8_static_with_calibration_batches(tmp_path: os.PathLike) -> None:
    path = str(tmp_path / "student.onnx")
    result = export(TinyClassifier(), path, int8=True, calib=[image_inputs(2) for _ in range(3)])

    [variant] = result.variants
    assert variant.method == "static, 3 calibration batches"
    assert variant.cosine > 0.9


def test_existing_output_is_kept_without_force(tmp_path: os.PathLike) -> None:
    path = tmp_path / "student.onnx"
    path.write_bytes(b"keep me")

    with pytest.raises(OutputError, match=r"student.onnx' exists; pass --force to overwrite it"):
        export(TinyClassifier(), str(path))
    assert path.read_bytes() == b"keep me"
    assert files(tmp_path) == ["student.onnx"]

    export(TinyClassifier(), str(path), force=True)
    onnx.checker.check_model(str(path))


class ShiftedClassifier(TinyClassifier):
    """Adds a Python float, which the exporters bake into the graph as a constant."""

    shift = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.shift


def test_failed_parity_names_every_output_and_writes_nothing(tmp_path: os.PathLike) -> None:
    model = ShiftedClassifier().eval()

    def shift_after_export(line: str) -> None:
        if line.startswith("exported"):
            model.shift = 1.0

    with pytest.raises(ValidationError, match=r"'logits' \(3, 10\) max abs diff 1, .*student.onnx was not written"):
        export_student(
            model,
            image_inputs(1),
            image_inputs,
            str(tmp_path / "student.onnx"),
            kind="image",
            latency_runs=0,
            log=shift_after_export,
        )
    assert files(tmp_path) == []


def test_falls_back_to_torchscript_when_dynamo_fails(tmp_path: os.PathLike) -> None:
    result = export(DataDependentBranch(), str(tmp_path / "student.onnx"))

    assert result.exporter == "torchscript"
    assert result.fallback_reason is not None and result.fallback_reason.startswith(
        "dynamo exporter (dynamic batch) failed"
    )
    assert all(check.ok for check in result.checks)


def test_external_data_for_large_models(tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_ABOVE", 0)
    model = TinyClassifier()
    path = str(tmp_path / "student.onnx")
    result = export(model, path)

    assert files(tmp_path) == ["student.onnx", "student.onnx.data"]
    assert result.data_path == path + ".data"
    assert result.size_bytes == os.path.getsize(path) + os.path.getsize(path + ".data")
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in files(tmp_path):
        if name != "moved":
            os.replace(tmp_path / name, moved / name)
    assert verify_onnx(str(moved / "student.onnx"), model, image_inputs, kind="image", log=lambda _: None)
