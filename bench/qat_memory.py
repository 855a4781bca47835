"""QAT train-step peak memory: every named recipe against float, eager and compiled.

The model is a GPT-style stack (`qcompile.demo.char_gpt.CharGPT`: 4 blocks, d_model 512,
8 heads, fused causal SDPA attention, GELU MLP, byte vocabulary) trained with AdamW on
next-byte cross-entropy. One train step = forward, loss, backward, AdamW step.

Each variant (float or a recipe; eager or compiled) runs in its own process: build, prepare,
calibrate (static recipes), one warm-up step (which compiles), then the peak is reset and
`--steps` more steps are measured:

- CPU: the peak resident set size of the process over the measured steps (`VmHWM` of
  /proc/self/status, reset through /proc/self/clear_refs after `malloc_trim`), so the
  compiler's own memory during warm-up is not counted, but the process's fixed memory
  (torch, the compiled code, the model, AdamW state) is: the ratios understate the extra
  memory itself, which is shown beside them as `extra` = peak - baseline, baseline = RSS
  before the warm-up step.
- CUDA: `torch.cuda.max_memory_allocated()` over the measured steps (tensors only).

Ratios are to the float step of the same mode (eager / compiled) at the same size.

    python bench/qat_memory.py                                  # full run, writes RESULTS.md
    python bench/qat_memory.py --tokens 512 --recipes int8 --no-write
    python bench/qat_memory.py --quick --no-write               # smoke run (tiny model)
    python bench/qat_memory.py --from-logs a.log b.log          # table from split runs' output

Peers (torchao QAT, ModelOpt) are measured where they import; otherwise their rows say why.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = ("int8", "fp8", "nvfp4", "mxfp4", "mxfp8", "int4", "w4a8")
#: also measured with the attention products quantized (`Recipe.attention="products"`, the
#: default before #27) for comparison
PRODUCTS = ("int8", "fp8")
TARGETS = {"compiled": 1.10, "eager": 1.30}
#: tokens -> (batch, layers); 2,048 tokens use a smaller batch on the 2-core machine
SIZES = {512: (8, 4), 2048: (2, 4)}


# ---------------------------------------------------------------- child: one variant


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device) -> int:
    """Return freed heap to the OS, reset the peak; the current footprint (bytes)."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kib("VmRSS") * 1024


def _peak(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_kib("VmHWM") * 1024


def run_variant(args) -> dict:
    import torch
    from torch.nn import functional as F

    import qcompile as qc
    from qcompile.demo import char_gpt

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = char_gpt.GPTConfig(layers=args.layers, d_model=args.d_model, heads=args.heads,
                                seq_len=args.tokens)
    model = char_gpt.CharGPT(config).to(device)
    generator = torch.Generator().manual_seed(0)
    window = torch.randint(0, char_gpt.VOCAB_SIZE, (args.batch, args.tokens + 1),
                           generator=generator).to(device)
    ids, target = window[:, :-1], window[:, 1:].reshape(-1)

    kind, _, name = args.variant.partition(":")
    if kind == "qcompile":
        recipe = qc.get_recipe(name.split("+")[0])
        if name.endswith("+products"):
            recipe = recipe.with_(attention="products")
        model = qc.prepare(model, recipe, (ids,))
        if recipe.needs_calibration:
            qc.calibrate(model, [(ids,)], progress=False)
        model.train()
    elif kind == "peer":
        model = _peer(model, name, ids)
    call = model
    if args.mode == "compiled":
        call = torch.compile(model, backend="qcompile" if kind == "qcompile" else "inductor")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step():
        logits = call(ids)
        F.cross_entropy(logits.reshape(-1, char_gpt.VOCAB_SIZE), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: compiles, creates AdamW state
    baseline = _reset_peak(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    return {"peak": _peak(device), "baseline": baseline, "step_s": seconds}


def _peer(model, name: str, ids):
    if name.startswith("torchao"):
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        import torch

        activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        weight = IntxFakeQuantizeConfig(torch.int8, "per_channel")
        quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
                  filter_fn=lambda m, fqn: type(m).__name__ == "Linear" and "head" not in fqn)
        return model
    import modelopt.torch.quantization as mtq

    config = getattr(mtq, name.split()[-1])
    return mtq.quantize(model, config, lambda m: m(ids))


# ---------------------------------------------------------------- parent: all variants


def variants(recipes) -> list[str]:
    found = ["float"] + [f"qcompile:{r}" for r in recipes]
    found += [f"qcompile:{r}+products" for r in recipes if r in PRODUCTS]
    return found + ["peer:torchao int8-act int8-weight", "peer:modelopt INT8_DEFAULT_CFG"]


def peer_problem(variant: str) -> str:
    module = "torchao" if "torchao" in variant else "modelopt"
    try:
        __import__(module)
    except ImportError as error:
        return f"not installed here ({error})"
    return ""


def measure(variant: str, mode: str, tokens: int, args) -> dict:
    batch, layers = (2, 1) if args.quick else SIZES[tokens]
    command = [
        sys.executable, __file__, "--child", "--variant", variant, "--mode", mode,
        "--tokens", str(tokens), "--batch", str(batch), "--layers", str(layers),
        "--d-model", str(128 if args.quick else 512), "--heads", str(4 if args.quick else 8),
        "--steps", str(args.steps), "--device", args.device,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict, tokens: int, args) -> list[str]:
    batch, layers = (2, 1) if args.quick else SIZES[tokens]
    lines = [f"{tokens} tokens, batch {batch}, {layers} blocks:", "",
             "| variant | eager peak | eager x float | compiled peak | compiled x float |",
             "|---|---|---|---|---|"]
    mib = 1 << 20
    for variant, by_mode in results.items():
        cells = []
        for mode in ("eager", "compiled"):
            row, float_row = by_mode[mode], results["float"][mode]
            if "skipped" in row or "error" in row:
                cells += [row.get("skipped") or f"error: {row['error']}", ""]
                continue
            extra = (row["peak"] - row["baseline"]) / mib
            ratio = row["peak"] / float_row["peak"]
            mark = "" if variant == "float" or "+" in variant or ratio <= TARGETS[mode] else " (over)"
            cells += [f"{row['peak'] / mib:,.0f} MiB (extra {extra:,.0f})", f"{ratio:.2f}x{mark}"]
        label = variant.split(":", 1)[-1].replace("+products", ' [attention="products"]')
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--d-model", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--heads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--from-logs", nargs="+", metavar="LOG",
                        help="write the table from the progress lines of earlier runs (runs "
                             "split over several processes) instead of measuring")
    args = parser.parse_args()
    if args.child:
        args.tokens = args.tokens[0]
        print(json.dumps(run_variant(args)))
        return
    measured = read_logs(args.from_logs) if args.from_logs else {}
    lines = []
    for tokens in args.tokens:
        results = {}
        for variant in variants(args.recipes):
            results[variant] = {}
            for mode in args.modes:
                problem = peer_problem(variant) if variant.startswith("peer:") else ""
                if problem:
                    row = {"skipped": problem}
                elif args.from_logs:
                    row = measured.get((tokens, variant, mode), {"skipped": "not run"})
                else:
                    row = measure(variant, mode, tokens, args)
                results[variant][mode] = row
                print(tokens, variant, mode, row, flush=True)
        for mode in ("eager", "compiled"):
            if mode not in args.modes:
                for row in results.values():
                    row[mode] = {"skipped": "not run"}
        lines += table(results, tokens, args) + [""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        sys.path.insert(0, str(HERE))
        from results import cpu_model, write_section

        command = "python bench/qat_memory.py " + " ".join(sys.argv[1:])
        write_section("qat_memory", f"## QAT step peak memory (#27)\n\n`{command}` on "
                      f"{cpu_model()} ({os.cpu_count()} cores, shared with other jobs), "
                      f"device {args.device}, {args.steps} measured steps after one warm-up "
                      "step; CPU peak = max RSS of each variant's own process over the "
                      "measured steps (extra = peak - RSS before them).\n\n" + text)


def read_logs(paths: list[str]) -> dict[tuple[int, str, str], dict]:
    """(tokens, variant, mode) -> row, from the lines `main` prints as it measures."""
    found = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            head, brace, row = line.partition(" {")
            if not brace or not head.split(" ", 1)[0].isdigit():
                continue
            tokens, rest = head.split(" ", 1)
            variant, mode = rest.rsplit(" ", 1)
            found[int(tokens), variant, mode] = ast.literal_eval("{" + row)
    return found


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
