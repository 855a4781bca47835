"""Weight scale rules and searched weight scales (#25): PTQ, GPTQ and a short QAD per variant.

For each model and format, each variant is prepared, calibrated (`max`), evaluated (PTQ),
GPTQ-rounded and evaluated (GPTQ), then distilled from the float model for `--qad-steps`
(QAD, starting from GPTQ), all in this one process:

- `amax/7`: int4 weights with the scale rule before #25 (scale = amax / 7; the format row
  swapped for the run, so every kernel computes it), `amax/127.5` the same for int8;
- `default`: the library's defaults (int4: amax / 7.5; NVFP4 weights: the `mse` search,
  `qc.calibrate`'s `weight_scales="auto"`);
- `own`: no search (`weight_scales=None`: every scale from the weight's own max), NVFP4's
  default before it searched;
- `mse`: `qc.calibrate(..., weight_scales="mse")` (clipping ratio per block/channel/tensor by
  weight MSE; NVFP4/MXFP4 also the block max mapped to 4);
- `4over6`: `weight_scales="four_over_six"` (NVFP4/MXFP4: per block, max mapped to 6 or 4);
- `output`: `weight_scales="output"` (the `mse` candidates, errors weighed per input column
  by the input's mean square: the diagonal of GPTQ's Hessian).

Metrics, lower is better: char-GPT validation cross-entropy over float; MiniLM 1 - mean
cosine to the float embeddings on held-out docstrings.

    python bench/scales.py --models gpt --save-rows /tmp/scales_gpt.json
    python bench/scales.py --models minilm --save-rows /tmp/scales_minilm.json
    python bench/scales.py --from-rows /tmp/scales_gpt.json /tmp/scales_minilm.json  # table
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from accuracy import NextByteLoss, float_gpt
from results import write_section

import qcompile as qc
from qcompile.core import formats
from qcompile.core.kernels import cpu
from qcompile.demo import char_gpt, corpus, minilm
from qcompile.demo.run import embed, fidelity, text_batches

#: format -> variants measured (the first is the baseline of the "x before" column).
VARIANTS = {
    "int4": ("amax/7", "default", "mse", "output"),
    "w4a8": ("amax/7", "default", "mse", "output"),
    "nvfp4": ("own", "default", "4over6", "output"),
    "mxfp4": ("default", "mse", "4over6", "output"),
    "int8": ("default", "amax/127.5", "mse"),
    "fp8": ("default", "mse"),
}
#: variant -> (format row name, scale_divisor) swapped for the run.
DIVISORS = {"amax/7": ("int4", None), "amax/127.5": ("int8", 127.5)}
SEARCH = {"default": "auto", "mse": "mse", "4over6": "four_over_six", "output": "output"}


@contextlib.contextmanager
def scale_rule(variant: str):
    """The format row of `variant` swapped in (and the compiled CPU kernels rebuilt)."""
    if variant not in DIVISORS:
        yield
        return
    name, divisor = DIVISORS[variant]
    before = formats.FORMATS[name]
    formats.FORMATS[name] = dataclasses.replace(before, scale_divisor=divisor)
    cpu._compiled.cache_clear()
    try:
        yield
    finally:
        formats.FORMATS[name] = before
        cpu._compiled.cache_clear()


def _quantized(model, recipe, calibration, variant, example, num_gptq):
    """(PTQ, GPTQ) models of one variant; `example` is (args, kwargs) of prepare."""
    args, kwargs = example
    ptq = qc.prepare(copy.deepcopy(model), recipe, example_inputs=args, example_kwargs=kwargs)
    qc.calibrate(ptq, calibration, method="max", progress=False, weight_scales=SEARCH.get(variant))
    if not num_gptq:
        return ptq, None
    gptq = copy.deepcopy(ptq)
    qc.gptq(gptq, num_gptq, progress=False)
    return ptq, gptq


def run_gpt(args) -> list[dict]:
    model, train_data, train_windows, val_windows = float_gpt(args)
    inputs = [w[:, :-1] for w in train_windows]
    calibration = inputs[: args.calibration_batches]
    qad_data = char_gpt.sample_batches(train_data, 32, model.config.seq_len, args.qad_steps, seed=7)
    float_loss = math.log(char_gpt.perplexity(model, val_windows))

    def loss(m):
        return math.log(char_gpt.perplexity(m.eval(), val_windows)) - float_loss

    rows = []
    for fmt in args.formats:
        for variant in [v for v in VARIANTS[fmt] if not args.variants or v in args.variants]:
            started = time.perf_counter()
            with scale_rule(variant):
                ptq, gptq = _quantized(model, fmt, calibration, variant, ((inputs[0],), None),
                                       inputs[: args.gptq_batches])
                row = {"model": "char-GPT", "format": fmt, "variant": variant,
                       "metric": f"val CE over float ({float_loss:.4f})", "PTQ": loss(ptq)}
                if gptq is not None:
                    row["GPTQ"] = loss(gptq)
                if args.qad_steps and gptq is not None and fmt != "int8":
                    qad = copy.deepcopy(gptq)
                    distiller = qc.Distiller(copy.deepcopy(model), qad, temperature=1.0)
                    qc.train(qad, [w[:, :-1] for w in qad_data], steps=args.qad_steps,
                             lr=args.lr, distiller=distiller, progress=False)
                    row["QAD"] = loss(qad)
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def run_minilm(args) -> list[dict]:
    model, tokenizer = minilm.load()
    train_texts = corpus.docstrings("train", limit=256 + args.qad_steps * 32)
    batches = text_batches(tokenizer, train_texts)
    calibration = batches[: args.calibration_batches]
    evaluation = text_batches(tokenizer, corpus.docstrings("val", limit=args.minilm_eval_texts))
    reference = embed(model, evaluation, "float")

    def gap(m):
        return 1.0 - fidelity(reference, embed(m.eval(), evaluation, "q")).mean_cosine

    rows = []
    for fmt in args.formats:
        for variant in [v for v in VARIANTS[fmt] if not args.variants or v in args.variants]:
            started = time.perf_counter()
            with scale_rule(variant):
                ptq, gptq = _quantized(model, fmt, calibration, variant, ((), calibration[0]),
                                       batches[: args.gptq_batches])
                row = {"model": "MiniLM", "format": fmt, "variant": variant,
                       "metric": "1 - mean cosine", "PTQ": gap(ptq)}
                if gptq is not None:
                    row["GPTQ"] = gap(gptq)
                if args.qad_steps and gptq is not None and fmt != "int8":
                    qad = copy.deepcopy(gptq)
                    distiller = qc.Distiller(copy.deepcopy(model), qad, loss="cosine")
                    qc.train(qad, batches[8:], steps=args.qad_steps, lr=args.minilm_lr,
                             distiller=distiller, progress=False)
                    row["QAD"] = gap(qad)
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def clamp_check() -> None:
    """int4 on MiniLM's Linear weights: where each block max lands under amax / 7.5, the max
    element's error, and the summed weight MSE of amax / 7, amax / 7.5 and a sign-aware scale
    (max on +7 or -8 exactly, as a static per-block amax)."""
    from qcompile.core import numerics

    model, _ = minilm.load()
    int4 = formats.FORMATS["int4"]
    rules = {"amax/7": dataclasses.replace(int4, scale_divisor=None), "amax/7.5": int4}
    totals = dict.fromkeys([*rules, "sign-aware"], 0.0)
    on_edge = blocks = 0
    for linear in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        w = linear.weight.detach().float()
        b = numerics.to_blocks(w, 128)
        amax, index = b.abs().max(-1, keepdim=True)
        negative = b.gather(-1, index) < 0
        for name, fmt in rules.items():
            totals[name] += float((numerics.to_blocks(numerics.fake_quantize(w, None, fmt, 128), 128)
                                   - b).square().sum())
        values, _ = numerics.quantize(w, None, int4, 128)
        top = values.gather(-1, index)
        on_edge += int(((top == 7) & ~negative).sum() + ((top == -8) & negative).sum())
        signed = numerics.fake_quantize(w, torch.where(negative, amax * 7.5 / 8, amax), int4, 128)
        totals["sign-aware"] += float((numerics.to_blocks(signed, 128) - b).square().sum())
        blocks += amax.numel()
    print(json.dumps({"blocks": blocks, "max on +7 or -8": on_edge, "weight MSE sums": totals}))


def markdown(rows: list[dict]) -> str:
    lines = ["| model | format | variant | PTQ | GPTQ | QAD | PTQ x baseline |",
             "|---|---|---|---|---|---|---|"]
    baseline = {}
    for row in rows:
        key = (row["model"], row["format"])
        baseline.setdefault(key, row["PTQ"])
        cells = " | ".join(f"{row[m]:.4f}" if m in row else "-" for m in ("PTQ", "GPTQ", "QAD"))
        ratio = row["PTQ"] / baseline[key] if baseline[key] else float("nan")
        lines.append(f"| {row['model']} ({row['metric']}) | {row['format']} | {row['variant']} | "
                     f"{cells} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt", "minilm"], choices=["gpt", "minilm"])
    parser.add_argument("--formats", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--qad-steps", type=int, default=30, help="0: no QAD rows")
    parser.add_argument("--lr", type=float, default=4e-3, help="the GPT's QAD lr")
    parser.add_argument("--minilm-lr", type=float, default=2e-5)
    parser.add_argument("--gptq-batches", type=int, default=8, help="0: no GPTQ (nor QAD) rows")
    parser.add_argument("--variants", nargs="+", help="only these variants (default: all)")
    parser.add_argument("--gpt-float-steps", type=int, default=600)
    parser.add_argument("--gpt-layers", type=int, default=4)
    parser.add_argument("--gpt-d-model", type=int, default=128)
    parser.add_argument("--gpt-batch", type=int, default=16)
    parser.add_argument("--gpt-eval-batches", type=int, default=8)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--minilm-eval-texts", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-rows", type=Path)
    parser.add_argument("--from-rows", type=Path, nargs="+", help="run nothing: table from rows")
    parser.add_argument("--write", action="store_true", help="put the table in bench/RESULTS.md")
    parser.add_argument("--clamp-check", action="store_true",
                        help="run only the int4 block-max count and weight MSE on MiniLM")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.clamp_check:
        clamp_check()
        return
    if args.from_rows:
        rows = [row for path in args.from_rows for row in json.loads(path.read_text())]
    else:
        rows = []
        if "gpt" in args.models:
            rows += run_gpt(args)
        if "minilm" in args.models:
            rows += run_minilm(args)
        if args.save_rows:
            args.save_rows.write_text(json.dumps(rows))
    table = markdown(rows)
    print(table)
    if args.write:
        write_section("weight_scales_table", table)


if __name__ == "__main__":
    main()
