"""Calibration methods: observers that turn the tensors a quantizer sees into a static amax.

This module owns the statistics of calibration, one small class per method (`max`,
`percentile`, `mse`, `entropy`), all registered in `OBSERVERS`. Every observer honours its
quantizer's `QuantSpec`: the amax it returns is 0-d per tensor (also the *global* amax of
nvfp4), `(C,)` per channel along `spec.axis`, or `x.shape[:-1] + (K // block_size,)` per block
for FP32-scaled block formats (int4). It knows nothing of graphs, models or data loaders;
`qcompile.algorithms.calibrate` attaches observers to quantizers and installs what they compute. In a
data-parallel run each observer also says how its statistics combine across ranks (`merge`,
through a `Reduce` that `qcompile.algorithms.data` supplies); it never calls torch.distributed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal, Protocol

import torch

from qcompile.core.fake_quant import fake_quantize
from qcompile.core.formats import get_format
from qcompile.core.quantizer import Granularity, QuantSpec


def reduce_per_amax(
    values: torch.Tensor, spec: QuantSpec, reduce: Literal["amax", "sum"]
) -> torch.Tensor:
    """Reduce elementwise `values` (shape of the quantized tensor) to the shape of its amax."""
    kind = spec.granularity
    if kind is Granularity.TENSOR:
        return getattr(values, reduce)()
    if kind is Granularity.CHANNEL:
        if not -values.ndim <= spec.axis < values.ndim:
            raise ValueError(f"axis={spec.axis} is out of range for a {values.ndim}-d tensor")
        axis = spec.axis % values.ndim
        dims = [d for d in range(values.ndim) if d != axis]
        return getattr(values, reduce)(dim=dims) if dims else values
    block_size = get_format(spec.format).resolve_block_size(spec.block_size)
    if values.ndim == 0 or values.shape[-1] % block_size:
        raise ValueError(
            f"{spec.format} blocks of {block_size} need the last axis to be a multiple of "
            f"{block_size}, got shape {tuple(values.shape)}"
        )
    blocks = values.unflatten(-1, (values.shape[-1] // block_size, block_size))
    return getattr(blocks, reduce)(dim=-1)


class Reduce(Protocol):
    """Combines a tensor with its counterparts on every rank ("max" or "sum") and returns the
    result. Every rank calls it in the same order with tensors of the same shape and dtype."""

    def __call__(self, x: torch.Tensor, op: Literal["max", "sum"]) -> torch.Tensor: ...


class AmaxObserver(ABC):
    """Base class: checks each tensor, skips empty ones, and hands the rest to `_update`.

    `name` names the quantizer's site in error messages. Subclasses implement `_update(x)`
    (x finite, non-empty, in its own dtype) and `_compute()`.
    """

    def __init__(self, spec: QuantSpec, name: str = "quantizer") -> None:
        self.spec = spec
        self.name = name
        self.num_batches = 0

    def observe(self, x: torch.Tensor) -> None:
        """Record x's statistics; an empty x is skipped, NaN or inf raise a ValueError."""
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "inf"
            raise ValueError(
                f"calibration input of {self.name} contains {bad}; clean the calibration data "
                "or check the model for overflow (e.g. an fp16 activation past 65504) before "
                "calibrating"
            )
        self._update(x)
        self.num_batches += 1

    def compute_amax(self) -> torch.Tensor:
        """The calibrated amax (float32, shaped per `spec.granularity`)."""
        if self.num_batches == 0:
            raise RuntimeError(f"{self.name} observed no data; run calibration data through it")
        return self._compute().float()

    @property
    def amax_shape(self) -> tuple[int, ...] | None:
        """The shape of the amax this observer computes; None before it has seen data."""
        return None if self.num_batches == 0 else ()

    def merge(self, reduce: Reduce, num_batches: int, amax_shape: tuple[int, ...]) -> None:
        """Combine these statistics with those of the other ranks, in place.

        Afterwards `compute_amax` gives the amax of all ranks' data (and runs the collectives
        it still needs). Every rank calls it, also one that saw no data, with the totals agreed
        beforehand: `num_batches` over all ranks and the common `amax_shape`.
        """
        self._merge(reduce, amax_shape)
        self.num_batches = num_batches

    @abstractmethod
    def _update(self, x: torch.Tensor) -> None: ...

    @abstractmethod
    def _compute(self) -> torch.Tensor: ...

    @abstractmethod
    def _merge(self, reduce: Reduce, amax_shape: tuple[int, ...]) -> None: ...

    def _require_per_tensor(self, method: str, instead: str) -> None:
        if self.spec.granularity is not Granularity.TENSOR:
            raise ValueError(
                f"{method} calibration computes one amax per tensor, but {self.name} uses a "
                f"per-{self.spec.granularity.value} {self.spec.format} amax; use {instead}"
            )


class MaxObserver(AmaxObserver):
    """`max`: the running max of |x| per tensor, channel or block (exact)."""

    def __init__(self, spec: QuantSpec, name: str = "quantizer") -> None:
        super().__init__(spec, name)
        self.amax: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        batch_amax = reduce_per_amax(x.detach().float().abs(), self.spec, "amax")
        if self.amax is None:
            self.amax = batch_amax
            return
        if batch_amax.shape != self.amax.shape:
            raise ValueError(
                f"{self.name}: a per-{self.spec.granularity.value} amax of shape "
                f"{tuple(self.amax.shape)} cannot take a batch giving shape "
                f"{tuple(batch_amax.shape)}; calibrate per-channel/per-block quantizers with "
                "batches of one shape"
            )
        self.amax = torch.maximum(self.amax, batch_amax)

    @property
    def amax_shape(self) -> tuple[int, ...] | None:
        return None if self.amax is None else tuple(self.amax.shape)

    def _compute(self) -> torch.Tensor:
        return self.amax

    def _merge(self, reduce: Reduce, amax_shape: tuple[int, ...]) -> None:
        # The union's max is the max of the ranks' maxima; zeros stand in for no data.
        local = torch.zeros(amax_shape) if self.amax is None else self.amax
        self.amax = reduce(local, "max")


class MagnitudeHistogram:
    """A histogram of |x| over [0, range) whose range is a power of two, doubled as larger
    values arrive.

    Doubling the range merges pairs of bins exactly, so counts are never redistributed
    approximately; the price is resolution: the final bin width is `range / bins` with
    `max|x| < range <= 2 * max|x|`. Because the range is a power of two, the bin of a value
    depends only on the final range, not on the order in which the data came: histograms of
    the same data split any way (across batches or ranks) merge exactly (`merge`). The counts
    live on the CPU; the binning runs on the data's device.
    """

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.range = 0.0

    @property
    def bin_width(self) -> float:
        return self.range / self.bins

    def add(self, magnitude: torch.Tensor) -> None:
        magnitude = magnitude.detach().flatten().float()
        top = magnitude.max().item()
        if top >= self.range and top > 0:
            self._grow_to(math.ldexp(1.0, math.frexp(top)[1]))  # the power of two above top
        if self.range == 0:  # only zeros so far: they fall in bin 0 of any later range
            self.counts[0] += magnitude.numel()
            return
        index = (magnitude / self.bin_width).long().clamp(max=self.bins - 1)
        self.counts += torch.bincount(index, minlength=self.bins).cpu().double()

    def merge(self, reduce: Reduce) -> None:
        """Become the histogram of every rank's data: the largest range, the summed counts."""
        top = reduce(torch.tensor(self.range, dtype=torch.float64), "max").item()
        if top > self.range:
            self._grow_to(top)
        self.counts = reduce(self.counts, "sum")

    def _grow_to(self, new_range: float) -> None:
        """Widen the range to `new_range` (a power of two): groups of bins merge exactly."""
        if self.range == 0:  # only zeros so far (bin 0 of any range)
            self.range = new_range
            return
        factor = round(new_range / self.range)
        self.range = new_range
        target = torch.arange(self.bins) // min(factor, self.bins)
        self.counts = torch.zeros_like(self.counts).index_add_(0, target, self.counts)


def check_percentile(percentile: float) -> float:
    """Validate a percentile in (0, 100]; the error says what to pass instead."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
        raise TypeError(f"percentile must be a number such as 99.99, got {percentile!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], such as 99.99; got {percentile!r}")
    return float(percentile)


class HistogramObserver(AmaxObserver):
    """An observer whose statistics are a `MagnitudeHistogram` of |x|, per tensor (its
    subclasses choose the amax from the histogram in `_compute`)."""

    def __init__(self, spec: QuantSpec, name: str, method: str) -> None:
        super().__init__(spec, name)
        self._require_per_tensor(method, "method='max' or 'mse'")
        self.histogram = MagnitudeHistogram()

    def _update(self, x: torch.Tensor) -> None:
        self.histogram.add(x.float().abs())

    def _merge(self, reduce: Reduce, amax_shape: tuple[int, ...]) -> None:
        self.histogram.merge(reduce)


class PercentileObserver(HistogramObserver):
    """`percentile`: the given percentile of |x| over all batches, per tensor.

    Approximation: |x| is accumulated in a `MagnitudeHistogram` of 2048 bins and the percentile
    is interpolated linearly inside the bin where the cumulative count crosses it. That bin
    holds the exact percentile as the inverse of the empirical CDF (numpy's
    `percentile(..., method="inverted_cdf")`), so the result is within one bin width
    (`< 2 * max|x| / 2048`, about 0.1% of the max) of it. Where the tail is sparse, numpy's
    default (linear between order statistics) may differ by more: by the gap between two
    neighbouring order statistics.
    """

    def __init__(
        self, spec: QuantSpec, name: str = "quantizer", percentile: float = 99.99
    ) -> None:
        self.percentile = check_percentile(percentile)
        super().__init__(spec, name, "percentile")

    def _compute(self) -> torch.Tensor:
        counts = self.histogram.counts
        cumulative = counts.cumsum(0)
        target = cumulative[-1] * self.percentile / 100
        index = int(torch.searchsorted(cumulative, target).clamp(max=len(counts) - 1))
        below = cumulative[index - 1].item() if index > 0 else 0.0
        fraction = (target.item() - below) / counts[index].item() if counts[index] > 0 else 1.0
        return torch.tensor((index + fraction) * self.histogram.bin_width)


class MseObserver(MaxObserver):
    """`mse`: the amax in `max * MSE_RATIOS` minimising the fake-quantization squared error.

    Each tensor, channel or block picks its own ratio (ties go to the larger amax). The error
    is summed over a bounded sample: the batches observed until `sample_elements` elements are
    kept; later batches still raise the running max that the candidates scale. Across ranks the
    running max is the max over all ranks and each candidate's error is summed over the ranks'
    samples, so every rank picks the same amax.
    """

    MSE_RATIOS = torch.linspace(1.0, 0.3, 36)  # steps of 0.02, largest first

    def __init__(
        self, spec: QuantSpec, name: str = "quantizer", sample_elements: int = 1 << 22
    ) -> None:
        super().__init__(spec, name)
        self.sample: list[torch.Tensor] = []
        self.sample_elements = sample_elements
        self._kept = 0
        self._reduce: Reduce | None = None

    def _update(self, x: torch.Tensor) -> None:
        super()._update(x)
        if self._kept < self.sample_elements:
            self.sample.append(x.detach().clone())
            self._kept += x.numel()

    def _compute(self) -> torch.Tensor:
        amax = super()._compute()
        errors = torch.stack([self._error(amax * ratio) for ratio in self.MSE_RATIOS])
        if self._reduce is not None:
            errors = self._reduce(errors, "sum")
        best = errors.argmin(dim=0)
        return amax * self.MSE_RATIOS.to(amax.device)[best]

    def _error(self, amax: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        total = torch.zeros_like(amax)
        for x in self.sample:
            y = fake_quantize(x, spec.format, amax=amax, axis=spec.axis, block_size=spec.block_size)
            total += reduce_per_amax((y.float() - x.float()).square(), spec, "sum")
        return total

    def _merge(self, reduce: Reduce, amax_shape: tuple[int, ...]) -> None:
        super()._merge(reduce, amax_shape)
        self._reduce = reduce  # the candidates' errors are summed over ranks in _compute


class EntropyObserver(HistogramObserver):
    """`entropy`: TensorRT's KL-divergence calibration, for int8 per-tensor amax only.

    |x| goes into a 2048-bin `MagnitudeHistogram`. For every threshold of i bins
    (i = 128 ... 2048) the reference distribution P is the first i bins with the clipped tail
    added to the last one; Q merges those bins into 128 int8 levels and spreads each level's
    count evenly over its non-empty bins. The amax is the threshold `i * bin_width` with the
    smallest KL(P || Q), where i runs up to the bin holding max|x| (the histogram's range may
    reach twice that).
    """

    LEVELS = 128
    _CHUNK = 256  # thresholds evaluated at once (bounds memory to CHUNK x 2048 doubles)

    def __init__(self, spec: QuantSpec, name: str = "quantizer") -> None:
        if spec.format != "int8":
            raise ValueError(
                f"entropy (KL) calibration is defined for int8; {name} is "
                f"{spec.format}; use method='max', 'percentile' or 'mse'"
            )
        super().__init__(spec, name, "entropy")

    def _compute(self) -> torch.Tensor:
        counts = self.histogram.counts
        if self.histogram.range == 0:
            return torch.tensor(0.0)
        top = int(counts.nonzero().max()) + 1  # bins up to the one holding max|x|
        thresholds = torch.arange(self.LEVELS, max(top, self.LEVELS) + 1)
        divergence = torch.cat(
            [self._kl(counts, chunk) for chunk in thresholds.split(self._CHUNK)]
        )
        best = thresholds[divergence.argmin()].item()
        return torch.tensor(best * self.histogram.bin_width)

    def _kl(self, counts: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """KL(P || Q) for each threshold (number of bins kept), one row per threshold."""
        rows = torch.arange(len(thresholds))
        bins = torch.arange(len(counts))
        kept = bins[None, :] < thresholds[:, None]
        p = torch.where(kept, counts, 0.0)
        p[rows, thresholds - 1] += counts.sum() - counts.cumsum(0)[thresholds - 1]  # the tail
        occupied = (kept & (counts > 0)).double()
        level = (bins[None, :] * self.LEVELS // thresholds[:, None]).clamp(max=self.LEVELS - 1)
        level = (level + rows[:, None] * self.LEVELS).flatten()
        level_count = torch.zeros(len(thresholds) * self.LEVELS, dtype=counts.dtype)
        level_bins = torch.zeros_like(level_count)
        level_count.index_add_(0, level, (occupied * counts).flatten())
        level_bins.index_add_(0, level, occupied.flatten())
        q = occupied * (level_count / level_bins.clamp(min=1))[level].view_as(occupied)
        p = p / p.sum(dim=1, keepdim=True)
        q = q / q.sum(dim=1, keepdim=True).clamp(min=1e-300)
        terms = torch.where(p > 0, p * (p / q).log(), 0.0)  # p > 0 where q == 0 gives inf
        return terms.sum(dim=1)


OBSERVERS: dict[str, type[AmaxObserver]] = {
    "max": MaxObserver,
    "percentile": PercentileObserver,
    "mse": MseObserver,
    "entropy": EntropyObserver,
}


def get_observer_class(method: str) -> type[AmaxObserver]:
    """Look a calibration method up by name; an unknown name lists the valid ones."""
    try:
        return OBSERVERS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown calibration method {method!r}; valid methods: {', '.join(OBSERVERS)}"
        ) from None
