"""calibrate() on hand-built modules holding Quantizers and a `qcompile_sites` list."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile.algorithms.calibrate import CalibrationWarning, calibrate
from qcompile.algorithms.data import check_data_reached
from qcompile.core.quantizer import Quantizer, QuantSpec
from qcompile.passes.sites import Site, SiteKind, site_quantizers

INPUT = QuantSpec("int8")
WEIGHT = QuantSpec("int8", axis=0, dynamic=True)


class QLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, input_spec: QuantSpec, weight_spec: QuantSpec):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.input_quantizer = Quantizer(input_spec)
        self.weight_quantizer = Quantizer(weight_spec)

    def forward(self, x):
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.linear.weight),
                        self.linear.bias)


class TwoLayers(nn.Module):
    """fc1 -> relu -> dropout -> fc2, with the sites list the insert pass would attach."""

    def __init__(self, input_spec: QuantSpec = INPUT, weight_spec: QuantSpec = WEIGHT):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = QLinear(8, 16, input_spec, weight_spec)
        self.drop = nn.Dropout(0.5)
        self.fc2 = QLinear(16, 4, input_spec, weight_spec)
        self.qcompile_sites = [
            Site(name, SiteKind.LINEAR, f"linear_{i}",
                 specs={"input": input_spec, "weight": weight_spec},
                 quantizers={"input": f"{name}.input_quantizer",
                             "weight": f"{name}.weight_quantizer"})
            for i, name in enumerate(["fc1", "fc2"])
        ]
        self.seen_train_or_grad: list[bool] = []

    def forward(self, x, scale: float = 1.0):
        self.seen_train_or_grad.append(self.training or torch.is_grad_enabled())
        return self.fc2(self.drop(F.relu(self.fc1(x * scale))))


def batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def max_abs(tensors) -> float:
    return max(t.abs().max().item() for t in tensors)


def test_iterable_of_tensors_calibrates_every_static_quantizer():
    model, data = TwoLayers(), batches()
    assert calibrate(model, data, progress=False) is model
    assert model.fc1.input_quantizer.amax.item() == max_abs(data)
    assert model.fc2.input_quantizer.amax.item() > 0
    assert not model.fc1.weight_quantizer.calibrated  # dynamic: left alone
    assert all(q.observer is None for q in _quantizers(model))


def test_tuples_are_positional_and_dicts_keyword_arguments():
    data = batches()
    model = calibrate(TwoLayers(), [(x, 2.0) for x in data], progress=False)
    assert model.fc1.input_quantizer.amax.item() == max_abs([x * 2.0 for x in data])
    model = calibrate(TwoLayers(), [{"x": x, "scale": 3.0} for x in data], progress=False)
    assert model.fc1.input_quantizer.amax.item() == max_abs([x * 3.0 for x in data])


def test_forward_loop_runs_the_model_itself():
    data = batches()

    def forward_loop(model):
        for x in data[:2]:
            model(x)

    model = calibrate(TwoLayers(), forward_loop, progress=False)
    assert model.fc1.input_quantizer.amax.item() == max_abs(data[:2])


def test_num_batches_stops_early():
    data = batches()
    model = calibrate(TwoLayers(), iter(data), num_batches=1, progress=False)
    assert model.fc1.input_quantizer.amax.item() == max_abs(data[:1])


def test_runs_in_eval_mode_without_grad_and_restores_modes():
    model = TwoLayers().train()
    model.fc2.eval()
    calibrate(model, batches(), progress=False)
    assert model.seen_train_or_grad == [False] * 3
    assert model.training and model.fc1.training and not model.fc2.training


def test_bf16_model_and_inputs():
    model = TwoLayers().to(torch.bfloat16)
    data = [x.to(torch.bfloat16) for x in batches()]
    calibrate(model, data, method="mse", progress=False)
    amax = model.fc1.input_quantizer.amax
    assert amax.dtype == torch.float32 and 0 < amax.item() <= max_abs(data)
    assert model(data[0]).dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_methods_end_to_end(method):
    calibrate(model := TwoLayers(), batches(), method=method, progress=False)
    assert 0 < model.fc1.input_quantizer.amax.item() <= max_abs(batches()) * 1.01


def test_progress_bar_can_be_switched_off(capsys):
    calibrate(TwoLayers(), batches(), progress=False)
    assert "calibrating" not in capsys.readouterr().err
    calibrate(TwoLayers(), batches(), progress=True)
    assert "calibrating" in capsys.readouterr().err


def test_nan_names_the_site_and_leaves_the_model_as_it_was():
    model = TwoLayers().train()
    model.drop.eval()
    calibrate(model, batches(), progress=False)
    before = model.fc1.input_quantizer.amax.clone()
    bad = batches()[0].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"fc1 \(input\) contains NaN; clean the calibration data"):
        calibrate(model, [batches()[1] * 10, bad], progress=False)
    assert torch.equal(model.fc1.input_quantizer.amax, before)
    assert all(q.observer is None for q in _quantizers(model))
    assert model.training and not model.drop.training


def test_without_sites_quantizers_are_found_by_module_path():
    model = TwoLayers()
    del model.qcompile_sites
    bad = batches()[0].clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"fc1\.input_quantizer contains inf"):
        calibrate(model, [bad], progress=False)
    calibrate(model, batches(), progress=False)
    assert model.fc1.input_quantizer.amax.item() == max_abs(batches())


@pytest.mark.parametrize("data", [[], [torch.empty(0, 8)], lambda model: None],
                         ids=["no batches", "empty batch", "loop that runs nothing"])
def test_empty_data_is_an_error(data):
    model = TwoLayers()
    with pytest.raises(ValueError, match="calibration data is empty"):
        calibrate(model, data, progress=False)
    assert not model.fc1.input_quantizer.calibrated


def test_quantizers_that_see_no_data_are_named_in_a_warning():
    model = TwoLayers()
    with pytest.warns(CalibrationWarning, match=r"fc2 \(input\)"):
        calibrate(model, lambda m: m.fc1(batches()[0]), progress=False)
    assert model.fc1.input_quantizer.calibrated and not model.fc2.input_quantizer.calibrated


def test_dynamic_only_model_needs_no_calibration():
    model = TwoLayers(QuantSpec("mxfp8"), QuantSpec("mxfp4"))
    with pytest.warns(CalibrationWarning, match="no calibration needed: mxfp4, mxfp8 use dynamic"):
        calibrate(model, batches(), progress=False)
    assert model.seen_train_or_grad == []


def test_disabled_quantizers_are_skipped():
    model = TwoLayers()
    model.fc2.input_quantizer.enabled = False
    calibrate(model, batches(), progress=False)
    assert model.fc1.input_quantizer.calibrated and not model.fc2.input_quantizer.calibrated


def test_model_without_quantizers_is_an_error():
    with pytest.raises(ValueError, match="qcompile.prepare"):
        calibrate(nn.Linear(2, 2), batches(), progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "minmax"}, ValueError, "valid methods: max, percentile, mse, entropy"),
        ({"method": "percentile", "percentile": 101}, ValueError, r"\(0, 100\]"),
        ({"method": "max", "percentile": 99.9}, ValueError, "applies to method='percentile'"),
        ({"num_batches": 0}, ValueError, "positive int"),
        ({"method": "entropy"}, ValueError, "defined for int8"),
    ],
)
def test_invalid_arguments_fail_before_running_data(kwargs, error, match):
    model = TwoLayers(QuantSpec("fp8"))
    with pytest.raises(error, match=match):
        calibrate(model, batches(), progress=False, **kwargs)
    assert model.seen_train_or_grad == [] and not model.fc1.input_quantizer.calibrated


def test_one_tensor_is_not_taken_for_a_batch_list():
    with pytest.raises(TypeError, match=r"pass \[x\]"):
        calibrate(TwoLayers(), batches()[0], progress=False)


def test_no_warning_on_a_normal_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(TwoLayers(), batches(), progress=False)


def test_sites_without_data_are_named_in_a_warning_at_the_users_call():
    def public_entry_point():  # stands for qc.calibrate / qc.smooth
        check_data_reached(["fc2 (input)"], 3, empty="data is empty",
                            partial="sites saw no data: {names}")

    with pytest.warns(CalibrationWarning, match=r"^1 sites saw no data: fc2 \(input\)$") as record:
        public_entry_point()
    assert record[0].filename == __file__
    with pytest.raises(ValueError, match="data is empty; pass a non-empty iterable"):
        check_data_reached(["a", "b"], 2, empty="data is empty", partial="{names}")


def _quantizers(model: nn.Module) -> list[Quantizer]:
    return [entry.quantizer for entry in site_quantizers(model)]
