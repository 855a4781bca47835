"""The Quantizer module: its forward against `qcompile.fake_quantize`, its amax state."""

import pytest
import torch
from torch import nn

from qcompile.algorithms.observers import MaxObserver
from qcompile.core.fake_quant import fake_quantize
from qcompile.core.quantizer import Quantizer, QuantSpec

X = torch.linspace(-3, 3, 64).reshape(4, 16)


def test_static_quantizer_needs_calibration():
    with pytest.raises(RuntimeError, match=r"qcompile\.calibrate"):
        Quantizer(QuantSpec("int8"))(X)


def test_calibrated_forward_is_fake_quantize_with_its_amax():
    quantizer = Quantizer(QuantSpec("int8"))
    quantizer.set_amax(torch.tensor(2.0))
    assert torch.equal(quantizer(X), fake_quantize(X, "int8", amax=torch.tensor(2.0)))


def test_dynamic_quantizer_needs_no_amax():
    quantizer = Quantizer(QuantSpec("int8", axis=0, dynamic=True))
    assert torch.equal(quantizer(X), fake_quantize(X, "int8", axis=0))


def test_observer_sees_the_input_and_passes_it_through():
    quantizer = Quantizer(QuantSpec("int8"))
    quantizer.observer = MaxObserver(quantizer.spec)
    assert quantizer(X) is X
    assert quantizer.observer.compute_amax().item() == 3.0


def test_disabled_quantizer_is_the_identity():
    quantizer = Quantizer(QuantSpec("int8"))
    quantizer.enabled = False
    assert quantizer(X) is X


def test_learned_amax_is_a_parameter():
    quantizer = Quantizer(QuantSpec("int8", learn_amax=True))
    quantizer.set_amax(torch.tensor(2.0))
    assert isinstance(quantizer.amax, nn.Parameter)
    assert [name for name, _ in quantizer.named_parameters()] == ["amax"]


def test_calibrated_amax_loads_into_a_fresh_quantizer():
    calibrated = Quantizer(QuantSpec("int8", axis=0))
    calibrated.set_amax(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    fresh = Quantizer(QuantSpec("int8", axis=0))
    fresh.load_state_dict(calibrated.state_dict())
    assert torch.equal(fresh.amax, calibrated.amax) and torch.equal(fresh(X), calibrated(X))


def test_dtype_conversion_keeps_amax_float32_and_devices_move():
    static, learned = Quantizer(QuantSpec("int8")), Quantizer(QuantSpec("int8", learn_amax=True))
    for quantizer in (static, learned):
        quantizer.set_amax(torch.tensor(3.14159))
        parameter = quantizer.amax
        quantizer.to(torch.bfloat16)
        assert quantizer.amax.dtype == torch.float32
        assert quantizer.amax.item() == pytest.approx(3.14159)
        if quantizer.spec.learn_amax:
            assert quantizer.amax is parameter  # still the Parameter the optimizer holds
        quantizer.half().to("meta")
        assert quantizer.amax.device.type == "meta" and quantizer.amax.dtype == torch.float32
