"""CPU kernels: the aten reference of `qcompile.numerics`, fused by inductor for large tensors.

Eager aten runs each step of a quantization as its own pass over memory; inductor fuses the
whole function into one vectorised C++ loop (its compiler flags keep IEEE semantics: no
fast-math), which computes bit-identical numbers. Small tensors stay eager, where compiling
would cost more than it saves. Each (function, format, block size, static/dynamic) gets its
own compiled entry point so that dynamo's per-function recompile limit is never reached.
Set `QCOMPILE_CPU_KERNELS=eager` to skip compilation (debugging, or no C++ compiler).
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from typing import Callable

import torch

from qcompile import numerics
from qcompile.formats import get_format

#: Tensors with fewer elements than this run the eager reference.
COMPILE_MIN_NUMEL = 1 << 16

_compile_failed = False

REFERENCES: dict[str, Callable] = {
    "forward": numerics.fake_quantize,
    "backward": numerics.fake_quantize_backward,
    "amax_backward": numerics.amax_gradient,
}


def _fresh_code(fn: Callable) -> Callable:
    """A copy of fn with its own code object, hence its own dynamo cache."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


@functools.lru_cache(maxsize=None)
def _compiled(kind: str, format_name: str, block_size: int | None, static: bool) -> Callable:
    fmt = get_format(format_name)
    reference = REFERENCES[kind]

    def kernel(*tensors):
        *data, amax = tensors
        return reference(*data, amax, fmt, block_size)

    return torch.compile(_fresh_code(kernel), dynamic=None, fullgraph=True)


def _use_compiled(x: torch.Tensor) -> bool:
    mode = os.environ.get("QCOMPILE_CPU_KERNELS", "auto")
    return (
        mode != "eager"
        and not _compile_failed
        and x.device.type == "cpu"
        and x.numel() >= COMPILE_MIN_NUMEL
        and not torch.compiler.is_compiling()
    )


def run(kind: str, format_name: str, block_size: int | None, *tensors: torch.Tensor | None):
    """Run reference `kind` (forward, backward or amax_backward) on tensors, the last one amax."""
    global _compile_failed
    *data, amax = tensors
    if _use_compiled(data[0]):
        # Plain tensors only: a Parameter would guard the compiled kernel on its type, and a
        # weight arriving once as a Parameter and once as a product would recompile it.
        plain = [t if t is None else t.detach() for t in (*data, amax)]
        try:
            with torch.no_grad():
                return _compiled(kind, format_name, block_size, amax is not None)(*plain)
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
