"""Searched weight scales (`qcompile.algorithms.weight_scales`): the search against rounding
with the weight's own amax, the stored scales against the independent ml_dtypes reference
(tests/references.py), GPTQ on stored scales, and every round trip exact (qc.save/load, ONNX,
Hugging Face and serving checkpoints)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.algorithms.gptq import gptq_round
from qcompile.algorithms.rounding import ColumnRounder
from qcompile.algorithms.weight_scales import candidate_ratios, search_scale_amax
from qcompile.core.formats import get_format
from qcompile.core.quantizer import Quantizer, QuantSpec
from qcompile.core.weights import quantize_weight
from tests.references import ml_dtypes_fake_quantize

SPECS = {
    "int4": QuantSpec("int4", dynamic=True),
    "int8 per channel": QuantSpec("int8", axis=0, dynamic=True),
    "fp8 per tensor": QuantSpec("fp8", dynamic=True),
    "nvfp4": QuantSpec("nvfp4", dynamic=True),
    "mxfp4": QuantSpec("mxfp4"),
}


def _weight(rows: int = 16, columns: int = 256) -> torch.Tensor:
    """Heavy-tailed weights, an outlier, a zero block."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(rows, columns, generator=g) * 0.02
    w = w * torch.rand(rows, columns, generator=g).pow(-0.3)  # heavier tails
    w[2, 9] = 0.9
    w[4, :128] = 0.0
    return w


def _reference(w: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
    """ml_dtypes fake quantization with the quantizer's stored amax (written from the contract)."""
    spec, stored = quantizer.spec, quantizer.scale_amax.numpy()
    fmt = get_format(spec.format)
    if fmt.scale.value == "fp32":
        out = ml_dtypes_fake_quantize(w.numpy(), spec.format, amax=stored, axis=spec.axis)
    else:
        out = ml_dtypes_fake_quantize(w.numpy(), spec.format, block_amax=stored)
    return torch.from_numpy(out)


@pytest.mark.parametrize("name", list(SPECS))
def test_search_loses_less_than_the_weights_own_amax(name):
    spec, w = SPECS[name], _weight()
    quantizer = Quantizer(spec)
    own = (quantizer(w) - w).square().sum()
    ratios = candidate_ratios(get_format(spec.format), "mse")
    quantizer.set_scale_amax(search_scale_amax(w, quantizer, ratios))
    stored = quantizer(w)
    torch.testing.assert_close(stored, _reference(w, quantizer), rtol=0, atol=0)
    error = (stored - w).square().sum()
    assert error < own if get_format(spec.format).element.bits == 4 else error <= own
    assert torch.equal(quantize_weight(w, quantizer, e8m0_scales=True).dequantize(), stored)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_four_over_six_maps_each_block_max_to_6_or_4(name):
    spec, w = SPECS[name], _weight()
    quantizer = Quantizer(spec)
    ratios = candidate_ratios(get_format(spec.format), "four_over_six")
    assert ratios == (1.0, 1.5) and candidate_ratios(get_format("int4"), "four_over_six") == ()
    stored = search_scale_amax(w, quantizer, ratios)
    own = w.reshape(16, -1, get_format(spec.format).block_size).abs().amax(-1)
    six, four = stored == own, stored == own * 1.5
    assert (six | four).all() and six[own > 0].any() and four.any()  # both occur


@pytest.mark.parametrize("name", ["int4", "nvfp4", "mxfp4"])
def test_gptq_latent_quantizes_to_the_rounded_weight_with_stored_scales(name):
    spec, w = SPECS[name], _weight()
    quantizer = Quantizer(spec)
    quantizer.set_scale_amax(search_scale_amax(w, quantizer, candidate_ratios(
        get_format(spec.format), "mse")))
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    x[:, 7] *= 20
    for act_order in (False, True):
        rounder = ColumnRounder(spec, w, quantizer.amax, quantizer.scale_amax)
        rounded, latent = gptq_round(w, x.T @ x, rounder, act_order=act_order)
        assert torch.equal(quantizer(latent), rounded)
        assert torch.equal(_reference(latent, quantizer), rounded)


def test_unknown_method_and_learned_amax_are_refused():
    qmodel = _prepared("int4")
    before = copy.deepcopy(qmodel.state_dict())
    with pytest.raises(ValueError, match="mse, output, four_over_six"):
        qc.calibrate(qmodel, _batches(), weight_scales="minmax", progress=False)
    with pytest.raises(ValueError, match="mse, output, four_over_six"):
        qc.search_weight_scales(qmodel, _batches(), "minmax")
    assert qmodel.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match="learned"):
        Quantizer(QuantSpec("int4", learn_amax=True)).set_scale_amax(torch.ones(2, 2))


# ------------------------------------------------------------------- round trips, exact


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _batches(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(4, 8, 64, generator=g) for _ in range(n)]


def _prepared(recipe: str) -> qc.PreparedModel:
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.up.weight[3, 5] = 2.0
    if recipe == "int4":
        recipe = qc.RECIPES["int4"].with_(overrides={"*": qc.SiteSpecs(
            weight=QuantSpec("int4", block_size=32, dynamic=True))})
    return qc.prepare(model, recipe, example_inputs=(_batches(1)[0],))


@pytest.fixture(scope="module", params=["int4", "nvfp4"])
def searched(request):
    qmodel = _prepared(request.param)
    qc.calibrate(qmodel, _batches(), weight_scales="mse", progress=False)
    quantizers = [q for q in qmodel.modules() if isinstance(q, Quantizer) and q.scale_amax is not None]
    assert len(quantizers) == 2
    return request.param, qmodel


def test_save_and_load_keep_the_stored_scales(searched, tmp_path):
    recipe, qmodel = searched
    qc.save(tmp_path / "ckpt.pt", qmodel)
    fresh = _prepared(recipe)
    qc.load(tmp_path / "ckpt.pt", fresh)
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), qmodel(x))


def test_onnx_export_stores_the_searched_scales(searched, tmp_path):
    recipe, qmodel = searched
    x = _batches(1)[0]
    path = tmp_path / "model.onnx"
    qc.export_onnx(qmodel.eval(), (x,), path, target="onnx")
    report = qc.verify_onnx(qmodel, path, (x,))
    assert report.max_difference == 0.0, report.render()
    weights = [row for row in report.rows if row.label.endswith("(weight)")]
    assert len(weights) == 2 and all(row.size > 0 for row in weights), report.render()


def test_output_aware_search_weighs_columns_by_their_inputs():
    # One input column 30x the others: the output-aware choice loses less on X (W - Q)^T than
    # the plain weight-MSE choice, which in turn loses less weight MSE.
    spec, w = SPECS["nvfp4"], _weight()
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))
    x[:, 3] *= 30
    quantizer = Quantizer(spec)
    ratios = candidate_ratios(get_format(spec.format), "output")
    chosen = {}
    for name, columns in (("mse", None), ("output", x.square().mean(0))):
        quantizer.set_scale_amax(search_scale_amax(w, quantizer, ratios, columns))
        chosen[name] = quantizer(w)
    output_error = {n: (x @ (q - w).T).square().sum() for n, q in chosen.items()}
    weight_error = {n: (q - w).square().sum() for n, q in chosen.items()}
    assert output_error["output"] < output_error["mse"]
    assert weight_error["mse"] < weight_error["output"]


def test_calibrate_output_search_stores_scales_at_every_linear():
    qmodel = _prepared("nvfp4")
    qc.calibrate(qmodel, _batches(), weight_scales="output", progress=False)
    stored = {n: tuple(q.scale_amax.shape) for n, q in qmodel.named_modules()
              if isinstance(q, Quantizer) and q.scale_amax is not None}
    assert stored == {"up.weight_quantizer": (128, 4), "down.weight_quantizer": (64, 8)}


def test_storing_scales_drops_the_inference_weight_cache():
    weight = nn.Parameter(_weight())
    quantizer = Quantizer(SPECS["nvfp4"]).eval()
    with torch.no_grad():
        before = quantizer(weight)
        assert quantizer(weight) is before  # cached (qcompile.core.weight_cache)
        quantizer.set_scale_amax(search_scale_amax(weight, quantizer, (1.0, 1.5)))
        after = quantizer(weight)
        assert not torch.equal(after, before)
        assert torch.equal(after, _reference(weight.detach(), quantizer))


def test_calibrate_searches_nvfp4_weights_by_default_and_keeps_stored_scales():
    # "auto": nvfp4 weights searched (as weight_scales="mse" would), int4 left to its own
    # amax; calibrating again after GPTQ keeps the scales GPTQ rounded onto.
    qmodel = _prepared("nvfp4")
    qc.calibrate(qmodel, _batches(), progress=False)
    explicit = _prepared("nvfp4")
    qc.calibrate(explicit, _batches(), progress=False, weight_scales="mse")
    for path in ("up.weight_quantizer", "down.weight_quantizer"):
        stored = qmodel.get_submodule(path).scale_amax
        assert stored is not None
        assert torch.equal(stored, explicit.get_submodule(path).scale_amax)
    assert _prepared("nvfp4").get_submodule("up.weight_quantizer").scale_amax is None
    off = _prepared("nvfp4")
    qc.calibrate(off, _batches(), progress=False, weight_scales=None)
    assert all(q.scale_amax is None for q in off.modules() if isinstance(q, Quantizer))
    int4 = _prepared("int4")
    with pytest.warns(qc.CalibrationWarning, match="dynamic scales"):
        qc.calibrate(int4, _batches(), progress=False)
    assert all(q.scale_amax is None for q in int4.modules() if isinstance(q, Quantizer))

    qc.gptq(qmodel, _batches(), progress=False)

    def rounded_weights():
        with torch.no_grad():
            return [qmodel.get_submodule(f"{name}.weight_quantizer")(
                qmodel.get_parameter(f"{name}.weight")) for name in ("up", "down")]

    before = rounded_weights()
    qc.calibrate(qmodel, _batches(), progress=False)
    for now, then in zip(rounded_weights(), before):
        assert torch.equal(now, then)
