"""The `qcompile` torch.compile backend: inductor, with our fake-quant ops decomposed.

Inductor treats a custom op as an opaque call: one extra pass over memory that cannot fuse with
the element-wise kernels beside it. This backend hands inductor a decomposition of each
`qcompile` op into the aten reference of `qcompile.numerics` (the same code that defines the
numbers), so forward and backward fuse into their neighbours. Scales stay tensors, so changing
them never recompiles. It knows nothing of how a model was prepared.

Registered through the `torch_dynamo_backends` entry point: `torch.compile(m, backend="qcompile")`
works after installation, without importing qcompile.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from qcompile import numerics, ops  # noqa: F401  (ops registers torch.ops.qcompile.*)
from qcompile.formats import get_format


def _block(block_size: int) -> int | None:
    return block_size if block_size > 0 else None


def _fake_quantize(x, amax, format, block_size):
    return numerics.fake_quantize(x, amax, get_format(format), _block(block_size))


def _fake_quantize_backward(grad, x, amax, format, block_size):
    return numerics.fake_quantize_backward(grad, x, amax, get_format(format), _block(block_size))


def _fake_quantize_amax_backward(grad, x, amax, format, block_size):
    return numerics.amax_gradient(grad, x, amax, get_format(format), _block(block_size))


def decompositions() -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """The aten decompositions of every qcompile op, keyed by op overload."""
    qcompile = torch.ops.qcompile
    return {
        qcompile.fake_quantize.default: _fake_quantize,
        qcompile.fake_quantize_backward.default: _fake_quantize_backward,
        qcompile.fake_quantize_amax_backward.default: _fake_quantize_amax_backward,
    }


def qcompile_backend(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None
) -> Callable:
    """Compile a dynamo-captured graph with inductor, decomposing qcompile's ops first."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    options = dict(options or {})
    unknown = set(options)
    if unknown:
        raise ValueError(f"unknown qcompile backend options: {sorted(unknown)}")
    table = {**select_decomp_table(), **decompositions()}
    return compile_fx(gm, example_inputs, decompositions=table)
