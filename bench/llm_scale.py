"""LLMs at their real size (#20): block-wise prepare time against depth, a 1B model prepared on
the meta device, generate tokens/s with the KV cache, and peak memory of FSDP2 per block and
of activation checkpointing. Llama-style configs with random weights.

    python bench/llm_scale.py                 # every section
    python bench/llm_scale.py --only prepare generate

Peak memory on CPU is the peak resident set size (ru_maxrss) of a fresh process running one
step, minus that process's size before it builds the model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def tokens_per_second(model, prompt, new_tokens: int, **options) -> float:
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0, **options)
        started = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, **options)
    return prompt.shape[0] * (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - started)


def section_generate(out: list[str], layers=8, hidden=256, new_tokens=48) -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config(layers, hidden)).eval()
    prompt = torch.randint(0, 512, (1, 16))
    out.append(f"\n### generate, {layers} layers, hidden {hidden}, prompt 16, {new_tokens} new "
               "tokens, greedy, batch 1\n")
    out.append("| model | tokens/s | vs float | tokens equal the no-cache run |")
    out.append("|---|---:|---:|---|")
    float_tps = tokens_per_second(model, prompt, new_tokens)
    out.append(f"| float, KV cache | {float_tps:.1f} | 1.00x | |")
    for recipe in ("int8", "nvfp4"):
        qmodel = qc.prepare(model, recipe, example_kwargs={"input_ids": prompt.repeat(2, 1)})
        qc.calibrate(qmodel, [{"input_ids": torch.randint(0, 512, (2, 32))}], progress=False)
        qmodel.eval()
        cached = tokens_per_second(qmodel, prompt, new_tokens)
        uncached = tokens_per_second(qmodel, prompt, new_tokens, use_cache=False)
        with torch.no_grad():
            options = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            same = torch.equal(qmodel.generate(prompt, **options),
                               qmodel.generate(prompt, use_cache=False, **options))
        out.append(f"| {recipe}, KV cache | {cached:.1f} | {cached / float_tps:.2f}x | {same} |")
        out.append(f"| {recipe}, no cache | {uncached:.1f} | {uncached / float_tps:.2f}x | |")


# --- memory: each measurement in a fresh process ------------------------------------------


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_child(kind: str, rank: int, world: int, init: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = config(8, 512)
    ids = torch.randint(0, 512, (2, 128))
    before = _rss_mib()
    model = transformers.LlamaForCausalLM(cfg)
    teacher = None
    if kind.startswith("qad"):
        teacher = transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)
        model = qc.prepare(model, "int8", example_kwargs={"input_ids": ids[:, :16]})
        qc.calibrate(model, [{"input_ids": ids}], progress=False)
        model.train()
    if kind.endswith("checkpointed"):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
        )
        block = qc.PreparedBlock if kind.startswith("qad") else type(model.model.layers[0])
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, block))
    if world > 1:
        if kind.startswith("qad"):
            model = qc.fully_shard(model)
            if teacher is not None:
                for layer in teacher.model.layers:
                    fully_shard(layer)
                fully_shard(teacher)
        else:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        if teacher is not None:
            loss = qc.Distiller(teacher=teacher, student=model).compute_loss(
                model, input_ids=ids, use_cache=False)
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if world > 1:
        dist.destroy_process_group()
    return {"peak MiB": _rss_mib() - before}


def _run_memory(kind: str, world: int) -> float:
    if world == 1:
        command = [sys.executable, __file__, "--child", kind, "0", "1", "-"]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])["peak MiB"]
    init = f"file:///tmp/qcompile_llm_scale_{os.getpid()}_{kind}"
    procs = [subprocess.Popen([sys.executable, __file__, "--child", kind, str(r), str(world),
                               init], stdout=subprocess.PIPE, text=True) for r in range(world)]
    peaks = [json.loads(p.communicate()[0].strip().splitlines()[-1])["peak MiB"] for p in procs]
    return max(peaks)


def section_memory(out: list[str]) -> None:
    out.append("\n### Peak memory per process (8 layers, hidden 512, batch 2 x 128, AdamW, "
               "2 steps; RSS growth from before the model is built)\n")
    out.append("| run | peak MiB | ratio |")
    out.append("|---|---:|---:|")
    float_fsdp = _run_memory("float", 2)
    qad_fsdp = _run_memory("qad", 2)
    out.append(f"| float, FSDP2 per block, 2 ranks (per rank) | {float_fsdp:.0f} | 1.00x |")
    out.append(f"| int8 QAD (teacher + student), FSDP2 per block, 2 ranks (per rank) | "
               f"{qad_fsdp:.0f} | {qad_fsdp / float_fsdp:.2f}x |")
    plain = _run_memory("qad", 1)
    checkpointed = _run_memory("qad-checkpointed", 1)
    out.append(f"| int8 QAD, 1 process | {plain:.0f} | 1.00x |")
    out.append(f"| int8 QAD, 1 process, activation checkpointing per block | "
               f"{checkpointed:.0f} | {checkpointed / plain:.2f}x |")


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
        out = []


if __name__ == "__main__":
    main()
