"""LLMs at their real size (#20): block-wise prepare time against depth, a 1B model prepared on
the meta device, generate tokens/s with the KV cache, and peak memory of FSDP2 per block and
of activation checkpointing. Llama-style configs with random weights.

    python bench/llm_scale.py                 # every section
    python bench/llm_scale.py --only prepare generate

Peak memory on CPU is the peak resident set size (VmHWM, restarted just before the steps) of a
fresh process running two steps, minus that process's size before it builds the models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch
import transformers

import qcompile as qc

warnings.simplefilter("ignore")


def config(layers: int, hidden: int, **extra) -> transformers.LlamaConfig:
    options = dict(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden,
                   num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 2),
                   num_key_value_heads=max(hidden // 128, 1), max_position_embeddings=256)
    options.update(extra)
    return transformers.LlamaConfig(**options)


def prepare_time(layers: int, hidden: int, blocks) -> float:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config(layers, hidden))
    ids = torch.ones(2, 16, dtype=torch.long, device="meta")
    kwargs = {"input_ids": ids} if blocks else {"input_ids": ids, "use_cache": False}
    started = time.perf_counter()
    qc.prepare(model, "int8", example_kwargs=kwargs, blocks=blocks)
    return time.perf_counter() - started


def section_prepare(out: list[str], repeats: int = 3) -> None:
    out.append(f"\n### Prepare time against depth (meta device, int8, example batch 2 x 16; "
               f"median of {repeats} runs, depths interleaved)\n")
    out.append("| hidden | layers | block-wise s | whole graph s (use_cache=False) |")
    out.append("|---:|---:|---:|---:|")
    depths = (4, 8, 16, 32)
    prepare_time(2, 256, "auto")  # imports and torch's first export out of the figures
    for hidden in (256, 1024):
        runs: dict[int, list[float]] = {layers: [] for layers in depths}
        for _ in range(repeats):  # interleaved: a load change on the machine hits every depth
            for layers in depths:
                runs[layers].append(prepare_time(layers, hidden, "auto"))
        times = {layers: sorted(r)[len(r) // 2] for layers, r in runs.items()}
        for layers in depths:
            whole = prepare_time(layers, hidden, None) if layers <= 8 and hidden == 256 else None
            shown = "-" if whole is None else f"{whole:.1f}"
            out.append(f"| {hidden} | {layers} | {times[layers]:.2f} | {shown} |")
        out.append(f"| {hidden} | 32 / 4 | {times[32] / times[4]:.2f}x | |")
    one_b = config(22, 2048, intermediate_size=5632, vocab_size=32000, num_attention_heads=32,
                   num_key_value_heads=4)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(one_b)
    count = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    qc.prepare(model, "nvfp4", example_kwargs={
        "input_ids": torch.ones(2, 16, dtype=torch.long, device="meta")})
    out.append(f"\n{count / 1e9:.2f}B-parameter Llama (22 layers, hidden 2048) prepared for "
               f"nvfp4 on the meta device in {time.perf_counter() - started:.1f} s.")


def _generate_seconds(model, prompt, new_tokens: int, **options) -> float:
    with torch.no_grad():
        started = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, **options)
    return time.perf_counter() - started


def section_generate(out: list[str], hidden=256, new_tokens=16, rounds=3) -> None:
    """Greedy tokens/s with the KV cache against the float model: the runs of one config take
    turns (`rounds` times) and each keeps its fastest, so that load from other jobs on the
    machine hits all of them alike."""
    torch.set_num_threads(1)
    out.append(f"\n### generate, hidden {hidden}, prompt 16, {new_tokens} new tokens, greedy, "
               f"batch 1, 1 thread (fastest of {rounds} interleaved runs)\n")
    out.append("| layers | model | tokens/s | vs float | tokens equal the no-cache run |")
    out.append("|---:|---|---:|---:|---|")
    for layers in (2, 8):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config(layers, hidden)).eval()
        prompt = torch.randint(0, 512, (1, 16))
        runs = {"float, KV cache": (model, True)}
        same = {}
        for recipe in ("int8", "nvfp4"):
            qmodel = qc.prepare(model, recipe, example_kwargs={"input_ids": prompt.repeat(2, 1)})
            qc.calibrate(qmodel, [{"input_ids": torch.randint(0, 512, (2, 32))}], progress=False)
            qmodel.eval()
            with torch.no_grad():
                options = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                same[recipe] = torch.equal(qmodel.generate(prompt, **options),
                                           qmodel.generate(prompt, use_cache=False, **options))
            runs[f"{recipe}, KV cache"] = (qmodel, True)
            runs[f"{recipe}, KV cache, weight cache off"] = (qmodel, False)
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(rounds):
            for name, (run_model, weight_cache) in runs.items():
                if run_model is not model:
                    qc.set_weight_cache(run_model, weight_cache)
                best[name] = min(best[name], _generate_seconds(run_model, prompt, new_tokens))
        for recipe in ("int8", "nvfp4"):  # once: these take seconds a token
            qmodel = runs[f"{recipe}, KV cache"][0]
            qc.set_weight_cache(qmodel, True)
            best[f"{recipe}, no KV cache"] = _generate_seconds(qmodel, prompt, new_tokens,
                                                                use_cache=False)
        for name in sorted(best, key=lambda n: (n.split(",")[0] != "float", n.split(",")[0])):
            tps = new_tokens / best[name]
            shown = str(same[name.split(",")[0]]) if name.endswith(", KV cache") and \
                not name.startswith("float") else ""
            out.append(f"| {layers} | {name} | {tps:.1f} | "
                       f"{best['float, KV cache'] / best[name]:.2f}x | {shown} |")
        print("\n".join(out), flush=True)
        out.clear()


# --- memory: each measurement in a fresh process ------------------------------------------


def _rss_mib() -> float:
    """The resident set size now (MiB)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _peak_since_reset_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def _reset_peak() -> None:
    """Return freed heap to the OS and restart the peak RSS (VmHWM) from the current RSS, so
    that what building and preparing the models left behind does not count as the step's."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _memory_child(kind: str, rank: int, world: int, init: str) -> dict:
    """One measurement. kind: "<student>-<what>", student float / int8 / nvfp4, what "qad"
    (a float teacher distils into the student: Distiller's KL) or "train" (the student alone
    on its labels), optionally "-checkpointed" (activation checkpointing per block)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    student, what, *extra = kind.split("-")
    torch.manual_seed(0)
    cfg = config(8, 512)
    ids = torch.randint(0, 512, (2, 128))
    before = _rss_mib()
    model = transformers.LlamaForCausalLM(cfg)
    teacher = None
    if what == "qad":
        teacher = transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)
    if student != "float":
        model = qc.prepare(model, student, example_kwargs={"input_ids": ids[:, :16]})
        qc.calibrate(model, [{"input_ids": ids}], progress=False)
    model.train()
    if extra == ["checkpointed"]:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
        )
        block = qc.PreparedBlock if student != "float" else type(model.model.layers[0])
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, block))
    if world > 1:
        if student != "float":
            model = qc.fully_shard(model)
        else:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        if teacher is not None:
            for layer in teacher.model.layers:
                fully_shard(layer)
            fully_shard(teacher)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    distiller = None if teacher is None else qc.Distiller(teacher=teacher, student=model)
    at_start = _rss_mib() - before
    _reset_peak()
    for _ in range(2):
        if distiller is not None:
            loss = distiller.compute_loss(model, input_ids=ids, use_cache=False)
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if world > 1:
        dist.destroy_process_group()
    return {"peak MiB": _peak_since_reset_mib() - before, "start MiB": at_start}


def _run_memory(kind: str, world: int) -> dict:
    """The child's figures; with 2 ranks, the larger of the two ranks' for each."""
    if world == 1:
        command = [sys.executable, __file__, "--child", kind, "0", "1", "-"]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])
    init = f"file:///tmp/qcompile_llm_scale_{os.getpid()}_{kind}"
    procs = [subprocess.Popen([sys.executable, __file__, "--child", kind, str(r), str(world),
                               init], stdout=subprocess.PIPE, text=True) for r in range(world)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {key: max(r[key] for r in results) for key in results[0]}


def section_memory(out: list[str]) -> None:
    out.append("\n### Peak memory per process (8 layers, hidden 512, batch 2 x 128, AdamW, "
               "2 steps; peak RSS during the steps minus the RSS before the models were built; "
               "per rank: the larger rank's)\n")
    out.append("| run | RSS at the first step MiB | peak MiB | vs float QAD |")
    out.append("|---|---:|---:|---:|")
    rows = [("float-qad", 2, "float QAD (float teacher -> float student), FSDP2 per block, 2 ranks"),
            ("int8-qad", 2, "int8 QAD (float teacher -> int8 student), FSDP2 per block, 2 ranks"),
            ("nvfp4-qad", 2, "nvfp4 QAD (float teacher -> nvfp4 student), FSDP2 per block, 2 ranks"),
            ("float-train", 2, "float training of the student alone, FSDP2 per block, 2 ranks")]
    base = None
    for kind, world, name in rows:
        got = _run_memory(kind, world)
        base = base or got["peak MiB"]
        out.append(f"| {name} | {got['start MiB']:.0f} | {got['peak MiB']:.0f} | "
                   f"{got['peak MiB'] / base:.2f}x |")
        print("\n".join(out), flush=True)
        out.clear()
    plain = _run_memory("int8-qad", 1)
    checkpointed = _run_memory("int8-qad-checkpointed", 1)
    out.append(f"| int8 QAD, 1 process | {plain['start MiB']:.0f} | {plain['peak MiB']:.0f} | |")
    out.append(f"| int8 QAD, 1 process, activation checkpointing per block | "
               f"{checkpointed['start MiB']:.0f} | {checkpointed['peak MiB']:.0f} | "
               f"{checkpointed['peak MiB'] / plain['peak MiB']:.2f}x of the row above |")


SECTIONS = {"prepare": section_prepare, "generate": section_generate, "memory": section_memory}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rank, world, init = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        print(json.dumps(_memory_child(kind, rank, world, init)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = [f"torch {torch.__version__}, transformers {transformers.__version__}, "
           f"{os.cpu_count()} CPU cores (shared with other jobs)"]
    for name in args.only:
        SECTIONS[name](out)
        print("\n".join(out), flush=True)
        out.clear()


if __name__ == "__main__":
    main()
