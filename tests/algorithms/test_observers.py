"""Observers against hand-computed references: torch amax for `max`, numpy.percentile for
`percentile`, the fake-quantization error of the max amax for `mse`, the data max for
`entropy`."""

import math

import numpy as np
import pytest
import torch

from qcompile.algorithms.observers import (
    OBSERVERS,
    EntropyObserver,
    MagnitudeHistogram,
    MaxObserver,
    MseObserver,
    PercentileObserver,
    check_percentile,
    get_observer_class,
)
from qcompile.core.fake_quant import fake_quantize
from qcompile.core.quantizer import QuantSpec

INT8 = QuantSpec("int8")


def gaussian(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def observed(observer, *batches):
    for x in batches:
        observer.observe(x)
    return observer.compute_amax()


# --- max ---------------------------------------------------------------------------------


def test_max_per_tensor_is_running_abs_max():
    amax = observed(MaxObserver(INT8), torch.tensor([1.0, -3.0]), torch.tensor([[2.5, -0.5]]))
    assert amax.shape == () and amax.item() == 3.0


def test_max_per_channel_follows_axis():
    x = torch.tensor([[1.0, -4.0, 0.5], [-2.0, 3.0, 0.25]])
    rows = observed(MaxObserver(QuantSpec("int8", axis=0)), x)
    assert torch.equal(rows, torch.tensor([4.0, 3.0]))
    columns = observed(MaxObserver(QuantSpec("int8", axis=-1)), x, -2 * x)
    assert torch.equal(columns, torch.tensor([4.0, 8.0, 1.0]))


def test_max_per_block_for_int4():
    x = torch.arange(16.0).reshape(2, 8) - 8  # blocks of 4 along the last axis
    amax = observed(MaxObserver(QuantSpec("int4", block_size=4)), x)
    assert torch.equal(amax, torch.tensor([[8.0, 4.0], [3.0, 7.0]]))


def test_nvfp4_static_amax_is_global():
    x = gaussian(64).reshape(2, 32)
    assert observed(MaxObserver(QuantSpec("nvfp4")), x).item() == x.abs().max().item()


def test_max_rejects_a_batch_of_another_channel_count():
    observer = MaxObserver(QuantSpec("int8", axis=-1), name="fc1 (input)")
    observer.observe(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"fc1 \(input\).*batches of one shape"):
        observer.observe(torch.ones(2, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_float32_amax(dtype):
    x = gaussian(100).to(dtype)
    amax = observed(MaxObserver(INT8), x)
    assert amax.dtype == torch.float32 and amax.item() == x.float().abs().max().item()


# --- checks shared by every observer -------------------------------------------------------


@pytest.mark.parametrize("method", list(OBSERVERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_the_site(method, bad):
    observer = get_observer_class(method)(INT8, name="encoder.q (input)")
    with pytest.raises(ValueError, match=r"encoder\.q \(input\).*clean the calibration data"):
        observer.observe(torch.tensor([1.0, bad]))


@pytest.mark.parametrize("method", list(OBSERVERS))
def test_empty_batches_are_skipped(method):
    observer = get_observer_class(method)(INT8, name="fc1 (input)")
    observer.observe(torch.empty(0, 8))
    assert observer.num_batches == 0
    with pytest.raises(RuntimeError, match=r"fc1 \(input\) observed no data"):
        observer.compute_amax()
    observer.observe(torch.tensor([0.5, -2.0]))
    assert 0 < observer.compute_amax().item() <= 2.0 * 1.01


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid methods: max, percentile, mse, entropy"):
        get_observer_class("minmax")


# --- percentile ----------------------------------------------------------------------------


def test_histogram_grows_by_exact_bin_merges():
    histogram = MagnitudeHistogram(bins=8)
    histogram.add(torch.zeros(3))
    histogram.add(torch.tensor([1.0, 0.1]))
    histogram.add(torch.tensor([3.0]))  # range 1 -> 4: bins merge in groups of four
    assert histogram.counts.sum().item() == 6
    assert histogram.counts[0].item() == 4 and histogram.counts[1:].sum().item() == 2
    assert 3.0 < histogram.range < 6.0


def test_histogram_bins_do_not_depend_on_the_order_of_the_data():
    # Power-of-two ranges: what ranks see separately merges exactly (qcompile.algorithms.data).
    batches = [gaussian(500, seed, scale) for seed, scale in enumerate([0.3, 7.0, 1.5])]
    forward, backward = MagnitudeHistogram(), MagnitudeHistogram()
    for batch in batches:
        forward.add(batch.abs())
    for batch in reversed(batches):
        backward.add(batch.abs())
    top = max(batch.abs().max().item() for batch in batches)
    assert forward.range == backward.range and top < forward.range <= 2 * top
    assert math.log2(forward.range).is_integer()
    assert torch.equal(forward.counts, backward.counts)


def test_percentile_matches_numpy_within_one_bin():
    batches = [torch.zeros(100)] + [gaussian(4000, seed, scale) for seed, scale in
                                    enumerate([0.1, 1.0, 5.0, 2.0])]
    for percentile in (50.0, 99.0, 99.99):
        observer = PercentileObserver(INT8, percentile=percentile)
        amax = observed(observer, *batches).item()
        data = torch.cat(batches).abs().numpy()
        reference = np.percentile(data, percentile, method="inverted_cdf")
        assert abs(amax - reference) <= observer.histogram.bin_width


def test_percentile_100_is_the_max_within_one_bin():
    observer = PercentileObserver(INT8, percentile=100)
    assert observed(observer, gaussian(1000)).item() == pytest.approx(
        gaussian(1000).abs().max().item(), abs=observer.histogram.bin_width
    )


@pytest.mark.parametrize("bad", [0, -1, 100.5, float("nan")])
def test_percentile_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        check_percentile(bad)
    with pytest.raises(TypeError):
        check_percentile(True)


def test_percentile_rejects_per_channel_specs():
    with pytest.raises(ValueError, match="per-channel int8 amax; use method='max' or 'mse'"):
        PercentileObserver(QuantSpec("int8", axis=0), name="fc1 (weight)")


# --- mse ----------------------------------------------------------------------------------


def squared_error(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor) -> float:
    y = fake_quantize(x, spec.format, amax=amax, axis=spec.axis, block_size=spec.block_size)
    return (y - x).square().sum().item()


def test_mse_clips_an_outlier_and_beats_max():
    # One outlier M among n = 40000 values: clipping it to c costs (M - c)^2, rounding costs
    # n * (c / 127)^2 / 12; the optimum is c = M / (1 + n / (12 * 127^2)) = 0.83 M.
    x = gaussian(40_000)
    x[0] = 10.0
    amax = observed(MseObserver(INT8), x[:20_000], x[20_000:])
    assert 0.75 * 10.0 < amax.item() < 0.9 * 10.0
    assert squared_error(x, INT8, amax) <= squared_error(x, INT8, torch.tensor(10.0))


def test_mse_keeps_the_max_without_outliers():
    x = torch.linspace(-1, 1, 255)  # exactly the int8 grid of amax 1 (127 steps each side)
    assert observed(MseObserver(INT8), x).item() == 1.0


def test_mse_picks_one_amax_per_channel():
    spec = QuantSpec("int8", axis=0)
    x = torch.stack([gaussian(30_000, 1), gaussian(30_000, 2)])
    x[1, 0] = 10.0  # clipped to about 10 / (1 + 30000 / (12 * 127^2)) = 8.7
    amax = observed(MseObserver(spec), x)
    channel_max = x.abs().amax(dim=1)
    assert amax.shape == (2,) and bool((amax <= channel_max).all()) and amax[1] < 0.95 * 10
    assert squared_error(x, spec, amax) <= squared_error(x, spec, channel_max)


def test_mse_handles_nvfp4_global_amax():
    x = gaussian(512).reshape(4, 128)
    amax = observed(MseObserver(QuantSpec("nvfp4")), x)
    assert amax.shape == () and 0.3 * x.abs().max() <= amax <= x.abs().max()


# --- entropy ------------------------------------------------------------------------------


def test_entropy_threshold_lies_below_outliers():
    x = gaussian(50_000)
    x[:5] = 30.0
    amax = observed(EntropyObserver(INT8), x).item()
    assert 2.0 < amax < 0.5 * 30.0


def test_entropy_of_zeros_is_zero():
    assert observed(EntropyObserver(INT8), torch.zeros(10)).item() == 0.0


@pytest.mark.parametrize("spec", [QuantSpec("fp8"), QuantSpec("int8", axis=0)])
def test_entropy_rejects_what_it_does_not_define(spec):
    with pytest.raises(ValueError, match="use method='max'"):
        EntropyObserver(spec, name="fc1 (input)")
