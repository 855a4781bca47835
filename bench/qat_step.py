"""QAT train-step time: qcompile's recipes over float, eager and compiled, beside torchao and ModelOpt.

One train step = forward, loss, backward, AdamW step. Two models:

1. `qcompile.demo.char_gpt.CharGPT` (4 layers, d_model 256, 4 heads), batch 8 x 128 bytes,
   next-byte cross-entropy.
2. The real all-MiniLM-L6-v2 (`qcompile.demo.minilm`, loaded offline), batch 16 x 64 tokens,
   cosine loss of the sentence embeddings to fixed random targets.

Variants of each model, all alive at once: float eager and float compiled (inductor);
for each recipe the prepared model eager and compiled with `backend="qcompile"` (calibrated
on one batch where the recipe has static ranges); the `lowering="kernel"` option (each op an
opaque call into qcompile's CPU kernel) beside the default decomposition for a few recipes;
int8 and fp8 also on Linear sites only (`quantize_matmul=False`: the attention products stay
float, the scope of every peer config below, so that row is the like-for-like comparison); and,
where they are installed, torchao QAT (`QATConfig` with `IntxFakeQuantizeConfig`: int8
per-token dynamic activations with int8 per-channel or int4 group-128 weights) and ModelOpt
(`mtq.quantize` with INT8/FP8/NVFP4/MXFP8_DEFAULT_CFG), compiled with inductor. A peer
that cannot run here is listed with the reason.

Timing is interleaved: after warm-up (which includes compilation), each round runs one step
of every variant, in an order rotated each round; a variant's ratio in a round is its time
over the float step of the same mode (eager / compiled) in that round, and the table shows
medians over rounds. The machine's load drifts; ratios taken within a round mostly cancel it.

    python bench/qat_step.py                            # full run, writes bench/RESULTS.md
    python bench/qat_step.py --quick --no-write         # smoke run (tiny models)
    python bench/qat_step.py --models gpt --recipes int8 --rounds 5 --no-write

Peers are imported from the running interpreter: run it with a Python that has torchao and
nvidia-modelopt (a separate venv, see RESULTS.md) to measure them; without them their rows
say why they are missing.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from results import cpu_model, write_section
from torch import nn
from torch.nn import functional as F

import qcompile as qc
from qcompile.demo import char_gpt

HERE = Path(__file__).resolve().parent
RECIPES = ("int8", "fp8", "nvfp4", "mxfp4", "mxfp8", "int4")
#: compiled QAT step / compiled float step, per recipe.
COMPILED_TARGETS = {"int8": 1.10, "fp8": 1.10, "nvfp4": 1.20, "mxfp4": 1.20, "mxfp8": 1.20, "int4": 1.20}
EAGER_TARGET = 2.0
#: the recipes measured with both lowerings.
KERNEL_LOWERING = ("int8", "nvfp4")
#: recipes that also quantize the attention products (`quantize_matmul`), which no peer
#: quantizes: also measured on Linear sites only, the scope the peers' configs cover.
LINEAR_ONLY = ("int8", "fp8")
LINEAR_ONLY_SUFFIX = " [Linear sites only]"
#: which peer rows each recipe must beat (same or nearest scheme).
PEERS_OF = {
    "int8": ("torchao int8-act int8-weight", "modelopt INT8_DEFAULT_CFG"),
    "fp8": ("modelopt FP8_DEFAULT_CFG",),
    "nvfp4": ("modelopt NVFP4_DEFAULT_CFG",),
    "mxfp8": ("modelopt MXFP8_DEFAULT_CFG",),
    "int4": ("torchao int8-act int4-weight",),
}


# ---------------------------------------------------------------- models


@dataclass
class Workload:
    """A model, how to call it on one batch, and the loss of a train step."""

    name: str
    build: Callable[[], nn.Module]
    args: tuple
    kwargs: dict
    loss: Callable[[torch.Tensor], torch.Tensor]
    description: str


def gpt_workload(quick: bool) -> Workload:
    config = char_gpt.GPTConfig(layers=1 if quick else 4, d_model=128 if quick else 256, heads=4)
    batch = 2 if quick else 8
    generator = torch.Generator().manual_seed(0)
    window = torch.randint(0, char_gpt.VOCAB_SIZE, (batch, config.seq_len + 1), generator=generator)
    target = window[:, 1:].reshape(-1)

    def loss(logits):
        return F.cross_entropy(logits.reshape(-1, char_gpt.VOCAB_SIZE), target)

    torch.manual_seed(0)
    model = char_gpt.CharGPT(config)
    return Workload(
        "char-GPT", lambda: copy.deepcopy(model), (window[:, :-1],), {}, loss,
        f"CharGPT {config.layers} layers, d_model {config.d_model}, {config.heads} heads, "
        f"batch {batch} x {config.seq_len}",
    )


def minilm_workload(quick: bool) -> Workload:
    from qcompile.demo import minilm

    encoder, tokenizer = minilm.load()
    batch, seq = (2, 16) if quick else (16, 64)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, tokenizer.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    target = F.normalize(torch.randn(batch, encoder.bert.config.hidden_size, generator=generator), dim=-1)

    def loss(embeddings):
        return 1 - (embeddings * target).sum(-1).mean()

    encoder.train()
    return Workload(
        "MiniLM", lambda: copy.deepcopy(encoder), (), {"input_ids": ids, "attention_mask": mask},
        loss, f"all-MiniLM-L6-v2 (real weights), batch {batch} x {seq} tokens",
    )


# ---------------------------------------------------------------- variants


@dataclass
class Variant:
    label: str
    mode: str  # "eager" or "compiled"
    kind: str  # "float", "qcompile" or "peer"
    step: Callable[[], None] | None = None
    recipe: str = ""  # the named recipe whose targets apply (qcompile rows)
    skipped: str = ""
    warmup_s: float = 0.0
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def reference(self) -> str:
        return f"float ({self.mode})"

    @property
    def name(self) -> str:
        return self.label if self.kind == "float" else f"{self.label} ({self.mode})"


def train_step(workload: Workload, model: nn.Module, call: Callable) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)  # tiny: keep the values tame

    def step():
        workload.loss(call(*workload.args, **workload.kwargs)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def qcompile_variants(workload: Workload, recipes, kernel_lowering,
                      own_weight_scales=False) -> list[Variant]:
    variants = []
    for recipe in recipes:
        model = qc.prepare(workload.build(), recipe, workload.args, workload.kwargs)
        if qc.get_recipe(recipe).needs_calibration:
            qc.calibrate(model, [workload.kwargs or workload.args], progress=False)
        model.train()
        variants.append(Variant(recipe, "eager", "qcompile", train_step(workload, model, model), recipe=recipe))
        compiled = torch.compile(model, backend="qcompile")
        variants.append(Variant(recipe, "compiled", "qcompile", train_step(workload, model, compiled),
                                recipe=recipe))
        stored = any(getattr(m, "scale_amax", None) is not None for m in model.modules())
        if own_weight_scales and stored:  # calibrate's default searched (and stored) scales
            model = qc.prepare(workload.build(), recipe, workload.args, workload.kwargs)
            qc.calibrate(model, [workload.kwargs or workload.args], progress=False,
                         weight_scales=None)
            model.train()
            name = f"{recipe} [own weight scales]"
            variants.append(Variant(name, "eager", "qcompile", train_step(workload, model, model)))
            compiled = torch.compile(model, backend="qcompile")
            variants.append(Variant(name, "compiled", "qcompile",
                                    train_step(workload, model, compiled)))
        if recipe in kernel_lowering:
            opaque = torch.compile(model, backend="qcompile", options={"lowering": "kernel"})
            variants.append(Variant(f"{recipe} [kernel lowering]", "compiled", "qcompile",
                                    train_step(workload, model, opaque)))
        if recipe in LINEAR_ONLY:
            linear_only = qc.get_recipe(recipe).with_(quantize_matmul=False)
            model = qc.prepare(workload.build(), linear_only, workload.args, workload.kwargs)
            qc.calibrate(model, [workload.kwargs or workload.args], progress=False)
            model.train()
            compiled = torch.compile(model, backend="qcompile")
            variants.append(Variant(recipe + LINEAR_ONLY_SUFFIX, "compiled", "qcompile",
                                    train_step(workload, model, compiled), recipe=recipe))
    return variants


def _linear_filter(module: nn.Module, fqn: str) -> bool:
    """Linears that qcompile's recipes quantize (output heads stay float)."""
    return isinstance(module, nn.Linear) and not fqn.endswith(("lm_head", "classifier"))


def torchao_variants(workload: Workload) -> list[Variant]:
    schemes = {
        "torchao int8-act int8-weight": ("int8", "per_channel"),
        "torchao int8-act int4-weight": ("int4", 128),
    }
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except Exception as error:  # noqa: BLE001 - any import failure is reported
        reason = f"torchao not importable ({type(error).__name__}: {error})"
        return [Variant(label, "compiled", "peer", skipped=reason) for label in schemes]
    variants = []
    for label, (weight_dtype, weight_granularity) in schemes.items():
        try:
            model = workload.build()
            activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
            if weight_dtype == "int8":
                weight = IntxFakeQuantizeConfig(torch.int8, weight_granularity, is_symmetric=True)
            else:
                weight = IntxFakeQuantizeConfig(torch.int4, group_size=weight_granularity,
                                                is_symmetric=True)
            config = QATConfig(activation_config=activation, weight_config=weight, step="prepare")
            quantize_(model, config, filter_fn=_linear_filter)
            model.train()
            variants.append(Variant(label, "compiled", "peer",
                                    train_step(workload, model, torch.compile(model))))
        except Exception as error:  # noqa: BLE001
            variants.append(Variant(label, "compiled", "peer", skipped=_reason(error)))
    return variants


def modelopt_variants(workload: Workload) -> list[Variant]:
    configs = ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG", "MXFP8_DEFAULT_CFG")
    labels = [f"modelopt {name}" for name in configs]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except Exception as error:  # noqa: BLE001
        reason = f"nvidia-modelopt not importable ({type(error).__name__}: {error})"
        return [Variant(label, "compiled", "peer", skipped=reason) for label in labels]
    variants = []
    for name, label in zip(configs, labels):
        try:
            model = workload.build()
            config = copy.deepcopy(getattr(mtq, name))  # it keeps lm_head in float itself

            def forward_loop(m):
                m(*workload.args, **workload.kwargs)

            with torch.no_grad():
                mtq.quantize(model, config, forward_loop)
            model.train()
            step = train_step(workload, model, torch.compile(model))
            step()  # a peer that fails on this CPU fails here (and says why)
            variants.append(Variant(label, "compiled", "peer", step))
        except Exception as error:  # noqa: BLE001
            variants.append(Variant(label, "compiled", "peer", skipped=_reason(error)))
    return variants


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if "BackendCompilerFailed" in type(error).__name__ and len(text) > 1:
        first = " ".join(line.strip() for line in text[:3])
    return f"{type(error).__name__}: {first[:200]}"


# ---------------------------------------------------------------- timing


def measure(variants: list[Variant], warmup: int, rounds: int) -> None:
    live = [v for v in variants if v.step is not None]
    for variant in live:
        start = time.perf_counter()
        try:
            for _ in range(warmup):
                variant.step()
        except Exception as error:  # noqa: BLE001
            variant.step, variant.skipped = None, _reason(error)
            traceback.print_exc()
        variant.warmup_s = time.perf_counter() - start
        print(f"  warmed up {variant.name} in {variant.warmup_s:.1f} s"
              + (f" (FAILED: {variant.skipped})" if variant.skipped else ""), flush=True)
    live = [v for v in live if v.step is not None]
    for index in range(rounds):
        shift = index % len(live)
        order = live[shift:] + live[:shift]
        times = {}
        for variant in order:
            start = time.perf_counter()
            variant.step()
            times[variant.name] = time.perf_counter() - start
        for variant in live:
            variant.times.append(times[variant.name])
            variant.ratios.append(times[variant.name] / times[variant.reference])
        print(f"  round {index + 1}/{rounds}: float eager {times['float (eager)'] * 1e3:.0f} ms, "
              f"float compiled {times['float (compiled)'] * 1e3:.0f} ms", flush=True)


def run_workload(workload: Workload, args) -> list[Variant]:
    print(f"{workload.name}: {workload.description}", flush=True)
    model = workload.build().train()
    variants = [
        Variant("float (eager)", "eager", "float", train_step(workload, model, model)),
    ]
    compiled_model = workload.build().train()
    variants.append(Variant("float (compiled)", "compiled", "float",
                            train_step(workload, compiled_model, torch.compile(compiled_model))))
    variants += qcompile_variants(workload, args.recipes, [r for r in KERNEL_LOWERING if r in args.recipes],
                                  args.own_weight_scales)
    if not args.no_peers:
        variants += torchao_variants(workload)
        variants += modelopt_variants(workload)
    measure(variants, args.warmup, args.rounds)
    return variants


# ---------------------------------------------------------------- report


def _ratio(variant: Variant) -> float:
    return statistics.median(variant.ratios) if variant.ratios else float("nan")


def _verdict(variant: Variant, by_name: dict[str, Variant]) -> str:
    if variant.kind != "qcompile" or not variant.recipe:
        return ""
    ratio = _ratio(variant)
    if variant.mode == "eager":
        return f"<= {EAGER_TARGET:.2f}x: {'met' if ratio <= EAGER_TARGET else 'MISSED'}"
    target = COMPILED_TARGETS[variant.recipe]
    parts = [f"<= {target:.2f}x: {'met' if ratio <= target else 'MISSED'}"]
    for peer in PEERS_OF.get(variant.recipe, ()):
        other = by_name.get(f"{peer} (compiled)")
        if other is None or other.step is None and not other.ratios:
            continue
        below = ratio < _ratio(other)
        parts.append(f"{'below' if below else 'NOT below'} {peer.split()[0]} ({_ratio(other):.2f}x)")
    return "; ".join(parts)


def markdown(results: dict[str, list[Variant]], args, elapsed: float) -> str:
    lines = [
        f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up steps "
        f"(wall time {elapsed / 60:.1f} min).",
        "",
    ]
    for model, variants in results.items():
        by_name = {v.name: v for v in variants}
        lines += [
            f"**{model}** ({WORKLOAD_DESCRIPTIONS[model]})",
            "",
            "| variant | mode | step ms (median) | / float, same mode | warm-up s | target |",
            "|---|---|---:|---:|---:|---|",
        ]
        for variant in variants:
            if variant.skipped and not variant.ratios:
                lines.append(f"| {variant.label} | {variant.mode} | - | - | - | not run: {variant.skipped} |")
                continue
            median_ms = statistics.median(variant.times) * 1e3
            lines.append(
                f"| {variant.label} | {variant.mode} | {median_ms:.1f} | {_ratio(variant):.2f}x | "
                f"{variant.warmup_s:.0f} | {_verdict(variant, by_name)} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


WORKLOAD_DESCRIPTIONS: dict[str, str] = {}


def plot(results: dict[str, list[Variant]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.6 * len(results)), squeeze=False)
    colors = {"float": "#888888", "qcompile": "#1f77b4", "peer": "#d62728"}
    for ax, (model, variants) in zip(axes[:, 0], results.items()):
        shown = [v for v in variants if v.ratios and v.kind != "float"]
        labels = [f"{v.label}\n{v.mode}" for v in shown]
        values = [_ratio(v) for v in shown]
        bars = ax.bar(range(len(shown)), values, color=[colors[v.kind] for v in shown])
        for bar, v in zip(bars, shown):
            if v.mode == "eager":
                bar.set_alpha(0.45)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.1, color="green", linestyle="--", linewidth=0.8, label="1.10x / 1.20x targets")
        ax.axhline(1.2, color="green", linestyle=":", linewidth=0.8)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("step time / float step")
        ax.set_title(f"{model}: QAT train step over float (same mode); blue qcompile, red peers, pale eager")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(text: str, command: str) -> None:
    write_section("qat_step", f"## QAT train-step time over float\n\n    {command}\n\n{text}\n\n"
                              "![qat step](qat_step.png)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt", "minilm"], choices=["gpt", "minilm"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (the first compiles)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peers", action="store_true", help="skip torchao and ModelOpt")
    parser.add_argument("--quick", action="store_true", help="tiny models and 2 rounds: a smoke run")
    parser.add_argument("--own-weight-scales", action="store_true",
                        help="beside each recipe whose calibration searched weight scales (nvfp4), "
                             "the same recipe calibrated with weight_scales=None")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup = 2, 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    started = time.perf_counter()
    builders = {"gpt": gpt_workload, "minilm": minilm_workload}
    results = {}
    for name in args.models:
        workload = builders[name](args.quick)
        WORKLOAD_DESCRIPTIONS[workload.name] = workload.description
        results[workload.name] = run_workload(workload, args)
        torch._dynamo.reset()
        print(markdown({workload.name: results[workload.name]}, args, time.perf_counter() - started),
              flush=True)
    text = markdown(results, args, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        plot(results, HERE / "qat_step.png")
        write_results(text, f"{sys.executable} bench/qat_step.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
