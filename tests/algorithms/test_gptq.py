"""GPTQ rounding (`qcompile.algorithms.gptq`): the algorithm against rounding to nearest, the stored
weights against an independent fake-quantize (ml_dtypes), the prepared model, bad input."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.algorithms.gptq import gptq, gptq_round
from qcompile.algorithms.rounding import ColumnRounder, UnsupportedWeight
from qcompile.core import numerics
from qcompile.core.formats import get_format
from qcompile.core.quantizer import Quantizer, QuantSpec
from qcompile.recipe import Recipe, SiteSpecs
from tests.references import ml_dtypes_fake_quantize

#: (spec of the weight, the reference's keyword arguments)
WEIGHT_SPECS = {
    "int4": (QuantSpec("int4", dynamic=True), {}),
    "int4 block 32": (QuantSpec("int4", block_size=32, dynamic=True), {"block_size": 32}),
    "nvfp4": (QuantSpec("nvfp4", dynamic=True), {}),
    "mxfp4": (QuantSpec("mxfp4"), {}),
    "mxfp8": (QuantSpec("mxfp8"), {}),
    "mxfp4_ocp": (QuantSpec("mxfp4_ocp"), {}),
    "int8 per channel": (QuantSpec("int8", axis=0, dynamic=True), {"axis": 0}),
    "fp8 per tensor": (QuantSpec("fp8", dynamic=True), {}),
}


def _weight(rows: int = 48, columns: int = 256, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with outliers (one 20x the rest), a zero block and a zero column."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g) * 0.05
    w[3, 200] = 1.0  # the tensor's largest element, in a late column
    w[5, 17] = -0.6
    w[7, :32] = 0.0
    w[:, 40] = 0.0
    return w


def _correlated_inputs(columns: int = 256, n: int = 512, seed: int = 1) -> torch.Tensor:
    """Samples (seed) of one fixed distribution: correlated channels, an outlier, a dead one."""
    mix = torch.randn(columns, columns, generator=torch.Generator().manual_seed(0)) / columns**0.5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, columns, generator=g) @ mix + 0.3 * torch.randn(n, columns, generator=g)
    x[:, 11] *= 25.0  # an outlier channel
    x[:, 90] = 0.0  # a channel that never fires
    return x


def _reference(w: torch.Tensor, spec: QuantSpec, kwargs: dict) -> torch.Tensor:
    return torch.from_numpy(ml_dtypes_fake_quantize(w.numpy(), spec.format, **kwargs))


@pytest.mark.parametrize("name", list(WEIGHT_SPECS))
def test_identity_hessian_is_rounding_to_nearest(name):
    # Uncorrelated unit inputs leave GPTQ nothing to trade: it must round every element to
    # nearest, exactly as the format's own quantization (ml_dtypes reference) does.
    spec, kwargs = WEIGHT_SPECS[name]
    w = _weight()
    rounded, latent = gptq_round(w, torch.eye(w.shape[1]), ColumnRounder(spec, w, None))
    torch.testing.assert_close(rounded, _reference(w, spec, kwargs), rtol=0, atol=0)
    # The latent weight is the original but for the elements that set (or pass) a scale's amax.
    assert float((latent != w).float().mean()) < 0.1
    torch.testing.assert_close(_reference(latent, spec, kwargs), rounded, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("name", "top"), [("mxfp4", 3.1), ("mxfp8", 230.0)])
def test_ceil_block_max_rounding_down_to_half_the_range_keeps_its_scale(name, top):
    # A block max just above max/2 (scale 1) rounds down to exactly max/2, which on its own
    # would requantize with half the scale and round the rest of the block on a finer grid.
    spec, kwargs = WEIGHT_SPECS[name]
    w = _weight(rows=8, columns=256)[:, :64].contiguous()
    w[:, 5] = top
    w[:, 40] = -top * 2.0**-3
    rounded, latent = gptq_round(w, torch.eye(64), ColumnRounder(spec, w, None))
    torch.testing.assert_close(rounded, _reference(w, spec, kwargs), rtol=0, atol=0)
    torch.testing.assert_close(_reference(latent, spec, kwargs), rounded, rtol=0, atol=0)


def _round_correlated(spec: QuantSpec, act_order: bool):
    """The test weight and its GPTQ (rounded, latent) for the correlated inputs."""
    w, x = _weight(), _correlated_inputs()
    return w, *gptq_round(w, x.T @ x, ColumnRounder(spec, w, None), act_order=act_order)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", list(WEIGHT_SPECS))
def test_latent_weight_quantizes_to_the_rounded_one(name, act_order):
    # The prepared model re-quantizes the stored (latent) weight with dynamic scales on every
    # forward: it must give the GPTQ values, outliers and all. Where scale = amax / max the
    # rounded weight is a fixed point itself; int4's amax / 7.5 is not (a block max of 7.5
    # rounds to 7 or -8), so there the latent keeps each block's amax, and GPTQ uses -8 too.
    spec, kwargs = WEIGHT_SPECS[name]
    w, rounded, latent = _round_correlated(spec, act_order)
    torch.testing.assert_close(_reference(latent, spec, kwargs), rounded, rtol=0, atol=0)
    assert float((latent == w).float().mean()) > 0.25  # many weights keep their place in the bin
    fmt = get_format(spec.format)
    if fmt.divisor == fmt.element.max_value:
        torch.testing.assert_close(_reference(rounded, spec, kwargs), rounded, rtol=1e-6, atol=0)
    else:
        values, _ = numerics.quantize(latent, None, fmt, fmt.resolve_block_size(spec.block_size))
        assert float(values.min()) == -8.0 and float(values.max()) == 7.0
        assert not torch.equal(_reference(rounded, spec, kwargs), rounded)
    if spec.format == "nvfp4":  # the tensor's amax, hence the global scale, is pinned
        assert float(rounded.abs().max()) == float(w.abs().max())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", list(WEIGHT_SPECS))
def test_output_error_is_below_rounding_to_nearest(name, act_order):
    spec, kwargs = WEIGHT_SPECS[name]
    w, rounded, _ = _round_correlated(spec, act_order)
    nearest = _reference(w, spec, kwargs)
    held_out = _correlated_inputs(seed=2)  # the same distribution, other samples
    error = (held_out @ (rounded - w).T).square().sum()
    baseline = (held_out @ (nearest - w).T).square().sum()
    assert error < 0.8 * baseline


def test_static_amax_keeps_its_scales():
    # A calibrated (here learned) amax fixes the scale: GPTQ may use the whole grid, -8 included.
    w, x = _weight(), _correlated_inputs()
    amax = torch.full((48, 2), 0.1)
    rounder = ColumnRounder(QuantSpec("int4", learn_amax=True), w, amax)
    rounded, _ = gptq_round(w, x.T @ x, rounder)
    expected = qc.fake_quantize(rounded, "int4", amax=amax)
    torch.testing.assert_close(rounded, expected, rtol=0, atol=0)
    assert float(rounded.max()) == pytest.approx(0.1 * 7 / 7.5)
    assert float(rounded.min()) == pytest.approx(-0.1 * 8 / 7.5)


def test_per_input_channel_scales_are_refused():
    with pytest.raises(UnsupportedWeight, match="axis=0"):
        ColumnRounder(QuantSpec("int8", axis=1, dynamic=True), _weight(), None)


# ------------------------------------------------------------------------ prepared models


class MLP(nn.Module):
    def __init__(self, d: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _batches(n: int, seed: int, d: int = 128) -> list[torch.Tensor]:
    """Batches (seed) of one fixed distribution with correlated channels of growing scale."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(0)) / d**0.5
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, d, generator=g) @ mix) * torch.linspace(0.2, 4, d) for _ in range(n)]


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def _prepared(model: nn.Module, recipe) -> qc.PreparedModel:
    qmodel = qc.prepare(copy.deepcopy(model), recipe, example_inputs=(_batches(1, 0)[0],))
    if qc.get_recipe(recipe).needs_calibration:
        qc.calibrate(qmodel, _batches(4, 1), progress=False)
    return qmodel


#: recipe -> bound on GPTQ's output error over rounding to nearest (int8's error is mostly
#: its per-tensor activations', which GPTQ does not touch).
MODEL_GAIN = {"int4": 0.9, "nvfp4": 0.9, "mxfp4": 0.9, "int8": 1.0, "fp8": 0.9}


@pytest.mark.parametrize("recipe", list(MODEL_GAIN))
def test_gptq_brings_the_prepared_model_closer_to_float(mlp, recipe):
    qmodel = _prepared(mlp, recipe)
    nearest = copy.deepcopy(qmodel)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    assert sorted(gptq(qmodel, _batches(4, 1), progress=False)) == ["down", "up"]
    changed = {k for k, v in qmodel.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"up.weight", "down.weight"}  # biases, amax: untouched
    x = torch.cat(_batches(2, 7))
    with torch.no_grad():
        reference = mlp(x)
        error = (qmodel(x) - reference).square().mean()
        baseline = (nearest(x) - reference).square().mean()
    assert error < MODEL_GAIN[recipe] * baseline
    for name in ("up", "down"):  # each stored weight is what its quantizer computes
        weight = qmodel.get_parameter(f"{name}.weight")
        quantizer = qmodel.get_submodule(f"{name}.weight_quantizer")
        fmt = get_format(quantizer.spec.format)
        if fmt.divisor == fmt.element.max_value:  # int4: the latent keeps each block's amax
            torch.testing.assert_close(quantizer(quantizer(weight)), quantizer(weight), rtol=1e-6, atol=0)
        else:
            assert not torch.equal(quantizer(quantizer(weight)), quantizer(weight))


def test_smoothed_sites_round_the_scaled_weight(mlp):
    # SmoothQuant scales the weight's input channels (pre_scale): GPTQ must round W * s.
    qmodel = qc.prepare(copy.deepcopy(mlp), "nvfp4", example_inputs=(_batches(1, 0)[0],))
    qc.smooth(qmodel, _batches(2, 1), alpha=0.5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qc.calibrate(qmodel, _batches(4, 1), progress=False)
    nearest = copy.deepcopy(qmodel)
    gptq(qmodel, _batches(4, 1), progress=False)
    x = torch.cat(_batches(2, 7))
    with torch.no_grad():
        error = (qmodel(x) - mlp(x)).square().mean()
        baseline = (nearest(x) - mlp(x)).square().mean()
        assert error < 0.9 * baseline
        quantizer = qmodel.get_submodule("up.weight_quantizer")
        rounded = quantizer(qmodel.get_parameter("up.weight"))
    # calibrate's default stored searched block scales (#25): GPTQ rounded onto them
    assert quantizer.scale_amax is not None
    reference = torch.from_numpy(ml_dtypes_fake_quantize(
        rounded.numpy(), "nvfp4", block_amax=quantizer.scale_amax.numpy()))
    torch.testing.assert_close(reference, rounded, rtol=1e-6, atol=0)


def test_export_after_gptq_matches_onnxruntime(mlp, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    qmodel = _prepared(mlp, "int4")
    gptq(qmodel, _batches(4, 1), progress=False)
    x = _batches(1, 9)[0]
    path = tmp_path / "gptq_int4.onnx"
    qc.export_onnx(qmodel, (x,), path, target="onnx")
    options = ort.SessionOptions()  # its QDQ fusions change the numbers (test_onnx_export)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = qmodel(x).numpy()
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)


def test_bad_input_changes_nothing(mlp):
    with pytest.raises(ValueError, match="prepared by qcompile.prepare"):
        gptq(mlp, _batches(1, 1), progress=False)
    qmodel = _prepared(mlp, "int4")
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    with pytest.raises(ValueError, match="damp must be a positive number"):
        gptq(qmodel, _batches(1, 1), damp=0.0, progress=False)
    with pytest.raises(ValueError, match="no batch reached"):
        gptq(qmodel, [], progress=False)
    uncalibrated = qc.prepare(copy.deepcopy(mlp), "int8", example_inputs=(_batches(1, 0)[0],))
    with pytest.raises(RuntimeError, match="calibrate"):
        gptq(uncalibrated, _batches(1, 1), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in qmodel.state_dict().items())
    float_sites = qc.prepare(copy.deepcopy(mlp), Recipe("none", SiteSpecs(input=QuantSpec("fp8"))),
                             example_inputs=(_batches(1, 0)[0],))
    with pytest.raises(ValueError, match="no quantized Linear weight"):
        gptq(float_sites, _batches(1, 1), progress=False)


def test_quantizer_module_is_untouched_by_the_probe(mlp):
    # The Hessians are recorded on a copy: the model's graph and modules stay as they were.
    qmodel = _prepared(mlp, "nvfp4")
    graph_before = str(qmodel.graph)
    modules_before = {name for name, _ in qmodel.named_modules()}
    gptq(qmodel, _batches(2, 1), progress=False)
    assert str(qmodel.graph) == graph_before
    assert {name for name, _ in qmodel.named_modules()} == modules_before
    assert all(isinstance(qmodel.get_submodule(f"{n}.weight_quantizer"), Quantizer) for n in ("up", "down"))
