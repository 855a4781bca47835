"""`qcompile.auto_recipe`: pick each site's format by measurement, under an effective-bits budget.

This module owns the mixed-precision search: the candidate specs of each format (the named
recipes' own), the decision units (a site, or a group that serving engines fuse: q/k/v,
gate/up, the experts of one MoE layer), their sensitivity scores, and an exact
multiple-choice knapsack over the units. The answer is an ordinary `Recipe` with one override
per searched site, so it prepares, calibrates, trains and exports like any recipe.

Scores are label-free by default (the quantized model against the float one):
- "gradient": one calibration pass per format, then per batch one float forward and one
  backward. At every quantizer q of a unit the squared quantization error of each format f,
  (Q_f(x) - x)^2, is weighted by the diagonal Fisher information g^2 at that tensor, where g is
  the gradient of a probe loss whose expected squared gradient is the Fisher of the output
  divergence (a label sampled from the float model's softmax for KL, a Gaussian probe for MSE)
  or of the user's `loss_fn`. This is ModelOpt's auto_quantize estimator (sum g^2 dY^2),
  taken at the quantizers' outputs (weight and activation) rather than at the site's output.
- "kl": the measured divergence of the output with one unit switched to one format at a time
  (one forward per batch, unit and format).

It reads sites and quantizers only through `model_sites` / `site_quantizers`; it knows nothing of
graphs or backends.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qcompile.algorithms.calibrate import calibrate
from qcompile.core.calls import split_batch
from qcompile.core.formats import get_format
from qcompile.core.quantizer import Quantizer, QuantSpec
from qcompile.passes.sites import Site, SiteKind, model_sites, site_quantizers
from qcompile.prepare import prepare
from qcompile.recipe import RECIPES, Recipe, SiteSpecs
from qcompile.training.distill import kl_divergence, select_logits

#: Bits per weight element of a site left in float (bf16/fp16 serving).
FLOAT_BITS = Fraction(16)

#: Sites that serving engines fuse into one kernel, so they take one format together: a regex
#: on the site name whose first group is the key shared by one fused group. The experts rule
#: comes first: every projection of every expert of one MoE layer shares that layer's format.
FUSED_GROUPS: tuple[str, ...] = (
    r"^(.*\.experts)\.\d+\.[^.]+$",  # Mixtral/Qwen-MoE experts.N.{w1,w2,w3,gate_proj,...}
    r"^(.*\.)(?:q_proj|k_proj|v_proj)$",  # Llama/Qwen/Mistral attention
    r"^(.*\.)(?:query|key|value)$",  # BERT attention
    r"^(.*\.)(?:gate_proj|up_proj)$",  # gated MLPs
)

#: The most knapsack cells the exact solver fills per unit before it rounds sizes up (the
#: answer then stays within budget and is optimal on the rounded sizes).
MAX_CELLS = 200_000

Method = Literal["gradient", "kl"]


@dataclass
class Unit:
    """Sites that take one format together, their weight elements and per-choice scores."""

    name: str
    sites: list[Site]
    size: int
    #: choice (a format name, or None for float) -> score; a missing choice is not available
    #: (the format cannot quantize one of the sites).
    scores: dict[str | None, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchResult:
    """What `auto_recipe` measured and chose; the returned recipe's `search` attribute.

    `recipe_at(bits)` solves again for another budget from the same scores (no new passes).
    """

    effective_bits: float
    choices: dict[str, str | None]  # site name -> format (None: float)
    units: list[Unit]
    seconds: dict[str, float]  # "calibrate <format>", "score", "total"
    exact: bool  # the knapsack was solved on exact sizes (else sizes rounded up)
    base: Recipe
    candidates: dict[str, SiteSpecs | None]
    fixed_bits: Fraction
    total: int  # weight elements counted
    formats: tuple[str | None, ...]
    float_sites: tuple[str, ...] = ()  # sites no candidate can quantize (shapes): kept float

    def bounds(self) -> tuple[float, float]:
        """The least and the most effective bits the candidates reach on this model."""
        return _reach(self.units, self.candidates, self.fixed_bits, self.total)

    def recipe_at(self, effective_bits: float, scores: dict[str, dict] | None = None) -> Recipe:
        """The recipe for another budget, from these scores (or `scores`: unit name ->
        choice -> score, e.g. random ones for a baseline)."""
        units = self.units
        if scores is not None:
            units = [Unit(u.name, u.sites, u.size, dict(scores[u.name])) for u in units]
        return _finish(units, self.base, self.candidates, self.fixed_bits, self.total,
                       effective_bits, self.formats, self.seconds, self.float_sites)


def auto_recipe(
    model: nn.Module,
    formats: Sequence[str | None] = ("nvfp4", "fp8"),
    data: Iterable[Any] = (),
    *,
    effective_bits: float,
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    method: Method = "gradient",
    base: Recipe | None = None,
    divergence: Literal["kl", "mse"] = "kl",
    calibration: str = "max",
    progress: bool = True,
    seed: int = 0,
) -> Recipe:
    """A `Recipe` giving each site the format (of `formats`) that costs least accuracy, with
    the effective bits per weight at most `effective_bits`.

    Args:
        model: the float model (not modified).
        formats: candidate formats by named recipe (nvfp4, fp8, int8, mxfp4, mxfp8, int4, w4a8),
            each with that recipe's weight and activation specs; None lets a site stay in float.
        data: a list (or re-iterable) of batches, as for `qcompile.calibrate`: calibrates each
            format's activations and scores the sites.
        effective_bits: the budget: sum over the weights of the model's Linear/conv sites of
            bits per element (scales included: nvfp4 4.5, mxfp4 4.25, int4 4.25, fp8/int8 8,
            float 16) times elements, over all their elements. Sites that `base` overrides
            count; sites its `exclude` keeps in float (output heads) do not, as in `qc.report`.
        example_inputs / example_kwargs: the example call for `prepare` (default: the first batch).
        loss_fn: `loss_fn(output, batch) -> scalar` to score with instead of the divergence from
            the float model (e.g. a task loss with labels in the batch).
        method: "gradient" (default: Fisher estimate, one backward per batch) or "kl" (the
            measured divergence with one unit switched at a time; exact but one forward per
            batch, unit and format). bench/RESULTS.md compares them.
        base: a recipe whose `exclude`, `overrides` and `quantize_matmul` are kept (sites it
            excludes or overrides are not searched); default: output heads float, attention
            products not quantized.
        divergence: "kl" on logits (`select_logits`) or "mse" for outputs that are not logits.
        calibration: the calibration method of each format (see `qcompile.calibrate`).
        progress: progress bars over the calibration and scoring passes.
        seed: seeds the gradient method's probes (sampled labels, Gaussian directions).

    The returned recipe has one override per searched site (the format's `SiteSpecs`, or None
    for float); its `search` attribute (`SearchResult`) holds the scores, sizes and timings.
    """
    started = time.perf_counter()
    candidates = _candidates(formats)
    batches = _batches(data)
    if method not in ("gradient", "kl"):
        raise ValueError(f"method must be 'gradient' or 'kl', got {method!r}")
    if divergence not in ("kl", "mse"):
        raise ValueError(f"divergence must be 'kl' or 'mse', got {divergence!r}")
    if isinstance(effective_bits, bool) or not isinstance(effective_bits, (int, float)):
        raise TypeError(f"effective_bits must be a number such as 6.0, got {effective_bits!r}")
    base = base if base is not None else Recipe("auto")
    if not example_inputs and not example_kwargs:
        example_inputs, example_kwargs = split_batch(batches[0])

    # One prepared and calibrated model per format: its quantizers are the candidates.
    seconds: dict[str, float] = {}
    prepared = {}
    for name, specs in candidates.items():
        if specs is not None:
            t0 = time.perf_counter()
            prepared[name] = prepare(model, _format_recipe(base, specs), example_inputs,
                                     example_kwargs)
            seconds[f"prepare {name}"] = time.perf_counter() - t0
    units, fixed_bits, total = _units(model_sites(next(iter(prepared.values()))), base)
    keys = {name: {(e.site.name, e.role) for e in site_quantizers(m) if e.site is not None}
            for name, m in prepared.items()}
    quantized = {name: {site for site, _ in found} for name, found in keys.items()}
    unquantizable = []  # no candidate fits (shapes): float, as prepare leaves such sites
    for unit in units:
        for name in prepared:
            if all(site.name in quantized[name] for site in unit.sites):
                unit.scores[name] = 0.0
        if "float" in candidates:
            unit.scores[None] = 0.0
        if not unit.scores:
            unquantizable.append(unit)
            fixed_bits += unit.size * FLOAT_BITS
    units = [unit for unit in units if unit.scores]
    if not units:
        raise ValueError(f"none of the formats {list(candidates)} can quantize any site of this "
                         "model (see qcompile.report of a model prepared with one of them)")
    float_sites = tuple(site.name for unit in unquantizable for site in unit.sites)
    _check_budget(units, candidates, fixed_bits, total, effective_bits)
    alternatives: dict[str, dict[tuple[str, str], Quantizer]] = {}
    for name, model_f in prepared.items():
        t0 = time.perf_counter()
        if any(e.quantizer.spec.needs_calibration for e in site_quantizers(model_f)):
            calibrate(model_f, batches, method=calibration, progress=progress)
        alternatives[name] = {(e.site.name, e.role): copy.deepcopy(e.quantizer)
                              for e in site_quantizers(model_f) if e.site is not None}
        seconds[f"calibrate {name}"] = time.perf_counter() - t0

    # The scoring model computes in float with every candidate's quantized tensors tapped: a
    # format's own model where it quantizes all of them (its quantizers then disabled), else
    # one with a quantizer everywhere (dynamic fp8: no calibration, no block constraint).
    needed = set().union(*keys.values())
    scorer = next((m for name, m in prepared.items() if keys[name] >= needed), None)
    if scorer is None:
        t0 = time.perf_counter()
        fp8 = QuantSpec("fp8", dynamic=True)
        probe = SiteSpecs(weight=fp8, input=fp8)
        scorer = prepare(model, Recipe("auto-scoring", probe, quantize_matmul=base.quantize_matmul,
                                       attention=base.attention, exclude=(), overrides=()),
                         example_inputs, example_kwargs)
        seconds["prepare scoring model"] = time.perf_counter() - t0
    del prepared

    t0 = time.perf_counter()
    taps = {(e.site.name, e.role): e.quantizer
            for e in site_quantizers(scorer) if e.site is not None}
    scorer_state = _ScoringModel(scorer, taps, alternatives)
    try:
        if method == "gradient":
            _score_gradient(scorer_state, units, batches, loss_fn, divergence, progress, seed)
        else:
            _score_kl(scorer_state, units, batches, loss_fn, divergence, progress)
    finally:
        scorer_state.close()
    seconds["score"] = time.perf_counter() - t0

    seconds["total"] = time.perf_counter() - started
    return _finish(units, base, candidates, fixed_bits, total, effective_bits, tuple(formats),
                   seconds, float_sites)


def _finish(units, base, candidates, fixed_bits, total, effective_bits, formats, seconds,
            float_sites) -> Recipe:
    _check_budget(units, candidates, fixed_bits, total, effective_bits)
    picks, exact = solve(units, candidates, fixed_bits, total, effective_bits)
    choices = {site.name: picks[unit.name] for unit in units for site in unit.sites}
    bits_used = fixed_bits + sum(unit.size * _bits(candidates[picks[unit.name] or "float"])
                                 for unit in units)
    achieved = float(bits_used / total) if total else 0.0
    recipe = _result_recipe(base, candidates, units, picks, achieved, formats, float_sites)
    search = SearchResult(achieved, choices, units, seconds, exact, base, candidates,
                          fixed_bits, total, formats, float_sites)
    object.__setattr__(recipe, "search", search)  # a plain attribute: copies drop it
    return recipe


# ---------------------------------------------------------------- candidates and units


def _candidates(formats: Sequence[str | None]) -> dict[str, SiteSpecs | None]:
    """Format name -> the named recipe's Linear specs ("float" -> None), in the given order."""
    if isinstance(formats, str):
        formats = (formats,)
    if not formats:
        raise ValueError("formats is empty; pass e.g. formats=('nvfp4', 'fp8')")
    candidates: dict[str, SiteSpecs | None] = {}
    for fmt in formats:
        if fmt is None:
            candidates["float"] = None
            continue
        if not isinstance(fmt, str) or fmt.lower() not in RECIPES:
            raise ValueError(
                f"unknown format {fmt!r} for auto_recipe; valid: {', '.join(RECIPES)}, "
                "or None for float"
            )
        candidates[fmt.lower()] = RECIPES[fmt.lower()].linear
    if len(candidates) < 2:
        raise ValueError(f"auto_recipe needs at least two candidates to choose from, got "
                         f"{list(candidates)}; add e.g. 'fp8' or None (float)")
    return candidates


def _batches(data: Iterable[Any]) -> list[Any]:
    if isinstance(data, torch.Tensor):
        raise TypeError("data must be a list of batches, not one tensor; pass [x] for one batch")
    if callable(data) and not isinstance(data, Iterable):
        raise TypeError("auto_recipe runs the data several times (each format, then scoring): "
                        "pass a list of batches rather than a forward loop")
    batches = list(data)
    if not batches:
        raise ValueError("data is empty: auto_recipe needs batches to calibrate and score with; "
                         "pass a non-empty list of batches")
    return batches


def _format_recipe(base: Recipe, specs: SiteSpecs) -> Recipe:
    """`base` (its exclude, overrides, quantize_matmul) with a format's specs on every kind."""
    return base.with_(linear=specs, conv=None, matmul=SiteSpecs(input=specs.input)
                      if specs.input is not None else None)


def _fixed(base: Recipe, site: Site) -> tuple[bool, Fraction | None]:
    """Whether `base` fixes the site, and its weight bits then (None: not counted, as an
    excluded site is not)."""
    for pattern, specs in base.overrides:
        if fnmatch.fnmatchcase(site.name, pattern):
            return True, _bits(specs)
    if base.excludes(site.name):
        return True, None
    if site.kind in (SiteKind.MATMUL, SiteKind.ATTENTION) and not base.quantize_matmul:
        return True, None
    return False, None


def _bits(specs: SiteSpecs | None) -> Fraction:
    """Bits stored per weight element under `specs` (float: 16)."""
    if specs is None or specs.weight is None:
        return FLOAT_BITS
    spec = specs.weight
    return get_format(spec.format).storage_bits(spec.block_size)


def fused_key(name: str) -> str:
    """The name of the fused group a site belongs to (the site's own name if none)."""
    for pattern in FUSED_GROUPS:
        match = re.match(pattern, name)
        if match:
            return f"{match.group(1)}[{pattern}]"
    return name


def _units(sites: list[Site], base: Recipe) -> tuple[list[Unit], Fraction, int]:
    """The searched units (fused groups merged), the bits of fixed sites, all weight elements."""
    groups: dict[str, list[Site]] = {}
    fixed_bits, total = Fraction(0), 0
    for site in sites:
        size = site.weight_size or 0
        fixed, bits = _fixed(base, site)
        if fixed:
            if bits is not None:  # overridden: counted; excluded: not
                fixed_bits += size * bits
                total += size
            continue
        total += size
        groups.setdefault(fused_key(site.name), []).append(site)
    units = [Unit(_label([s.name for s in members]), members,
                  sum(s.weight_size or 0 for s in members))
             for members in groups.values()]
    if not units:
        raise ValueError("no site is left to search: base excludes or overrides every site "
                         "(see qcompile.report of a model prepared with it)")
    return units, fixed_bits, total


def _label(names: list[str]) -> str:
    """"a.b.{q_proj,k_proj,v_proj}" for a group, the name itself for one site."""
    if len(names) == 1:
        return names[0]
    prefix = names[0][: len(names[0]) - len(names[0].split(".")[-1])]
    while not all(name.startswith(prefix) for name in names):
        prefix = prefix[: prefix.rstrip(".").rfind(".") + 1]
    return prefix + "{" + ",".join(name[len(prefix):] for name in names) + "}"


def _reach(units, candidates, fixed_bits, total) -> tuple[float, float]:
    def reach(pick) -> float:
        bits = fixed_bits + sum(unit.size * pick(_bits(candidates[c or "float"])
                                                 for c in unit.scores) for unit in units)
        return float(bits / total) if total else 0.0

    return reach(min), reach(max)


def _check_budget(units, candidates, fixed_bits, total, effective_bits) -> None:
    low, high = _reach(units, candidates, fixed_bits, total)
    if not low - 1e-9 <= effective_bits <= high + 1e-9:
        raise ValueError(
            f"effective_bits={effective_bits} is outside what {list(candidates)} can reach on "
            f"this model: {low:.3f} (every site in its smallest format) to {high:.3f} (every "
            f"site in its largest); sites the base recipe fixes count too. Pick a budget in "
            f"that range, or list other formats (None: float)."
        )


# ---------------------------------------------------------------- scoring


class _ScoringModel:
    """The float scoring model with a forward hook on every (disabled) quantizer: it records
    each tapped tensor (gradient method) or swaps in a candidate format's output (kl method)."""

    def __init__(self, model, taps: dict[tuple[str, str], Quantizer],
                 alternatives: dict[str, dict[tuple[str, str], Quantizer]]) -> None:
        self.model = model
        self.alternatives = alternatives
        self.axes = {(site.name, role): axis for site in model_sites(model)
                     for role, axis in site.reduction_axes.items()}
        self.recorded: dict[tuple[str, str], torch.Tensor] = {}
        self.record = False
        self.switched: dict[tuple[str, str], Quantizer] = {}
        self.grad_flags = {p: p.requires_grad for p in model.parameters()}
        self.handles = []
        self.blocked = {key: _blocked(quantizer) for key, quantizer in taps.items()}
        for key, quantizer in taps.items():
            quantizer.enabled = False
            self.handles.append(quantizer.register_forward_hook(self._hook(key)))

    def quantize(self, choice: str, key: tuple[str, str], x: torch.Tensor) -> torch.Tensor:
        """`x` (as the scoring model's quantizer sees it) through format `choice`'s quantizer.
        A block format sees a second matmul operand transposed, with its blocks along K; the
        tap sees it so only where the scoring model's own quantizer there is blocked too."""
        quantizer = self.alternatives[choice][key]
        if self.axes.get(key, -1) == -1 or _blocked(quantizer) == self.blocked[key]:
            return quantizer(x)
        axis = self.axes[key]
        return quantizer(x.transpose(axis, -1)).transpose(axis, -1)

    def _hook(self, key):
        def hook(module, args, output):
            if key in self.switched:
                return self.quantize(self.switched[key], key, args[0])
            if self.record:
                # its own autograd node (also for a parameter); a leaf where nothing upstream
                # needs a gradient (the model's input)
                tapped = (output.view_as(output) if output.requires_grad
                          else output.detach().requires_grad_())
                self.recorded[key] = tapped
                return tapped
            return None

        return hook

    def __call__(self, batch):
        args, kwargs = split_batch(batch)
        return self.model(*args, **kwargs)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for parameter, flag in self.grad_flags.items():
            parameter.requires_grad_(flag)


def _blocked(quantizer: Quantizer) -> bool:
    spec = quantizer.spec
    return get_format(spec.format).resolve_block_size(spec.block_size) is not None


def _output(output) -> torch.Tensor:
    return select_logits(output).float()


def _divergence(reference: torch.Tensor, output: torch.Tensor, divergence: str) -> torch.Tensor:
    if divergence == "kl":
        return kl_divergence(reference, output, 1.0)
    return torch.nn.functional.mse_loss(output.float(), reference.float())


def _probe_loss(output, batch, loss_fn, divergence: str,
                generator: torch.Generator) -> torch.Tensor:
    """A loss whose squared gradient estimates the Fisher information of the divergence:
    a label sampled from the model's own softmax (KL), a Gaussian direction (MSE)."""
    if loss_fn is not None:
        return loss_fn(output, batch)
    out = _output(output)
    if divergence == "kl":
        probs = torch.softmax(out.detach(), dim=-1).reshape(-1, out.shape[-1])
        labels = torch.multinomial(probs.cpu(), 1, generator=generator).reshape(-1).to(out.device)
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels,
                                                 reduction="sum")
    direction = torch.randn(out.shape, generator=generator).to(out.device)
    return (out * direction).sum()


def _unit_keys(unit: Unit, choice: str, scorer: _ScoringModel) -> list[tuple[str, str]]:
    """The (site, role) of every tensor that format `choice` quantizes in `unit`."""
    names = {site.name for site in unit.sites}
    return [key for key in scorer.alternatives[choice] if key[0] in names]


def _score_gradient(scorer: _ScoringModel, units, batches, loss_fn, divergence, progress, seed):
    generator = torch.Generator().manual_seed(seed)
    model = scorer.model
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    keys = [(unit, choice, _unit_keys(unit, choice, scorer))
            for unit in units for choice in unit.scores if choice is not None]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="auto_recipe: scoring (gradient)", unit="batch",
                          disable=not progress):
            scorer.record, scorer.recorded = True, {}
            with torch.enable_grad():
                output = scorer(batch)
                scorer.record = False
                loss = _probe_loss(output, batch, loss_fn, divergence, generator)
                tapped = list(scorer.recorded.items())
                grads = torch.autograd.grad(loss, [t for _, t in tapped], allow_unused=True)
            scorer.recorded = {}
            fisher = {key: g.detach().float().square() for (key, _), g in zip(tapped, grads)
                      if g is not None}
            values = {key: t.detach() for key, t in tapped}
            with torch.no_grad():
                for unit, choice, unit_keys in keys:
                    for key in unit_keys:
                        if key not in fisher:
                            continue  # the tensor does not reach the loss on this batch
                        x = values[key]
                        error = (scorer.quantize(choice, key, x).float() - x.float()).square()
                        unit.scores[choice] += float((fisher[key] * error).sum())
    finally:
        model.train(was_training)
        scorer.record, scorer.recorded = False, {}


def _score_kl(scorer: _ScoringModel, units, batches, loss_fn, divergence, progress):
    model = scorer.model
    was_training = model.training
    model.eval()
    passes = sum(1 for unit in units for c in unit.scores if c is not None)
    try:
        with torch.no_grad():
            references = [scorer(batch) for batch in batches]
            base_losses = ([float(loss_fn(r, b)) for r, b in zip(references, batches)]
                           if loss_fn is not None else None)
            references = [_output(r) for r in references]
            with tqdm(total=passes * len(batches), desc="auto_recipe: scoring (kl)",
                      unit="batch", disable=not progress) as bar:
                for unit in units:
                    for choice in unit.scores:
                        if choice is None:
                            continue
                        scorer.switched = {key: choice for key in _unit_keys(unit, choice, scorer)}
                        for i, batch in enumerate(batches):
                            output = scorer(batch)
                            if loss_fn is not None:
                                score = float(loss_fn(output, batch)) - base_losses[i]
                            else:
                                score = float(_divergence(references[i], _output(output),
                                                          divergence))
                            unit.scores[choice] += score
                            bar.update()
                        scorer.switched = {}
    finally:
        scorer.switched = {}
        model.train(was_training)


# ---------------------------------------------------------------- the knapsack


def solve(units: list[Unit], candidates: dict, fixed_bits: Fraction, total: int,
          effective_bits: float) -> tuple[dict[str, str | None], bool]:
    """The choice per unit of least total score with (fixed + chosen bits) / total at most
    `effective_bits`: a dynamic program over integer sizes (a multiple-choice knapsack), exact
    unless it needs more than `MAX_CELLS` cells; then sizes are rounded up (still within
    budget). Returns (unit name -> choice, exact)."""
    options = [sorted(unit.scores, key=lambda c: (_bits(candidates[c or "float"]), str(c)))
               for unit in units]
    costs = [[unit.size * _bits(candidates[c or "float"]) for c in opts]
             for unit, opts in zip(units, options)]
    # the budget as the nearest simple fraction: 4.5 + 3584 / 49152 computed in floats may
    # land a hair below the exact value, which would shut out a choice that fits exactly
    capacity = Fraction(effective_bits).limit_denominator(10**9) * total - fixed_bits
    capacity -= sum(min(c) for c in costs)
    extra = [[c - min(cs) for c in cs] for cs in costs]
    # Every sum of costs is a multiple of 1/denominator and of step/denominator, so flooring
    # the capacity onto that grid loses no feasible choice.
    denominator = math.lcm(*(f.denominator for row in extra for f in row))
    scaled = [[int(f * denominator) for f in row] for row in extra]
    slack = math.floor(max(capacity, Fraction(0)) * denominator)
    step = math.gcd(*(v for row in scaled for v in row)) or 1
    exact = True
    if slack // step > MAX_CELLS:
        step, exact = -(-slack // MAX_CELLS), False
    cells = slack // step
    sizes = [[-(-v // step) for v in row] for row in scaled]  # rounded up: never over budget

    best = np.zeros(cells + 1)
    picks = np.zeros((len(units), cells + 1), dtype=np.int16)
    for u, (unit, row) in enumerate(zip(units, sizes)):
        new = np.full(cells + 1, np.inf)
        for i, (choice, size) in enumerate(zip(options[u], row)):
            if size > cells:
                continue
            shifted = np.full(cells + 1, np.inf)
            shifted[size:] = best[: cells + 1 - size] + unit.scores[choice]
            better = shifted < new
            new[better] = shifted[better]
            picks[u][better] = i
        best = new
    chosen, cell = {}, int(np.argmin(best))
    for u in range(len(units) - 1, -1, -1):
        i = int(picks[u][cell])
        chosen[units[u].name] = options[u][i]
        cell -= sizes[u][i]
    return chosen, exact


# ---------------------------------------------------------------- the result


def _pattern(name: str) -> str:
    """A glob pattern matching exactly `name` (brackets, * and ? escaped)."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def _result_recipe(base: Recipe, candidates, units, picks, achieved: float, formats,
                   float_sites) -> Recipe:
    overrides = list(base.overrides) + [(_pattern(name), None) for name in float_sites]
    for unit in units:
        choice = picks[unit.name]
        specs = candidates[choice] if choice is not None else None
        for site in unit.sites:
            site_specs = specs
            if specs is not None and site.kind in (SiteKind.MATMUL, SiteKind.ATTENTION):
                site_specs = SiteSpecs(input=specs.input) if specs.input is not None else None
            overrides.append((_pattern(site.name), site_specs))
    shown = "/".join("float" if f is None else str(f) for f in formats)
    default = next(s for s in candidates.values() if s is not None)
    return base.with_(name=f"auto({shown}, {achieved:.2f} bits)", linear=default,
                      overrides=tuple(overrides))
