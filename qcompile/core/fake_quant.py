"""`qcompile.fake_quantize`: the functional entry point to every format's numerics.

This module owns argument checking and the mapping of user-facing arguments (`axis`,
per-block amax, Python numbers) onto the custom op's canonical form. It knows nothing of
graphs; the arithmetic lives in `qcompile.core.numerics` and the kernels behind `qcompile.core.ops`.
"""

from __future__ import annotations

import torch

from qcompile.core import numerics, ops
from qcompile.core.formats import QuantFormat, ScaleKind, get_format

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fake_quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        kind = "integer" if not x.dtype.is_floating_point else "this floating"
        raise TypeError(
            f"fake_quantize needs float32, bfloat16 or float16 input; {kind} dtype {x.dtype} is "
            "not supported. Convert with x.float() first."
        )


def _check_blocks(x: torch.Tensor, fmt: QuantFormat, block_size: int) -> None:
    if x.ndim == 0:
        raise ValueError(f"{fmt.name} quantizes blocks along the last axis; got a 0-d tensor")
    if x.shape[-1] % block_size:
        raise ValueError(
            f"{fmt.name} needs the last axis to be a multiple of its block size {block_size}, "
            f"got shape {tuple(x.shape)}. Pad the last axis to a multiple of {block_size}"
            + (" or pass a block_size that divides it." if not fmt.fixed_block_size else ".")
        )


def _channel_amax(x: torch.Tensor, amax: torch.Tensor | None, axis: int) -> torch.Tensor:
    """amax reshaped to broadcast along `axis` (computed from x when None)."""
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for a {x.ndim}-d tensor")
    axis %= x.ndim
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    if amax is None:
        reduce_dims = [d for d in range(x.ndim) if d != axis]
        magnitude = numerics.finite_abs(x.detach().float())
        return magnitude.amax(dim=reduce_dims, keepdim=True) if reduce_dims else magnitude
    if amax.numel() != x.shape[axis]:
        raise ValueError(
            f"per-channel amax along axis {axis} needs {x.shape[axis]} values, got shape "
            f"{tuple(amax.shape)}"
        )
    return amax.reshape(shape)


def _block_amax(x: torch.Tensor, amax: torch.Tensor, fmt: QuantFormat, block_size: int):
    """Static amax for a block format: one global value, or one per block for FP32 scales."""
    if amax.numel() == 1:
        return amax.reshape(())
    blocks = x.shape[-1] // block_size
    if fmt.scale is ScaleKind.FP32 and amax.shape in (
        (*x.shape[:-1], blocks),
        (*x.shape[:-1], blocks, 1),
    ):
        return amax.reshape(*x.shape[:-1], blocks, 1)
    expected = "one value" if fmt.scale is not ScaleKind.FP32 else (
        f"one value or shape {(*x.shape[:-1], blocks)} (one per block)"
    )
    raise ValueError(f"{fmt.name} amax must be {expected}, got shape {tuple(amax.shape)}")


def canonical_amax(
    x: torch.Tensor,
    fmt: QuantFormat,
    amax: torch.Tensor | float | None,
    axis: int | None,
    block_size: int | None,
) -> torch.Tensor | None:
    """Check amax against the format and reshape it to broadcast onto x or its block view."""
    if amax is not None and not isinstance(amax, torch.Tensor):
        amax = torch.tensor(float(amax), device=x.device)
    if amax is not None:
        if not fmt.static_amax:
            raise ValueError(
                f"{fmt.name} derives every scale from the data (dynamic per block); "
                "amax must be None"
            )
        if not amax.dtype.is_floating_point:
            raise TypeError(f"amax must be a floating-point tensor, got {amax.dtype}")
        if amax.requires_grad and not fmt.learnable_amax:
            raise ValueError(
                f"{fmt.name} has no learnable amax (its scales are not amax / max); "
                "learnable amax works for int8, int4 and fp8"
            )
    if axis is not None:
        if block_size is not None:
            raise ValueError(
                f"axis applies to per-tensor or per-channel scales; {fmt.name} uses blocks of "
                f"{block_size} along the last axis. Leave axis unset."
            )
        return _channel_amax(x, amax, axis)
    if amax is None:
        return None
    if block_size is not None:
        return _block_amax(x, amax, fmt, block_size)
    if amax.numel() != 1:
        raise ValueError(
            f"a per-tensor amax must hold one value, got shape {tuple(amax.shape)}; "
            "pass axis= for per-channel amax"
        )
    return amax.reshape(())


def fake_quantize(
    x: torch.Tensor,
    fmt: str | QuantFormat,
    *,
    amax: torch.Tensor | float | None = None,
    axis: int | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Quantize and dequantize `x` in format `fmt`, returning x's shape and dtype.

    Args:
        x: float32, bfloat16 or float16 tensor.
        fmt: one of int8, int4, fp8, nvfp4, mxfp4, mxfp8, mxfp4_ocp, mxfp8_ocp (or a `QuantFormat`).
        amax: the clipping range. None: dynamic, from x itself (per tensor, per channel with
            `axis`, or per block). A tensor: static (calibrated); it may require grad for
            int8/int4/fp8 (LSQ-style learnable range). For nvfp4 it is the global amax.
        axis: per-channel scales along this axis (formats without blocks).
        block_size: override the block size of int4 (default 128), or give int8/fp8 blocks.

    The backward pass is a straight-through estimator: the gradient passes where x lies inside
    the clipping range and is zero where it saturated.
    """
    _check_input(x)
    fmt = get_format(fmt)
    block_size = fmt.resolve_block_size(block_size)
    if block_size is not None:
        _check_blocks(x, fmt, block_size)
    amax = canonical_amax(x, fmt, amax, axis, block_size)
    if not torch.is_grad_enabled() and ops.plain_eager():
        return ops.fake_quantize_inference(x, amax, fmt.name, block_size or 0)
    return ops.fake_quantize(x, amax, fmt.name, block_size or 0)
