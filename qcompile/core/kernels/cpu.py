"""CPU kernels: the aten reference of `qcompile.core.numerics`, fused by inductor for large tensors.

Eager aten runs each step of a quantization as its own pass over memory; inductor fuses the
whole function into one vectorised C++ loop (its compiler flags keep IEEE semantics: no
fast-math), which computes bit-identical numbers. Small tensors stay eager, where compiling
would cost more than it saves. Each (function, format, block size, static/dynamic) gets its
own compiled entry point (per rank and dtype of its arguments too) so that dynamo's per-function
recompile limit is never reached.
Set `QCOMPILE_CPU_KERNELS=eager` to skip compilation (debugging, or no C++ compiler).
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from typing import Callable

import torch

from qcompile.core import numerics
from qcompile.core.formats import get_format

#: Tensors with fewer elements than this run the eager reference.
COMPILE_MIN_NUMEL = 1 << 16

_compile_failed = False

REFERENCES: dict[str, Callable] = {
    "forward": numerics.fake_quantize,
    "backward": numerics.fake_quantize_backward,
    "amax_backward": numerics.amax_gradient,
    "ste_keep": numerics.ste_keep,
    "masked_backward": lambda grad, keep, amax, fmt, block_size: numerics.masked_gradient(grad, keep),
}


def _fresh_code(fn: Callable) -> Callable:
    """A copy of fn with its own code object, hence its own dynamo cache."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


@functools.lru_cache(maxsize=None)
def _compiled(
    kind: str,
    format_name: str,
    block_size: int | None,
    signature: tuple[tuple[int, torch.dtype] | None, ...],
) -> Callable:
    """The compiled kernel for one (function, format, block size) and one (rank, dtype) of each
    tensor argument (None: no amax): within an entry only sizes vary, which dynamo generalises
    after one recompile, so no entry nears the recompile limit however many sites call it."""
    fmt = get_format(format_name)
    reference = REFERENCES[kind]

    def kernel(*tensors):
        *data, amax = tensors
        return reference(*data, amax, fmt, block_size)

    return torch.compile(_fresh_code(kernel), dynamic=None, fullgraph=True)


def _use_compiled(x: torch.Tensor) -> bool:
    return (  # cheapest first: decoding calls this for many small tensors
        x.numel() >= COMPILE_MIN_NUMEL
        and not _compile_failed
        and x.device.type == "cpu"
        and os.environ.get("QCOMPILE_CPU_KERNELS", "auto") != "eager"
        and not torch.compiler.is_compiling()
    )


def run(kind: str, format_name: str, block_size: int | None, *tensors: torch.Tensor | None):
    """Run reference `kind` (forward, backward or amax_backward) on tensors, the last one amax."""
    global _compile_failed
    *data, amax = tensors
    if _use_compiled(data[0]):
        try:
            # Plain tensors: a Parameter (a weight) would fail the type guard of an entry
            # compiled for activations, and recompile.
            tensors = [None if t is None else t.detach() for t in (*data, amax)]
            signature = tuple(None if t is None else (t.ndim, t.dtype) for t in tensors)
            with torch.no_grad():
                return _compiled(kind, format_name, block_size, signature)(*tensors)
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
            _compile_failed = True
            warnings.warn(
                f"qcompile: compiling the CPU fake-quant kernel failed ({type(error).__name__}: "
                f"{error}); falling back to eager aten ops, which are slower but identical. "
                "Install a C++ compiler or set QCOMPILE_CPU_KERNELS=eager to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
    return REFERENCES[kind](*data, amax, get_format(format_name), block_size)
