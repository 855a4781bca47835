"""SmoothQuant (`qcompile.algorithms.smooth`): float identity, int8 error, state, export, bad input."""


import numpy as np
import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.algorithms.smooth import (
    choose_scale,
    product_errors,
    smooth,
    smoothing_scale,
)
from qcompile.core.quantizer import Quantizer


class OutlierMLP(nn.Module):
    """Two Linears whose inputs carry a few channels ~30x the rest (as in BERT FFNs)."""

    def __init__(self, d: int = 64, hidden: int = 96) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(x))))


def _data(n: int, seed: int, d: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(4, 16, d, generator=g)
        x[..., [3, 17]] *= 30.0  # outlier channels
        x[0, 0] = 0.0  # a zero row
        batches.append(x)
    return batches


@pytest.fixture
def model() -> OutlierMLP:
    torch.manual_seed(0)
    return OutlierMLP().eval()


def _prepared(model: nn.Module, recipe: str = "int8") -> qc.PreparedModel:
    return qc.prepare(model, recipe, example_inputs=(_data(1, 0)[0],))


def _quantizers(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def test_smoothing_keeps_the_float_function(model):
    qmodel = _prepared(model)
    smoothed = smooth(qmodel, _data(2, 1), alpha=0.5, progress=False)
    assert set(smoothed) == {"up", "down", "head"}
    for q in _quantizers(qmodel):
        q.enabled = False
    x = _data(1, 5)[0]
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-5, atol=1e-5)


def test_smoothing_lowers_int8_error_on_outlier_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).eval()  # one site: its inputs carry the outliers
    calibration, evaluation = _data(4, 1), _data(2, 9)

    def error(qmodel: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((qmodel(x) - model(x)).square().mean()) for x in evaluation)

    plain = _prepared(model)
    qc.calibrate(plain, calibration, progress=False)
    smoothed = _prepared(model)
    smooth(smoothed, calibration, progress=False)
    qc.calibrate(smoothed, calibration, progress=False)
    assert error(smoothed) < 0.5 * error(plain), (error(smoothed), error(plain))


def test_smoothing_scale_formula_and_degenerate_channels():
    a = torch.tensor([4.0, 0.0, 9.0, float("inf")])
    w = torch.tensor([1.0, 2.0, 0.0, 1.0])
    s = smoothing_scale(a, w, 0.5)
    # s_j = a_j^0.5 / w_j^0.5; channels with a zero or infinite maximum keep s = 1
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 1.0, 1.0]))


def test_auto_picks_the_candidate_with_the_least_product_error(model):
    qmodel = _prepared(model)
    smooth(qmodel, _data(2, 1), alpha="auto", progress=False)
    # Rebuild the statistics of one site and check the choice against every candidate.
    from qcompile.algorithms.smooth import ALPHA_GRID, _observing, _smoothable

    pairs = _smoothable(qmodel)
    with torch.no_grad(), _observing(qmodel, pairs):
        for x in _data(2, 1):
            qmodel(x)
    for pair in pairs:
        chosen = choose_scale(pair, "auto")
        candidates = [None] + [
            smoothing_scale(pair.input_amax, pair.weight_amax, a) for a in ALPHA_GRID
        ]
        (chosen_error, unsmoothed_error) = product_errors(pair, [chosen, None])
        assert chosen_error == pytest.approx(min(product_errors(pair, candidates)))
        # with outlier channels this large, smoothing beats leaving the site alone
        assert chosen_error < unsmoothed_error


def test_smoothing_twice_replaces_the_first(model):
    qmodel = _prepared(model)
    smooth(qmodel, _data(2, 1), alpha=0.5, progress=False)
    first = {n: b.clone() for n, b in qmodel.named_buffers() if n.endswith("pre_scale")}
    smooth(qmodel, _data(2, 1), alpha=0.5, progress=False)
    second = {n: b for n, b in qmodel.named_buffers() if n.endswith("pre_scale")}
    assert first.keys() == second.keys() and len(first) == 6
    for name in first:
        torch.testing.assert_close(first[name], second[name])


def test_smoothing_clears_a_calibrated_amax_and_says_so(model):
    qmodel = _prepared(model)
    qc.calibrate(qmodel, _data(2, 1), progress=False)
    with pytest.warns(qc.CalibrationWarning, match="calibrate"):
        smooth(qmodel, _data(2, 1), alpha=0.5, progress=False)
    assert not qmodel.get_submodule("up.input_quantizer").calibrated
    with pytest.raises(RuntimeError, match="not calibrated"):
        qmodel(_data(1, 2)[0])


def test_state_dict_round_trip_restores_the_smoothing(model):
    qmodel = _prepared(model)
    smooth(qmodel, _data(2, 1), progress=False)
    qc.calibrate(qmodel, _data(2, 1), progress=False)
    fresh = _prepared(model)
    fresh.load_state_dict(qmodel.state_dict())
    x = _data(1, 3)[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), qmodel(x), rtol=0, atol=0)


def test_an_unsmoothed_model_has_no_pre_scale_in_its_state(model):
    qmodel = _prepared(model)
    assert not [k for k in qmodel.state_dict() if "pre_scale" in k]


@pytest.mark.parametrize(
    "alpha, message", [(1.5, "alpha"), (-0.1, "alpha"), ("best", "alpha"), (True, "alpha")]
)
def test_bad_alpha_is_rejected_before_anything_changes(model, alpha, message):
    qmodel = _prepared(model)
    with pytest.raises(ValueError, match=message):
        smooth(qmodel, _data(1, 1), alpha=alpha, progress=False)
    assert all(q.pre_scale is None for q in _quantizers(qmodel))


def test_unprepared_model_and_empty_data_are_errors(model):
    with pytest.raises(ValueError, match="prepare"):
        smooth(model, _data(1, 1), progress=False)
    qmodel = _prepared(model)
    with pytest.raises(ValueError, match="empty"):
        smooth(qmodel, [], progress=False)
    assert all(q.pre_scale is None for q in _quantizers(qmodel))


def test_export_writes_a_mul_and_matches_onnxruntime(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    qmodel = _prepared(model)
    smooth(qmodel, _data(2, 1), progress=False)
    qc.calibrate(qmodel, _data(2, 1), progress=False)
    path = tmp_path / "smoothed.onnx"
    qc.export_onnx(qmodel, (_data(1, 0)[0],), path, target="onnx")
    graph = onnx.load(path).graph
    producers = {out: node for node in graph.node for out in node.output}
    quantize_inputs = [producers.get(n.input[0]) for n in graph.node if n.op_type == "QuantizeLinear"]
    assert sum(p is not None and p.op_type == "Mul" for p in quantize_inputs) == 3
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options)
    x = _data(1, 4)[0]
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = qmodel(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
