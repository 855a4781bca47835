"""Block-wise prepare: each repeated block its own graph, in place in the user's model class,
with the KV cache of Hugging Face decoders; everything downstream reads it like one graph."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qcompile as qc
from qcompile.blocks import BlockError, find_blocks
from qcompile.passes.capture import CaptureError
from qcompile.passes.sites import model_sites, site_quantizers
from qcompile.prepare import PreparedBlock, PreparedModel

transformers = pytest.importorskip("transformers")

TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _llama(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **options)).eval()


def _ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module")
def blockwise(llama):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = qc.prepare(llama, "int8", example_kwargs={"input_ids": _ids()})
    qc.calibrate(qmodel, [{"input_ids": _ids(seed=s)} for s in range(3)], progress=False)
    return qmodel.eval()


def test_auto_prepares_a_decoder_with_its_cache_block_by_block(llama, blockwise):
    assert type(blockwise) is type(llama)  # the user's class: generate, save_pretrained
    assert find_blocks(llama, "auto") == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert all(isinstance(layer, PreparedBlock) for layer in blockwise.model.layers)
    assert not any(isinstance(m, PreparedBlock) for m in llama.modules())  # not modified
    names = [site.name for site in model_sites(blockwise)]
    assert "model.layers.2.mlp.down_proj" in names and "model.layers.0.self_attn.q_proj" in names
    for entry in site_quantizers(blockwise):
        assert blockwise.get_submodule(entry.path) is entry.quantizer
    # the graph is traced once per block class: the others reuse its code with their weights
    codes = {layer.code for layer in blockwise.model.layers}
    assert len(codes) == 1
    # ... compiled once: every block runs one function, which its own graph generates
    assert len({type(layer).graph_forward for layer in blockwise.model.layers}) == 1
    assert all(layer.graph.python_code("self").src == layer.code
               for layer in blockwise.model.layers)
    weights = [layer.get_parameter("mlp.down_proj.weight") for layer in blockwise.model.layers]
    assert weights[0].data_ptr() != weights[1].data_ptr()


def test_without_a_cache_auto_keeps_one_graph(llama):
    qmodel = qc.prepare(llama, "int8", example_kwargs={"input_ids": _ids(), "use_cache": False})
    assert isinstance(qmodel, PreparedModel)


def test_blockwise_computes_what_the_whole_graph_computes(llama, blockwise):
    whole = qc.prepare(llama, "int8", blocks=None,
                       example_kwargs={"input_ids": _ids(), "use_cache": False})
    assert sorted(s.name for s in model_sites(whole)) == sorted(
        s.name for s in model_sites(blockwise))
    # the same keys: a state dict moves between the two modes
    assert set(whole.state_dict()) == set(blockwise.state_dict())
    whole.load_state_dict(blockwise.state_dict())
    whole.eval()
    ids = _ids(batch=3, length=11, seed=7)
    with torch.no_grad():
        expected = whole(input_ids=ids, use_cache=False).logits
        got = blockwise(input_ids=ids).logits
        float_logits = llama(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - float_logits).abs().max() > 1e-4  # quantized, not float


def _family(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        return _llama()
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).eval()
    if name == "mistral":
        return transformers.MistralForCausalLM(
            transformers.MistralConfig(**TINY, sliding_window=None)).eval()
    config = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
    if name == "gpt_neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config)).eval()
    if name == "opt":  # dropout 0.1: eval mode must reach graphs captured in use
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            **config, ffn_dim=64, word_embed_proj_dim=32)).eval()
    if name == "falcon":  # makes index tensors in forward: constants of each graph
        return transformers.FalconForCausalLM(transformers.FalconConfig(**config)).eval()
    # GPT-2: Conv1D weights, the cache passed positionally, dropout 0.1
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64)).eval()


@pytest.mark.parametrize("family,recipe", [
    ("llama", "int8"),
    pytest.param("llama", "nvfp4", marks=pytest.mark.slow),
    pytest.param("qwen2", "int8", marks=pytest.mark.slow),
    pytest.param("mistral", "fp8", marks=pytest.mark.slow),
    ("gpt_neox", "int8"),
    ("gpt2", "int8"),
    pytest.param("opt", "int8", marks=pytest.mark.slow),
    pytest.param("falcon", "int8", marks=pytest.mark.slow),
])
def test_generate_with_the_kv_cache_gives_the_tokens_without_it(family, recipe):
    model = _family(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = qc.prepare(model, recipe, example_kwargs={"input_ids": _ids()})
    assert sum(isinstance(m, PreparedBlock) for m in qmodel.modules()) == 3
    quantizers = {entry.path for entry in site_quantizers(qmodel)}
    extra = set(qmodel.state_dict()) - set(model.state_dict())
    assert extra and all(key.rpartition(".")[0] in quantizers for key in extra)
    qc.calibrate(qmodel, [{"input_ids": _ids(seed=s)} for s in range(2)], progress=False)
    qmodel.eval()
    prompt = _ids(batch=2, length=6, seed=3)
    options = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0,
               "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        cached = qmodel.generate(prompt, **options)
        uncached = qmodel.generate(prompt, use_cache=False, **options)
        # the same as the quantized model's own logits on the whole sequence, step by step
        logits = qmodel(input_ids=cached[:, :-1], use_cache=False).logits
        # the graphs captured in use (without a cache here) run in eval mode as prepared
        torch.testing.assert_close(logits, qmodel(input_ids=cached[:, :-1]).logits,
                                   rtol=0, atol=1e-5)
    assert torch.equal(cached, uncached)
    # the structures met in use (decode with a past, no cache) were captured once for all
    infos = [m.qcompile_block for m in qmodel.modules() if isinstance(m, PreparedBlock)]
    assert len({id(info.variants) for info in infos}) == 1
    assert any(v.forward is not None for v in infos[0].variants.values())
    torch.testing.assert_close(logits[:, prompt.shape[1] - 1:].argmax(-1),
                               cached[:, prompt.shape[1]:])


def test_checkpoints_and_algorithms_work_on_blocks(tmp_path, llama, blockwise):
    from qcompile import hf

    ids = _ids(batch=2, length=9, seed=11)
    hf.save_quantized(blockwise, tmp_path / "saved")
    loaded = hf.load_quantized(tmp_path / "saved")
    assert type(loaded) is type(llama)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, blockwise(input_ids=ids).logits,
                                   rtol=0, atol=0)
    qc.save(tmp_path / "ckpt.pt", blockwise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = qc.prepare(llama, "fp8", example_kwargs={"input_ids": _ids()})
    with pytest.raises(qc.CheckpointError, match="model.layers.0.self_attn.q_proj"):
        other.load_state_dict(blockwise.state_dict())
    report = str(qc.report(blockwise))
    assert "model.layers.1.mlp.up_proj" in report
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = qc.prepare(llama, "int8", example_kwargs={"input_ids": _ids()})
    qc.calibrate(student, [{"input_ids": _ids(seed=s)} for s in range(2)], progress=False)
    rounded = qc.gptq(student, [{"input_ids": _ids(seed=s)} for s in range(2)], progress=False)
    assert "model.layers.2.mlp.down_proj" in rounded


def test_bad_blocks_and_inputs_say_what_to_do(llama, blockwise):
    with pytest.raises(BlockError, match=r"'model.layers.\*' \(3 blocks\)"):
        qc.prepare(llama, "int8", example_kwargs={"input_ids": _ids()}, blocks="layers.*")
    qwen = transformers.Qwen2Model(transformers.Qwen2Config(**TINY)).eval()
    with pytest.raises(CaptureError, match=r"use_cache': False.*blocks at 'auto'.*'layers\.\*'"):
        qc.prepare(qwen, "int8", example_kwargs={"input_ids": _ids()}, blocks=None)
    # one layer is no list of repeated blocks: "auto" keeps one graph, and the error says
    # only what works there
    one = transformers.Qwen2Model(transformers.Qwen2Config(**{**TINY, "num_hidden_layers": 1}))
    with pytest.raises(CaptureError, match="use_cache': False") as error:
        qc.prepare(one.eval(), "int8", example_kwargs={"input_ids": _ids()})
    assert "blocks" not in str(error.value)
    with pytest.raises(ValueError, match="float64"):
        blockwise.model.layers[0](torch.randn(2, 8, 32, dtype=torch.float64),
                                  position_embeddings=(torch.ones(1, 8, 8),) * 2)


def test_regional_compilation_of_each_block_computes_the_same(llama, blockwise):
    qmodel = copy.deepcopy(blockwise)
    ids = _ids(batch=2, length=8, seed=13)
    with torch.no_grad():
        expected = qmodel(input_ids=ids).logits
        for layer in qmodel.model.layers:
            layer.compile(backend="qcompile")
        got = qmodel(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.slow  # two captures of the whole model (export, verify) and an ONNX export
def test_export_onnx_of_a_blockwise_model_computes_its_numbers(tmp_path, blockwise):
    """export_onnx traces the block-wise model as one graph: onnxruntime (optimizations off)
    gives the model's logits at another batch size and length, and each quantizer's Q/DQ
    equals the quantizer exactly."""
    ort = pytest.importorskip("onnxruntime")
    before = {k: v.clone() for k, v in blockwise.state_dict().items()}
    path = qc.export_onnx(blockwise, (), tmp_path / "llama.onnx",
                          example_kwargs={"input_ids": _ids()}, dynamic_sequence=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    for batch, length, seed in ((2, 8, 1), (3, 13, 5)):
        ids = _ids(batch, length, seed)
        with torch.no_grad():
            want = blockwise(input_ids=ids).logits
        got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    report = qc.verify_onnx(blockwise, path, example_kwargs={"input_ids": _ids()})
    assert report.passed and report.max_difference == 0, report.render()
    assert all(isinstance(layer, PreparedBlock) for layer in blockwise.model.layers)
    assert all(torch.equal(v, before[k]) for k, v in blockwise.state_dict().items())
