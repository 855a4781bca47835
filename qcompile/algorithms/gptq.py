"""`qcompile.algorithms.gptq`: GPTQ rounding of the quantized Linear weights (Frantar et al., 2023).

Rounding each weight to its nearest grid value (what the weight quantizer does) ignores which
errors the layer's inputs amplify. GPTQ rounds one input column at a time and moves each
column's rounding error into the columns not yet rounded, weighted by the inverse Hessian
H = X^T X of the layer's inputs X, which minimises the error of the layer's output
||X W^T - X Q(W)^T|| far better than rounding to nearest. The prepared model's latent weight
is replaced by one that its weight quantizer rounds exactly to the GPTQ values (each original
value kept where it already rounds there; `qcompile.algorithms.rounding` fixes the scales so that this
holds), so PTQ, QAT, QAD and the exported model all compute with them.

The inputs X are those the quantized model feeds each site (after its input quantizer, with
the other weights still rounded to nearest), recorded in one pass over the data.

Integer weights with dynamic block scales (int4) get stored scales (`Quantizer.scale_amax`):
GPTQ rounds the weight once per candidate (`rounding.stored_scale_choices`: each block's max
at amax / 7.5 or at amax / 7) and keeps, per output channel, the one with the lower output
error (GPTQ rounds each output channel independently, so the choice is exact for its
objective). Stored scales pin no element, unlike the weight's own dynamic scales.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from qcompile.algorithms.data import (
    CalibrationData,
    CalibrationWarning,
    all_reduce,
    check_data_reached,
    eval_mode,
    is_distributed,
    run_data,
)
from qcompile.algorithms.rounding import ColumnRounder, UnsupportedWeight, stored_scale_choices
from qcompile.core.quantizer import Quantizer
from qcompile.passes.sites import Site, SiteKind, SiteStatus, model_sites, prepared_graphs

#: Columns processed together (a multiple of every block size up to it).
COLUMNS_PER_STEP = 128


def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    rounder: ColumnRounder,
    damp: float = 0.01,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one [out, in] weight given H = X^T X ([in, in]).

    Returns the rounded weight and a latent weight that quantizes to it: the original value
    wherever that rounds to the same grid point (`ColumnRounder.latent`).
    `damp` (a fraction of H's mean diagonal) is added to H's diagonal so that it inverts even
    where inputs are collinear or never nonzero. `act_order` rounds the columns with the
    largest inputs first (GPTQ's act-order), with every block's scales fixed beforehand from
    the original weight (static groups).
    """
    original = weight.detach().float()
    columns = original.shape[1]
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    order = torch.arange(columns, device=h.device)
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True)
        h = h[order][:, order]
        rounder.fix_all_groups(original)
    w = original[:, order].clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(columns, dtype=h.dtype, device=h.device)
    try:
        h_inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        upper = torch.linalg.cholesky(h_inverse, upper=True).float()
    except torch.linalg.LinAlgError as error:
        raise ValueError(
            f"the input Hessian is not positive definite even with damp={damp}; raise damp"
        ) from error
    step = max(COLUMNS_PER_STEP, rounder.group_size)
    step -= step % rounder.group_size
    rounded, latent = torch.zeros_like(w), torch.zeros_like(w)
    for start in range(0, columns, step):
        end = min(start + step, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u = upper[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            if not act_order and column % rounder.group_size == 0:
                rounder.start_group(column, block[:, i : i + rounder.group_size])
            q = rounder.round(column, block[:, i])
            rounded[:, column] = q
            latent[:, column] = rounder.latent(column, original[:, column], q)
            error = (block[:, i] - q) / u[i, i]
            block[:, i:] -= error[:, None] * u[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return rounded, latent


def gptq_round_choosing_scales(
    weight: torch.Tensor, hessian: torch.Tensor, quantizer: Quantizer, damp: float,
    act_order: bool, choose_scales: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`gptq_round` of one [out, in] weight with `quantizer`'s scales, returning (rounded,
    latent, the scales to store in `quantizer` or None).

    With `choose_scales`, where `stored_scale_choices` offers candidates (int4 with dynamic
    scales, none stored yet), GPTQ runs once per candidate and each output channel keeps the
    one with the lower output error d H d^T (d: the channel's rounded - weight); ties keep
    the first, the format's own rule."""
    spec = quantizer.spec
    choices = stored_scale_choices(spec, weight) if choose_scales else []
    if quantizer.scale_amax is not None or not choices:
        rounder = ColumnRounder(spec, weight, quantizer.amax, quantizer.scale_amax)
        return (*gptq_round(weight, hessian, rounder, damp, act_order), None)
    best = None
    h = hessian.double()
    for scale_amax in choices:
        rounder = ColumnRounder(spec, weight, None, scale_amax)
        rounded, latent = gptq_round(weight, hessian, rounder, damp, act_order)
        d = (rounded - weight).double()
        error = ((d @ h) * d).sum(dim=1)
        if best is None:
            best = (rounded, latent, scale_amax, error)
            continue
        better = (error < best[3])[:, None]  # ties keep the first (the format's own rule)
        best = (torch.where(better, rounded, best[0]), torch.where(better, latent, best[1]),
                torch.where(better, scale_amax, best[2]), torch.minimum(error, best[3]))
    return best[0], best[1], best[2]


@dataclass
class _Target:
    """One quantized Linear site: its graph node, weight parameter, weight quantizer and
    input Hessian."""

    site: str
    node_name: str
    weight_name: str
    quantizer: Quantizer
    graph: str = ""  # the path of the prepared graph holding the node ("" for the model)
    hessian: torch.Tensor | None = None
    rows: int = 0


class _HessianRecorder(nn.Module):
    """Identity on the activation a site multiplies; accumulates its X^T X."""

    def __init__(self, target: _Target) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().float().reshape(-1, x.shape[-1])
        product = (rows.T @ rows).double()
        t = self.target
        t.hessian = product if t.hessian is None else t.hessian + product
        t.rows += rows.shape[0]
        return x


def _targets(model: nn.Module) -> list[_Target]:
    """The Linear sites whose weight is quantized, in every prepared graph of `model` (the
    model itself, or each block of a block-wise prepared model)."""
    graphs = prepared_graphs(model)
    if not graphs:
        wrapped = prepared_graphs(getattr(model, "prepared", None) or nn.Module())
        hint = (f"; {type(model).__name__} wraps one: pass its .prepared (the same weights)"
                if wrapped else "")
        raise ValueError(
            f"gptq needs a model prepared by qcompile.prepare (it reads its sites){hint}")
    targets = []
    for prefix, gm in graphs:
        for target in _graph_targets(gm):
            target.graph = prefix
            if prefix:
                target.site = f"{prefix}.{target.site}"
                target.weight_name = f"{prefix}.{target.weight_name}"
            targets.append(target)
    return targets


def _graph_targets(model: fx.GraphModule) -> list[_Target]:
    sites: list[Site] = model_sites(model)
    nodes = {node.name: node for node in model.graph.nodes}
    targets = []
    for site in sites:
        if site.kind is not SiteKind.LINEAR or site.status is not SiteStatus.QUANTIZED:
            continue
        if "weight" not in site.quantizers or site.reduction_axes.get("weight", -1) != -1:
            continue
        quantizer = model.get_submodule(site.quantizers["weight"])
        node = nodes.get(site.node_name)
        weight_node = node.args[1] if node is not None and len(node.args) > 1 else None
        if not (isinstance(weight_node, fx.Node) and weight_node.op == "call_module"
                and weight_node.target == site.quantizers["weight"]
                and weight_node.args[0].op == "get_attr") or not quantizer.enabled:
            continue
        targets.append(_Target(site.name, node.name, weight_node.args[0].target, quantizer))
    return targets


def _record_hessians(
    model: nn.Module, targets: list[_Target], data: CalibrationData,
    num_batches: int | None, progress: bool,
) -> None:
    """Run `data` through a copy of `model` with a recorder in front of each site's input."""
    probe = copy.deepcopy(model)
    graphs = dict(prepared_graphs(probe))
    changed = set()
    for index, target in enumerate(targets):
        gm = graphs[target.graph]
        node = next(n for n in gm.graph.nodes if n.name == target.node_name)
        name = f"_qcompile_gptq_recorder_{index}"
        gm.add_submodule(name, _HessianRecorder(target))
        with gm.graph.inserting_before(node):
            recorder = gm.graph.call_module(name, (node.args[0],))
        node.update_arg(0, recorder)
        changed.add(target.graph)
    for path in changed:
        graphs[path].recompile()
    with eval_mode(probe):
        run_data(probe, data, num_batches, progress)


def _merge_across_ranks(model: nn.Module, targets: list[_Target]) -> None:
    """Every rank's X^T X summed, so that every rank rounds every weight the same way."""
    for target in targets:
        columns = model.get_parameter(target.weight_name).shape[1]
        hessian = target.hessian
        if hessian is None:
            hessian = torch.zeros(columns, columns, dtype=torch.float64)
        target.hessian = all_reduce(hessian, "sum")
        target.rows = int(all_reduce(torch.tensor(float(target.rows)), "sum"))
        if target.rows == 0:
            target.hessian = None


def input_hessians(
    model: nn.Module, data: CalibrationData, num_batches: int | None = None,
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """H = X^T X / rows of the input of every quantized Linear site GPTQ would round (summed
    over ranks when distributed), keyed by `id()` of the site's weight quantizer; sites that
    saw no data are absent. The output-aware error of a weight change dW is tr(dW H dW^T)."""
    targets = _targets(model)
    _record_hessians(model, targets, data, num_batches, progress)
    if is_distributed():
        _merge_across_ranks(model, targets)
    return {id(t.quantizer): t.hessian.float() / t.rows for t in targets if t.hessian is not None}


def gptq(
    model: nn.Module,
    data: CalibrationData,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    choose_scales: bool = True,
    num_batches: int | None = None,
    progress: bool = True,
) -> list[str]:
    """GPTQ-round the weight of every quantized Linear site of a prepared `model`.

    Args:
        model: a model prepared by `qcompile.prepare` and calibrated (static activation
            ranges must be set: the Hessians are taken from the inputs the quantized model
            computes).
        data: calibration data, as for `qcompile.calibrate` (a few hundred sequences suffice).
        damp: fraction of the mean Hessian diagonal added to it (GPTQ's percdamp).
        act_order: round the input channels with the largest activations first, block
            scales fixed from the original weight beforehand (GPTQ's act-order with static
            groups; all-MiniLM-L6-v2 int4, 32 batches: mean cosine 0.977 without, 0.981 with).
        choose_scales: for integer weights with dynamic block scales (int4, w4a8), store
            each block's scale (`Quantizer.scale_amax`), per output channel the lower output
            error of amax / 7.5 and amax / 7 (one GPTQ pass per candidate); False keeps the
            weight's own dynamic scales (amax / 7.5, the element setting each block's amax
            held at its value). See bench/RESULTS.md (#25) for the measurements.
        num_batches, progress: as for `qcompile.calibrate`.

    Each latent weight is replaced by one that its quantizer rounds to the GPTQ values, so
    the model computes with them in eval mode, in training and after export. Returns the
    rounded site names. Sites whose weight quantizer is disabled, whose weight is not an
    [out, in] parameter or whose scales run along the input axis are left as they were (a
    warning lists the last kind). On error nothing changes. In a distributed run the
    Hessians are summed over the ranks, so every rank installs the same weights.
    """
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not damp > 0:
        raise ValueError(f"damp must be a positive number, got {damp!r}")
    if not isinstance(choose_scales, bool):
        raise TypeError(f"choose_scales must be True or False, got {choose_scales!r}")
    targets = _targets(model)
    if not targets:
        raise ValueError(
            "the model has no quantized Linear weight to round; check qcompile.report(model)"
        )
    _record_hessians(model, targets, data, num_batches, progress)
    if is_distributed():
        _merge_across_ranks(model, targets)
    unseen = [t.site for t in targets if t.hessian is None]
    check_data_reached(
        unseen, len(targets),
        empty="GPTQ data is empty: no batch reached the Linear sites",
        partial="Linear sites saw no data and keep rounding to nearest: {names}",
    )
    rounded, skipped = [], []
    uses = Counter(t.weight_name for t in targets)
    for target in tqdm(targets, desc="GPTQ", unit="site", disable=not progress):
        if target.hessian is None:
            continue
        if uses[target.weight_name] > 1:
            skipped.append(f"{target.site} (its weight {target.weight_name} feeds several sites)")
            continue
        parameter = model.get_parameter(target.weight_name)
        quantizer = target.quantizer
        pre_scale = quantizer.pre_scale
        weight = parameter.detach().float()
        if pre_scale is not None:
            weight = weight * pre_scale
        try:
            values, latent, scale_amax = gptq_round_choosing_scales(
                weight, 2 * target.hessian / target.rows, quantizer, damp, act_order,
                choose_scales)
        except UnsupportedWeight as error:
            skipped.append(f"{target.site} ({error})")
            continue
        if pre_scale is not None:
            values, latent = values / pre_scale, latent / pre_scale
            requantize = quantizer
            if scale_amax is not None:  # the quantizer as it will be, on a copy
                requantize = copy.deepcopy(quantizer)
                requantize.set_scale_amax(scale_amax)
            with torch.no_grad():  # dividing by pre_scale may move a latent value across a bin edge
                moved = requantize(latent) != requantize(values)
            latent = torch.where(moved, values, latent)
        rounded.append((target, latent, scale_amax))
    if skipped:
        warnings.warn(f"GPTQ left {len(skipped)} sites rounded to nearest: {'; '.join(skipped)}",
                      CalibrationWarning, stacklevel=2)
    with torch.no_grad():
        for target, values, scale_amax in rounded:
            parameter = model.get_parameter(target.weight_name)
            parameter.copy_(values.to(parameter.dtype))
            if scale_amax is not None:
                target.quantizer.set_scale_amax(scale_amax)
    return [target.site for target, _, _ in rounded]
