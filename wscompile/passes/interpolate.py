"""Position embeddings on a token grid are resampled, not subsampled.

A ViT position table ``(1, p + g*g, D)`` holds ``p`` prefix tokens (class, distillation) and a
``g x g`` grid. A student with another grid (another image or patch size) takes the teacher's
prefix rows as they are and the grid resized to ``g_s x g_s`` by bicubic interpolation with
antialiasing, as timm's ``resample_abs_pos_embed`` does; channels are selected as usual before
resizing. Picking every k-th token instead would tear rows of the grid apart. Which tables are
such grids is decided from the graph (``position_grid.py``), not from their length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RULE = "interpolate"
MAX_PREFIX_TOKENS = 8


def grid_split(tokens: int) -> tuple[int, int] | None:
    """(prefix tokens, grid side) if ``tokens`` is a few prefix tokens plus a square grid."""
    side = math.isqrt(tokens)
    for g in (side, side - 1):
        prefix = tokens - g * g
        if g > 1 and 0 <= prefix <= MAX_PREFIX_TOKENS:
            return prefix, g
    return None


def resample(table: torch.Tensor, student_tokens: int, axis: int = 1) -> torch.Tensor:
    """Resize the grid part of ``table`` along ``axis`` to ``student_tokens`` tokens."""
    prefix, g_t = grid_split(table.shape[axis])
    _, g_s = grid_split(student_tokens)
    moved = table.movedim(axis, -2)  # (..., tokens, D)
    lead, channels = moved.shape[:-2], moved.shape[-1]
    flat = moved.reshape(-1, moved.shape[-2], channels)
    head, grid = flat[:, :prefix], flat[:, prefix:]
    grid = grid.reshape(-1, g_t, g_t, channels).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g_s, g_s), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, g_s * g_s, channels).to(table.dtype)
    out = torch.cat([head, grid], dim=1).reshape(*lead, prefix + g_s * g_s, channels)
    return out.movedim(-2, axis)
