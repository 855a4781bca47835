"""How a batch of data is fed to a model: the one convention calibrate and train share.

A dict is passed as keyword arguments, a tuple or list as positional arguments, anything else
(a tensor) as the only argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.utils import _pytree as pytree


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


def input_name(path: tuple) -> str:
    """How a leaf of a batch (a pytree key path) is named in messages: 'x', "'mask'[0]",
    'input 1', or 'the batch' for a batch that is one tensor."""
    if not path:
        return "the batch"
    head, rest = path[0], pytree.keystr(tuple(path[1:]))
    if isinstance(head, pytree.MappingKey):
        return f"{head.key!r}{rest}"
    if isinstance(head, pytree.SequenceKey):
        return f"input {head.idx}{rest}"
    return pytree.keystr(tuple(path))
