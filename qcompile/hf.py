"""Hugging Face integration: QAD with the `Trainer`, generation, and checkpoints.

`QADTrainer` is a `transformers.Trainer` whose loss is a `qcompile.Distiller`'s: the frozen
float teacher's outputs on the same batch, KL on logits (labels are dropped; none are needed).
`prepare_causal_lm` / `QuantizedCausalLM` (in `hf_causal_lm`) make a prepared causal LM that
`generate()` drives; `save_quantized` / `load_quantized` (in `hf_checkpoint`) write and read a
`save_pretrained`-style directory with a `quantization_config`. Import this module only where
transformers is installed; the rest of qcompile never needs it.
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn

from qcompile.distill import Distiller
from qcompile.hf_causal_lm import QuantizedCausalLM, prepare_causal_lm
from qcompile.hf_checkpoint import load_quantized, save_quantized

__all__ = [
    "QADTrainer",
    "QuantizedCausalLM",
    "load_quantized",
    "prepare_causal_lm",
    "save_quantized",
]


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
