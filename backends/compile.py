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

from qcompile.formats import get_format
from qcompile.kernels.cpu import REFERENCES
from qcompile.ops import block_or_none

#: op name -> the `qcompile.kernels.cpu.REFERENCES` entry that defines its numbers.
_OP_REFERENCES = {
    "fake_quantize": "forward",
    "fake_quantize_backward": "backward",
    "fake_quantize_amax_backward": "amax_backward",
}


def _decomposition(kind: str) -> Callable[..., Any]:
    reference = REFERENCES[kind]

    def decomposed(*args):  # (*tensors, amax, format, block_size), as the op takes them
        *tensors, format, block_size = args
        return reference(*tensors, get_format(format), block_or_none(block_size))

    return decomposed


def decompositions() -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """The aten decompositions of every qcompile op, keyed by op overload."""
    return {
        getattr(torch.ops.qcompile, op).default: _decomposition(kind)
        for op, kind in _OP_REFERENCES.items()
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
