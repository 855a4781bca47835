"""Searched weight scales (#25): per block, channel or tensor, the amax whose quantization of
the weight loses least, stored in the weight quantizer (`Quantizer.scale_amax`).

A weight's scales are normally derived from its own max. Clipping a block's top (a smaller
amax) rounds the rest of the block on a finer grid; for E2M1 blocks (NVFP4, MXFP4), mapping the
block max to 4 instead of 6 ("four over six": an amax 1.5x the max) puts more values on the
grid's fine end. This module owns the candidates and the criterion (squared error of the
quantized weight, per scale); the arithmetic is `qcompile.core.numerics`', and the stored amax
is quantizer state that export and checkpoints carry like any other (`qcompile.core.weights`).
It knows nothing of graphs or files: it reads each weight quantizer's input in one pass of the
data.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from qcompile.algorithms.data import CalibrationData, eval_mode, run_data
from qcompile.algorithms.gptq import input_hessians
from qcompile.core import numerics
from qcompile.core.formats import ElementKind, QuantFormat, ScaleKind, get_format
from qcompile.core.quantizer import Quantizer
from qcompile.passes.sites import site_quantizers

#: What `search_weight_scales` (and `calibrate(weight_scales=...)`) accepts.
METHODS = ("mse", "output", "four_over_six")
#: Clipping ratios of the "mse" search (the data's own amax, 1.0, first: ties keep it).
CLIP_RATIOS = (1.0, *(round(0.5 + 0.02 * i, 2) for i in range(25)))
#: An amax 1.5x the block max maps the max to 4 of E2M1's 6 (four over six).
FOUR_OVER_SIX = 1.5


def check_method(method: str) -> str:
    """`method` if it is one of `METHODS`, else a ValueError listing them."""
    if method not in METHODS:
        raise ValueError(f"unknown weight scale search {method!r}; use one of {', '.join(METHODS)}")
    return method


def candidate_ratios(fmt: QuantFormat, method: str) -> tuple[float, ...]:
    """The multiples of the data's amax a search tries for format `fmt` (empty: none apply)."""
    e2m1_blocks = (fmt.element.kind is ElementKind.FLOAT and fmt.element.max_value == 6.0
                   and fmt.block_size is not None)
    if check_method(method) == "four_over_six":
        return (1.0, FOUR_OVER_SIX) if e2m1_blocks else ()
    # "mse" and "output" try the same amaxes; they differ in how errors are weighed
    return CLIP_RATIOS + ((FOUR_OVER_SIX,) if e2m1_blocks else ())


def searchable(quantizer: Quantizer) -> str | None:
    """Why stored scales cannot replace this quantizer's, or None where they can."""
    spec = quantizer.spec
    if not quantizer.enabled:
        return "disabled"
    if spec.learn_amax:
        return "its amax is learned"
    if not spec.dynamic and get_format(spec.format).scale is ScaleKind.FP32:
        return "its amax is calibrated (static)"
    return None


def search_scale_amax(weight: torch.Tensor, quantizer: Quantizer,
                      ratios: tuple[float, ...],
                      column_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per scale of `quantizer`, the amax among `ratios` x the weight's own amax with the
    least squared error of the quantized weight (each column's error times
    `column_weights[column]` where given: the input's mean square, for the output-aware
    error), shaped as `Quantizer.scale_amax` stores it."""
    spec = quantizer.spec
    fmt = get_format(spec.format)
    block = fmt.resolve_block_size(spec.block_size)
    w = weight.detach().float()
    if quantizer.pre_scale is not None:
        w = w * quantizer.pre_scale
    if block is not None:
        own = numerics.dynamic_amax(numerics.to_blocks(w, block), block)  # (..., K/b, 1)
    elif spec.axis is not None:
        axis = spec.axis % w.ndim
        dims = [d for d in range(w.ndim) if d != axis]
        own = numerics.finite_abs(w).amax(dim=dims, keepdim=True) if dims else numerics.finite_abs(w)
    else:
        own = numerics.finite_abs(w).amax()
    global_amax = None
    if fmt.scale is ScaleKind.E4M3_TWO_LEVEL:  # the global scale stays as the spec makes it
        global_amax = (numerics.finite_abs(w).amax() if spec.dynamic
                       else quantizer.amax.detach().float().reshape(()))
    best, best_error = own, None
    for ratio in ratios:
        candidate = own * ratio
        if fmt.scale is ScaleKind.FP32:
            quantized = numerics.fake_quantize(w, candidate, fmt, block)
        else:
            quantized = numerics.fake_quantize(w, global_amax, fmt, block, candidate)
        error = (quantized - w).square()
        if column_weights is not None:
            error = error * column_weights
        if block is not None:
            error = numerics.to_blocks(error, block).sum(dim=-1, keepdim=True)
        elif spec.axis is not None:
            error = error.sum(dim=dims, keepdim=True) if dims else error
        else:
            error = error.sum()
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, candidate, best)
    if block is not None:
        return best.squeeze(-1)
    return best.reshape(-1) if spec.axis is not None else best.reshape(())


def search_weight_scales(
    model: nn.Module,
    data: CalibrationData,
    method: str = "mse",
    *,
    num_batches: int | None = 1,
    progress: bool = True,
) -> list[str]:
    """Search and store the weight scales of every enabled weight quantizer of `model`.

    Args:
        model: a prepared (and, where it has static ranges, calibrated) model.
        data: batches as for `qcompile.calibrate`; one pass (`num_batches`) shows each weight
            quantizer its weight.
        method: "mse": per scale the clipping ratio in {0.50, 0.52, ..., 1.00} of the weight's
            own amax with the least squared error of the quantized weight, plus, for NVFP4 and
            MXFP4, 1.5 (the block max mapped to 4 instead of 6). "output": the same amaxes,
            each column's error weighed by the mean square of the input it multiplies (the
            diagonal of GPTQ's Hessian, from `num_batches` of data; weights outside Linear
            sites GPTQ handles fall back to "mse"). "four_over_six": NVFP4/MXFP4
            only, per block the lower error of mapping its max to 6 or to 4.

    Every searched quantizer stores its scales (`Quantizer.scale_amax`, which replaces any
    stored before); `qc.save`/`qc.load`, Hugging Face and serving checkpoints and ONNX export
    carry them exactly. Weight quantizers with a learned or calibrated amax are left as they
    are. Returns the paths of the quantizers searched.
    """
    check_method(method)
    entries = [e for e in site_quantizers(model) if e.role == "weight"]
    targets = {e.path: e.quantizer for e in entries
               if searchable(e.quantizer) is None
               and candidate_ratios(get_format(e.quantizer.spec.format), method)}
    if not targets:
        return []
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for path, quantizer in targets.items():

        def hook(module, inputs, path=path):
            seen.setdefault(path, inputs[0].detach())

        handles.append(quantizer.register_forward_pre_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            run_data(model, data, num_batches, False)
    finally:
        for handle in handles:
            handle.remove()
    moments = {}
    if method == "output":
        moments = {key: torch.diagonal(h) for key, h in
                   input_hessians(model, data, num_batches).items()}
    searched = []
    for path in tqdm(list(seen), desc="weight scales", unit="weight", disable=not progress):
        quantizer = targets[path]
        ratios = candidate_ratios(get_format(quantizer.spec.format), method)
        columns = moments.get(id(quantizer))
        with torch.no_grad():
            quantizer.set_scale_amax(search_scale_amax(seen[path], quantizer, ratios, columns))
        searched.append(path)
    return searched
