"""Searched weight scales (#25): per block, channel or tensor, the amax whose quantization of
the weight loses least, stored in the weight quantizer (`Quantizer.scale_amax`).

A weight's scales are normally derived from its own max. Clipping a block's top (a smaller
amax) rounds the rest of the block on a finer grid; for E2M1 blocks (NVFP4, MXFP4), mapping the
block max to 4 instead of 6 ("four over six": an amax 1.5x the max) puts more values on the
grid's fine end. This module owns the candidates and the criterion (squared error of the
quantized weight, per scale); the arithmetic is `qcompile.core.numerics`', and the stored amax
is quantizer state that export and checkpoints carry like any other (`qcompile.core.weights`).
It knows nothing of graphs or files: it reads each weight quantizer's input as the model runs
(during `qcompile.calibrate`'s pass, `recorded_weights`, or a pass of its own). Which formats
`calibrate` searches by default is `DEFAULT_SEARCHES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

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
#: The default: per format, the search `calibrate` runs unless told otherwise (chosen by
#: measurement, bench/RESULTS.md #25: for NVFP4 "mse" lowered MiniLM's loss after PTQ, GPTQ
#: and QAD and char-GPT's after PTQ, the rest within noise; for the other formats no search
#: was better everywhere).
DEFAULT_SEARCHES: dict[str, str] = {"nvfp4": "mse"}
AUTO = "auto"
#: Elements of a weight searched at once (block scales): bounds the search's temporaries.
SEARCH_CHUNK = 1 << 22
#: Clipping ratios of the "mse" search (the data's own amax, 1.0, first: ties keep it).
CLIP_RATIOS = (1.0, *(round(0.5 + 0.02 * i, 2) for i in range(25)))
#: An amax 1.5x the block max maps the max to 4 of E2M1's 6 (four over six).
FOUR_OVER_SIX = 1.5


def check_method(method: str, allow_auto: bool = False) -> str:
    """`method` if it is one of `METHODS` (or `AUTO`, where allowed), else a ValueError
    listing them."""
    choices = (*METHODS, AUTO) if allow_auto else METHODS
    if method not in choices:
        raise ValueError(f"unknown weight scale search {method!r}; use one of {', '.join(choices)}")
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
    error), shaped as `Quantizer.scale_amax` stores it. Block scales are searched a slice of
    rows at a time (`SEARCH_CHUNK` elements), so the search's temporaries stay small beside
    the weight."""
    spec = quantizer.spec
    fmt = get_format(spec.format)
    block = fmt.resolve_block_size(spec.block_size)
    w = weight.detach().float()
    if quantizer.pre_scale is not None:
        w = w * quantizer.pre_scale
    global_amax = None
    if fmt.scale is ScaleKind.E4M3_TWO_LEVEL:  # the global scale stays as the spec makes it
        global_amax = (numerics.finite_abs(w).amax() if spec.dynamic
                       else quantizer.amax.detach().float().reshape(()))
    if block is not None:
        rows = w.reshape(-1, w.shape[-1])
        step = max(1, SEARCH_CHUNK // rows.shape[1])
        best = [_best_block_amax(rows[i:i + step], fmt, block, global_amax, ratios, column_weights)
                for i in range(0, rows.shape[0], step)]
        return torch.cat(best).reshape(*w.shape[:-1], -1)
    if spec.axis is not None:
        axis = spec.axis % w.ndim
        dims = [d for d in range(w.ndim) if d != axis]
        own = numerics.finite_abs(w).amax(dim=dims, keepdim=True) if dims else numerics.finite_abs(w)
    else:
        dims, own = None, numerics.finite_abs(w).amax()

    def quantize(candidate: torch.Tensor) -> torch.Tensor:
        return numerics.fake_quantize(w, candidate, fmt, None)

    def per_scale(error: torch.Tensor) -> torch.Tensor:
        if dims is None:
            return error.sum()
        return error.sum(dim=dims, keepdim=True) if dims else error

    best = _least_error(w, own, ratios, column_weights, quantize, per_scale)
    return best.reshape(-1) if spec.axis is not None else best.reshape(())


def _best_block_amax(rows: torch.Tensor, fmt: QuantFormat, block: int,
                     global_amax: torch.Tensor | None, ratios: tuple[float, ...],
                     column_weights: torch.Tensor | None) -> torch.Tensor:
    """`search_scale_amax` for a slice of rows of a block-scaled weight: (rows, K / block)."""
    own = numerics.dynamic_amax(numerics.to_blocks(rows, block), block)  # (rows, K/b, 1)

    def quantize(candidate: torch.Tensor) -> torch.Tensor:
        if fmt.scale is ScaleKind.FP32:
            return numerics.fake_quantize(rows, candidate, fmt, block)
        return numerics.fake_quantize(rows, global_amax, fmt, block, candidate)

    def per_scale(error: torch.Tensor) -> torch.Tensor:
        return numerics.to_blocks(error, block).sum(dim=-1, keepdim=True)

    return _least_error(rows, own, ratios, column_weights, quantize, per_scale).squeeze(-1)


def _least_error(w: torch.Tensor, own: torch.Tensor, ratios: tuple[float, ...],
                 column_weights: torch.Tensor | None,
                 quantize: Callable[[torch.Tensor], torch.Tensor],
                 per_scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Among `ratios` x `own`, per scale the amax whose `quantize(amax)` of `w` has the least
    (column-weighted) squared error summed by `per_scale`; ties keep the earlier ratio."""
    best, best_error = own, None
    for ratio in ratios:
        candidate = own * ratio
        error = (quantize(candidate) - w).square()
        if column_weights is not None:
            error = error * column_weights
        error = per_scale(error)
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, candidate, best)
    return best


def search_targets(model: nn.Module, method: str) -> dict[str, tuple[Quantizer, str]]:
    """The weight quantizers `method` searches, by path, each with the search it gets:
    `method` itself, or for `AUTO` the format's entry in `DEFAULT_SEARCHES` (others none),
    where the quantizer has no stored scales yet (GPTQ's, a checkpoint's or an earlier
    search's stay: GPTQ-rounded weights are exact only on the scales GPTQ rounded them to)."""
    check_method(method, allow_auto=True)
    targets = {}
    for entry in site_quantizers(model):
        quantizer = entry.quantizer
        fmt = get_format(quantizer.spec.format)
        chosen = DEFAULT_SEARCHES.get(fmt.name) if method == AUTO else method
        if method == AUTO and quantizer.scale_amax is not None:
            continue
        if (entry.role == "weight" and chosen is not None and searchable(quantizer) is None
                and candidate_ratios(fmt, chosen)):
            targets[entry.path] = (quantizer, chosen)
    return targets


@contextmanager
def recorded_weights(targets: dict[str, tuple[Quantizer, str]]) -> Iterator[dict[str, torch.Tensor]]:
    """While inside, the first input each target quantizer sees (its weight; a reference, not
    a copy) is recorded in the dict yielded, by path."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for path, (quantizer, _) in targets.items():

        def hook(module, inputs, path=path):
            seen.setdefault(path, inputs[0].detach())

        handles.append(quantizer.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def store_searched_scales(
    model: nn.Module, data: CalibrationData, targets: dict[str, tuple[Quantizer, str]],
    seen: dict[str, torch.Tensor], *, num_batches: int | None, progress: bool,
) -> list[str]:
    """Search the scales of every target whose weight was `seen` and store them
    (`Quantizer.set_scale_amax`); "output" searches take their column weights from
    `num_batches` of `data`. Returns the paths searched."""
    moments = {}
    if any(method == "output" for _, method in targets.values()):
        moments = {key: torch.diagonal(h) for key, h in
                   input_hessians(model, data, num_batches).items()}
    found = {}
    for path in tqdm(list(seen), desc="weight scales", unit="weight", disable=not progress):
        quantizer, method = targets[path]
        ratios = candidate_ratios(get_format(quantizer.spec.format), method)
        columns = moments.get(id(quantizer)) if method == "output" else None
        with torch.no_grad():
            found[path] = search_scale_amax(seen[path], quantizer, ratios, columns)
    for path, scale_amax in found.items():  # all or nothing
        targets[path][0].set_scale_amax(scale_amax)
    return list(found)


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
        data: batches as for `qcompile.calibrate`; one pass (`num_batches`; a forward loop
            runs as it decides) shows each weight quantizer its weight.
        method: "mse": per scale the clipping ratio in {0.50, 0.52, ..., 1.00} of the weight's
            own amax with the least squared error of the quantized weight, plus, for NVFP4 and
            MXFP4, 1.5 (the block max mapped to 4 instead of 6). "output": the same amaxes,
            each column's error weighed by the mean square of the input it multiplies (the
            diagonal of GPTQ's Hessian, from `num_batches` of data; weights outside Linear
            sites GPTQ handles fall back to "mse"). "four_over_six": NVFP4/MXFP4
            only, per block the lower error of mapping its max to 6 or to 4. "auto": what
            `qcompile.calibrate` does by default (`DEFAULT_SEARCHES`: "mse" for NVFP4 weights
            without stored scales, no search for other formats).

    Every searched quantizer stores its scales (`Quantizer.scale_amax`, which replaces any
    stored before); `qc.save`/`qc.load`, Hugging Face and serving checkpoints and ONNX export
    carry them exactly. Weight quantizers with a learned or calibrated amax are left as they
    are. The scales stay fixed while the weights train (QAT/QAD); search again ("mse") after
    training to fit them to the trained weights, but not after GPTQ, whose weights are
    rounded onto the scales they have. Returns the paths of the quantizers searched.
    """
    targets = search_targets(model, method)
    if not targets:
        return []
    if callable(data) and not isinstance(data, Iterable):
        num_batches = None  # a forward loop decides itself how many batches it runs
    with recorded_weights(targets) as seen, eval_mode(model), torch.no_grad():
        run_data(model, data, num_batches, False)
    return store_searched_scales(model, data, targets, seen, num_batches=num_batches,
                                 progress=progress)
