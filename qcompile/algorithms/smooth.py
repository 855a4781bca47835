"""`qcompile.algorithms.smooth`: SmoothQuant, moving activation outliers into the weights.

A Linear computes x @ W.T; for any positive per-input-channel vector s it equals
(x / s) @ (W * s).T. Activations with a few outlier channels (~20x the median channel, as in
BERT-style FFN down-projections) make a per-tensor int8 activation scale coarse for every
other channel; dividing those channels by s and multiplying the matching weight columns by s
(the weight is quantized per output channel, which absorbs it far better) evens the two out.
With s_j = amax_j(x) ** alpha / amax_j(W) ** (1 - alpha) (Xiao et al., 2023); one alpha does
not suit every layer (on all-MiniLM-L6-v2 int8, alpha = 0.5 for all sites is worse than no
smoothing), so by default each site picks its own alpha, or none, by the error of its
quantized product on a sample of the calibration rows.

This module owns the statistics and the choice of s; the quantizers apply it (`pre_scale`:
the input quantizer multiplies by 1/s, the weight quantizer by s), so the prepared model keeps
its graph and the ONNX export writes 1/s as a `Mul` in front of the activation's Q/DQ and
folds s into the stored weight. It knows nothing of formats or ONNX.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from qcompile.algorithms.data import (
    CalibrationData,
    CalibrationWarning,
    all_reduce,
    check_data_reached,
    eval_mode,
    is_distributed,
    run_data,
)
from qcompile.algorithms.observers import MaxObserver
from qcompile.core.fake_quant import fake_quantize
from qcompile.core.quantizer import Quantizer
from qcompile.passes.sites import Site, SiteKind, SiteStatus, model_sites

#: Rows of each site's input kept for the alpha search (spread over the batches).
SAMPLE_ROWS = 1024
ROWS_PER_BATCH = 256
#: The alphas "auto" tries per site, besides leaving the site unsmoothed.
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class _Pair:
    """One Linear site's input and weight quantizers, and the channel maxima they saw."""

    site: str
    input: Quantizer
    weight: Quantizer
    input_amax: torch.Tensor | None = None
    weight_amax: torch.Tensor | None = None
    weight_value: torch.Tensor | None = None
    input_rows: list[torch.Tensor] = field(default_factory=list)

    def record_input(self, x: torch.Tensor) -> None:
        amax = _channel_amax(x)
        self.input_amax = amax if self.input_amax is None else torch.maximum(self.input_amax, amax)
        kept = sum(len(r) for r in self.input_rows)
        if kept < SAMPLE_ROWS:
            rows = x.detach().float().reshape(-1, x.shape[-1])
            step = max(1, len(rows) // ROWS_PER_BATCH)
            self.input_rows.append(rows[::step][: SAMPLE_ROWS - kept].clone())

    def record_weight(self, w: torch.Tensor) -> None:
        self.weight_value = w.detach()
        self.weight_amax = _channel_amax(w)


def _smoothable(model: nn.Module) -> list[_Pair]:
    sites: list[Site] | None = model_sites(model)
    if sites is None:
        raise ValueError(
            "smooth needs a model prepared by qcompile.prepare (it reads the model's sites)"
        )
    pairs = []
    for site in sites:
        roles = site.quantizers
        if site.kind is not SiteKind.LINEAR or site.status is not SiteStatus.QUANTIZED:
            continue
        if "input" not in roles or "weight" not in roles:
            continue
        if site.reduction_axes.get("input", -1) != -1 or site.reduction_axes.get("weight", -1) != -1:
            continue
        quantizers = [model.get_submodule(roles[r]) for r in ("input", "weight")]
        if all(q.enabled for q in quantizers):
            pairs.append(_Pair(site.name, *quantizers))
    return pairs


def _channel_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| per channel of the last axis, in fp32."""
    return x.detach().abs().float().reshape(-1, x.shape[-1]).amax(dim=0)


@contextmanager
def _observing(model: nn.Module, pairs: list[_Pair]) -> Iterator[None]:
    """Pre-hooks that record the channel maxima of what each quantizer receives (before
    any pre_scale: smoothing twice replaces the first smoothing), with every quantizer of
    `model` disabled: the statistics are those of the float model."""
    handles = []
    for pair in pairs:
        handles.append(pair.input.register_forward_pre_hook(
            lambda _, args, pair=pair: pair.record_input(args[0])))
        handles.append(pair.weight.register_forward_pre_hook(
            lambda _, args, pair=pair: pair.record_weight(args[0])))
    disabled = [m for m in model.modules() if isinstance(m, Quantizer) and m.enabled]
    for quantizer in disabled:
        quantizer.enabled = False
    try:
        yield
    finally:
        for quantizer in disabled:
            quantizer.enabled = True
        for handle in handles:
            handle.remove()


def smoothing_scale(input_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = amax_j(x) ** alpha / amax_j(W) ** (1 - alpha); 1 where either is 0 or not finite."""
    s = input_amax.pow(alpha) / weight_amax.pow(1 - alpha)
    usable = (input_amax > 0) & (weight_amax > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(usable, s, torch.ones_like(s))


def _quantized(quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """x fake-quantized by `quantizer`'s spec; a static amax is the max of x (as `max`
    calibration would set it)."""
    spec = quantizer.spec
    amax = None
    if not spec.dynamic:
        observer = MaxObserver(spec)
        observer.observe(x)
        amax = observer.compute_amax()
    return fake_quantize(x, spec.format, amax=amax, axis=spec.axis, block_size=spec.block_size)


def product_errors(pair: _Pair, scales: list[torch.Tensor | None]) -> list[float]:
    """Squared error of the site's quantized product on the sampled rows, smoothed by each
    of `scales` (None: unsmoothed), against the float product (computed once)."""
    x = torch.cat(pair.input_rows)
    w = pair.weight_value.float()
    reference = x @ w.T
    errors = []
    for scale in scales:
        xs, ws = (x, w) if scale is None else (x / scale, w * scale)
        out = _quantized(pair.input, xs) @ _quantized(pair.weight, ws).T
        errors.append(float((out - reference).square().sum()))
    return errors


def choose_scale(pair: _Pair, alpha: float | str) -> torch.Tensor | None:
    """The smoothing scale of one site: for a number, that alpha; for "auto", the candidate
    (no smoothing, or an alpha of ALPHA_GRID) whose quantized product errs least."""
    if alpha != "auto":
        return smoothing_scale(pair.input_amax, pair.weight_amax, alpha)
    candidates = [None] + [smoothing_scale(pair.input_amax, pair.weight_amax, a) for a in ALPHA_GRID]
    with torch.no_grad():
        errors = torch.tensor(product_errors(pair, candidates), dtype=torch.float64)
    if is_distributed():  # every rank picks the same candidate: errors over all ranks' rows
        errors = all_reduce(errors, "sum")
    return candidates[int(errors.argmin())]


def _merge_across_ranks(pairs: list[_Pair]) -> None:
    """Channel maxima over all ranks, so that every rank installs the same scales."""
    seen = torch.tensor([float(p.input_amax is not None) for p in pairs])
    if not torch.equal(all_reduce(seen, "max"), seen) or not torch.equal(
        -all_reduce(-seen, "max"), seen
    ):
        raise ValueError(
            "in a distributed run every rank must feed smoothing data that reaches the same "
            "Linear sites; give each rank at least one batch"
        )
    for pair in pairs:
        if pair.input_amax is not None:
            pair.input_amax = all_reduce(pair.input_amax, "max")


def smooth(
    model: nn.Module,
    data: CalibrationData,
    alpha: float | str = "auto",
    *,
    num_batches: int | None = None,
    progress: bool = True,
) -> list[str]:
    """SmoothQuant every quantized Linear site of a prepared `model`; run before `calibrate`.

    Args:
        model: a model prepared by `qcompile.prepare`.
        data: calibration data, as for `qcompile.calibrate`.
        alpha: migration strength in [0, 1] (1 moves all of the activations' range into the
            weights), or "auto": per site, no smoothing or the alpha of `ALPHA_GRID` whose
            quantized product (x/s)(W*s) is closest to the float x W on sampled rows.
        num_batches, progress: as for `qcompile.calibrate`.

    Sets `pre_scale` on each smoothed site's input (1/s) and weight (s) quantizer. The float function
    of the model does not change. A static activation amax calibrated before is no longer
    valid and is cleared (a warning says so): calibrate afterwards. Returns the smoothed
    site names. On error nothing changes. In a distributed run every rank computes the same
    scales (channel maxima merged with MAX, each candidate's error summed over the ranks).
    """
    if alpha != "auto" and (
        isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1
    ):
        raise ValueError(f"alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
    pairs = _smoothable(model)
    if not pairs:
        raise ValueError(
            "the model has no quantized Linear site with both an input and a weight quantizer "
            "to smooth; check qcompile.report(model)"
        )
    with eval_mode(model), _observing(model, pairs):
        run_data(model, data, num_batches, progress)
    if is_distributed():
        _merge_across_ranks(pairs)
    unseen = [pair.site for pair in pairs if pair.input_amax is None or pair.weight_amax is None]
    check_data_reached(
        unseen, len(pairs),
        empty="smoothing data is empty: no batch reached the Linear sites",
        partial="Linear sites saw no data and stay unsmoothed: {names}",
    )
    seen = [pair for pair in pairs if pair.site not in unseen]
    scales = [choose_scale(pair, alpha) for pair in seen]
    cleared = []
    for pair, s in zip(seen, scales):
        if s is None and pair.input.pre_scale is None:
            continue  # unsmoothed before and after
        pair.input.set_pre_scale(None if s is None else 1 / s)
        pair.weight.set_pre_scale(s)
        for quantizer in (pair.input, pair.weight):
            if quantizer.calibrated:
                quantizer.reset_amax()
                cleared.append(pair.site)
    if cleared:
        warnings.warn(
            f"smoothing cleared the calibrated amax of {len(cleared)} sites (their inputs "
            "changed); run qcompile.calibrate(model, data) again",
            CalibrationWarning,
            stacklevel=2,
        )
    return [pair.site for pair, s in zip(seen, scales) if s is not None]
