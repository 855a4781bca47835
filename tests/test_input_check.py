"""inputs: the example call recorded, the sizes export fixed, operand dtypes, call checks."""

import pytest
import torch
from torch import nn

from qcompile.core.calls import TensorSpec
from qcompile.input_check import InputSignature
from qcompile.passes.capture import capture, site_operand_problem
from qcompile.passes.match import find_sites


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x, extra=None, flag=True):
        y = self.proj(x)
        return y + extra["bias"] if flag else y


def _example():
    return (torch.randn(2, 3, 8),), {"extra": {"bias": torch.zeros(4), "ids": torch.ones(2).long()}}


def test_record_describes_leaves_relative_to_the_model():
    args, kwargs = _example()
    signature = InputSignature.record(Tiny(), args, kwargs)
    assert signature.names == ("x", "extra")
    x = signature.arguments["x"][""]
    assert isinstance(x, TensorSpec) and x.shape == (2, 3, 8) and x.model_dtype and x.model_device
    assert not signature.arguments["extra"]["['ids']"].model_dtype  # int64 in a float32 model


def test_fix_dims_reads_what_export_specialized():
    args, kwargs = _example()
    gm = capture(Tiny(), args, kwargs)
    signature = InputSignature.record(Tiny(), args, kwargs)
    signature.fix_dims(gm)
    assert signature.arguments["x"][""].fixed == (None, None, 8)  # K is fixed by the weight
    assert signature.arguments["extra"]["['bias']"].fixed == (4,)


def test_check_call_names_the_nested_leaf():
    args, kwargs = _example()
    model = Tiny()
    signature = InputSignature.record(model, args, kwargs)
    signature.check_call(model, args, kwargs)  # the example itself fits
    bad = {"extra": {"bias": torch.zeros(4, dtype=torch.float16), "ids": torch.ones(2).long()}}
    with pytest.raises(ValueError, match=r"\"extra\['bias'\]\" is float16 .*\.to\(torch.float32\)"):
        signature.check_call(model, args, bad)
    floats = {"extra": {"bias": torch.zeros(4), "ids": torch.ones(2)}}
    with pytest.raises(ValueError, match=r"was prepared with int64 \(integer\) there"):
        signature.check_call(model, args, floats)


def test_site_operand_problem_names_the_example_input():
    model = Tiny()
    args, kwargs = (torch.randn(2, 3, 8, dtype=torch.float64),), {"flag": False}
    gm = capture(model, args, kwargs)
    problem = site_operand_problem(gm, find_sites(gm))
    assert "site proj (linear) multiplies a float64 input by a float32 operand" in problem
    assert "example input 'x' (float64)" in problem
    gm = capture(model, (torch.randn(2, 3, 8),), kwargs)
    assert site_operand_problem(gm, find_sites(gm)) is None
