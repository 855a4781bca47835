"""`qcompile.algorithms.calibrate`: post-training calibration of the static amax of a prepared model.

This module owns the calibration run: finding the quantizers that need a static amax,
attaching an observer to each, running the data through the model in eval mode without
gradients, and installing the amax each observer computes, or, on any error, leaving the
model as it was. The statistics live in `qcompile.algorithms.observers`, and their merging across the
ranks of a distributed run in `qcompile.algorithms.data`; this module knows nothing of formats
beyond `QuantSpec.needs_calibration`. Messages that are information, not errors, go
through `warnings` as `CalibrationWarning`. Where the recipe ties fused layers (`Recipe.tie_fused`:
q/k/v, gate/up), their per-tensor ranges are tied here: one amax, the max over the group.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from qcompile.algorithms.weight_scales import (
    AUTO,
    recorded_weights,
    search_targets,
    search_weight_scales,
    store_searched_scales,
)
from qcompile.algorithms.data import (
    CalibrationData,
    CalibrationWarning,
    check_data_reached,
    eval_mode,
    is_main_process,
    merged_across_ranks,
    parallel_wrapper,
    run_data,
)
from qcompile.algorithms.observers import (
    AmaxObserver,
    MaxObserver,
    check_percentile,
    get_observer_class,
)
from qcompile.core.quantizer import Granularity, Quantizer
from qcompile.passes.sites import SiteKind, SiteQuantizer, model_sites, site_quantizers
from qcompile.recipe import fused_group


@contextmanager
def _attached(observers: dict[Quantizer, AmaxObserver]) -> Iterator[None]:
    """Observers attached for the duration; removed afterwards, also on error."""
    for quantizer, observer in observers.items():
        quantizer.observer = observer
    try:
        yield
    finally:
        for quantizer in observers:
            quantizer.observer = None


def _check_num_batches(num_batches: int | None) -> None:
    if num_batches is None:
        return
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0:
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")


def calibrate(
    model: nn.Module,
    data: CalibrationData,
    method: str = "max",
    *,
    percentile: float | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    weight_scales: str | None = AUTO,
) -> nn.Module:
    """Calibrate the static amax of every enabled quantizer of `model` that needs one.

    Args:
        model: a prepared model (or any module holding `Quantizer` submodules).
        data: an iterable of batches (a dict is passed as keyword arguments, a tuple or list
            as positional arguments, anything else as the only argument), or a forward loop
            `data(model)` that runs the model itself.
        method: "max", "percentile", "mse" or "entropy" (see `qcompile.algorithms.observers`).
        percentile: for method="percentile", in (0, 100]; default 99.99.
        num_batches: stop after this many batches of an iterable (per rank).
        progress: show a tqdm progress bar (on rank 0 only).
        weight_scales: how weight scales are chosen. "auto" (default): NVFP4 weights get
            the "mse" search (measured: MiniLM's loss lower after PTQ, GPTQ and QAD)
            unless they already store scales (GPTQ's, a checkpoint's, an earlier search's:
            calibrating again keeps them), every other format derives its scales from the
            weights themselves. None: no search. Or one search for every weight format
            (`qcompile.algorithms.weight_scales.search_weight_scales`): "mse" (clipping ratio
            per block/channel/tensor, and NVFP4/MXFP4 blocks' max mapped to 4 or 6), "output"
            (the same, errors weighed by the inputs' mean square per column) or
            "four_over_six" (NVFP4/MXFP4 only). Searched scales are stored in the weight
            quantizers (`Quantizer.scale_amax`), exported and checkpointed exactly, and stay
            fixed while the weights train (`search_weight_scales(model, data, "mse")`
            refits them after training; not after GPTQ, which rounded onto them).
            Measured in bench/RESULTS.md (#25).

    Runs in eval mode under `torch.no_grad()` and restores every module's train/eval mode.
    On error no amax changes and no observer stays attached. Returns `model`.

    Distributed (a `torch.distributed` process group of more than one rank is initialized):
    call it on every rank, each with its own share of the data, before wrapping the model in
    DDP/FSDP. The statistics are merged across ranks before the amax is computed, so every
    rank installs the same amax, the one a single process would compute on all ranks' data:
    exactly for max, percentile and entropy (the max, and histograms that merge exactly), and
    for mse the max over ranks with each candidate's error summed over the ranks' samples.
    If calibration fails on one rank, every rank raises.

    MoE experts (sites with an `expert` index) are calibrated each on the tokens routed to
    it. An expert that received none gets the max amax of its layer's other experts for
    its activations (its weight scales come from its own weights) and a `CalibrationWarning`.
    """
    observer_class = get_observer_class(method)
    searches = search_targets(model, weight_scales) if weight_scales is not None else {}
    options = {}
    if percentile is not None:
        if method != "percentile":
            raise ValueError(
                f"percentile= applies to method='percentile', not {method!r}; drop it or "
                "pass method='percentile'"
            )
        options["percentile"] = check_percentile(percentile)
    _check_num_batches(num_batches)

    entries = site_quantizers(model)
    quantizers = [(entry.label, entry.quantizer) for entry in entries]
    # A fused layer's static weight amax is the weight's max, whatever the method (as the
    # dynamic weight amax it replaces); the tie then takes the max over the group.
    fused_weights = {id(e.quantizer) for e in entries
                     if e.role == "weight" and fused_group(e.path.rpartition(".")[0])}
    sites = model_sites(model)
    if not quantizers and sites:
        reasons = "; ".join(f"{s.name}: {s.status.value}, {s.reason}" for s in sites[:4])
        raise ValueError(
            f"the model has no quantizers to calibrate: none of its {len(sites)} sites is "
            f"quantized ({reasons}{'; ...' if len(sites) > 4 else ''}); see qcompile.report"
            "(model), and adjust the recipe (exclude, overrides, block_size)"
        )
    if not quantizers:
        raise ValueError(
            "the model has no quantizers to calibrate; prepare it first with "
            "qcompile.prepare(model, recipe, example_inputs)"
        )
    targets = [(n, q) for n, q in quantizers if q.enabled and q.spec.needs_calibration]
    if not targets:
        formats = ", ".join(sorted({q.spec.format for _, q in quantizers if q.enabled}))
        reason = f"{formats} use dynamic scales" if formats else "all quantizers are disabled"
        if searches:
            search_weight_scales(model, data, weight_scales, progress=progress)
        else:
            warnings.warn(f"no calibration needed: {reason}", CalibrationWarning, stacklevel=2)
        return model

    wrapper = parallel_wrapper(model)
    if wrapper and any(q.spec.learn_amax for _, q in targets):
        raise ValueError(
            f"calibrate the prepared model before wrapping it in {wrapper}: learned amax "
            f"(learn_scales) become new parameters at calibration, which {wrapper} would "
            "neither synchronize nor shard"
        )
    observers = {q: MaxObserver(q.spec, name) if id(q) in fused_weights
                 else observer_class(q.spec, name, **options) for name, q in targets}
    labelled = [(name, observers[q]) for name, q in targets]
    with (merged_across_ranks(labelled), eval_mode(model), _attached(observers),
          recorded_weights(searches) as weights):
        run_data(model, data, num_batches, progress and is_main_process())

    amaxes = {q: obs.compute_amax() for q, obs in observers.items() if obs.num_batches}
    if amaxes:
        amaxes.update(_idle_expert_defaults(entries, observers, amaxes))
    unobserved = [name for name, q in targets if q not in amaxes]
    check_data_reached(
        unobserved, len(targets),
        empty="calibration data is empty: no batch reached the quantizers",
        partial="quantizers saw no calibration data and stay uncalibrated: {names}; make sure "
                "the data exercises these sites",
    )
    for quantizer, amax in amaxes.items():
        quantizer.set_amax(amax)
    tie_fused_ranges(model)
    if searches:  # after the ranges: NVFP4's global amax may be static
        store_searched_scales(model, data, searches, weights, num_batches=num_batches,
                              progress=progress and is_main_process())
    return model


def _idle_expert_defaults(
    entries: list[SiteQuantizer], observers: dict[Quantizer, AmaxObserver],
    amaxes: dict[Quantizer, torch.Tensor],
) -> dict[Quantizer, torch.Tensor]:
    """A static amax for each quantizer of a MoE expert that received no calibration tokens:
    the max over the same quantizer (weight and role) of the layer's other experts, with a
    `CalibrationWarning` naming the experts. Weights keep their own (weight-derived) scales."""
    groups: dict[tuple, list[SiteQuantizer]] = defaultdict(list)
    for entry in entries:
        if entry.site is not None and entry.site.expert is not None and entry.quantizer in observers:
            groups[entry.site.weight, entry.role].append(entry)
    defaults, idle = {}, []
    for members in groups.values():
        seen = [amaxes[m.quantizer] for m in members if m.quantizer in amaxes]
        shapes = {tuple(a.shape) for a in seen}
        if not seen or len(shapes) != 1:
            continue
        fallback = torch.stack(seen).amax(dim=0)
        for member in members:
            if member.quantizer not in amaxes:
                defaults[member.quantizer] = fallback
                idle.append(member.label)
    if idle:
        warnings.warn(
            f"{len(idle)} MoE expert quantizers received no calibration tokens: "
            f"{', '.join(idle)}; each takes the max amax of its layer's other experts. Calibrate "
            "on more (or more varied) data so that every expert is routed tokens.",
            CalibrationWarning,
            stacklevel=3,
        )
    return defaults


def tie_fused_ranges(model: nn.Module) -> list[list[str]]:
    """Give the layers that serving engines fuse (`qcompile.recipe.fused_group`: q/k/v,
    gate/up) one per-tensor amax per role, the max over the group, wherever their specs
    agree and the amax is static and calibrated. A learned amax becomes one parameter that the
    group shares, so QAT keeps it tied. Only in prepared models (also when wrapped, as in a
    `QuantizedCausalLM`) whose recipe has `tie_fused`. Returns the tied groups' labels."""
    prepared = [m for m in model.modules() if model_sites(m) is not None
                and getattr(m, "qcompile_recipe", None) is not None and m.qcompile_recipe.tie_fused]
    return [group for m in prepared for group in _tie(m)]


def _tie(model: nn.Module) -> list[list[str]]:
    groups: dict[tuple, list] = {}
    for entry in site_quantizers(model):
        quantizer = entry.quantizer
        if (entry.site is None or entry.site.kind is not SiteKind.LINEAR
                or not quantizer.enabled or quantizer.spec.dynamic or not quantizer.calibrated
                or quantizer.spec.granularity is not Granularity.TENSOR):
            continue
        group = fused_group(entry.site.name)
        if group is not None:
            groups.setdefault((group, entry.role, quantizer.spec), []).append(entry)
    tied = []
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0].quantizer
        amax = max((m.quantizer.amax.detach().float().reshape(()) for m in members),
                   key=float)
        first.set_amax(amax.clone())
        for member in members[1:]:
            quantizer = member.quantizer
            if first.spec.learn_amax:  # one parameter: an optimizer step moves all alike
                quantizer.reset_amax()
                del quantizer._buffers["amax"]
                quantizer.amax = first.amax
            else:  # equal values, separate buffers
                quantizer.set_amax(amax.clone())
        tied.append([m.label for m in members])
    return tied
