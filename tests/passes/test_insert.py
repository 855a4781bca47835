"""insert: quantizer modules in front of each quantized input; compared with fake_quantize."""

import pytest
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qcompile.core.fake_quant import fake_quantize
from qcompile.core.quantizer import Quantizer, QuantSpec
from qcompile.passes.insert import insert_quantizers
from qcompile.passes.match import assign_specs, find_sites
from qcompile.passes.sites import SiteStatus
from qcompile.recipe import Recipe, SiteSpecs

aten = torch.ops.aten


def _linear_then_matmul() -> fx.GraphModule:
    """out = linear(x, fc.weight) @ y, as a hand-built aten graph."""
    root = nn.Module()
    root.fc = nn.Module()
    root.fc.weight = nn.Parameter(torch.randn(32, 32))
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    h = graph.call_function(aten.linear.default, (x, graph.get_attr("fc.weight")))
    h.meta["nn_module_stack"] = {"fc": ("fc", "Linear")}
    graph.output(graph.call_function(aten.matmul.default, (h, y)))
    return fx.GraphModule(root, graph)


def _prepare(gm, recipe):
    return insert_quantizers(gm, assign_specs(find_sites(gm), recipe))


def test_quantizers_are_call_modules_named_after_the_site():
    gm = _linear_then_matmul()
    recipe = Recipe(
        linear=SiteSpecs(weight=QuantSpec("int8", axis=0, dynamic=True),
                         input=QuantSpec("int8", dynamic=True)),
        quantize_matmul=True,
    )
    linear, matmul = _prepare(gm, recipe)
    assert linear.quantizers == {"input": "fc.input_quantizer", "weight": "fc.weight_quantizer"}
    assert matmul.quantizers == {"input": "matmul_0.input_quantizer", "other": "matmul_0.other_quantizer"}
    modules = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert modules == ["fc.input_quantizer", "fc.weight_quantizer",
                       "matmul_0.input_quantizer", "matmul_0.other_quantizer"]
    assert isinstance(gm.fc.weight, nn.Parameter)  # the weight stays float and trainable
    assert "fc.input_quantizer.amax" in gm.state_dict()

    x, y = torch.randn(4, 32), torch.randn(32, 8)
    w = gm.fc.weight
    h = fake_quantize(x, "int8") @ fake_quantize(w, "int8", axis=0).T
    expected = fake_quantize(h, "int8") @ fake_quantize(y, "int8")
    torch.testing.assert_close(gm(x, y), expected)


def test_gradients_reach_the_float_weight():
    gm = _linear_then_matmul()
    _prepare(gm, Recipe(linear=SiteSpecs(weight=QuantSpec("int8", axis=0, dynamic=True))))
    gm(torch.randn(4, 32), torch.randn(32, 8)).sum().backward()
    assert gm.fc.weight.grad is not None and gm.fc.weight.grad.abs().sum() > 0


def test_block_scales_run_along_k_of_the_second_matmul_operand():
    gm = _linear_then_matmul()
    recipe = Recipe(linear=SiteSpecs(input=QuantSpec("mxfp8")), quantize_matmul=True,
                    exclude=["fc"])
    x, y = torch.randn(4, 32), torch.randn(32, 8)  # K = 32 is y's first axis
    ShapeProp(gm).propagate(x, y)  # block formats need K; export records it, here ShapeProp
    _, matmul = _prepare(gm, recipe)
    assert matmul.status is SiteStatus.QUANTIZED and matmul.reduction_size == 32
    h = x @ gm.fc.weight.T
    expected = fake_quantize(h, "mxfp8") @ fake_quantize(y.T, "mxfp8").T
    torch.testing.assert_close(gm(x, y), expected)


def test_excluded_sites_get_no_quantizer():
    gm = _linear_then_matmul()
    linear, matmul = _prepare(gm, Recipe(linear=SiteSpecs(input=QuantSpec("fp8", dynamic=True)),
                                         exclude=["fc"]))
    assert linear.status is SiteStatus.EXCLUDED and not linear.quantizers
    assert not any(isinstance(m, Quantizer) for m in gm.modules())


def test_preparing_twice_is_refused():
    gm = _linear_then_matmul()
    recipe = Recipe(linear=SiteSpecs(input=QuantSpec("fp8", dynamic=True)))
    sites = assign_specs(find_sites(gm), recipe)
    insert_quantizers(gm, sites)
    with pytest.raises(ValueError, match="exists already"):
        insert_quantizers(gm, sites)
