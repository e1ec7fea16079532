"""The position-grid rule fires on graph evidence (a table added to a patch grid), not on a table's length."""

from __future__ import annotations

import timm
import torch
import transformers
from timm.layers import resample_abs_pos_embed
from torch import nn

import wscompile
from wscompile import frontend
from wscompile.passes.interpolate import RULE as INTERPOLATE
from wscompile.passes.position_grid import token_grid
from wscompile.passes.uniform import uniform_indices


class LatentReader(nn.Module):
    """A learned latent array read as attention queries over patch tokens (Perceiver-style), never added to them."""

    def __init__(self, dim: int, latents: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.latents = nn.Parameter(torch.randn(1, latents, dim))
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        queries = self.query(self.latents.expand(x.shape[0], -1, -1))
        keys = self.key(tokens)
        return self.head(((queries @ keys.transpose(1, 2)).softmax(-1) @ keys).mean(1))


def _record(plan, key):
    return next(r for r in plan.tensors if r.student == key)


def test_latent_table_with_a_square_length_is_not_a_position_grid():
    # 64 = 8 x 8 latents beside an 8 x 8 patch grid, shrinking to 36 = 6 x 6: the length alone looks like a grid
    torch.manual_seed(0)
    teacher, student = LatentReader(32, 64).eval(), LatentReader(16, 36).eval()
    plan = wscompile.initialize(teacher, student, torch.randn(1, 3, 32, 32), student_inputs=torch.randn(1, 3, 24, 24))
    record = _record(plan, "latents")
    assert record.teacher == "latents"
    assert INTERPOLATE not in [a.rule for a in record.axes]
    assert record.axes[1].indices == uniform_indices(64, 36)
    channels = record.axes[2].indices or list(range(0, 32, record.axes[2].step))
    assert torch.equal(student.latents, teacher.latents[:, uniform_indices(64, 36)][:, :, channels])


def test_token_grid_reads_the_patch_embedding_output():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1).eval()
    graph = frontend.trace(model, {"x": torch.randn(1, 3, 64, 64)}, label="vit")
    found = {graph.nodes[n]["tensors"][0].name: token_grid(graph, n) for n in graph.nodes}
    assert found["pos_embed"] == (1, 4)  # the class token, then a 4 x 4 grid
    assert found["cls_token"] is None  # one row, beside the grid but no grid of its own
    latent = LatentReader(16, 36).eval()
    graph = frontend.trace(latent, {"x": torch.randn(1, 3, 24, 24)}, label="latents")
    assert all(token_grid(graph, n) is None for n in graph.nodes)


def test_hf_vit_position_table_at_another_image_size_is_resampled():
    def vit(width, image):
        return transformers.ViTModel(
            transformers.ViTConfig(
                hidden_size=width,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=2 * width,
                image_size=image,
                patch_size=16,
            ),
            add_pooling_layer=False,
        ).eval()

    teacher, student = vit(64, 96), vit(32, 64)
    plan = wscompile.initialize(teacher, student, torch.randn(1, 3, 96, 96), student_inputs=torch.randn(1, 3, 64, 64))
    key = "embeddings.position_embeddings"
    assert [a.rule for a in _record(plan, key).axes] == ["full", INTERPOLATE, "uniform"]
    selected = teacher.embeddings.position_embeddings[:, :, uniform_indices(64, 32)]
    expected = resample_abs_pos_embed(selected, new_size=(4, 4), old_size=(6, 6), num_prefix_tokens=1)
    assert torch.equal(student.embeddings.position_embeddings, expected)
