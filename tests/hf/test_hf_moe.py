"""Mixture-of-experts models (#24): fused 3-D expert weights quantized per expert, the capture
loop equal to every experts implementation, routers float, experts without calibration tokens
given a safe default, QAT gradients reaching each expert that received tokens."""

import warnings

import numpy as np
import pytest
import torch

import qcompile as qc
from qcompile.algorithms.data import CalibrationWarning
from qcompile.passes.experts import experts_loop_forward, is_fused_experts
from qcompile.passes.sites import SiteKind, SiteStatus, model_sites, site_quantizers
from qcompile.prepare import prepare
from qcompile.recipe import SiteSpecs
from tests.references import ml_dtypes_fake_quantize

transformers = pytest.importorskip("transformers")

EXPERTS = 4


def _mixtral(layers=1, **extra):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=100, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, num_hidden_layers=layers, num_local_experts=EXPERTS,
        num_experts_per_tok=2, **extra)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():  # experts of clearly different ranges
        for layer in model.model.layers:
            for e in range(EXPERTS):
                layer.mlp.experts.gate_up_proj[e] *= 1 + 3 * e
                layer.mlp.experts.down_proj[e] *= 1 + 3 * e
    return model


def _ids(ids=None, batch=2, length=8, seed=1):
    if ids is None:
        ids = torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


@pytest.fixture(scope="module")
def model():
    return _mixtral()


@pytest.fixture(scope="module")
def int8(model):
    return prepare(model, "int8", example_kwargs=_ids())


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_capture_loop_equals_each_experts_implementation(implementation):
    model = _mixtral(experts_implementation=implementation)
    experts = model.model.layers[0].mlp.experts
    assert is_fused_experts(experts)
    hidden = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    _, weights, index = model.model.layers[0].mlp.gate(hidden)
    index[0] = torch.tensor([0, 1])  # expert 3 gets no token: an empty slice in the loop
    index[index == 3] = 2
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        got = experts_loop_forward(experts, hidden, index, weights)
    # Same products in the same order as eager; the row-wise accumulation may still differ in
    # the last bit with the number of threads (seen with 2 threads, equal with 1).
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_each_expert_is_a_site_with_its_own_weight_scales(model, int8):
    sites = {s.name: s for s in model_sites(int8)}
    for e in range(EXPERTS):
        for param in ("gate_up_proj", "down_proj"):
            site = sites[f"model.layers.0.mlp.experts.{e}.{param}"]
            assert (site.status, site.expert, site.weight) == (
                SiteStatus.QUANTIZED, e, f"model.layers.0.mlp.experts.{param}")
    router = sites["model.layers.0.mlp.gate"]
    assert router.status is SiteStatus.EXCLUDED and router.reason.startswith("MoE router")
    assert router.router and not router.quantizers
    # what each expert's weight quantizer computes: its own slice, its own per-channel amax
    seen = {}
    hooks = [int8.get_submodule(f"model.layers.0.mlp.experts.{e}.down_proj.weight_quantizer")
             .register_forward_hook(lambda m, i, o, e=e: seen.__setitem__(e, (i[0], o)))
             for e in range(EXPERTS)]
    qc.calibrate(int8, [_ids(seed=s) for s in range(3)], progress=False)
    try:
        with torch.no_grad():
            int8(**_ids(batch=4, seed=5))
    finally:
        for hook in hooks:
            hook.remove()
    weights = model.model.layers[0].mlp.experts.down_proj.detach()
    for e in range(EXPERTS):
        x, y = seen[e]
        assert torch.equal(x, weights[e])
        reference = ml_dtypes_fake_quantize(weights[e].numpy(), "int8", axis=0)
        np.testing.assert_array_equal(y.numpy(), reference)


@pytest.mark.slow
def test_nvfp4_global_scale_is_per_expert(model):
    prepared = prepare(model, "nvfp4", example_kwargs=_ids())
    quantizer = prepared.get_submodule("model.layers.0.mlp.experts.1.gate_up_proj.weight_quantizer")
    weights = model.model.layers[0].mlp.experts.gate_up_proj.detach()
    got = quantizer(weights[1]).detach().numpy()
    np.testing.assert_array_equal(got, ml_dtypes_fake_quantize(weights[1].numpy(), "nvfp4"))
    whole = ml_dtypes_fake_quantize(weights.numpy(), "nvfp4")[1]  # one global scale for all
    assert not np.array_equal(got, whole)


def test_expert_without_calibration_tokens_gets_the_layers_max(int8):
    prepared = int8
    same = torch.full((1, 2), 7)  # two identical tokens: both routed to the same 2 experts
    with pytest.warns(CalibrationWarning, match=r"4 MoE expert quantizers received no "
                                                r"calibration tokens.*max amax"):
        qc.calibrate(prepared, [_ids(same)], progress=False)
    amax = {}
    for entry in site_quantizers(prepared):
        if entry.site.expert is not None and entry.role == "input" and "gate_up" in entry.path:
            amax[entry.site.expert] = entry.quantizer.amax
    routed = [e for e, a in amax.items() if a.numel()]
    assert len(amax) == EXPERTS and all(a.numel() == 1 and a.isfinite() for a in amax.values())
    # identical tokens: the routed experts see the same input, the idle ones take its max
    assert len({round(a.item(), 6) for a in amax.values()}) == 1 and len(routed) == EXPERTS
    with torch.no_grad():
        assert prepared(**_ids(batch=3, seed=7)).logits.isfinite().all()


def test_qat_gradient_reaches_every_expert_that_received_tokens(model, int8):
    qc.calibrate(int8, [_ids(seed=s) for s in range(3)], progress=False)
    rows = {}
    hooks = [int8.get_submodule(f"model.layers.0.mlp.experts.{e}.gate_up_proj.input_quantizer")
             .register_forward_hook(lambda m, i, o, e=e: rows.__setitem__(e, i[0].shape[0]))
             for e in range(EXPERTS)]
    int8.train()
    try:
        int8(**_ids(torch.tensor([[3, 3, 3]]))).logits.sum().backward()  # 2 of 4 experts
    finally:
        int8.eval()
        for hook in hooks:
            hook.remove()
    grad = int8.get_parameter("model.layers.0.mlp.experts.gate_up_proj").grad
    routed = [e for e in range(EXPERTS) if rows[e]]
    assert len(routed) == 2
    for e in range(EXPERTS):
        assert (grad[e].abs().sum() > 0) == (e in routed), (e, rows)
    int8.zero_grad()


@pytest.mark.slow
def test_an_override_quantizes_the_router(model):
    spec = qc.QuantSpec("int8", axis=0, dynamic=True)
    recipe = qc.get_recipe("int8").with_(overrides={"*.mlp.gate": SiteSpecs(weight=spec)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(model, recipe, example_kwargs=_ids())
    router = next(s for s in model_sites(prepared) if s.name == "model.layers.0.mlp.gate")
    assert router.status is SiteStatus.QUANTIZED and list(router.quantizers) == ["weight"]
    assert router.kind is SiteKind.LINEAR


@pytest.mark.slow
def test_checkpoint_round_trip_keeps_every_expert(model, int8, tmp_path):
    from qcompile import hf

    qc.calibrate(int8, [_ids(seed=s) for s in range(3)], progress=False)
    hf.save_quantized(int8, tmp_path, config=model.config)
    loaded = hf.load_quantized(tmp_path)
    names = [s.name for s in model_sites(loaded)]
    assert names == [s.name for s in model_sites(int8)]
    assert "model.layers.0.mlp.experts.3.down_proj" in names
    with torch.no_grad():
        assert torch.equal(loaded(**_ids(batch=3, seed=9)).logits,
                           int8(**_ids(batch=3, seed=9)).logits)
