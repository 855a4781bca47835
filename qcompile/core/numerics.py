"""The numerics of every format, written once per kind in plain aten ops.

This module owns the arithmetic of the numerics contract (README's numerics table): ONNX `QuantizeLinear`
semantics (`q = saturate(round_half_even(x / scale))`, `y = q * scale`, zero point 0) for
integer and small-float elements, with fp32, two-level E4M3 x fp32 and E8M0 scales. It knows
nothing of graphs, modules or ONNX files. The same functions serve as the eager CPU kernel,
as the source of the inductor-compiled CPU kernel, as the decomposition the torch.compile
backend fuses, and as the specification the Triton kernels are tested against.

Conventions:
- All arithmetic is float32; the result is cast back to the input dtype.
- Block formats view the last axis as (K // block_size, block_size); `amax` is then
  broadcastable to the block view `(..., K // block_size, 1)`. Otherwise `amax` is
  broadcastable to `x`. `amax=None` means dynamic: taken from the data itself.
- Dynamic amax ignores non-finite values, so an inf saturates to the range of its tensor or
  block instead of turning the whole block into NaN; a NaN stays NaN, elementwise.
- A zero scale (all-zero block, or a static amax of 0) gives zeros, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.core.formats import (
    E4M3_MAX,
    ElementKind,
    ElementType,
    QuantFormat,
    ScaleKind,
    ScaleRule,
)

_FLOAT32_EXPONENT_BIAS = 127
_FLOAT32_MANTISSA_BITS = 23
_E8M0_MIN_EXPONENT = -127
_E8M0_MAX_EXPONENT = 127


def to_blocks(x: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """View the last axis as (K // block_size, block_size); identity without blocks."""
    if block_size is None:
        return x
    # Lets symbolic shapes (dynamic compiles) prove (K // block_size) * block_size == K, so
    # that `from_blocks` stays a view instead of an index-remapping copy.
    torch._check(x.shape[-1] % block_size == 0)
    return x.unflatten(-1, (x.shape[-1] // block_size, block_size))


def from_blocks(x: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """Undo `to_blocks`."""
    return x if block_size is None else x.flatten(-2)


def finite_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| with inf and NaN replaced by 0, the input of every dynamic amax."""
    return torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x))


def dynamic_amax(x: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """The finite absolute max of each block (keepdim) or of the whole tensor (0-d)."""
    magnitude = finite_abs(x)
    if block_size is None:
        return magnitude.amax()
    return magnitude.amax(dim=-1, keepdim=True)


def _floor_log2(v: torch.Tensor) -> torch.Tensor:
    """floor(log2(v)) of positive fp32 values read from the exponent bits (int32).

    Zero and float32 subnormals give -127; every caller clamps below that anyway.
    """
    bits = v.view(torch.int32)
    return ((bits >> _FLOAT32_MANTISSA_BITS) & 0xFF) - _FLOAT32_EXPONENT_BIAS


def exp2_int(e: torch.Tensor) -> torch.Tensor:
    """2**e as fp32 for int32 e in [-127, 127], built exactly from bits (2**-127 is subnormal)."""
    normal = (e + _FLOAT32_EXPONENT_BIAS) << _FLOAT32_MANTISSA_BITS
    subnormal = torch.full_like(e, 1 << (_FLOAT32_MANTISSA_BITS - 1))  # 2**-127
    return torch.where(e >= -126, normal, subnormal).view(torch.float32)


def round_to_element(v: torch.Tensor, element: ElementType) -> torch.Tensor:
    """Saturate fp32 `v` to the element's range and round half to even onto its grid.

    The result is fp32 holding exactly representable element values; NaN stays NaN.
    """
    v = v.clamp(element.min_value, element.max_value)
    if element.kind is ElementKind.INT:
        # Integers have no -0: round(-0.3) is -0.0 in fp32, but DequantizeLinear of q = 0 is +0.
        rounded = torch.round(v)
        return torch.where(rounded == 0, torch.zeros_like(rounded), rounded)
    # Small float: the spacing of representable values near v is 2**(e - mantissa_bits),
    # where e is v's exponent, floored at the smallest normal exponent (subnormals).
    exponent = _floor_log2(v.abs()).clamp(min=element.min_exponent)
    quantum = exp2_int(exponent - element.mantissa_bits)
    return torch.round(v / quantum) * quantum


def e4m3_block_scale(raw: torch.Tensor) -> torch.Tensor:
    """Round fp32 block scales onto E4M3 (saturating at 448), returned as fp32."""
    return raw.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


@dataclass
class Scales:
    """The scales of one quantization, broadcastable to the (block) view of x.

    `scale` is the effective fp32 scale each element is divided by. For two-level NVFP4,
    `block_scale` holds the E4M3 block scales (as fp32 values) and `global_scale` the fp32
    global scale, with `scale == block_scale * global_scale`.
    """

    scale: torch.Tensor
    block_scale: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None


def amax_scale(amax: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The fp32 scale an amax stands for: `amax / divisor` for FP32 scales (the element max,
    or the format's `scale_divisor`: 7.5 for int4), the global scale
    `amax / (max * 448)` for two-level E4M3 x fp32 (NVFP4). What checkpoints store as a
    tensor's scale is this, computed here once."""
    if fmt.scale is ScaleKind.FP32:
        return amax / fmt.divisor
    if fmt.scale is ScaleKind.E4M3_TWO_LEVEL:
        return amax / (fmt.element.max_value * E4M3_MAX)
    raise ValueError(f"{fmt.name} scales are not derived from an amax")


def compute_scales(
    xb: torch.Tensor,
    amax: torch.Tensor | None,
    fmt: QuantFormat,
    block_size: int | None,
    block_amax: torch.Tensor | None = None,
) -> Scales:
    """Scales for fp32 `xb` (already in block view) according to the format's scale kind.

    `block_amax` (two-level and E8M0 formats; broadcastable to `(..., K // block_size, 1)`)
    replaces each block's own max as the amax its scale is derived from: stored weight scales
    found by a search (`qcompile.algorithms.weight_scales`). FP32 formats take theirs as `amax`.
    """
    element = fmt.element
    if fmt.scale is ScaleKind.FP32:
        if amax is None:
            amax = dynamic_amax(xb, block_size)
        return Scales(amax_scale(amax, fmt))
    if block_amax is None:
        block_amax = dynamic_amax(xb, block_size)
    if fmt.scale is ScaleKind.E4M3_TWO_LEVEL:
        if amax is None:
            amax = finite_abs(xb).amax()
        global_scale = amax_scale(amax, fmt)
        raw = (block_amax / element.max_value) / global_scale
        raw = torch.where(global_scale > 0, raw, torch.zeros_like(raw))
        block_scale = e4m3_block_scale(raw)
        return Scales(block_scale * global_scale, block_scale, global_scale)
    if fmt.scale is ScaleKind.E8M0:
        return Scales(exp2_int(e8m0_exponent(block_amax, element, fmt.scale_rule)))
    raise NotImplementedError(f"scale kind {fmt.scale}")


def e8m0_exponent(amax: torch.Tensor, element: ElementType, rule: ScaleRule) -> torch.Tensor:
    """The exponent k in [-127, 127] (int32) of the E8M0 scale 2**k of finite amax >= 0.

    OCP: `floor(log2(amax)) - element.max_exponent`. CEIL: the smallest k with
    `2**k >= q`, q = amax / element.max_value rounded to nearest in fp32: k = floor(log2(q)),
    plus one where q is not exactly 2**k. This is `cvt.rp.satfinite.ue8m0` of q, bit for bit
    (a quotient q <= 2**-127, zero included, gives -127).
    """
    if rule is ScaleRule.OCP:
        exponent = _floor_log2(amax) - element.max_exponent
    else:
        q = amax / element.max_value
        exponent = _floor_log2(q).clamp(_E8M0_MIN_EXPONENT, _E8M0_MAX_EXPONENT)
        exponent = exponent + (q > exp2_int(exponent)).to(torch.int32)
    return exponent.clamp(_E8M0_MIN_EXPONENT, _E8M0_MAX_EXPONENT)


def _safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(
    x: torch.Tensor,
    amax: torch.Tensor | None,
    fmt: QuantFormat,
    block_size: int | None,
    block_amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Scales]:
    """Element values (fp32, in block view) and scales of x; `fake_quantize` multiplies them.
    `block_amax`: see `compute_scales`."""
    xb = to_blocks(x.float(), block_size)
    amax = None if amax is None else amax.float()
    block_amax = None if block_amax is None else block_amax.float()
    scales = compute_scales(xb, amax, fmt, block_size, block_amax)
    values = round_to_element(xb / _safe_divisor(scales.scale), fmt.element)
    return values, scales


def fake_quantize(
    x: torch.Tensor,
    amax: torch.Tensor | None,
    fmt: QuantFormat,
    block_size: int | None,
    block_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize then dequantize x; the result has x's shape and dtype."""
    values, scales = quantize(x, amax, fmt, block_size, block_amax)
    return from_blocks(values * scales.scale, block_size).to(x.dtype)


def ste_pass(
    x: torch.Tensor, amax: torch.Tensor | None, fmt: QuantFormat, block_size: int | None
) -> torch.Tensor:
    """Where the straight-through estimator passes the gradient: 1.0 there, 0.0 elsewhere
    (float32, shape of x).

    With a static amax, inputs inside the clipping range [lo, amax] pass, where lo is
    amax * (min / divisor) for fp32-scaled formats (the grid's bottom: -128/127 for int8,
    -8/7.5 for int4) and -amax otherwise; saturated inputs get zero. With a dynamic amax every finite input passes.
    NaN never passes.

    Written with float operations only (no comparison makes a bool), so that a compiler
    which recomputes the mask in the backward saves a float tensor, never a bool one (see
    `qcompile.backends.compile`). `ste_mask` is the same rule as a bool tensor.
    """
    xb = to_blocks(x.float(), block_size)
    if amax is None:
        lo, hi = -torch.finfo(torch.float32).max, torch.finfo(torch.float32).max
    else:
        hi = amax.float()
        lo = hi * (fmt.element.min_value / fmt.divisor if fmt.scale is ScaleKind.FP32 else -1.0)
    # Exactly 0 inside [lo, hi] (x - y is never 0 for floats x != y), > 0 outside, NaN for
    # NaN; ceil(min(distance, 1)) is then 0 inside, 1 outside, and NaN stays NaN, which
    # fmax turns into 0.
    distance = (torch.clamp(xb, lo, hi) - xb).abs()
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    outside = torch.ceil(torch.minimum(distance, torch.ones_like(zero)))
    return from_blocks(torch.fmax(1 - outside, zero), block_size)


def ste_mask(
    x: torch.Tensor, amax: torch.Tensor | None, fmt: QuantFormat, block_size: int | None
) -> torch.Tensor:
    """`ste_pass` as a bool tensor: True where the straight-through estimator passes."""
    return ste_pass(x, amax, fmt, block_size) > 0


def ste_keep(
    x: torch.Tensor, amax: torch.Tensor | None, fmt: QuantFormat, block_size: int | None
) -> torch.Tensor:
    """`ste_pass` as uint8 (1 where the gradient passes): what the eager backward keeps of x,
    a quarter of float32 x (bool stores are slow in inductor's C++ kernels, uint8 ones not)."""
    return ste_pass(x, amax, fmt, block_size).to(torch.uint8)


def masked_gradient(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`fake_quantize_backward` from a saved `ste_keep`: grad where keep is 1, else 0."""
    return torch.where(keep.bool(), grad, torch.zeros_like(grad))


def fake_quantize_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    amax: torch.Tensor | None,
    fmt: QuantFormat,
    block_size: int | None,
) -> torch.Tensor:
    """Gradient of fake_quantize with respect to x: the STE, in the dtype of grad."""
    return torch.where(ste_mask(x, amax, fmt, block_size), grad, torch.zeros_like(grad))


def amax_gradient(
    grad: torch.Tensor,
    x: torch.Tensor,
    amax: torch.Tensor,
    fmt: QuantFormat,
    block_size: int | None,
) -> torch.Tensor:
    """LSQ-style gradient of fake_quantize with respect to a static amax (fp32-scaled formats).

    With v = x / scale and scale = amax / divisor: dy/damax is (round(v) - v) / divisor inside
    the element range [min, max], max / divisor above it and min / divisor below it (rounding
    passed straight through; 1 and min / max where the divisor is the element max). Summed
    over the elements that share each amax; NaN inputs contribute nothing.
    """
    if fmt.scale is not ScaleKind.FP32:
        raise ValueError(f"{fmt.name} has no learnable amax: its scales are not amax / max")
    element = fmt.element
    xb = to_blocks(x.float(), block_size)
    divisor = fmt.divisor
    scale = amax.float() / divisor
    v = xb / _safe_divisor(scale)
    q = round_to_element(v, element)
    inside = (q - v) / divisor
    d = torch.where(v > element.max_value, torch.full_like(v, element.max_value / divisor), inside)
    d = torch.where(v < element.min_value, torch.full_like(v, element.min_value / divisor), d)
    d = torch.where(torch.isnan(v), torch.zeros_like(v), d)
    contribution = to_blocks(grad.float(), block_size) * d
    return contribution.sum_to_size(amax.shape).to(amax.dtype)
