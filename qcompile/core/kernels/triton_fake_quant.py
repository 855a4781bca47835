"""Triton kernels for the `qcompile` custom ops on CUDA tensors.

This module owns the GPU kernels behind `qcompile::fake_quantize` and
`qcompile::fake_quantize_backward`: the same numbers as `qcompile.core.numerics`, bit for bit, in
one read and one write per element. The numerics are written once per *kind*, with the format
description of `qcompile.core.formats` passed in as compile-time constants: integer or small-float
element, and fp32, two-level E4M3 x fp32 or E8M0 scale. Block formats run in one pass (each
program loads whole blocks, takes their max in registers, quantizes and stores); per-tensor and
per-channel formats run an elementwise kernel that reads amax through a broadcast index. It
must not know of graphs, modules, recipes or ONNX; argument checking lives in
`qcompile.core.fake_quant`. Importing it makes no CUDA call; under `TRITON_INTERPRET=1` (set before
triton is imported) the same kernels run on CPU tensors, which is how the tests check them.

Arithmetic notes (all fp32, as in `qcompile.core.numerics`):
- Divisions use `tl.math.div_rn` (IEEE round-to-nearest); Triton's `/` lowers to an
  approximate division on CUDA.
- Round half to even is the magic-number trick `(|v| + 1.5 * 2**23) - 1.5 * 2**23` with v's sign
  bit restored, exact for |v| < 2**22; every rounded value here is at most 2**(mantissa+1) or
  128 after saturation. It needs no libdevice, so it also runs under the interpreter.
- No multiply feeds an add, so fused multiply-add contraction cannot change a result.
- Dynamic per-tensor amax (and NVFP4's dynamic global amax) is a Triton reduction kernel that
  writes one partial max per program, followed by `torch.amax` over the partials.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qcompile.core.formats import (
    E4M3,
    E4M3_MAX,
    ElementKind,
    ElementType,
    QuantFormat,
    ScaleKind,
    ScaleRule,
    get_format,
)

#: Elements per program of the elementwise kernels and the amax reduction.
ELEMENTWISE_BLOCK = 1024
#: Target number of elements per program of the block kernel (rows x padded block size).
BLOCK_KERNEL_ELEMENTS = 2048

#: Compile-time codes of `ScaleKind` inside the kernels.
SCALE_CODES = {ScaleKind.FP32: 0, ScaleKind.E4M3_TWO_LEVEL: 1, ScaleKind.E8M0: 2}



# ---------------------------------------------------------------------------------------------
# Device functions: one per step of the numerics contract.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _is_finite(v):
    """Neither inf nor NaN, read from the exponent bits of fp32 v."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) != 0xFF


@triton.jit
def _finite_abs(v):
    """|v| with inf and NaN replaced by 0 (the input of every dynamic amax)."""
    return tl.where(_is_finite(v), tl.abs(v), 0.0)


@triton.jit
def _floor_log2(v):
    """floor(log2(v)) of non-negative fp32 v from its exponent bits; 0 and subnormals give -127."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127


@triton.jit
def _exp2_int(e):
    """2**e as fp32 for int32 e in [-127, 128], built from bits (2**-127 is subnormal)."""
    normal = (e + 127) << 23
    bits = tl.where(e >= -126, normal, 4194304)  # 1 << 22 is 2**-127
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_half_even(v):
    """Round fp32 v (|v| < 2**22, or NaN) to the nearest integer, ties to even, keeping -0."""
    magnitude = (tl.abs(v) + 12582912.0) - 12582912.0  # 1.5 * 2**23: ulp 1 in [2**23, 2**24)
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 31) << 31
    return (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_element(
    v,
    IS_INT: tl.constexpr,
    LO: tl.constexpr,
    HI: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
):
    """Saturate v to [LO, HI] and round half to even onto the element's grid; NaN stays NaN."""
    v = tl.where(v < LO, LO, v)
    v = tl.where(v > HI, HI, v)
    if IS_INT:
        # Integers have no -0: DequantizeLinear of q = 0 is +0 (as in qcompile.core.numerics).
        rounded = _round_half_even(v)
        rounded = tl.where(rounded == 0.0, 0.0, rounded)
    else:
        # Spacing of representable values near v: 2**(e - mantissa_bits), with e the exponent
        # of v floored at the smallest normal exponent (subnormals share one spacing).
        exponent = tl.maximum(_floor_log2(tl.abs(v)), MIN_EXPONENT)
        quantum = _exp2_int(exponent - MANTISSA_BITS)
        rounded = _round_half_even(tl.math.div_rn(v, quantum)) * quantum
    return rounded


@triton.jit
def _fake_quantize_values(
    x,
    scale,
    IS_INT: tl.constexpr,
    LO: tl.constexpr,
    HI: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
):
    """round_to_element(x / scale) * scale, dividing by 1 where the scale is not positive."""
    divisor = tl.where(scale > 0, scale, 1.0)
    values = _round_to_element(
        tl.math.div_rn(x, divisor), IS_INT, LO, HI, MANTISSA_BITS, MIN_EXPONENT
    )
    return values * scale


@triton.jit
def _to_output_dtype(y, OUT_DTYPE: tl.constexpr):
    """Cast fp32 y to the output dtype rounding to nearest even, as torch's `.to` does.

    bf16 is rounded here, in integer arithmetic, so that the final cast is exact: the Triton
    interpreter truncates fp32 -> bf16 (CUDA rounds to nearest even), and this way both agree.
    """
    if OUT_DTYPE == tl.bfloat16:
        bits = y.to(tl.int32, bitcast=True)
        lsb = (bits >> 16) & 1
        rounded = (((bits + 32767 + lsb) >> 16) << 16).to(tl.float32, bitcast=True)
        y = tl.where(y != y, y, rounded)
    return y.to(OUT_DTYPE)


@triton.jit
def _amax_offsets(index, inner, channels, AMAX_SCALAR: tl.constexpr):
    """Offset into the flat amax of each element (or block) index: a broadcast index."""
    if AMAX_SCALAR:
        offsets = tl.zeros_like(index)
    else:
        offsets = (index // inner) % channels
    return offsets


# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _finite_amax_partials_kernel(x_ptr, partials_ptr, numel, BLOCK: tl.constexpr):
    """One partial finite absolute max per program; `torch.amax` of the partials finishes it."""
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
    tl.store(partials_ptr + pid, tl.max(_finite_abs(x), axis=0))


@triton.jit
def _fake_quantize_elementwise_kernel(
    x_ptr,
    amax_ptr,
    out_ptr,
    numel,
    amax_inner,
    amax_channels,
    AMAX_SCALAR: tl.constexpr,
    IS_INT: tl.constexpr,
    LO: tl.constexpr,
    HI: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
    DIVISOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-tensor or per-channel fp32 scale `amax / DIVISOR`, amax read through a broadcast
    index."""
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    amax_offsets = _amax_offsets(offsets, amax_inner, amax_channels, AMAX_SCALAR)
    amax = tl.load(amax_ptr + amax_offsets, mask=mask, other=0.0)
    scale = tl.math.div_rn(amax, DIVISOR)
    y = _fake_quantize_values(x, scale, IS_INT, LO, HI, MANTISSA_BITS, MIN_EXPONENT)
    tl.store(out_ptr + offsets, _to_output_dtype(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quantize_block_kernel(
    x_ptr,
    amax_ptr,
    out_ptr,
    n_blocks,
    amax_inner,
    amax_channels,
    HAS_AMAX: tl.constexpr,
    AMAX_SCALAR: tl.constexpr,
    SCALE_KIND: tl.constexpr,
    IS_INT: tl.constexpr,
    LO: tl.constexpr,
    HI: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
    MAX_EXPONENT: tl.constexpr,
    E8M0_CEIL: tl.constexpr,
    DIVISOR: tl.constexpr,
    GLOBAL_DIVISOR: tl.constexpr,
    SCALE_LO: tl.constexpr,
    SCALE_HI: tl.constexpr,
    SCALE_MANTISSA_BITS: tl.constexpr,
    SCALE_MIN_EXPONENT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_SIZE_P2: tl.constexpr,
    ROWS: tl.constexpr,
):
    """ROWS blocks of BLOCK_SIZE elements per program: block max, scale, quantize, store.

    SCALE_KIND 0: fp32 `amax / DIVISOR` (amax static per block or global, else the block max).
    SCALE_KIND 1: two-level, `e4m3((block_max / HI) / gs) * gs` with `gs = amax / GLOBAL_DIVISOR`.
    SCALE_KIND 2: E8M0 `2 ** k`, k clamped to [-127, 127]: with E8M0_CEIL the smallest k with
    `2**k >= block_max / HI`, else (OCP) `floor(log2(block_max)) - MAX_EXPONENT`.
    """
    pid = tl.program_id(0).to(tl.int64)
    blocks = pid * ROWS + tl.arange(0, ROWS)
    block_mask = blocks < n_blocks
    columns = tl.arange(0, BLOCK_SIZE_P2)
    mask = block_mask[:, None] & (columns < BLOCK_SIZE)[None, :]
    offsets = blocks[:, None] * BLOCK_SIZE + columns[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    block_max = tl.max(_finite_abs(x), axis=1)
    if HAS_AMAX:
        amax_offsets = _amax_offsets(blocks, amax_inner, amax_channels, AMAX_SCALAR)
        amax = tl.load(amax_ptr + amax_offsets, mask=block_mask, other=0.0)
    else:
        amax = block_max
    if SCALE_KIND == 0:
        scale = tl.math.div_rn(amax, DIVISOR)
    elif SCALE_KIND == 1:
        global_scale = tl.math.div_rn(amax, GLOBAL_DIVISOR)
        raw = tl.math.div_rn(tl.math.div_rn(block_max, HI), global_scale)
        raw = tl.where(global_scale > 0, raw, 0.0)
        block_scale = _round_to_element(
            raw, False, SCALE_LO, SCALE_HI, SCALE_MANTISSA_BITS, SCALE_MIN_EXPONENT
        )
        scale = block_scale * global_scale
    else:
        if E8M0_CEIL:
            q = tl.math.div_rn(block_max, HI)
            exponent = tl.minimum(tl.maximum(_floor_log2(q), -127), 127)
            exponent = exponent + (q > _exp2_int(exponent)).to(tl.int32)
        else:
            exponent = _floor_log2(block_max) - MAX_EXPONENT
        exponent = tl.minimum(tl.maximum(exponent, -127), 127)
        scale = _exp2_int(exponent)
    y = _fake_quantize_values(x, scale[:, None], IS_INT, LO, HI, MANTISSA_BITS, MIN_EXPONENT)
    tl.store(out_ptr + offsets, _to_output_dtype(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ste_backward_kernel(
    grad_ptr,
    x_ptr,
    amax_ptr,
    out_ptr,
    numel,
    amax_group,
    amax_inner,
    amax_channels,
    HAS_AMAX: tl.constexpr,
    AMAX_SCALAR: tl.constexpr,
    LOWER_RATIO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad where x is inside [amax * LOWER_RATIO, amax] (static) or finite (dynamic), else 0.

    amax_group is the number of consecutive elements sharing one amax row (the block size for
    block formats, 1 otherwise); the broadcast index then runs over those rows.
    """
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_AMAX:
        amax_offsets = _amax_offsets(offsets // amax_group, amax_inner, amax_channels, AMAX_SCALAR)
        hi = tl.load(amax_ptr + amax_offsets, mask=mask, other=0.0)
        passes = (x >= hi * LOWER_RATIO) & (x <= hi)
    else:
        passes = _is_finite(x)
    tl.store(out_ptr + offsets, tl.where(passes, grad, 0.0).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side: format description -> compile-time constants, amax layout, launches.
# ---------------------------------------------------------------------------------------------


def _element_constants(element: ElementType) -> dict:
    """The element type as kernel constants (IS_INT, LO, HI, MANTISSA_BITS, MIN_EXPONENT)."""
    return {
        "IS_INT": element.kind is ElementKind.INT,
        "LO": float(element.min_value),
        "HI": float(element.max_value),
        "MANTISSA_BITS": element.mantissa_bits,
        "MIN_EXPONENT": element.min_exponent,
    }


def _block_scale_constants(fmt: QuantFormat) -> dict:
    """Scale-kind constants of the block kernel (the E4M3 block-scale grid comes from formats)."""
    scale_element = _element_constants(E4M3)
    return {
        "SCALE_KIND": SCALE_CODES[fmt.scale],
        "MAX_EXPONENT": fmt.element.max_exponent,
        "E8M0_CEIL": fmt.scale_rule is ScaleRule.CEIL,
        "DIVISOR": float(fmt.divisor),
        "GLOBAL_DIVISOR": float(fmt.element.max_value * E4M3_MAX),
        "SCALE_LO": scale_element["LO"],
        "SCALE_HI": scale_element["HI"],
        "SCALE_MANTISSA_BITS": scale_element["MANTISSA_BITS"],
        "SCALE_MIN_EXPONENT": scale_element["MIN_EXPONENT"],
    }


def _lower_ratio(fmt: QuantFormat) -> float:
    """Lower end of the STE range as a multiple of amax (same rule as `numerics.ste_mask`)."""
    if fmt.scale is ScaleKind.FP32:
        return fmt.element.min_value / fmt.divisor
    return -1.0


def _resolve_block_size(fmt: QuantFormat, x: torch.Tensor, block_size: int) -> int | None:
    """The op's block_size (0: none) checked against x; block formats need one."""
    if block_size <= 0:
        if fmt.scale is not ScaleKind.FP32:
            raise ValueError(
                f"{fmt.name} uses {fmt.scale.value} block scales; pass block_size="
                f"{fmt.block_size}"
            )
        return None
    if x.ndim == 0 or x.shape[-1] % block_size:
        raise ValueError(
            f"{fmt.name}: the last axis of shape {tuple(x.shape)} is not a multiple of "
            f"block_size {block_size}"
        )
    return block_size


def _amax_layout(
    amax: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, bool, int, int]:
    """Flat fp32 amax and its broadcast index over `shape`: (amax, scalar, inner, channels).

    Element (or block) i of `shape` reads `amax[(i // inner) % channels]`. A single value and
    an amax with one non-unit axis are read in place; any other broadcast is materialised.
    """
    if amax.numel() == 1:
        return amax.reshape(1), True, 1, 1
    if amax.ndim > len(shape):
        raise ValueError(f"amax of shape {tuple(amax.shape)} does not broadcast to {shape}")
    padded = (1,) * (len(shape) - amax.ndim) + tuple(amax.shape)
    if torch.broadcast_shapes(padded, shape) != torch.Size(shape):
        raise ValueError(f"amax of shape {tuple(amax.shape)} does not broadcast to {shape}")
    non_unit = [axis for axis, size in enumerate(padded) if size != 1]
    if len(non_unit) == 1:
        axis = non_unit[0]
        return amax.reshape(-1).contiguous(), False, math.prod(shape[axis + 1 :]), shape[axis]
    expanded = amax.reshape(padded).expand(shape).contiguous().reshape(-1)
    return expanded, False, 1, max(expanded.numel(), 1)


def _block_amax_layout(
    amax: torch.Tensor, shape: tuple[int, ...], block_size: int
) -> tuple[torch.Tensor, bool, int, int]:
    """`_amax_layout` over the blocks of x, for an amax broadcastable to (..., K // bs, 1)."""
    block_rows = (*shape[:-1], shape[-1] // block_size)
    if amax.numel() == 1:
        return _amax_layout(amax, block_rows)
    view_ndim = len(block_rows) + 1
    if amax.ndim > view_ndim or (amax.ndim > 0 and amax.shape[-1] != 1):
        raise ValueError(
            f"a block amax must broadcast to the block view {(*block_rows, 1)}, "
            f"got shape {tuple(amax.shape)}"
        )
    return _amax_layout(amax.reshape(amax.shape[:-1]), block_rows)


def _prepare_amax(amax: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if amax is None else amax.detach().to(device=x.device, dtype=torch.float32)


def finite_amax(x: torch.Tensor) -> torch.Tensor:
    """The finite absolute max of contiguous non-empty x as a 0-d fp32 tensor (no host sync)."""
    numel = x.numel()
    programs = triton.cdiv(numel, ELEMENTWISE_BLOCK)
    partials = torch.empty(programs, dtype=torch.float32, device=x.device)
    _finite_amax_partials_kernel[(programs,)](x, partials, numel, BLOCK=ELEMENTWISE_BLOCK)
    return partials.amax()


def _launch_block_kernel(
    x: torch.Tensor, amax: torch.Tensor | None, out: torch.Tensor, fmt: QuantFormat, bs: int
) -> None:
    if fmt.scale is ScaleKind.E8M0:
        amax = None  # MX scales come from the data alone, whatever amax says (as in numerics)
    elif fmt.scale is ScaleKind.E4M3_TWO_LEVEL and amax is None:
        amax = finite_amax(x)  # the dynamic global amax needs the whole tensor first
    n_blocks = x.numel() // bs
    if amax is None:
        flat_amax, scalar, inner, channels = x, True, 1, 1  # never read
    else:
        flat_amax, scalar, inner, channels = _block_amax_layout(amax, tuple(x.shape), bs)
    bs_p2 = triton.next_power_of_2(bs)
    rows = max(1, BLOCK_KERNEL_ELEMENTS // bs_p2)
    grid = (triton.cdiv(n_blocks, rows),)
    _fake_quantize_block_kernel[grid](
        x, flat_amax, out, n_blocks, inner, channels,
        HAS_AMAX=amax is not None,
        AMAX_SCALAR=scalar,
        **_element_constants(fmt.element),
        **_block_scale_constants(fmt),
        BLOCK_SIZE=bs,
        BLOCK_SIZE_P2=bs_p2,
        ROWS=rows,
    )


def _launch_elementwise_kernel(
    x: torch.Tensor, amax: torch.Tensor | None, out: torch.Tensor, fmt: QuantFormat
) -> None:
    if amax is None:
        amax = finite_amax(x)
    flat_amax, scalar, inner, channels = _amax_layout(amax, tuple(x.shape))
    numel = x.numel()
    grid = (triton.cdiv(numel, ELEMENTWISE_BLOCK),)
    _fake_quantize_elementwise_kernel[grid](
        x, flat_amax, out, numel, inner, channels,
        AMAX_SCALAR=scalar,
        **_element_constants(fmt.element),
        DIVISOR=float(fmt.divisor),
        BLOCK=ELEMENTWISE_BLOCK,
    )


def fake_quantize(
    x: torch.Tensor, amax: torch.Tensor | None, format: str, block_size: int
) -> torch.Tensor:
    """Quantize then dequantize x, bit for bit `qcompile.core.numerics.fake_quantize`.

    Signature of the `qcompile::fake_quantize` op: `block_size` 0 means no blocks; `amax` None
    means dynamic. The result has x's shape and dtype and is contiguous.
    """
    fmt = get_format(format)
    bs = _resolve_block_size(fmt, x, block_size)
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    amax = _prepare_amax(amax, x)
    if bs is None:
        _launch_elementwise_kernel(x, amax, out, fmt)
    else:
        _launch_block_kernel(x, amax, out, fmt, bs)
    return out


def fake_quantize_backward(
    grad: torch.Tensor, x: torch.Tensor, amax: torch.Tensor | None, format: str, block_size: int
) -> torch.Tensor:
    """The straight-through estimator, bit for bit `qcompile.core.numerics.fake_quantize_backward`.

    grad passes where x lies in the static clipping range (or, with a dynamic amax, where x is
    finite) and is zero elsewhere; the result has grad's dtype.
    """
    fmt = get_format(format)
    bs = _resolve_block_size(fmt, x, block_size)
    shape = torch.broadcast_shapes(grad.shape, x.shape)
    grad = grad.expand(shape).contiguous()
    x = x.expand(shape).contiguous()
    out = torch.empty(shape, dtype=grad.dtype, device=grad.device)
    numel = out.numel()
    if numel == 0:
        return out
    amax = _prepare_amax(amax, x)
    if amax is None:
        flat_amax, scalar, group, inner, channels = x, True, 1, 1, 1  # never read
    elif bs is None:
        group = 1
        flat_amax, scalar, inner, channels = _amax_layout(amax, tuple(shape))
    else:
        group = bs
        flat_amax, scalar, inner, channels = _block_amax_layout(amax, tuple(shape), bs)
    grid = (triton.cdiv(numel, ELEMENTWISE_BLOCK),)
    _ste_backward_kernel[grid](
        grad, x, flat_amax, out, numel, group, inner, channels,
        HAS_AMAX=amax is not None,
        AMAX_SCALAR=scalar,
        LOWER_RATIO=_lower_ratio(fmt),
        BLOCK=ELEMENTWISE_BLOCK,
    )
    return out
