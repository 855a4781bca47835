"""The format table of `qcompile.core.formats` against the README's numerics table and the element types of ml_dtypes.

Each row's element grid (what `numerics.round_to_element` can produce) must be exactly the
finite values of the matching `ml_dtypes` type, and each row's scale kind and block size the
ones the numerics contract names.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from qcompile.core import numerics
from qcompile.core.formats import (
    E2M1,
    E4M3,
    E4M3_MAX,
    FORMATS,
    INT4,
    INT8,
    ElementKind,
    ElementType,
    QuantFormat,
    ScaleKind,
    ScaleRule,
    get_format,
)


def test_the_table_is_the_contract():
    expected = {
        "int8": (INT8, ScaleKind.FP32, None, True),
        "int4": (INT4, ScaleKind.FP32, 128, True),
        "fp8": (E4M3, ScaleKind.FP32, None, True),
        "nvfp4": (E2M1, ScaleKind.E4M3_TWO_LEVEL, 16, True),
        "mxfp4": (E2M1, ScaleKind.E8M0, 32, False),
        "mxfp8": (E4M3, ScaleKind.E8M0, 32, False),
        "mxfp4_ocp": (E2M1, ScaleKind.E8M0, 32, False),
        "mxfp8_ocp": (E4M3, ScaleKind.E8M0, 32, False),
    }
    assert set(FORMATS) == set(expected)
    for name, (element, scale, block, static) in expected.items():
        fmt = FORMATS[name]
        assert (fmt.element, fmt.scale, fmt.block_size, fmt.static_amax) == (
            element, scale, block, static
        ), name
        assert fmt.learnable_amax == (scale is ScaleKind.FP32)
        assert fmt.fixed_block_size == (name in ("nvfp4", "mxfp4", "mxfp8", "mxfp4_ocp", "mxfp8_ocp"))
        expected_rule = None if scale is not ScaleKind.E8M0 else (
            ScaleRule.OCP if name.endswith("_ocp") else ScaleRule.CEIL)
        assert fmt.scale_rule is expected_rule, name
    assert E4M3_MAX == 448.0


def _all_values(dtype, bits: int) -> np.ndarray:
    """Every finite value of a small ml_dtypes float type (4-bit types take one byte each)."""
    values = np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float32)
    return np.unique(values[np.isfinite(values)])


@pytest.mark.parametrize("element,dtype", [
    (E4M3, ml_dtypes.float8_e4m3fn),
    (E2M1, ml_dtypes.float4_e2m1fn),
    (INT8, np.int8),
    (INT4, ml_dtypes.int4),
])
def test_element_grid_is_the_ml_dtypes_type(element, dtype):
    if element.kind is ElementKind.INT:
        info = ml_dtypes.iinfo(dtype)
        grid = np.arange(info.min, info.max + 1, dtype=np.float32)
    else:
        grid = _all_values(dtype, element.bits)
        assert ml_dtypes.finfo(dtype).max == element.max_value
    assert grid.min() == element.min_value and grid.max() == element.max_value
    # a dense sweep past both ends lands on every grid value and nowhere else
    sweep = torch.linspace(element.min_value * 1.5, element.max_value * 1.5, 400_001)
    sweep = torch.cat([sweep, torch.from_numpy(grid)])
    produced = numerics.round_to_element(sweep, element).unique().numpy()
    np.testing.assert_array_equal(np.unique(produced), grid)


def test_small_float_constants_match_ml_dtypes():
    for element, dtype in ((E4M3, ml_dtypes.float8_e4m3fn), (E2M1, ml_dtypes.float4_e2m1fn)):
        info = ml_dtypes.finfo(dtype)
        assert element.mantissa_bits == info.nmant
        assert 2.0**element.min_exponent == float(info.smallest_normal)
        assert 2.0**element.max_exponent * (2 - 2.0**-element.mantissa_bits) >= element.max_value


def test_get_format():
    assert get_format("NVFP4") is FORMATS["nvfp4"]
    assert get_format(FORMATS["int8"]) is FORMATS["int8"]
    with pytest.raises(ValueError, match="valid formats: fp8, int4, int8, mxfp4, mxfp4_ocp, mxfp8, mxfp8_ocp, nvfp4"):
        get_format("fp4")
    with pytest.raises(TypeError):
        get_format(None)


def test_resolve_block_size():
    assert FORMATS["int4"].resolve_block_size(None) == 128
    assert FORMATS["int4"].resolve_block_size(32) == 32
    assert FORMATS["int8"].resolve_block_size(None) is None
    assert FORMATS["nvfp4"].resolve_block_size(16) == 16
    with pytest.raises(ValueError, match="nvfp4 is defined with blocks of 16"):
        FORMATS["nvfp4"].resolve_block_size(32)
    with pytest.raises(ValueError, match="positive int"):
        FORMATS["int4"].resolve_block_size(0)


def test_invalid_rows_are_refused():
    with pytest.raises(ValueError, match="need a block size"):
        QuantFormat("bad", E2M1, ScaleKind.E8M0)
    with pytest.raises(ValueError, match="need a scale_rule"):
        QuantFormat("bad", E2M1, ScaleKind.E8M0, block_size=32)
    with pytest.raises(ValueError, match="need a scale_rule"):
        QuantFormat("bad", INT8, ScaleKind.FP32, scale_rule=ScaleRule.CEIL)
    with pytest.raises(ValueError, match="block_size must be positive"):
        QuantFormat("bad", INT8, ScaleKind.FP32, block_size=0)
    with pytest.raises(ValueError, match="straddle zero"):
        ElementType("bad", ElementKind.INT, 4, max_value=7.0, min_value=0.0)


def test_storage_bits_count_the_block_scales():
    from qcompile.core.formats import get_format

    expected = {"nvfp4": 4 + 8 / 16, "mxfp4": 4 + 8 / 32, "mxfp8": 8 + 8 / 32,
                "int4": 4 + 32 / 128, "fp8": 8, "int8": 8}
    for name, bits in expected.items():
        assert float(get_format(name).storage_bits()) == bits, name
    assert float(get_format("int4").storage_bits(32)) == 5.0
