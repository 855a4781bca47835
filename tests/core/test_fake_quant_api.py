"""`qcompile.fake_quantize` as users call it: dtypes, argument errors, and autograd.

Gradients are checked against the contract: the STE mask (zero where a static amax saturated
the input, pass-through with a dynamic amax) and the LSQ amax gradient against a central finite
difference of the straight-through surrogate `s -> s * clip(x / s + d, qmin, qmax)`, with
`d = q(x / s0) - x / s0` held fixed (rounding treated as the identity) and s = amax / divisor
(qmax, or int4's 7.5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from references import REF_FORMATS, blocks, cast_to_element

import qcompile

FORMATS = ["int8", "int4", "fp8", "nvfp4", "mxfp4", "mxfp8"]


# ------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_has_input_dtype_and_shape(fmt, dtype):
    x = torch.randn(3, 2, 128, dtype=dtype)
    y = qcompile.fake_quantize(x, fmt)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device


def test_amax_as_number_or_tensor_is_the_same():
    x = torch.randn(4, 128)
    for fmt in ("int8", "fp8", "int4", "nvfp4"):
        a = qcompile.fake_quantize(x, fmt, amax=1.5)
        b = qcompile.fake_quantize(x, fmt, amax=torch.tensor([1.5], dtype=torch.float64))
        assert torch.equal(a, b), fmt


def test_format_name_is_case_insensitive_and_accepts_a_spec():
    x = torch.randn(2, 32)
    expected = qcompile.fake_quantize(x, "mxfp8")
    assert torch.equal(qcompile.fake_quantize(x, "MXFP8"), expected)
    assert torch.equal(qcompile.fake_quantize(x, qcompile.get_format("mxfp8")), expected)


# ------------------------------------------------------------------------------ errors
def test_unknown_format_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown format 'int3'") as info:
        qcompile.fake_quantize(torch.randn(4), "int3")
    for name in FORMATS:
        assert name in str(info.value)


def test_format_must_be_a_name():
    with pytest.raises(TypeError, match="format must be a name"):
        qcompile.fake_quantize(torch.randn(4), 8)


@pytest.mark.parametrize("fmt,block,width", [
    ("nvfp4", 16, 40), ("mxfp4", 32, 48), ("mxfp8", 32, 16), ("int4", 128, 64),
])
def test_last_axis_not_a_multiple_of_the_block_size_says_which(fmt, block, width):
    with pytest.raises(ValueError, match=f"multiple of its block size {block}") as info:
        qcompile.fake_quantize(torch.randn(3, width), fmt)
    assert f"(3, {width})" in str(info.value)


def test_int4_block_size_override_is_checked_too():
    with pytest.raises(ValueError, match="block size 32"):
        qcompile.fake_quantize(torch.randn(2, 48), "int4", block_size=32)
    qcompile.fake_quantize(torch.randn(2, 48), "int4", block_size=16)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_tensors_are_refused(dtype):
    with pytest.raises(TypeError, match="integer dtype"):
        qcompile.fake_quantize(torch.ones(4, 32, dtype=dtype), "int8")


def test_float64_and_non_tensors_are_refused():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        qcompile.fake_quantize(torch.ones(4, dtype=torch.float64), "fp8")
    with pytest.raises(TypeError, match="torch.Tensor"):
        qcompile.fake_quantize(np.ones(4, np.float32), "fp8")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
def test_fixed_block_sizes_cannot_be_overridden(fmt):
    with pytest.raises(ValueError, match="Leave block_size unset"):
        qcompile.fake_quantize(torch.randn(2, 64), fmt, block_size=64 if fmt == "nvfp4" else 16)


@pytest.mark.parametrize("block_size", [0, -16, 2.0, True])
def test_block_size_must_be_a_positive_int(block_size):
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        qcompile.fake_quantize(torch.randn(2, 64), "int4", block_size=block_size)


def test_amax_errors():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="amax must be None"):
        qcompile.fake_quantize(x, "mxfp4", amax=1.0)
    with pytest.raises(TypeError, match="floating-point"):
        qcompile.fake_quantize(x, "int8", amax=torch.tensor(3))
    with pytest.raises(ValueError, match="per-tensor amax must hold one value"):
        qcompile.fake_quantize(x, "int8", amax=torch.ones(4))
    with pytest.raises(ValueError, match="needs 4 values"):
        qcompile.fake_quantize(x, "int8", amax=torch.ones(3), axis=0)
    with pytest.raises(ValueError, match="out of range"):
        qcompile.fake_quantize(x, "int8", axis=2)
    with pytest.raises(ValueError, match="Leave axis unset"):
        qcompile.fake_quantize(x, "nvfp4", axis=0)
    with pytest.raises(ValueError, match="nvfp4 amax must be one value"):
        qcompile.fake_quantize(x, "nvfp4", amax=torch.ones(4, 4))
    with pytest.raises(ValueError, match="no learnable amax"):
        qcompile.fake_quantize(x, "nvfp4", amax=torch.tensor(1.0, requires_grad=True))


def test_zero_dim_block_input_is_refused():
    with pytest.raises(ValueError, match="0-d"):
        qcompile.fake_quantize(torch.tensor(1.0), "nvfp4")


# -------------------------------------------------------------------------- STE mask
def _x_grad(x, fmt, **kwargs):
    x = x.clone().requires_grad_(True)
    qcompile.fake_quantize(x, fmt, **kwargs).sum().backward()
    return x.grad


@pytest.mark.parametrize("fmt,lo", [("int8", -128 / 127), ("fp8", -1.0), ("nvfp4", -1.0)])
def test_ste_is_zero_where_a_static_amax_saturated(fmt, lo):
    amax = 2.0
    x = torch.linspace(-3, 3, 32 * 9)[: 32 * 9]
    x = torch.cat([x, torch.tensor([amax, -amax, lo * amax, 2.0001, -2.0001, lo * amax * 1.0001]),
                   torch.zeros(10)]).reshape(-1, 16)
    grad = _x_grad(x, fmt, amax=amax)
    inside = (x >= lo * amax) & (x <= amax)
    assert torch.equal(grad, inside.float())
    assert 0 < inside.float().mean() < 1


def test_ste_with_per_block_and_per_channel_amax():
    x = torch.randn(4, 64) * 3
    amax = torch.rand(4, 2) + 0.5
    grad = _x_grad(x, "int4", amax=amax, block_size=32)
    hi = amax.repeat_interleave(32, dim=1)
    assert torch.equal(grad, ((x <= hi) & (x >= -hi * 8 / 7.5)).float())  # amax / 7.5: [-8s, amax]
    channel = torch.rand(4) + 0.5
    grad = _x_grad(x, "fp8", amax=channel, axis=0)
    assert torch.equal(grad, (x.abs() <= channel[:, None]).float())


@pytest.mark.parametrize("fmt", FORMATS)
def test_ste_passes_every_finite_value_with_a_dynamic_amax(fmt):
    x = torch.randn(2, 128) * 5
    x[0, 3], x[1, 4], x[1, 5] = float("nan"), float("inf"), float("-inf")
    grad = _x_grad(x, fmt)
    assert torch.equal(grad, x.isfinite().float())


def test_ste_gradient_keeps_the_dtype_of_its_input():
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(2, 32) * 4).to(dtype).requires_grad_(True)
        qcompile.fake_quantize(x, "int8", amax=1.0).sum().backward()
        assert x.grad.dtype == dtype
        x32 = x.detach().float()
        inside = (x32 <= 1.0) & (x32 >= -128 / 127)
        assert torch.equal(x.grad, inside.to(dtype))


# ------------------------------------------------------------------------- amax gradient
def surrogate_amax_gradient(x: np.ndarray, amax: np.ndarray, fmt: str, block_size=None, axis=None):
    """Per-element d y / d amax by a central difference of the straight-through surrogate.

    Returns (gradient, kink): `kink` marks elements where x / s0 + d lands exactly on qmin or
    qmax while x / s0 is inside the range, where the surrogate has a corner and a central
    difference averages the two one-sided slopes.
    """
    spec = REF_FORMATS[fmt]
    x64 = blocks(x.astype(np.float64), block_size)
    a = np.asarray(amax, np.float64)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        a = a.reshape(shape)
    elif block_size is not None and a.size > 1:
        a = a.reshape(*x64.shape[:-1], 1)
    qmin, qmax = spec.qmin, spec.qmax
    divisor = spec.divisor or qmax
    s0 = a / divisor
    v32 = (blocks(x, block_size) / (a / divisor).astype(np.float32)).astype(np.float32)
    inside = (v32 >= qmin) & (v32 <= qmax)
    # d = round(v) - v, held fixed: rounding onto the element grid inside the range; outside
    # it the clip decides (integers: plain rint; floats: the grid ends at qmax, d = 0).
    if spec.element.startswith("int"):
        rounded = np.rint(v32).astype(np.float64)
    else:
        rounded = np.where(inside, cast_to_element(v32, spec), v32).astype(np.float64)
    d = rounded - x64 / s0

    def surrogate(amax_value):
        s = amax_value / divisor
        return s * np.clip(x64 / s + d, qmin, qmax)

    h = 1e-6 * a
    gradient = (surrogate(a + h) - surrogate(a - h)) / (2 * h)
    v = x64 / s0
    q = v + d
    kink = (np.abs(q - qmax) < 1e-6) | (np.abs(q - qmin) < 1e-6)
    return gradient, kink


@pytest.mark.parametrize("fmt,kwargs,shape,amax", [
    ("int8", {}, (6, 40), 1.5),
    ("fp8", {}, (6, 40), 1.5),
    ("fp8", {}, (6, 40), 0.02),
    ("int8", {"axis": 0}, (6, 40), "channel"),
    ("int4", {"block_size": 16}, (3, 64), "block"),
    ("int8", {"block_size": 8}, (3, 64), "block"),
])
def test_amax_gradient_matches_finite_difference_of_the_surrogate(fmt, kwargs, shape, amax):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 1.2).astype(np.float32)
    x.reshape(-1)[::17] *= 4  # plenty saturates at both ends
    bs = kwargs.get("block_size")
    if amax == "channel":
        amax = (rng.random(shape[0]) + 0.5).astype(np.float32)
    elif amax == "block":
        amax = (rng.random((*shape[:-1], shape[-1] // bs)) + 0.5).astype(np.float32)
    else:
        amax = np.float32(amax)
    fd, kink = surrogate_amax_gradient(x, amax, fmt, block_size=bs, axis=kwargs.get("axis"))
    kink = kink.reshape(shape)
    weights = rng.standard_normal(shape).astype(np.float32)
    weights[kink] = 0.0  # the corners of the surrogate are left out of the comparison

    amax_t = torch.tensor(amax, requires_grad=True)
    y = qcompile.fake_quantize(torch.from_numpy(x), fmt, amax=amax_t, **kwargs)
    (y * torch.from_numpy(weights)).sum().backward()

    per_element = fd * blocks(weights.astype(np.float64), bs)
    if kwargs.get("axis") == 0:  # one amax per row
        expected = per_element.sum(axis=tuple(range(1, per_element.ndim)))
    elif np.ndim(amax) == 0:  # one amax for the tensor
        expected = per_element.sum()
    else:  # one amax per block
        expected = per_element.sum(axis=-1)
    np.testing.assert_allclose(amax_t.grad.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert kink.mean() < 0.1


@pytest.mark.parametrize("fmt,above,below", [
    ("int8", 1.0, -128 / 127), ("int4", 7 / 7.5, -8 / 7.5), ("fp8", 1.0, -1.0)])
def test_amax_gradient_beyond_the_range_is_max_or_min_over_the_divisor(fmt, above, below):
    x = torch.tensor([10.0, -10.0, 0.0, float("nan"), float("inf"), -float("inf"), 0.5, 0.25])
    grads = []
    for i in range(x.numel()):
        amax = torch.tensor(1.0, requires_grad=True)
        y = qcompile.fake_quantize(x, fmt, amax=amax, block_size=8 if fmt == "int4" else None)
        y[i].backward()
        grads.append(amax.grad.item())
    assert grads[0] == pytest.approx(above, rel=1e-6) and grads[4] == pytest.approx(above, rel=1e-6)
    assert grads[1] == pytest.approx(below, rel=1e-6) and grads[5] == pytest.approx(below, rel=1e-6)
    assert grads[2] == 0.0 and grads[3] == 0.0  # zero lies on the grid; NaN contributes nothing
    # inside: (round(v) - v) / divisor
    divisor = {"int8": 127, "int4": 7.5, "fp8": 448}[fmt]
    for value, grad in zip((0.5, 0.25), grads[6:]):
        v = np.float32(value) / (np.float32(1.0) / np.float32(divisor))
        q = cast_to_element(np.array([v], np.float32), REF_FORMATS[fmt])[0]
        assert grad == pytest.approx((q - v) / divisor, abs=1e-7)


def test_dynamic_amax_has_no_amax_gradient_and_the_ste_for_x():
    x = torch.randn(4, 32, requires_grad=True)
    y = qcompile.fake_quantize(x, "int8")
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
