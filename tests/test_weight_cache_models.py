"""The inference weight cache on a block-wise prepared decoder: generate gives the tokens of the
uncached model, and every way the library or a user changes weights or scales between
inference calls (smooth, calibrate, gptq, load_state_dict, optimizer steps) is followed."""

from __future__ import annotations

import warnings

import pytest
import torch

import qcompile as qc
from qcompile.core import weight_cache
from qcompile.passes.sites import site_quantizers

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # prepares a decoder and captures its decode graph (~20 s)

TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _cached(model) -> int:
    return sum(weight_cache.ENTRY in e.quantizer.__dict__ for e in site_quantizers(model))


def _logits(model, ids):
    """Logits with what the weight cache holds, checked against the model without the cache;
    leaves the cache filled, so that the next change meets it."""
    with torch.no_grad():
        got = model(input_ids=ids).logits
        qc.set_weight_cache(model, False)
        expected = model(input_ids=ids).logits
        qc.set_weight_cache(model, True)
        model(input_ids=ids)
        assert _cached(model) > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    return got


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = qc.prepare(model, "int8", example_kwargs={"input_ids": _ids()})
    qc.calibrate(prepared, [{"input_ids": _ids(seed=s)} for s in range(2)], progress=False)
    return prepared.eval()


def test_generate_with_the_cache_gives_the_uncached_tokens(qmodel):
    prompt = _ids(batch=2, length=5, seed=3)
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0,
               "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        cached = qmodel.generate(prompt, **options)
        weights = sum(1 for e in site_quantizers(qmodel) if e.role == "weight")
        assert _cached(qmodel) == weights  # every weight quantizer, no activation quantizer
        qc.set_weight_cache(qmodel, False)
        uncached = qmodel.generate(prompt, **options)
        qc.set_weight_cache(qmodel, True)
    assert torch.equal(cached, uncached)


def test_the_outputs_follow_the_library_and_the_user(qmodel):
    ids = _ids(seed=5)
    data = [{"input_ids": _ids(seed=s)} for s in (6, 7)]
    steps = []

    def step(name, change):
        before = _logits(qmodel, ids)
        change()
        after = _logits(qmodel, ids)  # == the model without the cache
        steps.append((name, bool((after - before).abs().max() > 0)))

    def optimizer_step():
        qmodel.train()
        loss = qmodel(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.optim.SGD([p for p in qmodel.parameters() if p.requires_grad], lr=0.5).step()
        qmodel.zero_grad()
        qmodel.eval()

    def optimizer_step_in_eval_mode():  # no train(): only the version counters tell
        loss = qmodel(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.optim.SGD([p for p in qmodel.parameters() if p.requires_grad], lr=0.5).step()
        qmodel.zero_grad()

    def load_state_dict():
        state = {k: v * 1.5 if k.endswith("up_proj.weight") else v
                 for k, v in qmodel.state_dict().items()}
        qmodel.load_state_dict(state)

    def smooth():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # smoothing asks to calibrate again: done below
            qc.smooth(qmodel, data, alpha=0.5, progress=False)
        qc.calibrate(qmodel, data, progress=False)

    step("smooth", smooth)
    step("calibrate", lambda: qc.calibrate(qmodel, data[:1], progress=False))
    step("gptq", lambda: qc.gptq(qmodel, data, progress=False))
    step("load_state_dict", load_state_dict)
    step("optimizer step", optimizer_step)
    step("optimizer step in eval mode", optimizer_step_in_eval_mode)
    changed = [name for name, moved in steps if moved]
    assert len(changed) >= 5, steps  # (the checks that matter ran in _logits)
