"""Mixed precision by measurement: accuracy vs effective bits of `qc.auto_recipe` after PTQ.

On the char-GPT and the real all-MiniLM-L6-v2 of bench/accuracy.py (same models, data and
metrics: validation perplexity; mean cosine to the float embeddings), for budgets between
uniform NVFP4 (4.5 bits per weight) and uniform FP8 (8): auto_recipe with the gradient and
the kl scores, against uniform nvfp4, uniform fp8 and random assignments at the same budgets
(a random priority per unit through the same exact knapsack, so they fill the budget as fully). Every point
is a model prepared with the recipe, `max`-calibrated on the same batches, and evaluated.
One auto_recipe call per method scores the sites; the other budgets re-solve from its scores
(`SearchResult.recipe_at`).

Search time is checked against its budget: one calibration pass per format (the search's own
calibration passes) plus one forward+backward pass of the float model per scoring batch
(timed here in the same run); the captures (torch.export, one per format) are shown apart.

    python bench/mixed_precision.py --models gpt --save-rows /tmp/gpt.json --threads 1
    python bench/mixed_precision.py --models minilm --save-rows /tmp/minilm.json --threads 1
    python bench/mixed_precision.py --from-rows /tmp/gpt.json /tmp/minilm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch
from accuracy import float_gpt
from results import cpu_model, write_section

import qcompile as qc
from qcompile.core.calls import call_with_batch
from qcompile.demo import char_gpt, corpus, minilm
from qcompile.demo.run import embed, fidelity, text_batches

HERE = Path(__file__).resolve().parent
FORMATS = ("nvfp4", "fp8")


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def forward_backward_seconds(model, batches, loss) -> float:
    """One forward and backward pass of the float model per batch (the gradient score's
    share of the search-time budget)."""
    model = copy.deepcopy(model).eval()
    start = time.perf_counter()
    for batch in batches:
        loss(call_with_batch(model, batch)).backward()
    return time.perf_counter() - start


def run_model(name: str, model, calibration, evaluate, divergence: str, args) -> dict:
    """Every point of one model: uniform formats, auto_recipe per method and budget, random."""
    example = calibration[0]
    prepare_kwargs = ({"example_kwargs": example} if isinstance(example, dict)
                      else {"example_inputs": (example,)})
    points, seconds = [], {}

    def point(kind: str, recipe, bits_asked=None, extra=None):
        qmodel = qc.prepare(copy.deepcopy(model), recipe, **prepare_kwargs)
        _, calib = timed(qc.calibrate, qmodel, calibration, progress=False)
        value = evaluate(qmodel)
        bits = qc.report(qmodel).effective_bits
        row = {"model": name, "kind": kind, "budget": bits_asked, "bits": bits, "value": value,
               **(extra or {})}
        points.append(row)
        print(json.dumps(row), flush=True)
        return row, calib

    float_value = evaluate(model)
    for fmt in FORMATS:  # as auto_recipe's default base: Linear sites only, attention in float
        uniform = qc.RECIPES[fmt].with_(quantize_matmul=False)
        _, seconds[f"calibrate {fmt}"] = point(fmt, uniform)

    def loss(output):
        out = output.float()
        if divergence == "kl":
            return torch.nn.functional.cross_entropy(
                out.reshape(-1, out.shape[-1]), out.detach().argmax(-1).reshape(-1))
        return out.square().sum()

    seconds["forward+backward"] = forward_backward_seconds(model, calibration, loss)
    searches = {}
    for method in args.methods:
        recipe, wall = timed(qc.auto_recipe, model, FORMATS, calibration,
                             effective_bits=6.0,
                             method=method, divergence=divergence, progress=False)
        searches[method] = recipe.search
        seconds[f"search {method}"] = wall
        seconds[f"search {method} parts"] = recipe.search.seconds
    rng = random.Random(0)
    for budget in args.budgets:
        for method, search in searches.items():
            point(f"auto {method}", search.recipe_at(budget), budget)
        search = next(iter(searches.values()))
        for i in range(args.random if budget != 6.0 else args.random_at_6):
            # a random priority per unit for the larger format: the exact knapsack then fills
            # the budget as fully as auto_recipe does, with a random set of units
            scores = {u.name: {c: (rng.random() if c == "nvfp4" else 0.0) for c in u.scores}
                      for u in search.units}
            point("random", search.recipe_at(budget, scores=scores), budget, {"seed": i})
    return {"model": name, "float": float_value, "points": points, "seconds": seconds,
            "units": len(next(iter(searches.values())).units)}


# ---------------------------------------------------------------- the two models


def gpt_result(args) -> dict:
    model, _, train_windows, val_windows = float_gpt(args)
    calibration = [w[:, :-1] for w in train_windows[: args.calibration_batches]]
    return run_model("char-GPT", model, calibration,
                     lambda m: char_gpt.perplexity(m, val_windows), "kl", args)


def minilm_result(args) -> dict:
    model, tokenizer = minilm.load()
    texts = corpus.docstrings("train", limit=32 * args.calibration_batches)
    calibration = text_batches(tokenizer, texts)[: args.calibration_batches]
    evaluation = text_batches(tokenizer, corpus.docstrings("val", limit=args.minilm_eval_texts))
    reference = embed(model, evaluation, "float")

    def evaluate(m):
        return fidelity(reference, embed(m.eval(), evaluation, "eval")).mean_cosine

    return run_model("MiniLM", model, calibration, evaluate, "mse", args)


# ---------------------------------------------------------------- reading the results


def lower_is_better(result: dict) -> bool:
    return result["model"] == "char-GPT"


def summary(result: dict, at: float = 6.0) -> dict:
    """Gap closed at `at` bits by each method, the best random there, and the search time."""
    points = result["points"]
    value = {p["kind"]: p["value"] for p in points if p["kind"] in FORMATS}
    sign = 1 if lower_is_better(result) else -1
    gap = value["nvfp4"] - value["fp8"]
    out = {}
    randoms = [p["value"] for p in points if p["kind"] == "random" and p["budget"] == at]
    best_random = min(randoms, key=lambda v: sign * v) if randoms else None
    for p in points:
        if p["kind"].startswith("auto") and p["budget"] == at:
            out[p["kind"]] = {
                "value": p["value"], "bits": p["bits"],
                "gap closed": (value["nvfp4"] - p["value"]) / gap,
                "beats every random": best_random is None or sign * p["value"] < sign * best_random,
            }
    out["best random"] = best_random
    out["random gap closed"] = None if best_random is None else (value["nvfp4"] - best_random) / gap
    seconds = result["seconds"]
    for key in [k for k in seconds if k.startswith("search ") and not k.endswith("parts")]:
        parts = seconds[key + " parts"]
        calibration = sum(v for k, v in parts.items() if k.startswith("calibrate"))
        core = parts["score"] + calibration
        reference = calibration + seconds["forward+backward"]
        out[key] = {"wall s": seconds[key], "calibrate+score s": core,
                    "reference s": reference, "ratio": core / reference}
    return out


def markdown(results: list[dict], command: str, args) -> str:
    machine = (f"CPU: {cpu_model()}, shared with other jobs (2 cores, ~7 engineers, load "
               "10-15 during the runs). Budgets re-solved from one scoring pass per method.")
    lines = [f"`{command}`", "", machine, ""]
    for result in results:
        better = "lower" if lower_is_better(result) else "higher"
        metric = "val perplexity" if lower_is_better(result) else "mean cosine to float"
        title = (f"**{result['model']}** ({metric}, {better} is better; float "
                 f"{result['float']:.4f}; {result['units']} decision units)")
        lines += [title, "", "| kind | budget | effective bits | value |", "|---|---|---|---|"]
        for p in sorted(result["points"], key=lambda p: (p["bits"], p["kind"])):
            budget = "-" if p["budget"] is None else f"{p['budget']:.1f}"
            lines.append(f"| {p['kind']} | {budget} | {p['bits']:.3f} | {p['value']:.4f} |")
        s = summary(result)
        lines.append("")
        for method in [k for k in s if k.startswith("auto")]:
            m = s[method]
            lines.append(f"- at 6 bits, {method}: {m['value']:.4f} at {m['bits']:.3f} bits closes "
                         f"{m['gap closed']:.0%} of the nvfp4->fp8 gap; beats every random "
                         f"assignment: {m['beats every random']}")
        if s["best random"] is not None:
            lines.append(f"- best random assignment at 6 bits: {s['best random']:.4f} "
                         f"({s['random gap closed']:.0%} of the gap)")
        for key in [k for k in s if k.startswith("search ")]:
            t = s[key]
            lines.append(f"- {key}: {t['calibrate+score s']:.1f} s calibrating and scoring vs "
                         f"{t['reference s']:.1f} s for one calibration pass per format plus one "
                         f"forward+backward per batch (ratio {t['ratio']:.2f}, target <= 2); "
                         f"{t['wall s']:.1f} s wall with the captures (torch.export)")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8))
    axes = [axes] if len(results) == 1 else axes
    styles = {"auto gradient": ("C3", "o-"), "auto kl": ("C2", "s--"),
              "nvfp4": ("C0", "D"), "fp8": ("C1", "D"), "random": ("0.6", ".")}
    for ax, result in zip(axes, results):
        for kind, (color, style) in styles.items():
            pts = sorted((p["bits"], p["value"]) for p in result["points"] if p["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=kind)
        ax.axhline(result["float"], color="black", linestyle=":", label="float")
        ax.set_xlabel("effective bits per weight")
        ax.set_ylabel("val perplexity" if lower_is_better(result) else "mean cosine to float")
        ax.set_title(f"{result['model']}: auto_recipe after PTQ")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt", "minilm"], choices=["gpt", "minilm"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[5.0, 5.5, 6.0, 6.5, 7.0, 7.5])
    parser.add_argument("--methods", nargs="+", default=["gradient", "kl"])
    parser.add_argument("--random", type=int, default=2, help="random assignments per budget")
    parser.add_argument("--random-at-6", type=int, default=6, help="random assignments at 6 bits")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--gpt-float-steps", type=int, default=600)
    parser.add_argument("--gpt-layers", type=int, default=4)
    parser.add_argument("--gpt-d-model", type=int, default=128)
    parser.add_argument("--gpt-batch", type=int, default=16)
    parser.add_argument("--gpt-eval-batches", type=int, default=8)
    parser.add_argument("--minilm-eval-texts", type=int, default=256)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--save-rows", type=Path)
    parser.add_argument("--from-rows", type=Path, nargs="+")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.from_rows:
        results = [r for path in args.from_rows for r in json.loads(path.read_text())]
    else:
        results = []
        if "gpt" in args.models:
            results.append(gpt_result(args))
        if "minilm" in args.models:
            results.append(minilm_result(args))
    if args.save_rows:
        args.save_rows.write_text(json.dumps(results))
    text = markdown(results, "python bench/mixed_precision.py " + " ".join(sys.argv[1:]), args)
    print(text)
    if not args.no_write:
        plot(results, HERE / "mixed_precision.png")
        write_section("mixed_precision", "## Mixed precision: auto_recipe (#23)\n\n" + text
                      + "\n![mixed precision](mixed_precision.png)")


if __name__ == "__main__":
    main()
