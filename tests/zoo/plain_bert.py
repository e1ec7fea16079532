"""A BERT encoder written with plain ``nn.Module``s and its own attribute names.

Same math as Hugging Face ``BertModel`` without the pooler (word + position + token-type
embeddings, LayerNorm, post-norm layers with separate query/key/value/output projections and a
GELU MLP), but nothing is named or nested like it: the zoo uses it as a student of an HF BERT
teacher, so the pair can only be matched by structure.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SEQ_LEN = 16  # length of the example inputs


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.proj(context.transpose(1, 2).reshape(batch, seq, hidden))


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.attn = SelfAttention(hidden, heads)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, keep))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))


class PlainBert(nn.Module):
    def __init__(
        self,
        vocab: int,
        hidden: int,
        layers: int,
        heads: int,
        intermediate: int,
        positions: int,
        token_types: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(positions, hidden)
        self.segments = nn.Embedding(token_types, hidden)
        self.embed_norm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = nn.ModuleList(EncoderLayer(hidden, heads, intermediate, eps) for _ in range(layers))
        ids = torch.arange(SEQ_LEN) % vocab
        ids[-1] = vocab - 1  # spec loading draws example ids below max + 1
        self.example_inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, SEQ_LEN, dtype=torch.bool)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device)
        # summed in another order than BertEmbeddings (word + token type + position): the matcher
        # pairs the tables by structure and shape, not by the order of the additions
        x = self.tokens(input_ids) + self.positions(positions)
        x = self.embed_norm(x + self.segments(torch.zeros_like(input_ids)))
        keep = attention_mask[:, None, None, :].bool()  # attend to every key that is not padding
        for layer in self.encoder:
            x = layer(x, keep)
        return x


def factory(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    vocab: int = 1000,
    intermediate: int | None = None,
    positions: int = 64,
    token_types: int = 2,
    eps: float = 1e-12,
) -> PlainBert:
    """A PlainBert; ``intermediate`` defaults to 4 * hidden."""
    return PlainBert(vocab, hidden, layers, heads, intermediate or 4 * hidden, positions, token_types, eps)
