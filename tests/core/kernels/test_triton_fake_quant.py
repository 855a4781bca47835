"""The Triton kernels against their reference, `qcompile.core.numerics`, element for element.

Every comparison is bitwise (NaN compared as NaN, the sign of zero included). Without a GPU the
kernels run under the Triton interpreter on CPU tensors (see conftest.py); with one, on CUDA
tensors, and the reference still runs on CPU.
"""

from __future__ import annotations

import pytest
import torch
from references import e8m0_edge_blocks, ml_dtypes_fake_quantize

from qcompile.core import numerics
from qcompile.core.formats import FORMATS, ScaleKind, get_format
from qcompile.core.kernels import triton_fake_quant as tfq

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BITS_DTYPE = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
#: Per-block static amax is defined for fp32-scaled block formats (int4); nvfp4's is global.
BLOCK_FORMATS = ("int4", "nvfp4", "mxfp4", "mxfp8")
TENSOR_FORMATS = ("int8", "fp8")

# The interpreter runs the kernels in numpy, which warns where IEEE arithmetic makes NaN or inf
# (x / 0 of a masked lane, NaN inputs); the results are compared bit for bit all the same.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape, dtype and bits; NaN matches NaN whatever its payload or sign."""
    actual = actual.cpu()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    bits_dtype = BITS_DTYPE[expected.dtype]
    numbers = ~torch.isnan(expected)
    mismatched = actual.view(bits_dtype)[numbers] != expected.view(bits_dtype)[numbers]
    assert not mismatched.any(), f"{int(mismatched.sum())} elements differ in sign or bits"


def block_size_of(name: str) -> int:
    return FORMATS[name].block_size or 0


def make_data(shape, dtype, seed: int, block: int = 32) -> torch.Tensor:
    """Heavy-tailed data with outliers, an all-zero block, subnormals, -0, NaN and +-inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    flat = x.view(-1)
    middle = flat.numel() // 2
    flat[:block] = 0.0  # an all-zero block
    flat[block + 3] *= 1e3  # outliers
    flat[-1] = -2e3
    flat[block + 5] = float("nan")
    flat[middle + 1] = float("inf")
    flat[-2] = float("-inf")
    flat[-3] = -0.0
    tiny = torch.finfo(dtype).tiny  # smallest normal of the dtype: below it, subnormals
    flat[middle + 8 : middle + 8 + block // 2] = tiny * torch.rand(block // 2, generator=g) * 0.9
    return x.to(dtype)


def reference(x, amax, name, block_size):
    return numerics.fake_quantize(x, amax, get_format(name), block_size or None)


def kernel(x, amax, name, block_size, device):
    amax = None if amax is None else amax.to(device)
    return tfq.fake_quantize(x.to(device), amax, name, block_size)


# ---------------------------------------------------------------------------------------------
# Forward: every format, dynamic and static amax, every dtype.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_dynamic_amax_matches_numerics(name, dtype, device):
    x = make_data((3, 5, 256), dtype, seed=1)
    bs = block_size_of(name)
    assert_bitwise_equal(kernel(x, None, name, bs, device), reference(x, None, name, bs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("fraction", [0.3, 2.0], ids=["clipping", "loose"])
def test_static_global_amax_matches_numerics(name, dtype, fraction, device):
    """A 0-d amax: per-tensor for int8/fp8, global for int4/nvfp4 (MX formats ignore it)."""
    x = make_data((3, 5, 256), dtype, seed=2)
    amax = numerics.finite_abs(x.float()).amax() * fraction
    bs = block_size_of(name)
    assert_bitwise_equal(kernel(x, amax, name, bs, device), reference(x, amax, name, bs))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_tiny_values_matches_numerics(name, device):
    """A tensor whose amax and scales are fp32 subnormals (E8M0 scale 2**-127, NVFP4 gs ~ 0)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 128, generator=g) * 1e-39
    x[1, :64] *= 1e-4
    bs = block_size_of(name)
    for amax in (None, torch.tensor(3e-40)):
        assert_bitwise_equal(kernel(x, amax, name, bs, device), reference(x, amax, name, bs))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_all_zero_and_zero_amax_give_zeros(name, device):
    x = torch.zeros(2, 128)
    x[1, 0] = -0.0
    bs = block_size_of(name)
    for amax in (None, torch.tensor(0.0)):
        y = kernel(x, amax, name, bs, device)
        assert_bitwise_equal(y, reference(x, amax, name, bs))
        assert not torch.isnan(y.cpu()).any()
    nonzero = make_data((2, 128), torch.float32, seed=4)
    assert_bitwise_equal(
        kernel(nonzero, torch.tensor(0.0), name, bs, device),
        reference(nonzero, torch.tensor(0.0), name, bs),
    )


@pytest.mark.parametrize("name", ["int8", "fp8", "mxfp4", "mxfp8"])
def test_round_half_to_even_ties(name, device):
    """Inputs exactly halfway between two element values (scale 1 or a power of two)."""
    fmt = get_format(name)
    if fmt.element.name == "int8":
        ties = [0.5, 1.5, 2.5, 3.5, 126.5, -0.5, -1.5, -2.5, -0.25, 0.25]
    elif fmt.element.name == "float4_e2m1fn":
        ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -1.25, -5.0, 0.125]
    else:  # E4M3: subnormal spacing 2**-9, then 2**(e-3)
        ties = [2.0**-10, 3 * 2.0**-10, 1.0625, 1.1875, 248.0, 432.0, -1.0625, -(2.0**-10)]
    block = fmt.block_size or 32
    x = torch.zeros(2, block)
    x[0, : len(ties)] = torch.tensor(ties)
    x[1, : len(ties)] = -torch.tensor(ties)
    # amax that makes the scale 1: 127 (int8), 448 (fp8); MX: a block max whose E8M0 scale is 1
    anchor = {"int8": 127.0, "fp8": 448.0, "mxfp4": 4.0, "mxfp8": 256.0}[name]  # both E8M0 rules
    x[:, -1] = anchor
    amax = torch.tensor(anchor) if fmt.static_amax else None
    bs = block_size_of(name)
    y = kernel(x, amax, name, bs, device)
    assert_bitwise_equal(y, reference(x, amax, name, bs))


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8", "mxfp4_ocp", "mxfp8_ocp"])
def test_e8m0_rules_at_their_edges(name, device):
    """Block maxes exactly at max * 2**k, one ulp either side, powers of two, zero, fp32
    subnormals and the largest floats: the kernel equals numerics and the ml_dtypes reference."""
    x = torch.from_numpy(e8m0_edge_blocks(get_format(name).element.max_value))
    y = kernel(x, None, name, 32, device)
    assert_bitwise_equal(y, reference(x, None, name, 32))
    expected = torch.from_numpy(ml_dtypes_fake_quantize(x.numpy(), name))
    assert_bitwise_equal(y, expected)


def test_nvfp4_block_scales_round_and_saturate_like_e4m3(device):
    """Global amax 2688 makes gs = 1, so each E4M3 block scale is block_max / 6: hit its ties,
    its subnormals, underflow to zero and saturation at 448."""
    raw = [2.0**-10, 3 * 2.0**-10, 2.0**-9, 2.0**-12, 1.0625, 1.1875, 248.0, 464.0, 1e6, 0.0]
    raw += [2.0**e for e in range(-12, 9)]
    x = torch.randn(len(raw), 16, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    x[:, 0] = 1.0
    x = x * (6.0 * torch.tensor(raw))[:, None]
    for amax in (torch.tensor(2688.0), torch.tensor(1.0), None):
        assert_bitwise_equal(kernel(x, amax, "nvfp4", 16, device), reference(x, amax, "nvfp4", 16))


# ---------------------------------------------------------------------------------------------
# amax layouts: per channel, per block, broadcasts that must be materialised.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", TENSOR_FORMATS)
@pytest.mark.parametrize(
    "amax_shape",
    [(7, 1), (1, 96), (7, 96), (1, 1)],
    ids=["rows", "columns", "elementwise", "unit"],
)
def test_per_channel_amax_2d(name, dtype, amax_shape, device):
    x = make_data((7, 96), dtype, seed=6)
    g = torch.Generator().manual_seed(7)
    amax = torch.rand(amax_shape, generator=g) * 50 + 0.1
    amax.view(-1)[0] = 0.0  # a zero channel gives zeros
    assert_bitwise_equal(kernel(x, amax, name, 0, device), reference(x, amax, name, 0))


@pytest.mark.parametrize("name", TENSOR_FORMATS)
@pytest.mark.parametrize(
    "amax_shape", [(5, 1), (3, 1, 1), (3, 1, 64), (64,)], ids=["middle", "leading", "two_axes", "last"]
)
def test_per_channel_amax_3d(name, amax_shape, device):
    x = make_data((3, 5, 64), torch.float32, seed=8)
    amax = torch.rand(amax_shape, generator=torch.Generator().manual_seed(9)) * 20 + 0.5
    assert_bitwise_equal(kernel(x, amax, name, 0, device), reference(x, amax, name, 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 256), (256,), (1, 512)], ids=str)
def test_int4_per_block_static_amax(shape, dtype, device):
    x = make_data(shape if len(shape) > 1 else (1, *shape), dtype, seed=10).reshape(shape)
    blocks = (*shape[:-1], shape[-1] // 128, 1)
    amax = torch.rand(blocks, generator=torch.Generator().manual_seed(11)) * 5
    amax.view(-1)[-1] = 0.0
    assert_bitwise_equal(kernel(x, amax, "int4", 128, device), reference(x, amax, "int4", 128))


@pytest.mark.parametrize("block_size", [16, 48, 240])
@pytest.mark.parametrize("name", ["int4", "int8", "fp8"])
def test_block_size_override(name, block_size, device):
    """Blocks of any size along K, including sizes that are not a power of two."""
    x = make_data((3, 2, 240), torch.bfloat16, seed=12, block=16)
    per_block = torch.rand(3, 2, 240 // block_size, 1, generator=torch.Generator().manual_seed(13))
    for amax in (None, torch.tensor(7.0), per_block * 30):
        expected = reference(x, amax, name, block_size)
        assert_bitwise_equal(kernel(x, amax, name, block_size, device), expected)


# ---------------------------------------------------------------------------------------------
# Shapes and layouts.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_odd_shapes_and_non_contiguous_input(name, device):
    bs = block_size_of(name)
    base = make_data((128, 7, 3), torch.float16, seed=14)
    x = base.permute(2, 1, 0)[:, :5]  # (3, 5, 128), non-contiguous
    assert not x.is_contiguous()
    y = kernel(x, None, name, bs, device)
    assert y.is_contiguous()
    assert_bitwise_equal(y, reference(x, None, name, bs))
    one_row = make_data((1, 128), torch.float32, seed=15)[0]
    assert_bitwise_equal(kernel(one_row, None, name, bs, device), reference(one_row, None, name, bs))
    odd = make_data((1, 7, 1, 3, 128), torch.float32, seed=16)
    assert_bitwise_equal(kernel(odd, None, name, bs, device), reference(odd, None, name, bs))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_empty_tensor(name, device):
    x = torch.empty(0, 128, dtype=torch.bfloat16, device=device)
    bs = block_size_of(name)
    y = tfq.fake_quantize(x, None, name, bs)
    assert y.shape == x.shape and y.dtype == x.dtype
    grad = tfq.fake_quantize_backward(x, x, None, name, bs)
    assert grad.shape == x.shape


def test_zero_dim_tensor(device):
    for value in (3.7, float("nan"), float("inf")):
        x = torch.tensor(value)
        for amax in (None, torch.tensor(2.0)):
            assert_bitwise_equal(kernel(x, amax, "int8", 0, device), reference(x, amax, "int8", 0))


def test_larger_than_one_program(device):
    """Several programs per launch and a ragged last program (elementwise and block kernels)."""
    x = make_data((37, 160), torch.float32, seed=17)
    for name in ("int8", "nvfp4", "mxfp8"):
        bs = block_size_of(name)
        assert_bitwise_equal(kernel(x, None, name, bs, device), reference(x, None, name, bs))


def test_block_formats_reject_a_missing_or_ragged_block_size(device):
    x = torch.randn(2, 40, device=device)
    with pytest.raises(ValueError, match="block_size"):
        tfq.fake_quantize(x, None, "nvfp4", 0)
    with pytest.raises(ValueError, match="multiple"):
        tfq.fake_quantize(x, None, "mxfp4", 32)


# ---------------------------------------------------------------------------------------------
# Backward: the straight-through estimator.
# ---------------------------------------------------------------------------------------------


def reference_backward(grad, x, amax, name, block_size):
    return numerics.fake_quantize_backward(grad, x, amax, get_format(name), block_size or None)


def kernel_backward(grad, x, amax, name, block_size, device):
    amax = None if amax is None else amax.to(device)
    return tfq.fake_quantize_backward(grad.to(device), x.to(device), amax, name, block_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_ste_backward_matches_numerics(name, dtype, device):
    x = make_data((3, 5, 128), dtype, seed=18)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(19)).to(dtype)
    grad.view(-1)[7] = float("nan")
    bs = block_size_of(name)
    global_amax = numerics.finite_abs(x.float()).amax() * 0.25
    amaxes = [None, global_amax]
    if FORMATS[name].scale is ScaleKind.FP32 and bs:
        amaxes.append(torch.rand(3, 5, 1, 1, generator=torch.Generator().manual_seed(20)) * 4)
    elif not bs:
        amaxes.append(torch.rand(5, 1, generator=torch.Generator().manual_seed(21)) * 4)
    for amax in amaxes:
        actual = kernel_backward(grad, x, amax, name, bs, device)
        assert_bitwise_equal(actual, reference_backward(grad, x, amax, name, bs))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_ste_backward_range_boundaries(name, device):
    """x exactly at amax * (min/divisor) and amax, and one fp32 ulp outside each."""
    hi = torch.tensor(3.3)
    ratio = FORMATS[name].element.min_value / FORMATS[name].divisor
    if FORMATS[name].scale is not ScaleKind.FP32:
        ratio = -1.0
    lo = hi * ratio
    edges = torch.stack([
        lo, torch.nextafter(lo, torch.tensor(-10.0)), torch.nextafter(lo, torch.tensor(0.0)),
        hi, torch.nextafter(hi, torch.tensor(10.0)), torch.nextafter(hi, torch.tensor(0.0)),
    ])
    x = torch.zeros(2, 128)
    x[0, : len(edges)] = edges
    grad = torch.ones_like(x)
    bs = block_size_of(name)
    actual = kernel_backward(grad, x, hi, name, bs, device)
    expected = reference_backward(grad, x, hi, name, bs)
    assert_bitwise_equal(actual, expected)
    assert expected[0, : len(edges)].tolist() == [1, 0, 1, 1, 0, 1]


def test_ste_backward_non_contiguous_grad(device):
    x = make_data((64, 6), torch.float32, seed=22).t()
    grad = torch.randn(64, 6).t()
    amax = torch.tensor(2.0)
    actual = kernel_backward(grad, x, amax, "int8", 0, device)
    assert_bitwise_equal(actual, reference_backward(grad, x, amax, "int8", 0))


# ---------------------------------------------------------------------------------------------
# Through the custom op, on a GPU.
# ---------------------------------------------------------------------------------------------


def test_ops_register_the_triton_kernels_for_cuda_tensors():
    from qcompile.core import ops  # noqa: F401  (registers the kernels)

    for op in ("qcompile::fake_quantize", "qcompile::fake_quantize_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda is unavailable)")
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_custom_op_on_cuda_uses_triton_and_matches_numerics(name):
    x = make_data((4, 8, 256), torch.bfloat16, seed=23)
    bs = block_size_of(name)
    y = torch.ops.qcompile.fake_quantize(x.cuda(), None, name, bs)
    assert y.is_cuda
    assert_bitwise_equal(y, reference(x, None, name, bs))
    xg = x.cuda().float().requires_grad_()
    torch.ops.qcompile.fake_quantize(xg, None, name, bs).sum().backward()
    assert_bitwise_equal(xg.grad, reference_backward(torch.ones_like(x.float()), x.float(), None, name, bs))
