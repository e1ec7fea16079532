"""Teachers larger than memory: read lazily from safetensors, the student streamed to disk.

The oracle for the streamed path is the in-memory one: the whole teacher loaded, the plan applied
in memory (``apply_plan``) and saved with ``save_safetensors``. Both must give the same bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wscompile import commands, weights
from wscompile.outputs import (
    SHARD_INDEX,
    check_output_dir,
    save_safetensors,
    stream_safetensors,
    stream_safetensors_dir,
)
from wscompile.weights import SafetensorsSource, open_weights

transformers = pytest.importorskip("transformers")

# A Llama with grouped-query attention, ~380 MB of bf16, and a student a seventh of its size.
TEACHER = dict(
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=5632,
    vocab_size=16000,
    max_position_embeddings=64,
)
STUDENT = dict(
    hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1408
)
# Memory the streamed run may take beyond the student and one teacher tensor: tracing both
# models, the plan, one student tensor being written.
OVERHEAD = 128 * 2**20

# In a fresh process: `wscompile init` as the CLI runs it, and the peak RSS growth it caused; then
# the oracle, the in-memory path on the same plan: the whole teacher loaded, `apply_plan`, and
# `save_safetensors`, the kept tensors given the student's init by the same rule (`specs.init_kept`).
SCRIPT = textwrap.dedent("""
    import json, sys
    from safetensors.torch import load_file
    from wscompile import commands, weights
    from wscompile.outputs import save_safetensors
    from wscompile.passes.apply import apply_plan
    from wscompile.specs import load_model
    from wscompile.weights import DictSource

    teacher_spec, student_spec, teacher_dir, out, in_memory, manifest = sys.argv[1:]

    def status(field):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

    load_model(student_spec, role="student", device="meta")  # imports the model's code: not data
    baseline = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    options = commands.InitOptions(teacher=teacher_spec, student=student_spec, out=out, manifest=manifest)
    plan = commands.run_init(options, log=lambda line: None)
    peak_growth = status("VmHWM") - baseline

    index = json.load(open(f"{teacher_dir}/model.safetensors.index.json"))
    whole_teacher = {}
    for shard in sorted(set(index["weight_map"].values())):
        whole_teacher.update(load_file(f"{teacher_dir}/{shard}"))
    # the student's own init where the plan keeps it, by the documented rule (specs.init_kept)
    student = load_model(student_spec, role="student", seed=options.seed, device="meta").module
    assert commands.values_at_init(student, plan, options.seed)
    state = apply_plan(plan, DictSource(whole_teacher), student.state_dict())
    save_safetensors(in_memory, state, commands.student_metadata(options), force=False)
    print(json.dumps({"peak_growth": peak_growth}))
""")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded Hugging Face checkpoint: config.json, two safetensors shards and their index."""
    directory = tmp_path_factory.mktemp("llama-teacher")
    config = transformers.LlamaConfig(**TEACHER, dtype="bfloat16", tie_word_embeddings=False)
    config.save_pretrained(directory)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    keys = list(shapes)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(
            {k: torch.randn(shapes[k], generator=generator, dtype=torch.bfloat16) for k in part}, directory / name
        )
        weight_map.update(dict.fromkeys(part, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.fixture(scope="module")
def run(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Outputs of SCRIPT: the streamed and in-memory students, the manifest, the peak RSS growth."""
    directory = tmp_path_factory.mktemp("students")
    student = "&".join(f"{k}={v}" for k, v in STUDENT.items())
    paths = {name: directory / name for name in ("streamed.safetensors", "in-memory.safetensors", "plan.json")}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            f"hf:{teacher_dir}?task=causal-lm",
            f"hf:{teacher_dir}?task=causal-lm&{student}",
            str(teacher_dir),
            *map(str, paths.values()),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads(result.stdout.strip().splitlines()[-1]), **paths}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS")
def test_streamed_init_peak_memory_is_student_plus_one_teacher_tensor(teacher_dir: Path, run: dict) -> None:
    teacher_bytes = sum(p.stat().st_size for p in teacher_dir.glob("*.safetensors"))
    student_bytes = run["streamed.safetensors"].stat().st_size
    largest_teacher_tensor = TEACHER["vocab_size"] * TEACHER["hidden_size"] * 2  # embed_tokens, lm_head
    bound = student_bytes + largest_teacher_tensor + OVERHEAD
    assert bound < 0.6 * teacher_bytes  # so the test means something: the whole teacher would not fit
    assert run["peak_growth"] < bound, (run["peak_growth"], bound)


def test_streamed_student_is_byte_identical_to_in_memory_student(run: dict) -> None:
    # Structure first: grouped-query attention's k/v projections (2 of 4 kv heads) come from the
    # teacher like every kept layer; only the LM head keeps the student's init.
    plan = {r["student"]: r for r in json.loads(run["plan.json"].read_text())["tensors"]}
    assert plan["model.layers.3.self_attn.k_proj.weight"]["teacher"] == "model.layers.3.self_attn.k_proj.weight"
    assert plan["model.layers.3.self_attn.v_proj.weight"]["student_shape"] == [128, 512]
    assert [key for key, r in plan.items() if r["teacher"] is None] == ["lm_head.weight"]
    assert run["streamed.safetensors"].read_bytes() == run["in-memory.safetensors"].read_bytes()


@pytest.mark.parametrize("chunk_bytes", [10**9, 3000], ids=["one-read", "chunked"])
def test_safetensors_source_reads_exactly_the_positions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
) -> None:
    monkeypatch.setattr(weights, "_CHUNK_BYTES", chunk_bytes)  # 3000 bytes: a few rows per mapping
    path = tmp_path / "t.safetensors"
    tensor = torch.randn(200, 30, 2)
    save_file({"w": tensor}, path)
    source = SafetensorsSource(str(path))
    cases = [
        [None, list(range(0, 30, 3))],  # all rows, evenly spaced columns: strided views
        [list(range(1, 200, 2)), None, [1]],  # evenly spaced rows (more than _MAX_ROW_RUNS runs)
        [sorted({int(i) for i in torch.randint(0, 200, (90,))}), [4, 0, 7]],  # arbitrary rows and columns
        [[150, 3, 77] + list(range(100, 190, 3)), None],  # rows out of order: one read of their box
    ]
    for i, index in enumerate(cases):
        expected = tensor
        for axis, idx in enumerate(index):
            if idx is not None:
                expected = expected.index_select(axis, torch.tensor(idx))
        assert torch.equal(source.read("w", index), expected), index
        if i == 0:
            assert source.bytes_read == 200 * 28 * 2 * 4  # the columns' bounding box, every row, once


DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
]


def test_streamed_file_is_byte_identical_in_any_order(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i}.{dtype}".replace("torch.", ""): (torch.randn(3, 5, generator=generator) * 9).to(dtype)
        for i, dtype in enumerate(DTYPES)
    }
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "a.view": torch.arange(12.0).view(3, 4).t()}
    metadata = {f"key{i}": str(i) for i in range(12)}
    save_safetensors(tmp_path / "oracle", tensors, metadata, force=False)
    layout = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    stream_safetensors(tmp_path / "streamed", layout, reversed(list(tensors.items())), metadata, force=False)
    assert (tmp_path / "streamed").read_bytes() == (tmp_path / "oracle").read_bytes()


def test_stream_rejects_a_tensor_outside_the_layout_and_leaves_nothing(tmp_path: Path) -> None:
    layout = {"a": ((2,), torch.float32)}
    with pytest.raises(ValueError, match="'b' is not in the layout"):
        stream_safetensors(tmp_path / "s", layout, [("a", torch.zeros(2)), ("b", torch.zeros(2))], {}, force=False)
    with pytest.raises(ValueError, match="never written, e.g. 'a'"):
        stream_safetensors(tmp_path / "s", layout, [], {}, force=False)
    assert list(tmp_path.iterdir()) == []


def test_directory_output_is_sharded_with_an_index(tmp_path: Path) -> None:
    tensors = {f"layer{i}.weight": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each
    layout = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    out = tmp_path / "student"
    names = stream_safetensors_dir(out, layout, tensors.items(), {"format": "pt"}, force=False, max_shard_size=1000)
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [SHARD_INDEX]
    index = json.loads((out / SHARD_INDEX).read_text())
    assert index["metadata"]["total_size"] == 2000
    assert index["weight_map"]["layer4.weight"] == "model-00003-of-00003.safetensors"
    loaded = open_weights(str(out))
    assert all(torch.equal(loaded.read(k), v) for k, v in tensors.items())
    # One shard when it fits; replacing needs --force; a directory with other files is never replaced.
    with pytest.raises(Exception, match="pass --force"):
        stream_safetensors_dir(out, layout, tensors.items(), {}, force=False, max_shard_size=10**6)
    assert stream_safetensors_dir(out, layout, tensors.items(), {}, force=True, max_shard_size=10**6) == [
        "model.safetensors"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match=r"holds files wscompile did not write \(notes.txt\)"):
        check_output_dir(out, force=True)


def test_cli_init_into_a_directory(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
    )
    teacher_dir = tmp_path / "teacher"
    transformers.LlamaForCausalLM(config).save_pretrained(teacher_dir)
    spec = f"hf:{teacher_dir}?task=causal-lm"
    options = commands.InitOptions(
        teacher=spec,
        student=f"{spec}&hidden_size=32&num_hidden_layers=1",
        out=f"{tmp_path}/student/",
        max_shard_size=20_000,
        progress=False,
    )
    commands.run_init(options, log=lambda line: None)
    files = sorted(p.name for p in (tmp_path / "student").iterdir())
    assert SHARD_INDEX in files and len(files) > 2
    state = transformers.LlamaForCausalLM.from_pretrained(teacher_dir).state_dict()
    student = open_weights(str(tmp_path / "student"))
    rows = list(range(0, 64, 2))
    assert torch.equal(
        student.read("model.layers.0.mlp.up_proj.weight"), state["model.layers.0.mlp.up_proj.weight"][:, ::2]
    )
    assert torch.equal(student.read("model.embed_tokens.weight"), state["model.embed_tokens.weight"][:, rows])
