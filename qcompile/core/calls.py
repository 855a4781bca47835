"""How a model is called: the batch convention calibrate and train share, and how a call's
tensors are described (`TensorSpec`, `describe_call`) for input checks and error messages.

A dict is passed as keyword arguments, a tuple or list as positional arguments, anything else
(a tensor) as the only argument. Nothing here knows of graphs or quantization.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
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


#: Constants recorded and compared at call time; other Python objects are not checked.
CONSTANTS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class TensorSpec:
    """An example tensor: dtype, device and shape, whether dtype and device were the model's
    (then they must follow the model when it is converted or moved), and the sizes the
    captured graph fixed (None where a dimension may vary; all None where unknown)."""

    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, ...]
    model_dtype: bool
    model_device: bool
    fixed: tuple[int | None, ...] = ()


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    """The dtype of the first floating-point parameter (or buffer), and its device."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return None, None


def leaves(value: Any) -> list[tuple[str, Any]]:
    """(path, leaf) of a pytree; the path is '' for the value itself, '[0]', "['a']" below."""
    leaves, _ = pytree.tree_flatten_with_path(value)
    return [(pytree.keystr(path), leaf) for path, leaf in leaves]


def describe_value(value: Any, dtype: torch.dtype | None, device: torch.device | None) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(value.dtype, value.device, tuple(value.shape),
                          value.dtype == dtype, value.device == device)
    return value if isinstance(value, CONSTANTS) else ...


def show_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)} on {value.device}"
    return repr(value)


def describe_call(model: nn.Module, args: tuple, kwargs: dict) -> str:
    """"x: float32[4, 32] on cpu, mode: 'a'" for error messages."""
    try:
        items = list(inspect.signature(model.forward).bind(*args, **kwargs).arguments.items())
    except (TypeError, ValueError):
        items = [(f"input {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return ", ".join(f"{name}{path}: {show_value(leaf)}"
                     for name, value in items for path, leaf in leaves(value))
