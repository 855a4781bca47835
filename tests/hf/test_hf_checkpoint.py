"""`qcompile.hf.save_quantized` / `load_quantized`: a directory with weights, quantizer state
and a quantization_config, rebuilt on the meta device into the same quantized model."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import qcompile as qc  # noqa: E402
from qcompile import hf  # noqa: E402
from qcompile.recipe import recipe_from_dict  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, intermediate_size=128,
             num_hidden_layers=2)


def _ids(batch=2, length=8, seed=0):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_causal_lm_round_trip_with_tied_weights_and_rope_buffers(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True,
                                      pad_token_id=0, **SMALL)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    qlm = hf.prepare_causal_lm(model, "int8")
    qc.calibrate(qlm, [{"input_ids": _ids(seed=s)} for s in range(2)], progress=False)
    qlm.save_pretrained(tmp_path)  # == hf.save_quantized(qlm, tmp_path)

    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json", "quantization_config.json", "model.safetensors", "generation_config.json"}
    entry = json.loads((tmp_path / "quantization_config.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == entry
    assert entry["quant_method"] == "qcompile" and entry["causal_lm"] is True
    assert recipe_from_dict(entry["recipe"]) == qlm.prepared.qcompile_recipe
    assert entry["excluded"] == ["lm_head"]
    q_proj = entry["sites"]["model.layers.0.self_attn.q_proj"]
    assert q_proj["status"] == "quantized"
    assert q_proj["formats"]["weight"] == {"format": "int8", "axis": 0, "block_size": None,
                                           "dynamic": True, "learn_amax": False}
    assert entry["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "model.rotary_emb.inv_freq" in entry["buffers"]
    assert entry["example_inputs"]["use_cache"] == {"value": False}

    loaded = hf.load_quantized(tmp_path)
    assert isinstance(loaded, hf.QuantizedCausalLM) and not loaded.training
    prepared = loaded.prepared
    assert prepared.get_parameter("lm_head.weight") is prepared.get_parameter(
        "model.embed_tokens.weight")
    ids = _ids(3, 11, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, qlm(ids).logits, rtol=0, atol=0)
    greedy = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(loaded.generate(ids, **greedy), qlm.generate(ids, **greedy))


def test_encoder_round_trip_from_a_prepared_model(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(transformers.BertConfig(**SMALL)).eval()
    ids = _ids()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    prepared = qc.prepare(model, "fp8", example_kwargs=inputs)
    qc.calibrate(prepared, [inputs], progress=False)
    with pytest.raises(TypeError, match=r"config=model.config"):
        hf.save_quantized(prepared, tmp_path)
    hf.save_quantized(prepared, tmp_path, config=model.config, safe_serialization=False)
    assert (tmp_path / "model.pt").is_file()
    loaded = hf.load_quantized(tmp_path)
    assert isinstance(loaded, qc.PreparedModel)
    assert [s.name for s in loaded.qcompile_sites] == [s.name for s in prepared.qcompile_sites]
    amax = "encoder.layer.0.attention.self.query.input_quantizer.amax"
    assert torch.equal(loaded.state_dict()[amax], prepared.state_dict()[amax])
    other = {"input_ids": _ids(3, 5, seed=1), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(loaded(**other).last_hidden_state, prepared(**other).last_hidden_state)


def test_what_cannot_be_saved_or_loaded_says_why(tmp_path):
    with pytest.raises(TypeError, match="takes a model from qcompile.prepare"):
        hf.save_quantized(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(FileNotFoundError, match="not written by qcompile.hf.save_quantized"):
        hf.load_quantized(tmp_path)
