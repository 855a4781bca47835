"""Block-wise prepare across Hugging Face decoder families (#20): each family (3 layers,
hidden 32, random weights) prepared int8 with `use_cache` at its default, calibrated, then
greedy `generate` with the KV cache against `use_cache=False` and against the model's own
full-sequence logits. One line per family: blocks prepared, tokens equal, time.

    python bench/blockwise_families.py            # every family below
    python bench/blockwise_families.py gpt2 falcon
"""

import sys
import time
import warnings

import torch
import transformers as T

import qcompile as qc
from qcompile.prepare import PreparedBlock

SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=3)
GQA = dict(SMALL, intermediate_size=64, num_key_value_heads=2)
FAMILIES = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=3,
                                                   n_head=4)),
    "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=64, n_embd=32, n_layer=3,
                                                   n_head=4, rotary_dim=4)),
    "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(**SMALL)),
    "falcon_new": lambda: T.FalconForCausalLM(T.FalconConfig(
        **SMALL, new_decoder_architecture=True, num_kv_heads=2)),
    "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=32, n_head=4,
                                                      n_layer=3)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(**SMALL, ffn_dim=64, word_embed_proj_dim=32)),
    "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**SMALL, intermediate_size=64)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**GQA, pad_token_id=0)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**GQA, head_dim=8)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**GQA, head_dim=8)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(
        **dict(GQA, intermediate_size=32), num_local_experts=4, num_experts_per_tok=2)),
}


def ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def row(name: str) -> str:
    started = time.perf_counter()
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    qmodel = qc.prepare(model, "int8", example_kwargs={"input_ids": ids()})
    blocks = sum(isinstance(m, PreparedBlock) for m in qmodel.modules())
    qc.calibrate(qmodel, [{"input_ids": ids(seed=s)} for s in range(2)], progress=False)
    qmodel.eval()
    prompt = ids(2, 6, 3)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0,
                   attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        cached = qmodel.generate(prompt, **options)
        uncached = qmodel.generate(prompt, use_cache=False, **options)
        logits = qmodel(input_ids=cached[:, :-1], use_cache=False).logits
    steps = torch.equal(logits[:, prompt.shape[1] - 1:].argmax(-1), cached[:, prompt.shape[1]:])
    return (f"| {name} | {blocks} | {torch.equal(cached, uncached)} | {steps} | "
            f"{time.perf_counter() - started:.1f} s |")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    T.logging.set_verbosity_error()
    print("| family | blocks | cache tokens == no cache | == full-sequence argmax | time |")
    print("|---|---:|---|---|---:|")
    for family in sys.argv[1:] or list(FAMILIES):
        print(row(family), flush=True)
