"""Export breadth: students that used to bake their batch in, MoE experts, static fallback, .ort, --optimize, devices."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.unit.test_onnx import TinyClassifier
from wscompile.backend import ExportResult, export_student, verify_onnx
from wscompile.backend.verify import CUDA_PROVIDER
from wscompile.cli import main
from wscompile.errors import MissingDependencyError, ValidationError
from wscompile.specs import load_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("timm")

IMAGE_SIZE = 32
VOCAB = 100
HAS_CUDA = CUDA_PROVIDER in ort.get_available_providers()
# BEiT's relative-position attention: with a batch-1 trace the batch ended up in a view
# ("Cannot view a tensor with shape [1, 17, 2, 32] and strides ...").
BEIT = "timm:beit_base_patch16_224?img_size=64&embed_dim=64&depth=1&num_heads=2&num_classes=10"


def image_inputs(batch: int, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)}


def text_inputs(batch: int, seq_len: int | None) -> dict[str, torch.Tensor]:
    seq_len = seq_len or 8
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[1:, seq_len // 2 :] = 0
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq_len)), "attention_mask": attention_mask}


class BatchBranch(TinyClassifier):
    """Code that looks at the batch size: torch.export fixes the batch of its example, as window models do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 2:
            return super().forward(x)
        return super().forward(x) * 1.0


def export(model: nn.Module, path: str, make_inputs=image_inputs, **options: object) -> ExportResult:
    torch.manual_seed(0)
    model.eval()
    kind = options.pop("kind", "image")
    example = make_inputs(1, 8 if kind == "text" else None)
    log = options.pop("log", lambda _: None)
    return export_student(model, example, make_inputs, path, kind=kind, latency_runs=0, log=log, **options)


def run_ort(path: str, inputs: dict[str, torch.Tensor]) -> list:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: inputs[i.name].numpy() for i in session.get_inputs()})


def test_beit_from_a_spec_exports_with_a_dynamic_batch(tmp_path: os.PathLike) -> None:
    student = load_model(BEIT, role="student")
    path = str(tmp_path / "beit.onnx")
    result = export_student(
        student.module, student.inputs, student.make_inputs, path, kind=student.kind, latency_runs=0, log=lambda _: None
    )

    assert (result.exporter, result.fallback_reason) == ("dynamo", None)
    assert result.dynamic_axes == {"x": {0: "batch"}}
    assert result.export_shapes == {"x": [2, 3, 64, 64]}
    assert result.verify_shapes == {"x": [3, 3, 64, 64]}
    assert [(c.shape, c.ok) for c in result.checks] == [([3, 10], True)]
    inputs = student.make_inputs(5, None)
    with torch.no_grad():
        want = student.module(**inputs)
    torch.testing.assert_close(torch.from_numpy(run_ort(path, inputs)[0]), want, atol=1e-4, rtol=1e-3)


def test_mixtral_exports_with_batched_experts_and_keeps_its_own(tmp_path: os.PathLike) -> None:
    from transformers import MixtralConfig, MixtralModel

    config = MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2, use_cache=False,
    )  # fmt: skip
    model = MixtralModel(config)
    default = model.config._experts_implementation
    result = export(model, str(tmp_path / "moe.onnx"), text_inputs, kind="text")

    assert result.experts_implementation == "batched_mm"
    assert model.config._experts_implementation == default != "batched_mm"
    assert result.exporter == "dynamo"
    assert result.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    assert [(c.name, c.shape, c.ok) for c in result.checks] == [("last_hidden_state", [3, 5, 32], True)]


def test_a_model_that_fixes_its_batch_falls_back_to_the_static_batch_asked_for(tmp_path: os.PathLike) -> None:
    lines: list[str] = []
    path = str(tmp_path / "student.onnx")
    model = BatchBranch()
    result = export(model, path, batch_size=4, log=lines.append)

    assert result.exporter == "dynamo"
    assert (
        result.fallback_reason is not None
        and "static shape of 2 for dimension inputs[0].shape[0]" in result.fallback_reason
    )
    assert result.dynamic_axes == {}
    assert result.export_shapes == result.verify_shapes == {"x": [4, 3, IMAGE_SIZE, IMAGE_SIZE]}
    assert any("static shapes x [4, 3, 32, 32]" in line for line in lines)
    dims = [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 3, IMAGE_SIZE, IMAGE_SIZE]
    # --verify-only reads the static batch from the file.
    checks = verify_onnx(path, model, image_inputs, kind="image", log=lambda _: None)
    assert checks[0].shape == [4, 10]


def test_ort_copies_of_every_file_load_and_match(tmp_path: os.PathLike) -> None:
    torch.manual_seed(0)
    model = TinyClassifier()
    result = export(model, str(tmp_path / "student.onnx"), ort=True, fp16=True)

    assert sorted(os.listdir(tmp_path)) == [
        "student.fp16.onnx", "student.fp16.ort", "student.fp16.required_operators.config",
        "student.onnx", "student.ort", "student.required_operators.config",
    ]  # fmt: skip
    assert [(f.name, os.path.basename(f.path)) for f in result.ort_files] == [
        ("fp32", "student.ort"),
        ("fp16", "student.fp16.ort"),
    ]
    fp32, fp16 = result.ort_files
    assert fp32.max_abs < 1e-4 and fp16.cosine > 0.999
    assert "Conv" in (tmp_path / "student.required_operators.config").read_text()
    inputs = image_inputs(3)
    with torch.no_grad():
        want = model(**inputs)
    torch.testing.assert_close(torch.from_numpy(run_ort(fp32.path, inputs)[0]), want, atol=1e-4, rtol=1e-3)


def test_ort_parity_failure_writes_nothing_and_names_the_output(tmp_path: os.PathLike) -> None:
    class Shifted(TinyClassifier):
        shift = 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + self.shift

    model = Shifted()

    def shift_after_export(line: str) -> None:
        if line.startswith("exported"):
            model.shift = 1.0

    with pytest.raises(ValidationError, match=r"'logits' \(3, 10\) max abs diff 1, .*student.onnx was not written"):
        export(model, str(tmp_path / "student.onnx"), ort=True, log=shift_after_export)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("level", ["basic", "extended"])
def test_optimize_replaces_the_file_and_is_checked(tmp_path: os.PathLike, level: str) -> None:
    path = str(tmp_path / "student.onnx")
    result = export(TinyClassifier(), path, optimize=level, int8=True)

    assert result.optimization == level
    assert all(check.ok for check in result.checks)
    assert result.variants[0].cosine > 0.99
    domains = {node.domain for node in onnx.load(path).graph.node}
    assert ("com.microsoft" in domains) == (level == "extended")  # extended fuses Conv+Relu into FusedConv


def test_cli_export_with_ort_optimize_and_atol(tmp_path: os.PathLike, capsys: pytest.CaptureFixture) -> None:
    spec = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=1&embed_dim=48&num_heads=2"
    weights = tmp_path / "student.safetensors"
    save_file(load_model(spec, role="student").module.state_dict(), str(weights))
    model = tmp_path / "student.onnx"
    args = ["export", "--student", spec, "--weights", str(weights), "--onnx", str(model)]

    assert main([*args, "--ort", "--optimize", "basic", "--atol", "1e-3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dynamic axes x[0] batch" in out and "student.ort" in out
    assert sorted(os.listdir(tmp_path)) == [
        "student.onnx", "student.ort", "student.required_operators.config", "student.safetensors",
    ]  # fmt: skip
    assert main([*args, "--verify-only"]) == 0


@pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
def test_cuda_device_runs_on_the_cuda_provider(tmp_path: os.PathLike) -> None:
    result = export_student(
        TinyClassifier().eval(), image_inputs(1), image_inputs, str(tmp_path / "student.onnx"), kind="image",
        device="cuda", latency_runs=2, log=lambda _: None,
    )  # fmt: skip
    assert result.latency is not None and result.latency.provider == CUDA_PROVIDER


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA provider is installed")
def test_cuda_device_without_the_provider_says_how_to_install_it(tmp_path: os.PathLike) -> None:
    with pytest.raises(MissingDependencyError, match=r"--device cuda needs .*CUDAExecutionProvider.*gpu"):
        export(TinyClassifier(), str(tmp_path / "student.onnx"), device="cuda")
    assert os.listdir(tmp_path) == []
