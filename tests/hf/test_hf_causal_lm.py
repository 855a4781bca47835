"""`qcompile.hf.prepare_causal_lm`: AutoModelForCausalLM configs prepared, driven by HF
`generate()` (no KV cache), checked against a manual greedy loop and against the float
model with quantizers off."""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import qcompile as qc  # noqa: E402
from qcompile import hf  # noqa: E402
from qcompile.passes.sites import SiteKind, SiteStatus  # noqa: E402

TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4,
                                            **TOKENS),
    "llama": lambda: transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              intermediate_size=128, **TOKENS),
}
GREEDY = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)


def _ids(batch=2, length=6, seed=3):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CONFIGS))
def lm(request):
    """(float model, its calibrated int8 QuantizedCausalLM)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param]()).eval()
    qlm = hf.prepare_causal_lm(model, "int8")
    qc.calibrate(qlm, [{"input_ids": _ids(4, 12, seed=s)} for s in range(2)], progress=False)
    return model, qlm


def _linear_paths(model):
    conv1d = transformers.pytorch_utils.Conv1D
    return sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, conv1d)))


def test_sites_of_an_auto_model(lm):
    model, qlm = lm
    sites = qlm.prepared.qcompile_sites
    assert sorted(s.name for s in sites if s.kind is SiteKind.LINEAR) == _linear_paths(model)
    (head,) = [s for s in sites if s.name == "lm_head"]
    assert head.status is SiteStatus.EXCLUDED
    assert sorted(qlm.prepared.qcompile_inputs.arguments) == [
        "attention_mask", "input_ids", "position_ids", "use_cache"]
    assert isinstance(qlm, transformers.GenerationMixin) and not qlm.generation_config.use_cache


def test_greedy_generate_is_the_manual_greedy_loop(lm):
    _, qlm = lm
    ids = _ids()
    generated = qlm.generate(ids, **GREEDY)
    expected = ids
    with torch.no_grad():
        for _ in range(GREEDY["max_new_tokens"]):
            next_token = qlm(expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=-1)
    assert torch.equal(generated, expected)
    assert qlm.generate(ids[:1, :1], **GREEDY).shape == (1, 6)  # batch 1, a one-token prompt


def test_with_quantizers_off_generate_is_the_float_models(lm):
    model, qlm = lm
    ids, mask = _ids(), torch.ones(2, 6, dtype=torch.long)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding: positions come from the mask
    quantizers = [m for m in qlm.modules() if isinstance(m, qc.Quantizer)]
    for quantizer in quantizers:
        quantizer.enabled = False
    try:
        generated = qlm.generate(ids, attention_mask=mask, **GREEDY)
    finally:
        for quantizer in quantizers:
            quantizer.enabled = True
    expected = model.generate(ids, attention_mask=mask, use_cache=False, **GREEDY)
    assert torch.equal(generated, expected)
    quantized = qlm.generate(ids, attention_mask=mask, **GREEDY)
    assert quantized.shape == expected.shape  # int8 may pick other tokens; it must still run


def test_labels_give_the_next_token_loss_and_a_cache_is_refused(lm):
    model, qlm = lm
    ids = _ids()
    out = qlm(ids, labels=ids)
    reference = model(ids, labels=ids, use_cache=False)
    assert abs(out.loss.item() - reference.loss.item()) < 0.05 * reference.loss.item()
    with pytest.raises(ValueError, match=r"without a KV cache.*use_cache=False"):
        qlm(ids, use_cache=True)


def test_prepare_causal_lm_refuses_other_models():
    assert qc.hf is hf  # qcompile.hf is reachable from the package without an import
    with pytest.raises(TypeError, match="use qcompile.prepare for other models"):
        hf.prepare_causal_lm(nn.Linear(4, 4))
    config = CONFIGS["gpt2"]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="needs input_ids"):
        hf.prepare_causal_lm(model, "int8", example_kwargs={"inputs_embeds": torch.randn(2, 4, 64)})


@pytest.mark.slow
def test_qad_with_the_trainer_on_a_causal_lm(tmp_path, lm):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    model, qlm = lm
    student = copy.deepcopy(qlm)
    data = [{"input_ids": _ids(1, 12, seed=s)[0]} for s in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4,
        learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
        remove_unused_columns=False,
    )
    trainer = qc.QADTrainer(model=student, teacher=model, args=args, train_dataset=data)
    weight = next(student.parameters()).detach().clone()
    trainer.train()
    assert not torch.equal(next(student.parameters()), weight)
    assert student.generate(_ids(), **GREEDY).shape == (2, 11)
