"""Blocks: find a model's repeated blocks, record how each is called, and feed a KV cache.

Block-wise prepare (`qcompile.prepare(..., blocks=...)`) captures each repeated block (the
decoder layers of a `ModuleList`) as its own graph. This module owns what that needs besides
the graph passes: `find_blocks` (which modules are blocks), `record_calls` (the arguments
each block receives in the example call), `call_key` (what makes two calls need different
graphs: structure, constants, sizes 0 and 1 that torch.export fixes, a cache's past) and the
KV-cache plumbing (`TensorCache`, what a captured block sees instead of Hugging Face's cache
object, and `read_past`, the past keys/values of one layer of that cache). It knows nothing
of quantization or of the prepared graph.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree


class BlockError(ValueError):
    """The blocks asked for cannot be prepared one by one; the message says why and what to do."""


def _has_matmul_weight(module: nn.Module) -> bool:
    """Whether `module` holds a weight it multiplies by: a parameter of 2 or more dimensions
    outside an embedding (Linear, GPT-2's Conv1D, convolutions, fused experts)."""
    return any(
        parameter.ndim >= 2
        for child in module.modules() if not isinstance(child, (nn.Embedding, nn.EmbeddingBag))
        for parameter in child.parameters(recurse=False)
    )


def block_lists(model: nn.Module) -> list[tuple[str, int]]:
    """(path, length) of each `nn.ModuleList` of 2 or more children of one class that hold a
    matmul weight (Linear, Conv1D, experts): the candidates for blocks, longest first."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            classes = {type(child) for child in module}
            if len(classes) == 1 and all(_has_matmul_weight(child) for child in module):
                found.append((path, len(module)))
    return sorted(found, key=lambda item: -item[1])


def find_blocks(model: nn.Module, blocks: str | Iterable[str]) -> list[str]:
    """The module paths of the blocks of `model`, in model order.

    `blocks` is "auto" (the children of the longest `ModuleList` of same-class blocks that
    hold matmul weights, e.g. `model.layers.*`; none: []), or glob patterns on module paths
    ("model.layers.*"); a pattern that matches nothing raises a `BlockError`.
    """
    if blocks == "auto":
        lists = block_lists(model)
        if not lists:
            return []
        path, length = lists[0]
        return [f"{path}.{i}" if path else str(i) for i in range(length)]
    patterns = [blocks] if isinstance(blocks, str) else list(blocks)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise BlockError(
            f"blocks must be 'auto', None or glob patterns on module paths such as "
            f"'model.layers.*', got {blocks!r}"
        )
    paths = [path for path, _ in model.named_modules() if path]
    chosen: list[str] = []
    for pattern in patterns:
        matched = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
        if not matched:
            lists = ", ".join(f"'{p}.*' ({n} blocks)" for p, n in block_lists(model)[:3])
            raise BlockError(
                f"blocks pattern {pattern!r} matches no module of {type(model).__name__}"
                + (f"; its repeated blocks are {lists}" if lists else
                   "; it has no list of repeated blocks: pass blocks=None")
            )
        chosen += [p for p in matched if p not in chosen]
    outer = [p for p in chosen if not any(p.startswith(f"{q}.") for q in chosen)]
    order = {path: i for i, path in enumerate(paths)}
    return sorted(outer, key=order.__getitem__)


def is_cache(value: Any) -> bool:
    """Whether `value` is a Hugging Face KV cache object (duck-typed: `update`,
    `get_seq_length`)."""
    return (not isinstance(value, (torch.Tensor, dict, list, tuple))
            and callable(getattr(value, "update", None))
            and callable(getattr(value, "get_seq_length", None)))


#: Where a call passes the KV cache: a keyword argument's name, or a position (GPT-2's blocks
#: take it second, positionally).
CacheSlot = str | int


def cache_slot(args: tuple, kwargs: dict[str, Any]) -> CacheSlot | None:
    """Where `(args, kwargs)` pass a KV cache object (its keyword or position), if anywhere."""
    name = next((name for name, value in kwargs.items() if is_cache(value)), None)
    if name is not None:
        return name
    return next((i for i, value in enumerate(args) if is_cache(value)), None)


def take_cache(
    args: tuple, kwargs: dict[str, Any], slot: CacheSlot | None
) -> tuple[tuple, dict[str, Any], Any]:
    """(args, kwargs) without the cache at `slot`, and the cache (None without a slot)."""
    if slot is None:
        return args, kwargs, None
    if isinstance(slot, int):
        return args[:slot] + args[slot + 1:], kwargs, args[slot]
    kwargs = dict(kwargs)
    return args, kwargs, kwargs.pop(slot)


def put_cache(
    args: tuple, kwargs: dict[str, Any], slot: CacheSlot | None, cache: Any
) -> tuple[tuple, dict[str, Any]]:
    """The inverse of `take_cache`: (args, kwargs) with `cache` back at `slot`."""
    if slot is None:
        return args, kwargs
    if isinstance(slot, int):
        return args[:slot] + (cache,) + args[slot:], kwargs
    return args, {**kwargs, slot: cache}


#: Cache layers whose stored keys/values are exactly the past that attention concatenates to.
_GROWING_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def read_past(cache: Any, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The past keys and values that layer `layer_idx` of a Hugging Face cache holds, or None
    where it holds none yet. Only caches that grow by concatenation (DynamicCache, the default
    of `generate`) are read; others raise a `BlockError` saying what to use."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise BlockError(
            f"a block-wise prepared model reads the KV cache per layer; "
            f"{type(cache).__name__} has no `layers` (use transformers' DynamicCache)"
        )
    if layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if type(layer).__name__ not in _GROWING_LAYERS:
        raise BlockError(
            f"a block-wise prepared model supports caches that grow by concatenation "
            f"(DynamicCache, generate's default), not {type(cache).__name__} with "
            f"{type(layer).__name__} layers: call generate(..., cache_implementation="
            "'dynamic') or pass a DynamicCache"
        )
    if not getattr(layer, "is_initialized", False) or layer.keys is None or not layer.keys.numel():
        return None
    return layer.keys, layer.values


class TensorCache:
    """What a captured block gets in place of the Hugging Face cache: the past keys and values
    of its one layer as tensors (or none), and this call's new ones, recorded by `update`.

    `update` returns past and new concatenated along the sequence axis, as `DynamicCache` does,
    so the block attends to both; the caller then stores the new ones in the real cache."""

    def __init__(self, past: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.past = past
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        if self.new is not None:
            raise BlockError("the block updates its KV cache twice in one call; prepare it "
                             "with use_cache=False in example_kwargs, or blocks=None")
        self.new = (key, value)
        if self.past is None:
            return key, value
        return (torch.cat([self.past[0], key], dim=-2),
                torch.cat([self.past[1], value], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.past is None else self.past[0].shape[-2]


def layer_index(block: nn.Module, path: str) -> int:
    """The cache layer a block reads: a `layer_idx` attribute of it or a submodule (Hugging
    Face attention modules carry one), else its index in the block list."""
    for module in block.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int):
            return index
    last = path.rsplit(".", 1)[-1]
    return int(last) if last.isdigit() else 0


def record_calls(
    model: nn.Module, paths: list[str], args: tuple, kwargs: dict[str, Any]
) -> dict[str, tuple[tuple, dict[str, Any], tuple | None]]:
    """Run `model(*args, **kwargs)` once (no grad, eval mode) and return, per block path,
    the (args, kwargs, past) it was called with; `past` is the block's layer of a KV cache
    passed to it (by keyword or position; see `read_past`), read when the block was called.
    A block that is not called, or called twice, raises a `BlockError`.

    Only what the blocks are called with matters here, not what they compute: a block called
    exactly as an earlier block of its class (same structure, constants, shapes, dtypes,
    devices) is not run, it returns that block's output (the recording of a 32-layer model
    runs one layer)."""
    calls: dict[str, tuple[tuple, dict[str, Any], tuple | None]] = {}
    outputs: dict[tuple, Any] = {}

    def recorder(path: str, index: int, block: nn.Module):
        run = block.forward

        def forward(*block_args: Any, **block_kwargs: Any) -> Any:
            if path in calls:
                raise BlockError(
                    f"block {path} ({type(block).__name__}) is called twice in one forward "
                    "pass; block-wise prepare needs each block called once: pass blocks=None "
                    "(one graph for the whole model) or name other blocks"
                )
            _, _, cache = take_cache(block_args, block_kwargs,
                                     cache_slot(block_args, block_kwargs))
            past = None if cache is None else read_past(cache, index)
            calls[path] = (block_args, dict(block_kwargs), past)
            key = (type(block), _exact_key(block_args, block_kwargs, past))
            if key not in outputs:
                outputs[key] = run(*block_args, **block_kwargs)
            return outputs[key]
        return forward

    blocks = [model.get_submodule(path) for path in paths]
    own = [block.__dict__.get("forward") for block in blocks]  # an instance's own forward
    training = model.training
    try:
        for path, block in zip(paths, blocks):
            block.forward = recorder(path, layer_index(block, path), block)
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.train(training)
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    missing = [p for p in paths if p not in calls]
    if missing:
        raise BlockError(
            f"blocks {missing[:4]} are not called by {type(model).__name__} on the example "
            "inputs; block-wise prepare captures each block as it is called: pass blocks "
            "naming the blocks the model calls, or blocks=None"
        )
    return calls


def _exact_key(args: tuple, kwargs: dict[str, Any], past: tuple | None) -> tuple:
    """What makes two calls of blocks of one class compute outputs of one structure and shape:
    everything but the tensors' values (a cache object counts by its identity)."""
    leaves, spec = pytree.tree_flatten((args, kwargs, past))
    return str(spec), tuple(
        (leaf.dtype, tuple(leaf.shape), leaf.device, leaf.requires_grad)
        if isinstance(leaf, torch.Tensor) else
        ("cache", id(leaf)) if is_cache(leaf) else (type(leaf).__name__, _hashable(leaf))
        for leaf in leaves
    )


def call_key(args: tuple, kwargs: dict[str, Any], past: tuple | None) -> tuple:
    """What two calls of one block must share to run the same captured graph: the argument
    structure, the constants, each tensor's dtype, rank and which sizes are 0 or 1 (fixed by
    torch.export), and whether there is a past."""
    leaves, spec = pytree.tree_flatten((args, kwargs, past))
    described = tuple(
        (leaf.dtype, tuple(size if size in (0, 1) else -1 for size in leaf.shape))
        if isinstance(leaf, torch.Tensor) else (type(leaf).__name__, _hashable(leaf))
        for leaf in leaves
    )
    return str(spec), described


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value
