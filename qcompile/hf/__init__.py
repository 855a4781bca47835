"""Hugging Face integration: QAD with the `Trainer`, generation, and checkpoints.

`QADTrainer` is a `transformers.Trainer` whose loss is a `qcompile.Distiller`'s: the frozen
float teacher's outputs on the same batch, KL on logits (labels are dropped; none are needed).
`prepare_causal_lm` / `QuantizedCausalLM` (in `causal_lm`) make a prepared causal LM that
`generate()` drives; `save_quantized` / `load_quantized` (in `checkpoint`) write and read a
`save_pretrained`-style directory with a `quantization_config`; `export_checkpoint` /
`load_checkpoint` (in `serving`) write and read the quantized checkpoints that vLLM, SGLang and
TensorRT-LLM serve (ModelOpt's unified format or compressed-tensors). Import this module only where
transformers is installed; the rest of qcompile never needs it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from torch import nn

from qcompile.hf.causal_lm import QuantizedCausalLM, prepare_causal_lm
from qcompile.hf.checkpoint import read_checkpoint, save_quantized
from qcompile.hf.serving import InexpressibleError, export_checkpoint, load_checkpoint
from qcompile.prepare import PreparedModel
from qcompile.training.distill import Distiller

__all__ = [
    "InexpressibleError",
    "QADTrainer",
    "export_checkpoint",
    "load_checkpoint",
    "QuantizedCausalLM",
    "load_quantized",
    "prepare_causal_lm",
    "save_quantized",
]


def load_quantized(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> PreparedModel | QuantizedCausalLM:
    """Rebuild what `save_quantized` wrote to `directory`, on `device`, in eval mode: the
    prepared model, or the `QuantizedCausalLM` it was saved as."""
    loaded = read_checkpoint(directory, device=device)
    if not loaded.causal_lm:
        return loaded.prepared
    return QuantizedCausalLM(loaded.prepared, loaded.config, loaded.generation_config).eval()


class QADTrainer(transformers.Trainer):
    """`Trainer(model=qmodel, ...)` that distils `teacher` into the quantized model.

    Keyword arguments `teacher`, `temperature`, `loss`, `features`, `logits` and
    `teacher_dtype` go to `qcompile.Distiller`; everything else to `transformers.Trainer`.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module,
        temperature: float = 1.0,
        loss: str = "kl",
        features: list[str] | None = None,
        logits: Any = None,
        teacher_dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.distiller = Distiller(
            teacher, self.model, temperature=temperature, loss=loss, features=features,
            logits=logits, teacher_dtype=teacher_dtype,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k not in ("labels", "label")}
        teacher = self.distiller.teacher
        device = next(model.parameters()).device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        loss = self.distiller.compute_loss(model, **inputs)
        return (loss, None) if return_outputs else loss
