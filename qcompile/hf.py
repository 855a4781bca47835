"""Hugging Face `Trainer` integration: QAD by overriding `compute_loss`.

`QADTrainer` is a `transformers.Trainer` whose loss is a `qcompile.Distiller`'s: the frozen
float teacher's outputs on the same batch, KL on logits (labels are dropped; none are needed).
Import this module only where transformers is installed; the rest of qcompile never needs it.
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn

from qcompile.distill import Distiller


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
