"""A convenience QAT/QAD loop for the CLI and the examples; users with a loop never need it.

`train` cycles over batches, computes the loss (the distiller's, the model's own `.loss`, or a
`loss_fn`), and steps AdamW with a cosine learning-rate schedule, optional gradient
accumulation and bf16 autocast, behind a tqdm bar. `freeze` ends calibration and scale
learning. Nothing here knows about formats or graphs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qcompile.batches import call_with_batch, split_batch
from qcompile.distill import Distiller
from qcompile.quantizer import Quantizer


def freeze(model: nn.Module) -> nn.Module:
    """Stop calibration and scale updates: observers detached, learned amax no longer trained."""
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.observer = None
            module.amax.requires_grad_(False)
    return model


def _loss_of(output: Any, batch: Any, loss_fn: Callable | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(output, batch)
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError(
            "the model returns no loss: pass distiller=qcompile.Distiller(teacher, model) for "
            "QAD, or loss_fn=lambda output, batch: ... for QAT"
        )
    return loss


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train(
    model: nn.Module,
    data: Iterable,
    steps: int,
    lr: float = 1e-5,
    distiller: Distiller | None = None,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    accumulate: int = 1,
    autocast_dtype: torch.dtype | None = None,
    weight_decay: float = 0.0,
    warmup: int | None = None,
    progress: bool = True,
) -> list[float]:
    """Train `model` for `steps` optimizer steps and return the loss of each step.

    The data is cycled as often as needed. With `distiller`, the loss is the distillation loss
    (its student must be `model`); otherwise the model's own `.loss` or `loss_fn(output, batch)`.
    """
    if steps <= 0 or accumulate <= 0:
        raise ValueError(f"steps and accumulate must be positive, got {steps}, {accumulate}")
    if distiller is not None and distiller.student is not model:
        raise ValueError("distiller.student must be the model being trained")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20) if warmup is None else warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, warmup))
    batches = itertools.cycle(data)
    device_type = next(iter(parameters)).device.type
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="train", disable=not progress)
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accumulate):
            batch = next(batches)
            with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                if distiller is not None:
                    args, kwargs = split_batch(batch)
                    loss = distiller(*args, **kwargs)
                else:
                    loss = _loss_of(call_with_batch(model, batch), batch, loss_fn)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {len(losses)}: check the data for NaN/inf "
                    "and lower the learning rate"
                )
            (loss / accumulate).backward()
            total += loss.item() / accumulate
        optimizer.step()
        schedule.step()
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4g}")
    return losses
