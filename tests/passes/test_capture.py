"""capture: export a training-mode copy, fall back to symbolic_trace, explain failures."""

import pytest
import torch
from torch import nn

from qcompile.passes.capture import CaptureError, capture

aten = torch.ops.aten


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, scale=None):
        y = self.drop(self.proj(x))
        return {"y": y if scale is None else y * scale, "x": x}


def _targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def test_export_captures_training_ir_of_a_copy():
    model = Tiny().eval()
    gm = capture(model, (torch.randn(2, 8),))
    assert aten.linear.default in _targets(gm)
    dropout = next(n for n in gm.graph.nodes if n.target is aten.dropout.default)
    assert dropout.args[2] is True  # captured in training mode although the model was in eval
    assert not model.training  # the caller's model keeps its mode
    assert gm.proj.weight is not model.proj.weight  # and its parameters


def test_dynamic_shapes_accept_other_batch_sizes():
    gm = capture(Tiny(), (torch.randn(2, 8),))
    assert gm(torch.randn(5, 8))["y"].shape == (5, 8)


def test_static_shapes_reject_other_batch_sizes():
    gm = capture(Tiny(), (torch.randn(2, 8),), dynamic=False)
    with pytest.raises(Exception):
        gm(torch.randn(5, 8))


def test_keyword_inputs_and_output_structure():
    gm = capture(Tiny(), (torch.randn(2, 8),), {"scale": torch.tensor(2.0)})
    x = torch.randn(2, 8)
    out = gm(x, scale=torch.tensor(2.0))
    assert set(out) == {"y", "x"} and torch.equal(out["x"], x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_data_dependent_control_flow_is_named_with_advice():
    with pytest.raises(CaptureError) as info:
        capture(Branchy(), (torch.randn(3),))
    message = str(info.value)
    assert "data-dependent control flow" in message
    assert "test_capture.py" in message and "if x.sum() > 0" in message
    assert "torch.cond" in message


def test_wrong_example_inputs_are_blamed_on_the_inputs():
    with pytest.raises(CaptureError, match="fails on the example inputs.*Fix example_inputs"):
        capture(Tiny(), (torch.randn(2, 5),))


def test_example_inputs_must_be_a_tuple():
    with pytest.raises(TypeError, match=r"write \(x,\)"):
        capture(Tiny(), torch.randn(2, 8))


def test_falls_back_to_symbolic_trace_with_a_warning(monkeypatch):
    import qcompile.passes.capture as capture_module

    def failing_export(*args, **kwargs):
        raise RuntimeError("unsupported construct")

    monkeypatch.setattr(capture_module, "_export", failing_export)
    with pytest.warns(UserWarning, match="fell back to torch.fx.symbolic_trace"):
        gm = capture(Tiny(), (torch.randn(2, 8),))
    assert any(node.op == "call_module" and node.target == "proj" for node in gm.graph.nodes)
    assert gm(torch.randn(2, 8))["y"].shape == (2, 8)
