"""Bad input to prepare / calibrate / train / the prepared model: a clear error (or warning)
that names the problem and the fix, and nothing half-modified afterwards."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.passes.capture import CaptureError
from qcompile.passes.sites import SiteStatus

DIM = 128  # a multiple of every block size, so that every recipe quantizes every Linear


class MLP(nn.Module):
    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def _x(batch: int = 4, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, DIM, generator=torch.Generator().manual_seed(1)).to(dtype)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key


def _quiet_prepare(model, recipe, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qc.PrepareWarning)
        return qc.prepare(model, recipe, *args, **kwargs)


# -- recipes and formats ----------------------------------------------------------------------


def test_unknown_recipe_and_format_list_the_valid_names():
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"valid recipes: {', '.join(qc.RECIPES)}, or build"):
        qc.prepare(model, "nvfp8", (_x(),))
    with pytest.raises(ValueError, match="valid formats: fp8, int4, int8, mxfp4, mxfp4_ocp, mxfp8, mxfp8_ocp, nvfp4"):
        qc.prepare(model, qc.Recipe(linear=qc.SiteSpecs(weight=qc.QuantSpec("fp16"))), (_x(),))
    with pytest.raises(TypeError, match="a name such as 'int8' or a qcompile.Recipe"):
        qc.prepare(model, {"weights": "int8"}, (_x(),))
    assert_unchanged(model, before)


def test_preparing_a_prepared_model_again_is_an_error():
    prepared = qc.prepare(_mlp(), "int8", (_x(),))
    qc.calibrate(prepared, [_x()], progress=False)
    before = snapshot(prepared)
    with pytest.raises(ValueError, match="prepared already; prepare the original model"):
        qc.prepare(prepared, "fp8", (_x(),))
    wrapped = nn.Sequential(prepared, nn.ReLU())  # a prepared model inside another
    with pytest.raises(ValueError, match=r"quantizer already \(0\.fc1\.input_quantizer\).*once"):
        qc.prepare(wrapped, "fp8", (_x(),))
    assert_unchanged(prepared, before)


def test_patterns_that_match_no_site_warn_with_the_site_names():
    recipe = qc.get_recipe("int8").with_(
        exclude=["fc3", "*decoder*", *qc.Recipe().exclude], overrides={"mlp.fc1": None}
    )
    with pytest.warns(qc.PrepareWarning) as caught:
        prepared = qc.prepare(_mlp(), recipe, (_x(),))
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3  # the default output-head patterns do not warn
    assert messages[0] == (
        "exclude pattern '*decoder*' matches no site; the 2 sites are named like: fc1, fc2 "
        "(qcompile.report(qmodel) lists them all)"
    )
    assert messages[1].startswith("exclude pattern 'fc3' matches no site (did you mean 'fc")
    assert "override pattern 'mlp.fc1' matches no site (did you mean 'fc1'?)" in messages[2]
    assert all(s.status is SiteStatus.QUANTIZED for s in prepared.qcompile_sites)


def test_matching_patterns_do_not_warn():
    fp8 = qc.SiteSpecs(input=qc.QuantSpec("fp8", dynamic=True))
    recipe = qc.get_recipe("int8").with_(exclude=["fc2"], overrides={"fc1": fp8})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qc.prepare(_mlp(), recipe, (_x(),))
    # (all weights stay float here, which the float-weight warning says; no pattern warning)
    assert [str(w.message) for w in caught if "matches no site" in str(w.message)] == []
    assert any("100.0% of the matmul weight elements stay float" in str(w.message) for w in caught)


def test_a_recipe_that_quantizes_nothing_warns_and_calibrate_says_why():
    model = MLP(dim=48).eval()  # K=48: not a multiple of int4's blocks of 128
    with pytest.warns(qc.PrepareWarning, match=r"none of the 2 sites of MLP is quantized \(fc1: K"):
        prepared = qc.prepare(model, "w4a8", (torch.randn(2, 48),))
    with pytest.raises(ValueError, match=r"none of its 2 sites is quantized \(fc1: unsupported"):
        qc.calibrate(prepared, [torch.randn(2, 48)], progress=False)


# -- calibration data -------------------------------------------------------------------------


@pytest.mark.parametrize("data", [[], iter(()), lambda model: None],
                         ids=["empty list", "exhausted iterator", "loop that runs nothing"])
def test_empty_calibration_data_changes_nothing(data):
    prepared = qc.prepare(_mlp(), "int8", (_x(),))
    before = snapshot(prepared)
    with pytest.raises(ValueError, match="calibration data is empty"):
        qc.calibrate(prepared, data, progress=False)
    assert_unchanged(prepared, before)
    assert all(m.observer is None for m in prepared.modules() if isinstance(m, qc.Quantizer))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_data_names_the_site_and_keeps_the_old_ranges(bad):
    prepared = qc.prepare(_mlp(), "fp8", (_x(),))
    qc.calibrate(prepared, [_x()], progress=False)
    before = snapshot(prepared)
    x = _x()
    x[2, 3] = bad
    name = "NaN" if bad != bad else "inf"
    with pytest.raises(ValueError, match=rf"input of fc1 \(input\) contains {name}; clean"):
        qc.calibrate(prepared, [_x() * 10, x], progress=False)
    assert_unchanged(prepared, before)


# -- training data ----------------------------------------------------------------------------


def _loss(output, batch):
    return output.pow(2).mean()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_training_input_stops_at_its_step_with_weights_intact(bad):
    prepared = qc.prepare(_mlp(), "mxfp8", (_x(),))
    x = _x()
    x[0, 0] = bad
    batches = [{"x": _x()}, {"x": x}]  # the second step gets the bad batch
    name = "NaN" if bad != bad else "inf"
    with pytest.raises(FloatingPointError, match=rf"at step 1: 'x' contains {name}"):
        qc.train(prepared, batches, steps=2, lr=1e-3, loss_fn=_loss, progress=False)
    assert all(p.isfinite().all() for p in prepared.parameters())


def test_non_finite_gradients_skip_the_step_and_name_the_parameters():
    prepared = qc.prepare(_mlp(), "mxfp8", (_x(),))
    before = snapshot(prepared)

    def sqrt_loss(output, batch):  # a finite loss, but d sqrt(y)/dy is inf at y = 0
        return (output * 0).sqrt().sum()

    with pytest.raises(FloatingPointError, match=r"NaN or inf at step 0 \(fc1.weight, .*skipped"):
        qc.train(prepared, [_x()], steps=1, lr=1e-3, loss_fn=sqrt_loss, progress=False)
    assert_unchanged(prepared, before)


# -- example inputs at prepare time -----------------------------------------------------------


@pytest.mark.parametrize("x, match", [
    (torch.randn(4, DIM - 1), r"shapes cannot be multiplied.*Example inputs: x: "
                              r"float32\[4, 127\] on cpu; model parameters: float32 on cpu"),
    (torch.randn(4, DIM, dtype=torch.float64),
     r"site fc1 \(linear\) multiplies a float64 input by a float32 operand; .*example input "
     r"'x' \(float64\)"),
    (torch.randint(0, 5, (4, DIM)), r"multiplies a int64 input.*x.to\(torch.float32\)"),
    (torch.randn(4, DIM, device="meta"), r"float32\[4, 128\] on meta.*put the example tensors "
                                         r"on cpu, the model's device"),
], ids=["shape", "float64", "int64", "device"])
def test_example_inputs_the_model_cannot_run_on(x, match):
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(CaptureError, match=match):
        qc.prepare(model, "int8", (x,))
    assert_unchanged(model, before)


# -- calls of the prepared model --------------------------------------------------------------


class WithOptions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, 32)

    def forward(self, x, scale=None, mode="sum"):
        y = self.fc(x)
        y = y if scale is None else y * scale
        return y.sum(-1) if mode == "sum" else y


@pytest.fixture(scope="module")
def with_options():
    torch.manual_seed(0)
    return qc.prepare(WithOptions().eval(), "mxfp8", (torch.randn(2, 5, DIM),),
                      {"mode": "sum"})


@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.randn(2, 5, DIM, dtype=torch.float16),), {"mode": "sum"},
     r"input 'x' is float16 but the prepared model's parameters are float32; convert it with "
     r"x.to\(torch.float32\) \(or the model with .to\(torch.float16\)\)"),
    ((torch.randn(2, 5, DIM, dtype=torch.float64),), {"mode": "sum"},
     r"input 'x' is float64 .*x.to\(torch.float32\)\.$"),
    ((torch.randn(2, 5, DIM, device="meta"),), {"mode": "sum"},
     r"input 'x' is on meta but the prepared model's parameters are on cpu"),
    ((torch.randn(5, DIM),), {"mode": "sum"},
     r"input 'x' has 2 dimensions \(shape \[5, 128\]\), but the model was prepared with 3"),
    ((torch.randn(2, 5, 64),), {"mode": "sum"},
     r"dimension 2 was fixed to 128 when the model was prepared \(example shape \[2, 5, 128\]\)"),
    ((torch.randn(2, 5, DIM),), {"mode": "none"},
     r"argument 'mode' was 'sum' when the model was prepared.*got 'none'.*prepare again"),
    ((torch.randn(2, 5, DIM), "sum"), {},
     None),  # positional arguments bind as in the example call
], ids=["float16", "float64", "device", "rank", "fixed size", "constant", "positional"])
def test_calls_that_do_not_fit_the_example_call(with_options, args, kwargs, match):
    before = snapshot(with_options)
    if match is None:
        assert with_options(*args, **kwargs).shape == (2, 5)
        return
    with pytest.raises(ValueError, match=match):
        with_options(*args, **kwargs)
    assert_unchanged(with_options, before)


def test_the_input_check_follows_the_model_dtype_and_other_sizes_pass(with_options):
    assert with_options(torch.randn(3, 9, DIM), mode="sum").shape == (3, 9)  # dynamic sizes
    half = qc.prepare(WithOptions().eval(), "mxfp8", (torch.randn(2, 5, DIM),), {"mode": "sum"})
    half.half()
    assert half(torch.randn(2, 5, DIM).half(), mode="sum").dtype == torch.float16
    with pytest.raises(ValueError, match="is float32 but the prepared model's parameters are "
                                         "float16"):
        half(torch.randn(2, 5, DIM), mode="sum")


def test_an_example_of_size_one_warns_that_the_size_is_fixed():
    with pytest.warns(qc.PrepareWarning, match=r"only takes the example's size in 'x' dimension 0 "
                                                r"\(size 1\).*a batch of 2"):
        prepared = qc.prepare(_mlp(), "mxfp8", (_x(1),))
    with pytest.raises(ValueError, match="fixes example sizes 0 and 1: prepare again with an "
                                         "example of size 2 or more there"):
        prepared(_x(3))


# -- float16 / bfloat16 models ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("recipe", list(qc.RECIPES))
def test_half_precision_models_match_a_float32_prepared_model(recipe, dtype):
    reference = qc.prepare(_mlp(), recipe, (_x(),))
    prepared = qc.prepare(_mlp().to(dtype), recipe, (_x(dtype=dtype),))
    assert all(s.status is SiteStatus.QUANTIZED for s in prepared.qcompile_sites)
    if any(q.spec.needs_calibration for q in reference.modules() if isinstance(q, qc.Quantizer)):
        qc.calibrate(reference, [_x()], progress=False)
        qc.calibrate(prepared, [_x(dtype=dtype)], progress=False)
    amaxes = [q.amax for q in prepared.modules() if isinstance(q, qc.Quantizer) and q.calibrated]
    assert all(a.dtype == torch.float32 for a in amaxes)
    with torch.no_grad():
        expected, out = reference(_x(8)), prepared(_x(8, dtype=dtype))
    assert out.dtype == dtype and out.isfinite().all()
    error = (out.float() - expected).abs().max() / expected.abs().max()
    # half-precision weights and activations move values across quantization steps; the
    # steps of the 4-bit formats are coarse, so one step is a larger share of the range
    assert error < (0.25 if "4" in recipe else 0.08), error


def test_converting_a_calibrated_model_keeps_amax_in_float32():
    prepared = qc.prepare(_mlp(), "int8", (_x(),))
    qc.calibrate(prepared, [_x() * 3.3], progress=False)
    amax = prepared.get_submodule("fc1.input_quantizer").amax.clone()
    prepared.to(torch.bfloat16)
    assert prepared.get_parameter("fc1.weight").dtype == torch.bfloat16
    assert torch.equal(prepared.get_submodule("fc1.input_quantizer").amax, amax)  # not rounded
    assert prepared(_x(dtype=torch.bfloat16)).isfinite().all()


# -- models on the meta device ----------------------------------------------------------------


def test_meta_device_model_prepares_without_weights_then_loads_them():
    with torch.device("meta"):
        big = MLP(dim=8192)  # 512 MiB of weights if it were allocated
    prepared = qc.prepare(big, "mxfp8", (torch.randn(2, 8192, device="meta"),))
    assert {t.device.type for t in (*prepared.parameters(), *prepared.buffers())} == {"meta"}
    assert prepared(torch.randn(3, 8192, device="meta")).device.type == "meta"

    with torch.device("meta"):
        meta = MLP()
    float_model = _mlp()
    prepared = qc.prepare(meta, "int8", (torch.randn(2, DIM, device="meta"),))
    prepared.to_empty(device="cpu")
    result = prepared.load_state_dict(float_model.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(
        k for k in prepared.state_dict() if k.endswith("_quantizer.amax"))
    qc.calibrate(prepared, [_x()], progress=False)
    reference = qc.prepare(float_model, "int8", (_x(),))
    qc.calibrate(reference, [_x()], progress=False)
    assert torch.equal(prepared(_x(6)), reference(_x(6)))


# -- data-dependent control flow --------------------------------------------------------------


class ValueBranch(nn.Module):
    def __init__(self, construct: str) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.construct = construct

    def forward(self, x):
        y = self.fc(x)
        if self.construct == "if":
            if y.mean() > 0:
                return y * 2
            return y
        if self.construct == "item":
            return y[:, : int(y[0, 0].item() > 0) + 1]
        return y * len([v for v in y[0].tolist() if v > 0])


@pytest.mark.parametrize("construct, code", [
    ("if", "if y.mean() > 0:"),
    ("item", "return y[:, : int(y[0, 0].item() > 0) + 1]"),
    ("tolist", "return y * len([v for v in y[0].tolist() if v > 0])"),
])
def test_data_dependent_control_flow_names_the_construct_and_the_ways_out(construct, code):
    model = ValueBranch(construct)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CaptureError) as info:
            qc.prepare(model, "int8", (torch.randn(2, 16),))
    message = str(info.value)
    assert "data-dependent control flow at" in message and "test_bad_input.py" in message
    assert f"`{code}`" in message
    for advice in ("torch.cond", "make it static", "prepare only the submodules without it"):
        assert advice in message
    assert_unchanged(model, before)


# -- outputs that are not tensors -------------------------------------------------------------


class Outputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x):
        y = self.fc(x)
        return {"y": y, "count": 3, "name": "head", "nothing": None,
                "nested": {"pair": (y.sum(), 2.5), "labels": ["a", None]}}


def test_non_tensor_outputs_keep_their_structure():
    model = Outputs().eval()
    prepared = qc.prepare(model, "mxfp8", (_x(),))
    x = _x(5).requires_grad_()
    out, expected = prepared(x), model(x)
    assert out.keys() == expected.keys()
    assert (out["count"], out["name"], out["nothing"]) == (3, "head", None)
    assert out["nested"]["pair"][1] == 2.5 and out["nested"]["labels"] == ["a", None]
    assert isinstance(out["nested"]["pair"], tuple)
    torch.testing.assert_close(out["y"], expected["y"], atol=0.1, rtol=0.1)
    out["nested"]["pair"][0].backward()
    assert x.grad is not None and prepared.get_parameter("fc.weight").grad is not None


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, DIM)
        self.classifier = nn.Linear(DIM, DIM)

    def forward(self, x):
        return self.classifier(torch.relu(self.fc1(x)))


def test_excluding_much_of_the_weights_warns_naming_them_but_output_heads_do_not():
    with pytest.warns(qc.PrepareWarning, match=r"50.0% of the matmul weight elements stay float "
                      r"\(1 weights; matmul weights quantized: 50.0% .*fc2 \(16,384\): excluded"):
        qc.prepare(_mlp(), qc.get_recipe("int8").with_(exclude=["fc2"]), (_x(),))
    model = Classifier().eval()  # its head is float by default: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = qc.prepare(model, "int8", (_x(),))
    assert qc.report(prepared).coverage.fraction == 0.5
