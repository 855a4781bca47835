"""Every format of `qcompile.fake_quantize` against two independent references, bit for bit.

References (tests/references.py): numpy + `ml_dtypes` casts (`ml_dtypes_fake_quantize`), and
`onnx.reference` QuantizeLinear/DequantizeLinear models (`onnx_fake_quantize`,
`onnx_nvfp4_two_level`). Data has outliers, all-zero blocks, float32 subnormals, NaN and
+-inf, and odd leading shapes. Agreement is exact: same bits, NaN matching NaN. Tensors stay
below the inductor threshold, so this file checks the eager kernel; tests/test_ops.py checks
that the compiled kernel equals it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from references import (
    REF_FORMATS,
    e8m0_edge_amaxes,
    e8m0_edge_blocks,
    ml_dtypes_fake_quantize,
    onnx_fake_quantize,
    onnx_nvfp4_two_level,
    reference_scales,
)

import qcompile
from qcompile.core import numerics
from qcompile.core.formats import get_format

F32 = np.float32


def assert_bitwise_equal(actual: np.ndarray, expected: np.ndarray, where=None) -> None:
    """Same float32 bits everywhere (or where `where`), any NaN matching any NaN."""
    actual = np.asarray(actual, F32)
    expected = np.asarray(expected, F32)
    assert actual.shape == expected.shape
    same = (actual.view(np.int32) == expected.view(np.int32)) | (
        np.isnan(actual) & np.isnan(expected)
    )
    if where is not None:
        same |= ~where
    if not same.all():
        bad = np.argwhere(~same)
        first = [tuple(int(i) for i in b) for b in bad[:5]]
        shown = [(actual[i], expected[i]) for i in first]
        raise AssertionError(f"{len(bad)} of {same.size} differ; first {first}: {shown}")


def make_data(shape: tuple[int, ...], seed: int, zero_block: int = 32) -> np.ndarray:
    """Gaussian data with outliers, an all-zero run, subnormals, NaN, +inf and -inf."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(F32) * F32(rng.choice([1e-3, 1.0, 30.0]))
    flat = x.reshape(-1)
    n = flat.size
    outliers = rng.integers(0, n, max(1, n // 200))
    flat[outliers] *= F32(rng.choice([50.0, 1e4], size=outliers.size))
    if n >= 2 * zero_block:
        start = zero_block * int(rng.integers(0, n // zero_block))
        flat[start:start + zero_block] = 0.0  # an all-zero block (of 16, 32 or a row)
    if n >= 4 * zero_block:
        start = zero_block * int(rng.integers(0, n // zero_block))
        flat[start:start + zero_block] = (rng.standard_normal(zero_block) * 1e-40).astype(F32)
        flat[start] = np.float32(1.4e-45)  # smallest subnormal
    for value in (np.nan, np.inf, -np.inf):
        flat[rng.integers(0, n)] = value
    return x


def run_qcompile(x: np.ndarray, fmt: str, dtype=torch.float32, **kwargs) -> np.ndarray:
    kwargs = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    y = qcompile.fake_quantize(torch.from_numpy(x).to(dtype), fmt, **kwargs)
    assert y.dtype == dtype and y.shape == x.shape
    return y.float().numpy()


def run_reference(x: np.ndarray, fmt: str, dtype=torch.float32, **kwargs) -> np.ndarray:
    """ml_dtypes reference on x as qcompile sees it (after the cast to dtype), cast back."""
    x32 = torch.from_numpy(x).to(dtype).float().numpy()
    y = ml_dtypes_fake_quantize(x32, fmt, **kwargs)
    return torch.from_numpy(y).to(dtype).float().numpy()


# (format, keyword arguments, shapes): amax as a fraction of the data's finite max, so that
# static ranges saturate part of the data.
CASES = [
    ("int8", {}, [(3, 5, 64), (7, 33), (257,)]),
    ("int8", {"amax": 0.5}, [(3, 5, 64), (7, 33)]),
    ("int8", {"axis": 0}, [(7, 33), (3, 5, 64)]),
    ("int8", {"axis": -1, "amax": "channel"}, [(5, 3, 40)]),
    ("int8", {"block_size": 32}, [(3, 5, 64)]),
    ("int4", {}, [(3, 5, 128), (1, 384), (128,)]),
    ("int4", {"block_size": 32}, [(2, 3, 7, 64)]),
    ("int4", {"block_size": 32, "amax": "block"}, [(3, 5, 64)]),
    ("int4", {"amax": 0.25}, [(3, 256)]),
    ("fp8", {}, [(3, 5, 64), (7, 33), (257,)]),
    ("fp8", {"amax": 0.5}, [(3, 5, 64)]),
    ("fp8", {"axis": 1}, [(3, 5, 64)]),
    ("fp8", {"block_size": 32}, [(5, 96)]),
    ("nvfp4", {}, [(3, 5, 64), (1, 16), (9, 48), (2, 3, 5, 32)]),
    ("nvfp4", {"amax": 0.5}, [(3, 5, 64), (9, 48)]),
    ("nvfp4", {"amax": 1e-4}, [(4, 64)]),  # block scales saturate at 448
    ("mxfp4", {}, [(3, 5, 64), (1, 32), (9, 96), (2, 3, 5, 32)]),
    ("mxfp8", {}, [(3, 5, 64), (1, 32), (9, 96), (2, 3, 5, 32)]),
    ("mxfp4_ocp", {}, [(3, 5, 64), (9, 96)]),
    ("mxfp8_ocp", {}, [(3, 5, 64), (9, 96)]),
]


def case_params():
    for fmt, kwargs, shapes in CASES:
        for shape in shapes:
            label = ",".join(f"{k}={v}" for k, v in kwargs.items()) or "dynamic"
            yield pytest.param(fmt, kwargs, shape, id=f"{fmt}-{label}-{'x'.join(map(str, shape))}")


def resolve_amax(x: np.ndarray, fmt: str, kwargs: dict) -> dict:
    """Turn the symbolic amax of CASES into arrays computed from the data."""
    kwargs = dict(kwargs)
    amax = kwargs.get("amax")
    finite = np.where(np.isfinite(x), np.abs(x), 0).astype(F32)
    if isinstance(amax, float):
        kwargs["amax"] = np.asarray(F32(finite.max() * amax))
    elif amax == "channel":
        axis = kwargs["axis"] % x.ndim
        dims = tuple(d for d in range(x.ndim) if d != axis)
        kwargs["amax"] = (finite.max(axis=dims) * F32(0.5)).astype(F32)
    elif amax == "block":
        bs = kwargs["block_size"]
        per_block = finite.reshape(*x.shape[:-1], -1, bs).max(axis=-1)
        kwargs["amax"] = (per_block * F32(0.75)).astype(F32)  # shape (..., K // bs)
    return kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,kwargs,shape", list(case_params()))
def test_matches_ml_dtypes_reference(fmt, kwargs, shape, dtype):
    for seed in range(3):
        x = make_data(shape, seed=seed, zero_block=16 if fmt == "nvfp4" else 32)
        resolved = resolve_amax(x, fmt, kwargs)  # a static amax is read in fp32 by both
        assert_bitwise_equal(
            run_qcompile(x, fmt, dtype, **resolved), run_reference(x, fmt, dtype, **resolved)
        )


def onnx_comparable(x: np.ndarray, fmt: str, scale: np.ndarray, block_size) -> np.ndarray:
    """Where ONNX QuantizeLinear and the contract are meant to agree (bool, shape of x).

    Left out, and checked against the contract by the ml_dtypes reference instead:
    - elements whose scale is 0 (all-zero block, zero amax): ONNX divides by zero, the
      contract gives zeros;
    - integer formats: inf, NaN and |x / scale| >= 2**31, which ONNX's reference casts to
      int32 before clipping (undefined in numpy);
    - FLOAT4E2M1: NaN, which that type cannot hold (ONNX's cast makes it 0).
    """
    spec = REF_FORMATS[fmt]
    bs = block_size if block_size is not None else spec.block_size
    scale_b = np.broadcast_to(scale, x.reshape(*x.shape[:-1], -1, bs).shape if bs else x.shape)
    scale_x = scale_b.reshape(x.shape)
    keep = scale_x > 0
    if spec.element in ("int8", "int4"):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            keep &= np.isfinite(x) & (np.abs(x / np.where(keep, scale_x, 1)) < 2.0**31)
    if spec.element == "e2m1":
        keep &= ~np.isnan(x)
    return keep


@pytest.mark.parametrize("fmt,kwargs,shape", list(case_params()))
def test_matches_onnx_reference(fmt, kwargs, shape):
    spec = REF_FORMATS[fmt]
    for seed in range(2):
        x = make_data(shape, seed=seed, zero_block=16 if fmt == "nvfp4" else 32)
        resolved = resolve_amax(x, fmt, kwargs)
        axis, block_size = resolved.get("axis"), resolved.get("block_size")
        scales = reference_scales(x, spec, resolved.get("amax"), axis, block_size)
        keep = onnx_comparable(x, fmt, scales.scale, block_size)
        x_onnx = np.where(keep, x, F32(0)).astype(F32)
        expected = onnx_fake_quantize(x_onnx, fmt, scales.scale, axis, block_size)
        assert_bitwise_equal(run_qcompile(x, fmt, **resolved), expected, where=keep)
        if fmt == "nvfp4":
            two_level = onnx_nvfp4_two_level(x_onnx, scales)
            assert_bitwise_equal(run_qcompile(x, fmt, **resolved), two_level, where=keep)


@pytest.mark.parametrize("amax", [None, 3.0, 1e-3])
def test_nvfp4_block_scales_are_the_e4m3_reference(amax):
    """The two levels themselves (what export writes) match the ml_dtypes reference."""
    x = make_data((6, 64), seed=4, zero_block=16)
    fmt = get_format("nvfp4")
    amax_t = None if amax is None else torch.tensor(amax)
    _, scales = numerics.quantize(torch.from_numpy(x), amax_t, fmt, 16)
    ref = reference_scales(x, REF_FORMATS["nvfp4"], amax)
    assert_bitwise_equal(scales.global_scale.numpy(), ref.global_scale)
    assert_bitwise_equal(scales.block_scale.numpy(), ref.block_scale_e4m3.astype(F32))
    assert_bitwise_equal(scales.scale.numpy(), ref.scale)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "mxfp4_ocp", "mxfp8_ocp"])
def test_e8m0_scales_at_the_edges_match_the_reference(fmt):
    spec = REF_FORMATS[fmt]
    x = e8m0_edge_blocks(spec.qmax)
    _, scales = numerics.quantize(torch.from_numpy(x), None, get_format(fmt), 32)
    ref = reference_scales(x, spec)
    assert_bitwise_equal(scales.scale.numpy(), ref.scale)
    assert_bitwise_equal(run_qcompile(x, fmt), ml_dtypes_fake_quantize(x, fmt))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_ceil_rule_is_the_runtimes_bit_trick(fmt):
    """The default (ceil) exponent equals Transformer Engine's `float_to_e8m0` (the bits of
    `cvt.rp.satfinite.ue8m0x2.f32`) applied to fp32 amax / max, written here on the bits, over
    the edge cases and a million random fp32 amaxes of every magnitude."""
    spec = REF_FORMATS[fmt]
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 0x7F800000, 1_000_000, dtype=np.int64).astype(np.uint32)
    amaxes = np.concatenate([e8m0_edge_amaxes(spec.qmax), bits.view(F32)])
    q = (amaxes / F32(spec.qmax)).astype(F32).view(np.uint32)
    e, m = (q >> 23) & 0xFF, q & 0x7FFFFF
    bump = (m != 0) & (e != 0xFE) & ~((e == 0) & (m <= 0x400000))
    te_exponent = (e + bump).astype(np.int64) - 127
    ours = numerics.e8m0_exponent(torch.from_numpy(amaxes), get_format(fmt).element,
                                  get_format(fmt).scale_rule)
    np.testing.assert_array_equal(ours.numpy(), te_exponent)


def test_the_rules_differ_exactly_where_ocp_clips():
    """Ceil is OCP + 1 exactly where amax's significand exceeds the element max's (1.75 for
    E4M3, 1.5 for E2M1), i.e. where OCP would clip the block's top; elsewhere they agree."""
    for name, significand in (("mxfp8", 1.75), ("mxfp4", 1.5)):
        ceil, ocp = get_format(name), get_format(f"{name}_ocp")
        amax = torch.tensor([1.0, significand, 1.76, 1.5001, 1.99, 0.0, 2.0**-140]) * 2.0**10
        k_ceil = numerics.e8m0_exponent(amax, ceil.element, ceil.scale_rule)
        k_ocp = numerics.e8m0_exponent(amax, ocp.element, ocp.scale_rule)
        clips = amax > ceil.element.max_value * numerics.exp2_int(k_ocp)
        assert ((k_ceil - k_ocp) == clips.to(torch.int32)).all(), name
        assert clips.any() and not clips.all()
        # ceil never clips: the block max only rounds (half a step of its grid at most);
        # OCP saturates it to max * scale where it clips.
        x = amax[:, None].expand(-1, 32).contiguous()
        y_ceil = qcompile.fake_quantize(x, name)[:, 0]
        y_ocp = qcompile.fake_quantize(x, f"{name}_ocp")[:, 0]
        normal = amax > 1e-30
        error = ((y_ceil - amax).abs() / amax)[normal]
        assert (error <= 2.0 ** -(ceil.element.mantissa_bits + 1)).all(), name
        saturated = ceil.element.max_value * numerics.exp2_int(k_ocp)
        assert (y_ocp[clips] == saturated[clips]).all() and (y_ocp[clips] < amax[clips]).all()


# ----------------------------------------------------------------- the contract's edge cases
ALL_FORMATS = ["int8", "int4", "fp8", "nvfp4", "mxfp4", "mxfp8", "mxfp4_ocp", "mxfp8_ocp"]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_zero_gives_zeros(fmt, dtype):
    x = torch.zeros(3, 256, dtype=dtype)
    y = qcompile.fake_quantize(x, fmt)
    assert y.dtype == dtype and not y.isnan().any() and (y == 0).all()
    if get_format(fmt).static_amax:
        y = qcompile.fake_quantize(torch.randn(3, 256, dtype=dtype), fmt, amax=0.0)
        assert not y.isnan().any() and (y == 0).all()


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_nan_stays_nan_and_inf_saturates(fmt):
    x = torch.linspace(-2, 2, 256).reshape(2, 128)
    x[0, 5], x[0, 6], x[1, 7] = float("nan"), float("inf"), float("-inf")
    y = qcompile.fake_quantize(x, fmt)
    assert y[0, 5].isnan() and y.isnan().sum() == 1
    assert y[0, 6] > 0 and y[0, 6].isfinite() and y[1, 7] < 0 and y[1, 7].isfinite()
    # inf saturates to the largest value of its block's grid: the finite block max rounds there
    assert y[0, 6] >= y[0, :128][x[0, :128].isfinite()].max()


def test_round_half_to_even():
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -127.5])
    assert qcompile.fake_quantize(ties, "int8", amax=127.0).tolist() == [0, 2, 2, 0, -2, 126, -128]
    # E4M3 near 16 has spacing 2: 17 and 19 are ties; 15.5 ties between 15 and 16.
    ties = torch.tensor([17.0, 19.0, -17.0, 15.5, 0.5 * 2.0**-9, 1.5 * 2.0**-9])
    assert qcompile.fake_quantize(ties, "fp8", amax=448.0).tolist() == [
        16, 20, -16, 16, 0, 2 * 2.0**-9
    ]
    # E2M1 with a unit scale (block amax 6 -> scale 1 for mxfp4 needs amax in [4, 8)).
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0] * 4
    assert qcompile.fake_quantize(ties, "mxfp4").tolist() == expected


def test_integer_zero_is_positive_zero():
    """Integers have no -0: DequantizeLinear of q = 0 is +0.0, and so is ours."""
    x = torch.tensor([-0.6, -0.0, -1e-30, -0.01, 5.0])
    for fmt, kw in (("int8", {}), ("int4", {"block_size": 5})):
        y = qcompile.fake_quantize(x, fmt, **kw)
        assert y[0] < 0 and (y[1:4] == 0).all() and not torch.signbit(y[1:4]).any(), (fmt, y)


# ------------------------------------------------------------------------- property test
@st.composite
def fuzz_inputs(draw):
    fmt = draw(st.sampled_from(ALL_FORMATS))
    spec = REF_FORMATS[fmt]
    block = spec.block_size or draw(st.sampled_from([1, 3, 16]))
    if fmt == "int4":
        block = draw(st.sampled_from([2, 8, 32, 128]))
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    k = block * draw(st.integers(1, 4))
    shape = (*lead, k)
    seed = draw(st.integers(0, 2**32 - 1))
    log_scale = draw(st.floats(-40, 37))
    static = spec.scale != "e8m0" and draw(st.booleans())
    amax_fraction = draw(st.sampled_from([0.0, 1e-6, 0.3, 1.0, 10.0]))
    specials = draw(st.booleans())
    return fmt, block, shape, seed, log_scale, static, amax_fraction, specials


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_inputs())
def test_property_matches_ml_dtypes_reference(params):
    fmt, block, shape, seed, log_scale, static, amax_fraction, specials = params
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        x = (rng.standard_normal(shape) * 10.0**log_scale).astype(F32)
    if specials:
        flat = x.reshape(-1)
        for value in (np.nan, np.inf, -np.inf, 0.0, 1e-44):
            flat[rng.integers(0, flat.size)] = value
    kwargs: dict = {}
    if REF_FORMATS[fmt].block_size is None or fmt == "int4":
        kwargs["block_size"] = None if (fmt != "int4" and block == 1) else block
    if static:
        finite = np.where(np.isfinite(x), np.abs(x), 0).astype(F32)
        with np.errstate(over="ignore"):
            amax = finite.max() * F32(amax_fraction)
        kwargs["amax"] = np.asarray(amax if np.isfinite(amax) else finite.max())
    expected = ml_dtypes_fake_quantize(x, fmt, **kwargs)
    assert_bitwise_equal(run_qcompile(x, fmt, **kwargs), expected)


# ------------------------------------------------------------------ int4: amax / 7.5 (#25)
def _int4_blocks_with_both_signs_of_max() -> torch.Tensor:
    """Blocks of 128 over 24 orders of magnitude; half have a negative max, some outliers."""
    gen = torch.Generator().manual_seed(25)
    x = torch.randn(48, 256, generator=gen) * torch.logspace(-12, 12, 48)[:, None]
    x[::3, 7] *= 40.0  # outliers set the block max
    x[1::2, :128] = -x[1::2, :128].abs()  # blocks whose max is negative
    return x


def test_int4_scale_puts_the_block_max_on_the_rounding_edge():
    """scale = amax / 7.5: a positive block max saturates to 7, a negative one rounds to -8
    (or to -7 where fp32 puts -amax / scale one ulp above -7.5), so the blocks use the whole
    [-8, 7] range."""
    x = _int4_blocks_with_both_signs_of_max()
    values, scales = numerics.quantize(x, None, get_format("int4"), 128)
    amax = numerics.finite_abs(numerics.to_blocks(x, 128)).amax(-1, keepdim=True)
    assert torch.equal(scales.scale, amax / 7.5)
    top = values.gather(-1, numerics.to_blocks(x, 128).abs().argmax(-1, keepdim=True))
    edge = -amax / scales.scale
    assert ((top == 7) | (top == -8) | ((top == -7) & (edge > -7.5))).all()
    assert (top == -8).any() and (top == 7).any()
    assert values.min() == -8 and values.max() == 7


def test_int4_equals_compressed_tensors():
    """Bit for bit the compressed-tensors package's own group quantization (symmetric int4,
    scale = amax / ((qmax - qmin) / 2)), which vLLM's int4 checkpoints are written with."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake
    from compressed_tensors.quantization.utils import calculate_qparams

    x = _int4_blocks_with_both_signs_of_max()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                            group_size=128)
    view = x.reshape(48, 2, 128)
    scale, zero = calculate_qparams(view.amin(-1), view.amax(-1), args)
    assert torch.equal(scale.unsqueeze(-1), numerics.quantize(x, None, get_format("int4"), 128)[1].scale)
    assert torch.equal(ct_fake(x, scale, zero, args), qcompile.fake_quantize(x, "int4"))
