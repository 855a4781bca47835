"""Weight scale rules for PTQ (#25): which scale loses least, per weight format.

For each format's recipe (int4 weight-only, int8, fp8; activations calibrated with `max` as
in bench/accuracy.py), the weight quantizers get a static amax from one of these rules, then
the model is evaluated (char-GPT validation cross-entropy, MiniLM mean cosine to float):

- `max`: amax = the block's / channel's / tensor's max |w| (today's scale amax / qmax).
- `half`: amax = max |w| * qmax / (qmax + 0.5), i.e. scale = max |w| / 7.5 (int4) or / 127.5
  (int8): the block max lands on the rounding edge of the top level and the whole [-8, 7] /
  [-128, 127] range is used (torchao, compressed-tensors).
- `mse`: per block / channel / tensor, the clipping ratio r in {0.50, 0.51, ..., 1.00} (and
  qmax / (qmax + 0.5)) minimising the squared error of the quantized weight.
- `recipe`: the recipe as prepared, nothing changed (any format: PTQ of e.g. mxfp4 vs mxfp4_ocp).

    python bench/scales.py --models gpt minilm --formats int4 int8 fp8

The float char-GPT comes from bench/accuracy.py's cache (same flags). No training here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from accuracy import float_gpt
from torch import nn

import qcompile as qc
from qcompile.backends.onnx.weights import find_weight_quantizers
from qcompile.core import numerics
from qcompile.core.formats import ScaleKind, get_format
from qcompile.demo import char_gpt, corpus, minilm
from qcompile.demo.run import embed, fidelity, text_batches

RULES = ("max", "half", "mse", "recipe")
RATIOS = torch.linspace(0.5, 1.0, 51)


def _groups(w: torch.Tensor, spec) -> tuple[torch.Tensor, tuple[int, ...]]:
    """w as (groups, elements) rows sharing one amax, and the amax shape the quantizer takes."""
    fmt = get_format(spec.format)
    block = fmt.resolve_block_size(spec.block_size)
    if block is not None:
        rows = w.reshape(-1, block)
        return rows, (*w.shape[:-1], w.shape[-1] // block, 1)
    if spec.axis is not None:
        axis = spec.axis % w.ndim
        moved = w.movedim(axis, 0)
        shape = [1] * w.ndim
        shape[axis] = w.shape[axis]
        return moved.reshape(w.shape[axis], -1), tuple(shape)
    return w.reshape(1, -1), ()


def rule_amax(w: torch.Tensor, spec, rule: str) -> torch.Tensor:
    """The static amax of weight w under `rule`, shaped for the quantizer."""
    fmt = get_format(spec.format)
    element = fmt.element
    w = w.detach().float()
    rows, shape = _groups(w, spec)
    group_max = numerics.finite_abs(rows).amax(dim=1)
    if rule == "max":
        return group_max.reshape(shape)
    half = element.max_value / (element.max_value + 0.5)
    if rule == "half":
        return (group_max * half).reshape(shape)
    ratios = torch.cat([RATIOS, torch.tensor([half])])
    best_error = torch.full_like(group_max, math.inf)
    best = group_max.clone()
    for r in ratios.tolist():
        amax = group_max * r
        # one fp32 scale per row: quantize each row with its own amax (blocks of the row length)
        q = numerics.fake_quantize(rows, amax[:, None, None], fmt, rows.shape[1])
        error = (q - rows).pow(2).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, amax, best)
    return best.reshape(shape)


def apply_rule(model: nn.Module, weights: dict[str, torch.Tensor], rule: str) -> None:
    if rule == "recipe":
        return
    for path, weight in weights.items():
        quantizer = model.get_submodule(path)
        spec = quantizer.spec
        if get_format(spec.format).scale is not ScaleKind.FP32:
            raise ValueError(f"{spec.format}: only fp32-scaled weight formats have these rules")
        amax = rule_amax(weight, spec, rule)
        quantizer.spec = dataclasses.replace(spec, dynamic=False)
        quantizer.set_amax(amax)


def run_gpt(args) -> list[dict]:
    model, _, train_windows, val_windows = float_gpt(args)
    inputs = [w[:, :-1] for w in train_windows]
    float_loss = math.log(char_gpt.perplexity(model, val_windows))
    rows = []
    for fmt in args.formats:
        ptq = qc.prepare(copy.deepcopy(model), fmt, example_inputs=(inputs[0],))
        qc.calibrate(ptq, inputs[: args.calibration_batches], method="max")
        weights = find_weight_quantizers(ptq, (inputs[0],), {})
        row = {"model": "char-GPT", "format": fmt, "metric": "val CE loss over float",
               "float": float_loss}
        for rule in args.rules:
            candidate = copy.deepcopy(ptq)
            weights = find_weight_quantizers(candidate, (inputs[0],), {})
            apply_rule(candidate, weights, rule)
            row[rule] = math.log(char_gpt.perplexity(candidate, val_windows)) - float_loss
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_minilm(args) -> list[dict]:
    model, tokenizer = minilm.load()
    train_texts = corpus.docstrings("train", limit=256)
    calibration = text_batches(tokenizer, train_texts)[: args.calibration_batches]
    evaluation = text_batches(tokenizer, corpus.docstrings("val", limit=args.minilm_eval_texts))
    reference = embed(model, evaluation, "float")
    rows = []
    for fmt in args.formats:
        ptq = qc.prepare(copy.deepcopy(model), fmt, example_kwargs=calibration[0])
        qc.calibrate(ptq, calibration, method="max")
        row = {"model": "MiniLM", "format": fmt, "metric": "mean cosine gap (1 - cos)", "float": 1.0}
        for rule in args.rules:
            candidate = copy.deepcopy(ptq)
            weights = find_weight_quantizers(candidate, (), calibration[0])
            apply_rule(candidate, weights, rule)
            score = fidelity(reference, embed(candidate.eval(), evaluation, rule))
            row[rule] = 1.0 - score.mean_cosine
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt", "minilm"], choices=["gpt", "minilm"])
    parser.add_argument("--formats", nargs="+", default=["int4", "int8", "fp8"])
    parser.add_argument("--rules", nargs="+", default=["max", "half", "mse"], choices=RULES)
    parser.add_argument("--gpt-float-steps", type=int, default=1000)
    parser.add_argument("--gpt-layers", type=int, default=4)
    parser.add_argument("--gpt-d-model", type=int, default=128)
    parser.add_argument("--gpt-batch", type=int, default=16)
    parser.add_argument("--gpt-eval-batches", type=int, default=16)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--minilm-eval-texts", type=int, default=256)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--save-rows", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    rows = []
    if "gpt" in args.models:
        rows += run_gpt(args)
    if "minilm" in args.models:
        rows += run_minilm(args)
    print(f"wall time {(time.perf_counter() - started) / 60:.1f} min")
    for row in rows:
        cells = " | ".join(f"{row[r]:.4f}" if r in row else "-" for r in RULES)
        print(f"| {row['model']} | {row['format']} | {row['metric']} | {cells} |")
    if args.save_rows:
        args.save_rows.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
