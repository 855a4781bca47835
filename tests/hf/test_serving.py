"""`qcompile.hf.export_checkpoint` / `load_checkpoint`: quantized checkpoints that vLLM, SGLang
and TensorRT-LLM load (ModelOpt's unified HF checkpoint, compressed-tensors).

The decoders here are written from the formats' text (ModelOpt `qtensor/nvfp4_tensor.py`,
`quant_utils.py`; compressed-tensors `compressors/`), not from qcompile's code: every stored
tensor must decode to exactly the weight the prepared model fake-quantizes."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

import qcompile as qc  # noqa: E402
from qcompile import hf  # noqa: E402
from qcompile.passes.sites import SiteKind, model_sites  # noqa: E402
from qcompile.recipe import Recipe, SiteSpecs, recipe_from_dict, recipe_to_dict  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, num_hidden_layers=2)
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP8 = qc.QuantSpec("fp8")

RECIPES = {
    "nvfp4": qc.get_recipe("nvfp4").with_(kv_cache="fp8"),
    "fp8": qc.get_recipe("fp8").with_(quantize_matmul=False, kv_cache="fp8"),
    "mxfp8": qc.get_recipe("mxfp8"),
    "int4": Recipe("int4", SiteSpecs(weight=qc.QuantSpec("int4", block_size=32, dynamic=True))),
    "mixed": qc.get_recipe("nvfp4").with_(
        name="mixed", kv_cache="fp8",
        overrides={"*.mlp.*": SiteSpecs(weight=qc.QuantSpec("fp8", dynamic=True), input=FP8)}),
}
BOTH = ["modelopt", "compressed-tensors"]
CASES = [(r, f) for r in RECIPES for f in BOTH if (r, f) != ("int4", "modelopt")]


def _ids(batch=2, length=8, seed=0):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _float_model():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**SMALL)).eval()
    with torch.no_grad():  # a zero block, a zero row and an outlier
        model.model.layers[0].self_attn.q_proj.weight[0, :16] = 0
        model.model.layers[0].mlp.up_proj.weight[5] = 0
        model.model.layers[1].mlp.down_proj.weight[3, 5] *= 40
    return model


_CACHE = {}


def _calibrated(name):
    if name not in _CACHE:
        qlm = hf.prepare_causal_lm(_float_model(), RECIPES[name])
        if RECIPES[name].needs_calibration:
            qc.calibrate(qlm, [{"input_ids": _ids(seed=s)} for s in range(2)], progress=False)
        _CACHE[name] = qlm
    return _CACHE[name]


def _fake_quantized_weights(qlm):
    """Linear site name -> the weight as the prepared model fake-quantizes it (eval)."""
    prepared = qlm.prepared
    out = {}
    for site in model_sites(prepared):
        path = site.quantizers.get("weight")
        if site.kind is SiteKind.LINEAR and path is not None:
            with torch.no_grad():
                out[site.name] = prepared.get_submodule(path)(
                    prepared.get_parameter(site.name + ".weight"))
    return out


def _amax(qlm, path):
    return qlm.prepared.get_submodule(path).amax.float()


# ------------------------------------------------------------- decoders from the format text


def _unpack_fp4(packed):
    """uint8 [out, in/2], element 2j in the low nibble; code = sign << 3 | index into E2M1."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    magnitude = E2M1[codes & 0b0111]
    return torch.where(codes >= 8, -magnitude, magnitude)


def _e8m0(exponents):
    """uint8 E8M0 scale bytes: 2 ** (byte - 127)."""
    return torch.pow(2.0, exponents.double() - 127).float()


def _blocks(values, scale):
    out, k = values.shape
    return (values.reshape(out, scale.shape[1], -1) * scale.unsqueeze(-1)).reshape(out, k)


def _decode_modelopt(algo, t):
    if algo in ("NVFP4", "W4A16_NVFP4"):
        assert t["weight"].dtype == torch.uint8 and t["weight_scale"].dtype == torch.float8_e4m3fn
        assert t["weight_scale_2"].dtype == torch.float32 and t["weight_scale_2"].ndim == 0
        assert t["weight_scale"].shape[1] * 16 == t["weight"].shape[1] * 2
        # ModelOpt NVFP4QTensor.dequantize: per_block_scale = scale * double_scale
        return _blocks(_unpack_fp4(t["weight"]), t["weight_scale"].float() * t["weight_scale_2"])
    if algo == "FP8":
        assert t["weight"].dtype == torch.float8_e4m3fn and t["weight_scale"].ndim == 0
        return t["weight"].float() * t["weight_scale"]
    if algo == "MXFP8":
        assert t["weight"].dtype == torch.float8_e4m3fn and t["weight_scale"].dtype == torch.uint8
        assert t["weight_scale"].shape[1] * 32 == t["weight"].shape[1]
        return _blocks(t["weight"].float(), _e8m0(t["weight_scale"]))
    raise AssertionError(algo)


def _decode_ct(args, t):
    w = args["weights"]
    if w["type"] == "float" and w["num_bits"] == 4:  # nvfp4-pack-quantized
        assert t["weight_global_scale"].shape == (1,)
        return _blocks(_unpack_fp4(t["weight_packed"]),
                       t["weight_scale"].float() * (1 / t["weight_global_scale"]))
    if w["type"] == "int" and w["num_bits"] == 4:  # pack-quantized: q + 8, LSB first, int32
        words = t["weight_packed"].long() & 0xFFFFFFFF
        assert t["weight_packed"].dtype == torch.int32
        q = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], -1).flatten(1) - 8
        assert t["weight_shape"].tolist() == list(q.shape)
        return _blocks(q.float(), t["weight_scale"])
    if w.get("scale_dtype") == "torch.uint8":  # mxfp8-quantized
        return _blocks(t["weight"].float(), _e8m0(t["weight_scale"]))
    assert t["weight"].dtype == torch.float8_e4m3fn  # float-quantized
    return t["weight"].float() * t["weight_scale"]


def _layer_tensors(tensors, name):
    return {k[len(name) + 1:]: v for k, v in tensors.items()
            if k.startswith(name + ".") and "." not in k[len(name) + 1:]}


# ------------------------------------------------------------- tests


@pytest.mark.parametrize("recipe", ["nvfp4", "fp8", "mxfp8", "mixed"])
def test_modelopt_tensors_decode_to_exactly_the_fake_quantized_weights(recipe, tmp_path):
    qlm = _calibrated(recipe)
    hf.export_checkpoint(qlm, tmp_path, "modelopt")
    tensors = load_file(tmp_path / "model.safetensors")
    nested = json.loads((tmp_path / "hf_quant_config.json").read_text())
    flat = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert nested["producer"]["name"] == "modelopt" and flat["quant_method"] == "modelopt"
    quant = nested["quantization"]
    if recipe == "mixed":
        assert quant["quant_algo"] == "MIXED_PRECISION" == flat["quant_algo"]
        algos = {n: e["quant_algo"] for n, e in quant["quantized_layers"].items()}
        assert algos["model.layers.0.mlp.up_proj"] == "FP8"
        assert algos["model.layers.0.self_attn.q_proj"] == "NVFP4"
        assert quant["quantized_layers"]["model.layers.0.self_attn.q_proj"]["group_size"] == 16
    else:
        algo = {"nvfp4": "NVFP4", "fp8": "FP8", "mxfp8": "MXFP8"}[recipe]
        assert quant["quant_algo"] == algo == flat["quant_algo"]
        assert quant["exclude_modules"] == ["lm_head"] == flat["ignore"]
        algos = dict.fromkeys(_fake_quantized_weights(qlm), algo)
        assert "lm_head" not in algos
    expected = _fake_quantized_weights(qlm)
    for name, algo in algos.items():
        t = _layer_tensors(tensors, name)
        assert torch.equal(_decode_modelopt(algo, t), expected[name]), name
        if algo in ("NVFP4", "FP8"):
            maximum = 6 * 448 if algo == "NVFP4" else 448
            amax = _amax(qlm, name + ".input_quantizer")
            assert t["input_scale"].ndim == 0 and float(t["input_scale"]) == float(amax / maximum)
    assert tensors["lm_head.weight"].dtype == torch.float32  # excluded: model dtype
    assert torch.equal(tensors["lm_head.weight"], qlm.prepared.get_parameter("lm_head.weight"))
    assert not any("quantizer" in k for k in tensors)
    if recipe == "mxfp8":
        assert quant["kv_cache_quant_algo"] is None and "kv_cache_scheme" not in flat
        return
    assert quant["kv_cache_quant_algo"] == "FP8"
    assert flat["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    for layer in range(2):
        attention = f"model.layers.{layer}.self_attn"
        for role, scale in (("key", "k_proj.k_scale"), ("value", "v_proj.v_scale")):
            stored = tensors[f"{attention}.{scale}"]
            amax = _amax(qlm, f"{attention}.{role}_quantizer")
            assert stored.dtype == torch.float32 and float(stored) == float(amax / 448)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_compressed_tensors_decode_to_the_fake_quantized_weights(recipe, tmp_path):
    qlm = _calibrated(recipe)
    hf.export_checkpoint(qlm, tmp_path, "compressed-tensors")
    tensors = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["ignore"] == (["lm_head"] if recipe != "int4" else sorted(config["ignore"]))
    groups = config["config_groups"].values()
    expected = _fake_quantized_weights(qlm)
    checked = 0
    for name, weight in expected.items():
        if name == "lm_head" or f"{name}.weight_scale" not in tensors:
            continue
        group = next(g for g in groups if name in g["targets"])
        t = _layer_tensors(tensors, name)
        decoded = _decode_ct(group, t)
        if group["weights"]["type"] == "float" and group["weights"]["num_bits"] == 4:
            # the global scale is stored as a reciprocal: exact only up to its fp32 rounding
            torch.testing.assert_close(decoded, weight, rtol=2e-7, atol=0)
        else:
            assert torch.equal(decoded, weight), name
        checked += 1
    assert checked >= (2 if recipe == "int4" else 14)
    if recipe in ("nvfp4", "fp8", "mixed"):
        assert config["kv_cache_scheme"]["strategy"] == "tensor"
        stored = tensors["model.layers.1.self_attn.v_scale"]
        assert stored.shape == (1,) and float(stored) == float(
            _amax(qlm, "model.layers.1.self_attn.value_quantizer") / 448)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_compressed_tensors_package_reads_our_checkpoint(recipe, tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig

    qlm = _calibrated(recipe)
    hf.export_checkpoint(qlm, tmp_path, "compressed-tensors")
    entry = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(entry)
    assert parsed.quantization_status == "compressed" and ct.__version__
    stored = load_file(tmp_path / "model.safetensors")
    dense = CompressedTensorsDequantizer(str(tmp_path), dtype=torch.bfloat16).process(dict(stored))
    expected = _fake_quantized_weights(qlm)
    compared = 0
    for name, weight in expected.items():
        if f"{name}.weight_scale" not in stored:
            continue
        got = dense[f"{name}.weight"]
        assert got.shape == weight.shape, name
        # compressed-tensors returns bf16 (and divides by NVFP4's reciprocal global scale)
        torch.testing.assert_close(got.float(), weight.to(got.dtype).float(),
                                   rtol=2 ** -7, atol=0, msg=name)
        compared += 1
    assert compared >= 2


def _quantized_bytes(tensors, names):
    return sum(v.numel() * v.element_size() for k, v in tensors.items()
               if k.rpartition(".")[0] in names)


@pytest.mark.parametrize(("recipe", "ratio"), [("nvfp4", 0.30), ("fp8", 0.52)])
@pytest.mark.parametrize("format", BOTH)
def test_quantized_weights_are_a_fraction_of_bf16(recipe, ratio, format, tmp_path):
    qlm = _calibrated(recipe)
    hf.export_checkpoint(qlm, tmp_path, format)
    tensors = load_file(tmp_path / "model.safetensors")
    linears = {n for n in _fake_quantized_weights(qlm) if n != "lm_head"}
    bf16 = sum(qlm.prepared.get_parameter(n + ".weight").numel() * 2 for n in linears)
    stored = _quantized_bytes(tensors, linears)
    assert 0.2 * bf16 < stored <= ratio * bf16


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "format"), CASES)
def test_round_trip_gives_the_same_logits(recipe, format, tmp_path):
    qlm = _calibrated(recipe)
    hf.export_checkpoint(qlm, tmp_path, format)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every weight quantizer stays on: exact again
        loaded = hf.load_checkpoint(tmp_path)
    assert isinstance(loaded, hf.QuantizedCausalLM) and not loaded.training
    ids = _ids(3, 11, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qlm(ids).logits)


@pytest.mark.slow
def test_bf16_model_round_trip_and_sharding(tmp_path):
    model = _float_model().to(torch.bfloat16)
    qlm = hf.prepare_causal_lm(model, RECIPES["nvfp4"])
    qc.calibrate(qlm, [{"input_ids": _ids()}], progress=False)
    hf.export_checkpoint(qlm, tmp_path, "modelopt", max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 2 and all((tmp_path / f).is_file() for f in files)
    assert not (tmp_path / "model.safetensors").exists()
    assert load_file(tmp_path / index["weight_map"]["lm_head.weight"])[
        "lm_head.weight"].dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16: some weights may load with quantizers off
        loaded = hf.load_checkpoint(tmp_path)
    ids = _ids(2, 9, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qlm(ids).logits)


@pytest.mark.slow
def test_fused_layers_share_their_scales_in_ptq_and_qat(tmp_path):
    qlm = _calibrated("nvfp4")
    hf.export_checkpoint(qlm, tmp_path, "modelopt")
    tensors = load_file(tmp_path / "model.safetensors")
    for layer in range(2):
        for fused in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                      ("mlp.gate_proj", "mlp.up_proj")):
            for scale in ("weight_scale_2", "input_scale"):
                values = {float(tensors[f"model.layers.{layer}.{m}.{scale}"]) for m in fused}
                assert len(values) == 1, (layer, fused, scale)
    amax = max(qlm.prepared.get_parameter(f"model.layers.0.self_attn.{m}_proj.weight").detach()
               .abs().max() for m in "qkv")  # the global amax is the group's max
    assert float(tensors["model.layers.0.self_attn.q_proj.weight_scale_2"]) == float(
        amax / (6 * 448))
    # QAT with learned fp8 ranges: one parameter per fused group, so a step keeps them tied
    recipe = qc.get_recipe("fp8").with_(quantize_matmul=False, learn_scales=True)
    qat = hf.prepare_causal_lm(_float_model(), recipe)
    qc.calibrate(qat, [{"input_ids": _ids()}], progress=False)
    q_in = qat.prepared.get_submodule("model.layers.0.self_attn.q_proj.input_quantizer")
    v_in = qat.prepared.get_submodule("model.layers.0.self_attn.v_proj.input_quantizer")
    assert q_in.amax is v_in.amax and isinstance(q_in.amax, torch.nn.Parameter)
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-2)
    qat.train()
    qat(_ids(), labels=_ids()).loss.backward()
    before = q_in.amax.item()
    optimizer.step()
    assert q_in.amax.item() != before and q_in.amax is v_in.amax
    qat.eval()
    hf.export_checkpoint(qat, tmp_path / "qat", "compressed-tensors")
    tensors = load_file(tmp_path / "qat" / "model.safetensors")
    assert len({float(tensors[f"model.layers.0.self_attn.{m}_proj.input_scale"])
                for m in "qkv"}) == 1


def test_untied_fused_scales_are_refused(tmp_path):
    qlm = hf.prepare_causal_lm(_float_model(), RECIPES["nvfp4"].with_(tie_fused=False))
    qc.calibrate(qlm, [{"input_ids": _ids()}], progress=False)
    with pytest.raises(hf.InexpressibleError, match="tie_fused=True"):
        hf.export_checkpoint(qlm, tmp_path / "out", "modelopt")
    assert not (tmp_path / "out").exists()


def test_kv_cache_quantizes_key_and_value_states():
    qlm = _calibrated("nvfp4")
    kv = [s for s in model_sites(qlm.prepared) if s.kind is SiteKind.KV_CACHE]
    assert [s.name for s in kv] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert set(kv[0].specs) == {"key", "value"} and kv[0].specs["key"].format == "fp8"
    ids = _ids(2, 8, seed=5)
    with torch.no_grad():
        before = qlm(ids).logits
        for site in kv:
            for path in site.quantizers.values():
                qlm.prepared.get_submodule(path).enabled = False
        without = qlm(ids).logits
        for site in kv:
            for path in site.quantizers.values():
                qlm.prepared.get_submodule(path).enabled = True
    assert not torch.equal(before, without)  # the KV quantizers are in the forward pass
    assert recipe_from_dict(recipe_to_dict(RECIPES["nvfp4"])) == RECIPES["nvfp4"]


def _listing(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_bad_input_raises_before_anything_is_written(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(TypeError, match="prepare"):
        hf.export_checkpoint(_float_model(), target)
    uncalibrated = hf.prepare_causal_lm(_float_model(), RECIPES["nvfp4"])
    with pytest.raises(ValueError, match="calibrate"):
        hf.export_checkpoint(uncalibrated, target)
    with pytest.raises(hf.InexpressibleError, match="compressed-tensors"):
        hf.export_checkpoint(_calibrated("int4"), target, "modelopt")
    matmul = hf.prepare_causal_lm(_float_model(), "fp8")  # quantizes the attention products
    qc.calibrate(matmul, [{"input_ids": _ids()}], progress=False)
    with pytest.raises(hf.InexpressibleError, match="quantize_matmul=False"):
        hf.export_checkpoint(matmul, target, "compressed-tensors")
    with pytest.raises(ValueError, match="format="):
        hf.export_checkpoint(_calibrated("fp8"), target, "gguf")
    assert _listing(target) == []
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf.export_checkpoint(_calibrated("fp8"), target)
    assert _listing(target) == ["out"] and [p.name for p in target.iterdir()] == ["keep.txt"]
    hf.export_checkpoint(_calibrated("fp8"), target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()
    assert _listing(target) == ["out"]  # no staging directory left behind
    with pytest.raises(FileNotFoundError, match="export_checkpoint"):
        hf.load_checkpoint(tmp_path)


@pytest.mark.slow
def test_tokenizer_and_generation_config_are_saved(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "[UNK]")),
        unk_token="[UNK]")
    hf.export_checkpoint(_calibrated("fp8"), tmp_path, "compressed-tensors", tokenizer=tokenizer)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "generation_config.json", "config.json"} <= names
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids("b") == 2


@pytest.mark.slow
def test_command_line_exports_a_saved_model(tmp_path, capsys):
    from qcompile.cli import main

    hf.save_quantized(_calibrated("nvfp4"), tmp_path / "saved")
    out = tmp_path / "served"
    assert main(["export-checkpoint", str(tmp_path / "saved"), str(out),
                 "--format", "compressed-tensors"]) == 0
    assert f"vllm serve {out}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    assert main(["export-checkpoint", str(tmp_path / "saved"), str(out)]) == 1
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_a_prepared_model_round_trips_too(tmp_path):
    model = _float_model()
    kwargs = {"input_ids": _ids(), "use_cache": False}
    qmodel = qc.prepare(model, RECIPES["fp8"], example_kwargs=kwargs)
    qc.calibrate(qmodel, [{"input_ids": _ids(seed=1), "use_cache": False}], progress=False)
    with pytest.raises(TypeError, match="config=model.config"):
        hf.export_checkpoint(qmodel, tmp_path)
    hf.export_checkpoint(qmodel, tmp_path, "modelopt", config=model.config)
    loaded = hf.load_checkpoint(tmp_path)
    assert isinstance(loaded, qc.PreparedModel)
    ids = _ids(2, 8, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, use_cache=False).logits,
                           qmodel(input_ids=ids, use_cache=False).logits)


def test_recipe_kv_cache_and_tie_options_are_checked_and_serialised():
    with pytest.raises(ValueError, match="kv_cache='int8'"):
        Recipe(kv_cache="int8")
    with pytest.raises(TypeError, match="tie_fused"):
        Recipe(tie_fused="yes")
    with pytest.raises(ValueError, match="calibrate"):
        RECIPES["nvfp4"].with_dynamic_ranges()
    assert not RECIPES["mxfp8"].with_(tie_fused=True).with_dynamic_ranges().tie_fused
    untied = RECIPES["fp8"].with_(tie_fused=False)
    assert recipe_from_dict(recipe_to_dict(untied)) == untied
    # a fused layer's per-tensor weight amax becomes static (shared); other layers keep theirs
    specs, _ = RECIPES["fp8"].resolve("model.layers.0.self_attn.k_proj", SiteKind.LINEAR)
    assert not specs["weight"].dynamic
    specs, _ = RECIPES["fp8"].resolve("model.layers.0.self_attn.o_proj", SiteKind.LINEAR)
    assert specs["weight"].dynamic
    specs, _ = untied.resolve("model.layers.0.self_attn.k_proj", SiteKind.LINEAR)
    assert specs["weight"].dynamic


@pytest.mark.slow
def test_fused_weight_amax_is_the_max_whatever_the_calibration_method():
    qlm = hf.prepare_causal_lm(_float_model(), RECIPES["nvfp4"])
    qc.calibrate(qlm, [{"input_ids": _ids()}], method="percentile", percentile=90.0,
                 progress=False)
    prepared = qlm.prepared
    weights = [prepared.get_parameter(f"model.layers.1.mlp.{m}_proj.weight").detach()
               for m in ("gate", "up")]
    expected = max(float(w.abs().max()) for w in weights)
    for m in ("gate", "up"):
        amax = prepared.get_submodule(f"model.layers.1.mlp.{m}_proj.weight_quantizer").amax
        assert float(amax) == expected
    q_in = prepared.get_submodule("model.layers.1.mlp.up_proj.input_quantizer").amax
    g_in = prepared.get_submodule("model.layers.1.mlp.gate_proj.input_quantizer").amax
    assert float(q_in) == float(g_in)  # inputs: the method's amax (percentile), tied


@pytest.mark.slow
@pytest.mark.parametrize("format", BOTH)
def test_an_auto_recipe_exports_as_mixed_precision_and_round_trips(format, tmp_path):
    """`qc.auto_recipe`'s per-site formats (fused q/k/v and gate/up together) are a mixed
    checkpoint (#23): written, read back, the same logits."""
    model = _float_model()
    batches = [{"input_ids": _ids(2, 8, seed=s), "use_cache": False} for s in range(2)]
    recipe = qc.auto_recipe(model, ("nvfp4", "fp8"), batches, effective_bits=6.0, progress=False)
    assert set(recipe.search.choices.values()) == {"nvfp4", "fp8"}
    qlm = hf.prepare_causal_lm(model, recipe)
    qc.calibrate(qlm, [_ids(2, 8, seed=s) for s in range(2)], progress=False)
    hf.export_checkpoint(qlm, tmp_path, format)
    configs = " ".join(path.read_text() for path in tmp_path.glob("*.json"))
    assert ("MIXED_PRECISION" if format == "modelopt" else "mixed-precision") in configs
    loaded = hf.load_checkpoint(tmp_path)
    ids = _ids(3, 11, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qlm(ids).logits)


@pytest.mark.parametrize(("recipe", "format", "search"), [
    ("nvfp4", "modelopt", "mse"), ("int4", "compressed-tensors", "gptq")])
def test_searched_weight_scales_round_trip_exactly(recipe, format, search, tmp_path):
    # calibrate(weight_scales="mse"), and GPTQ on int4 (the same stored amax buffer as int4's
    # search, with GPTQ's latent weights), store each weight quantizer's scales: the serving
    # checkpoint holds them packed (and in the sidecar), hf.save_quantized in the state dict.
    qlm = hf.prepare_causal_lm(_float_model(), RECIPES[recipe])
    data = [{"input_ids": _ids(seed=s)} for s in range(2)]
    if search == "gptq":  # on the prepared graph (qc.gptq does not unwrap QuantizedCausalLM)
        mask = torch.ones_like(_ids())
        inputs = {"attention_mask": mask, "position_ids": mask.cumsum(-1) - 1, "use_cache": False}
        qc.gptq(qlm.prepared, [{**batch, **inputs} for batch in data], progress=False)
    else:
        qc.calibrate(qlm, data, progress=False, weight_scales=search)
    stored = {n: q.scale_amax for n, q in qlm.prepared.named_modules()
              if isinstance(q, qc.Quantizer) and q.scale_amax is not None}
    assert len(stored) == 14
    ids = _ids(3, 11, seed=7)
    with torch.no_grad():
        expected = qlm(ids).logits
    hf.export_checkpoint(qlm, tmp_path / "served", format)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every weight quantizer stays on
        served = hf.load_checkpoint(tmp_path / "served")
    hf.save_quantized(qlm, tmp_path / "saved")
    saved = hf.load_quantized(tmp_path / "saved")
    for loaded in (served, saved):
        quantizers = dict(loaded.prepared.named_modules())
        assert all(torch.equal(quantizers[n].scale_amax, s) for n, s in stored.items())
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)


def test_a_model_prepared_block_by_block_exports_and_round_trips(tmp_path):
    """`qc.prepare` of a decoder called with its cache is the user's class, block by block."""
    model = _float_model()
    qmodel = qc.prepare(model, RECIPES["nvfp4"], example_kwargs={"input_ids": _ids()})
    assert isinstance(qmodel, transformers.LlamaForCausalLM) and qmodel.qcompile_blocks
    qc.calibrate(qmodel, [{"input_ids": _ids(seed=s)} for s in range(2)], progress=False)
    hf.export_checkpoint(qmodel, tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["model.layers.1.mlp.down_proj.weight"].dtype == torch.uint8  # packed nvfp4
    assert set(stored) >= {"model.layers.0.self_attn.k_proj.k_scale", "lm_head.weight"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = hf.load_checkpoint(tmp_path)
    assert type(loaded) is transformers.LlamaForCausalLM and loaded.qcompile_blocks
    ids = _ids(3, 11, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qmodel(ids).logits)
        assert torch.equal(loaded.generate(ids, max_new_tokens=3, do_sample=False),
                           qmodel.generate(ids, max_new_tokens=3, do_sample=False))


def test_tensors_carry_the_names_checkpoints_use(tmp_path):
    """GPT-NeoX's head is `lm_head` in memory and `embed_out` in its checkpoints (transformers
    renames it on load): engines look for `embed_out`."""
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=100, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        num_hidden_layers=2)).eval()
    qmodel = qc.prepare(model, RECIPES["fp8"].with_(kv_cache=None),
                        example_kwargs={"input_ids": _ids()})
    qc.calibrate(qmodel, [{"input_ids": _ids()}], progress=False)
    hf.export_checkpoint(qmodel, tmp_path, "compressed-tensors")
    stored = load_file(tmp_path / "model.safetensors")
    assert "embed_out.weight" in stored and "lm_head.weight" not in stored
    assert "gpt_neox.layers.0.mlp.dense_h_to_4h.weight_scale" in stored
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "embed_out" in config["ignore"]
    loaded = hf.load_checkpoint(tmp_path)
    ids = _ids(2, 9, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qmodel(ids).logits)


def test_moe_models_are_refused_before_anything_is_written(tmp_path):
    """Mixtral holds its experts fused per layer; its checkpoints store them per expert."""
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=100, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, num_hidden_layers=1, num_local_experts=4,
        num_experts_per_tok=2)).eval()
    recipe = RECIPES["fp8"].with_(kv_cache=None)
    for exclude in ((), ("*.experts*",)):  # float experts would be misplaced just the same
        call = {"input_ids": _ids(), "use_cache": False}
        qmodel = qc.prepare(model, recipe.with_(exclude=exclude), example_kwargs=call)
        qc.calibrate(qmodel, [call], progress=False)
        with pytest.raises(hf.InexpressibleError, match="per expert.*save_quantized"):
            hf.export_checkpoint(qmodel, tmp_path / "out", config=model.config)
        assert list(tmp_path.iterdir()) == []
