"""How a batch of data is fed to a model: the one convention calibrate and train share.

A dict is passed as keyword arguments, a tuple or list as positional arguments, anything else
(a tensor) as the only argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def split_batch(batch: Any) -> tuple[tuple, dict]:
    """(args, kwargs) of one batch."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def call_with_batch(model: nn.Module, batch: Any) -> Any:
    """model(batch) following the batch convention."""
    args, kwargs = split_batch(batch)
    return model(*args, **kwargs)
