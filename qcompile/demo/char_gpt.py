"""A small character-level GPT, trained from scratch here on the standard library's source.

The accuracy and QAT-speed benchmarks need a real language model that nobody downloads: this
module defines a pre-norm decoder (nn.Linear projections, causal scaled-dot-product attention),
a byte-level vocabulary, batches from `qcompile.demo.corpus.source_text` split by file, and
validation perplexity. It knows nothing of quantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

VOCAB_SIZE = 256  # bytes


@dataclass(frozen=True)
class GPTConfig:
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    seq_len: int = 128
    dropout: float = 0.0


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.d_model)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, 4 * config.d_model)
        self.fc2 = nn.Linear(4 * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.proj(attention.transpose(1, 2).reshape(batch, seq, width)))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class CharGPT(nn.Module):
    """Byte-level decoder: token ids (batch, seq) -> logits (batch, seq, 256)."""

    def __init__(self, config: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(VOCAB_SIZE, config.d_model)
        self.position = nn.Parameter(torch.zeros(1, config.seq_len, config.d_model))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, VOCAB_SIZE, bias=False)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of text as a 1-d int64 tensor."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def sample_batches(
    data: torch.Tensor, batch_size: int, seq_len: int, count: int, seed: int = 0
) -> list[torch.Tensor]:
    """`count` batches of random windows of seq_len + 1 bytes (input and next-byte target)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len - 1, (count, batch_size), generator=generator)
    offsets = torch.arange(seq_len + 1)
    return [data[row[:, None] + offsets] for row in starts]


def next_byte_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each next byte of the window."""
    logits = model(window[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), window[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, windows: list[torch.Tensor]) -> float:
    """exp of the mean next-byte cross-entropy over the windows (eval mode)."""
    was_training = model.training
    model.eval()
    loss = sum(next_byte_loss(model, w).item() for w in windows) / len(windows)
    model.train(was_training)
    return math.exp(loss)
