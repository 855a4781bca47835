"""The weight cache: a weight quantizer's fake-quantized output, kept between inference calls.

In inference (decoding a token at a time) every call would fake-quantize every weight again,
although the weights do not change; a `Quantizer` fed by a parameter keeps its last output and
returns it while nothing it depends on has changed. It costs one extra copy of the quantized
weights in their own dtype while a model runs inference; `set_weight_cache(model, False)`
turns it off (and frees it): do so where weights are offloaded (accelerate's `device_map` with
CPU or disk offload), since the cache would keep every quantized weight on the accelerator.

The cache is used only when all of these hold, so that training, tracing and sharding behave
exactly as without it:
- the quantizer is in eval mode, gradients are off (`torch.no_grad` / `torch.inference_mode`),
  it is enabled, not observing, and `cache_weights` is True;
- its input is a plain `nn.Parameter` (a weight read straight from the module);
- nothing traces or intercepts the call (`qcompile.core.ops.plain_eager`): no torch.compile /
  torch.export / jit tracing, no torch function or dispatch mode (FakeTensor, proxy tracing,
  `with torch.device(...)`), no autocast;
- torch.distributed is not initialized (FSDP2 writes the gathered weights into the same
  tensors without bumping their version counters, so a change could not be seen).

An entry is reused only while the value it returned was not written into, the quantizer's
`spec` is equal, and the weight and every buffer and parameter of the quantizer (`amax`,
`pre_scale`, any state added later as a buffer) are the same tensor objects with the same
version counter, storage address, shape, stride, dtype and device. So optimizer steps, `load_state_dict`, `.to()`, in-place writes under `no_grad`,
calibration, `set_amax` / `set_pre_scale` and GPTQ all invalidate it. A call that may not use
the cache (training, gradients on) drops it, and so does `train()`. Writes through `.data`
(`weight.data.copy_(...)`) bypass the version counter: after such a write call
`clear_weight_cache(model)` (or `model.train()`), or write under `torch.no_grad()` instead.
Nothing here is in `state_dict()`, and copies (`copy.deepcopy`, pickling) start empty.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qcompile.core import ops

#: Attribute of a quantizer's __dict__ that holds its entry (never in state_dict or copies).
ENTRY = "_qcompile_weight_cache"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def usable(quantizer: nn.Module, x: Any) -> bool:
    """Whether this call of `quantizer` on `x` may read and fill the cache."""
    return (type(x) is nn.Parameter
            and not torch.is_grad_enabled()
            and not quantizer.training
            and quantizer.cache_weights
            and quantizer.enabled
            and quantizer.observer is None
            and ops.plain_eager()
            and not _distributed())


def _tensors(quantizer: nn.Module, x: torch.Tensor) -> list[torch.Tensor] | None:
    tensors = [x, *quantizer._buffers.values(), *quantizer._parameters.values()]
    tensors = [t for t in tensors if t is not None]
    if any(t.is_inference() for t in tensors):  # no version counter: changes are invisible
        return None
    return tensors


def _state(quantizer: nn.Module, tensors: list[torch.Tensor]) -> tuple:
    return (quantizer.spec, *((t._version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
                              for t in tensors))


def cached(quantizer: nn.Module, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]):
    """`compute(x)`, or the value it returned last time if neither x nor the quantizer's state
    has changed since (see the module docstring for what counts as a change)."""
    tensors = _tensors(quantizer, x)
    if tensors is None:
        drop(quantizer)
        return compute(x)
    state = _state(quantizer, tensors)
    entry = quantizer.__dict__.get(ENTRY)
    if (entry is not None and entry[1] == state and len(entry[0]) == len(tensors)
            and all(ref() is t for ref, t in zip(entry[0], tensors))
            and entry[2]._version == entry[3]):  # nobody wrote into the returned value
        return entry[2]
    drop(quantizer)  # free the old value before computing the new one
    with torch.inference_mode(False), torch.no_grad():  # a tensor with a version counter
        value = compute(x)
    quantizer.__dict__[ENTRY] = ([weakref.ref(t) for t in tensors], state, value, value._version)
    return value


def drop(quantizer: nn.Module) -> None:
    """Forget the quantizer's cached value."""
    quantizer.__dict__.pop(ENTRY, None)


def _quantizers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "cache_weights")]


def clear_weight_cache(model: nn.Module) -> None:
    """Forget every cached fake-quantized weight of `model` (e.g. after writing weights
    through `.data`, which the cache cannot see)."""
    for quantizer in _quantizers(model):
        drop(quantizer)


def set_weight_cache(model: nn.Module, enabled: bool) -> None:
    """Turn the inference weight cache of every quantizer of `model` on or off (on by
    default). Off saves one copy of the quantized weights during inference, at the cost of
    fake-quantizing each weight again at every call."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    for quantizer in _quantizers(model):
        quantizer.cache_weights = enabled
        drop(quantizer)
