"""match: sites of hand-built graphs (aten IR and torch IR), their names and their specs."""

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile.core.quantizer import QuantSpec
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.capture import capture
from qcompile.passes.match import assign_specs, find_sites
from qcompile.passes.sites import Site, SiteKind, SiteStatus
from qcompile.recipe import RECIPES, Recipe, SiteSpecs

aten = torch.ops.aten


def _graph(build) -> fx.GraphModule:
    """A GraphModule from `build(graph, x, y)`; `w` is a parameter [8, 8] at `proj.weight`."""
    root = nn.Module()
    root.proj = nn.Module()
    root.proj.weight = nn.Parameter(torch.randn(8, 8))
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    graph.output(build(graph, x, y))
    return fx.GraphModule(root, graph)


def _stack(node, path):
    node.meta["nn_module_stack"] = {"L__self__": ("", "M"), f"L__self__{path}": (path, "Linear")}
    return node


def test_linear_is_named_by_its_module_and_matmuls_are_counted():
    def build(graph, x, y):
        w = graph.get_attr("proj.weight")
        h = _stack(graph.call_function(aten.linear.default, (x, w)), "proj")
        a = graph.call_function(aten.matmul.default, (h, y))
        b = graph.call_function(operator.matmul, (a, y))
        return graph.call_function(aten.bmm.default, (b, y))

    sites = find_sites(_graph(build))
    assert [(s.name, s.kind) for s in sites] == [
        ("proj", SiteKind.LINEAR),
        ("matmul_0", SiteKind.MATMUL),
        ("matmul_1", SiteKind.MATMUL),
        ("matmul_2", SiteKind.MATMUL),
    ]
    assert sites[0].reduction_axes == {"input": -1, "weight": -1}


def test_two_linears_in_one_module_are_numbered():
    def build(graph, x, y):
        w = graph.get_attr("proj.weight")
        a = _stack(graph.call_function(F.linear, (x, w)), "block")
        return _stack(graph.call_function(F.linear, (a, w)), "block")

    assert [s.name for s in find_sites(_graph(build))] == ["block.linear_0", "block.linear_1"]


def test_products_with_weights_or_constants_are_not_activation_matmuls():
    def build(graph, x, y):
        w = graph.get_attr("proj.weight")
        a = graph.call_function(aten.matmul.default, (graph.call_function(aten.t.default, (w,)), w))
        positions = graph.call_function(aten.arange.default, (graph.call_function(aten.sym_size.int, (x, 0)),))
        return graph.call_function(aten.matmul.default, (a, positions))  # RoPE-like

    (site,) = find_sites(_graph(build))  # no activation matmul; the weight is listed
    assert (site.name, site.status, site.weight) == ("proj.weight", SiteStatus.UNSUPPORTED, "proj.weight")
    assert "matmul" in site.reason and site.weight_size == 64


def test_einsum_that_contracts_one_index_is_a_matmul():
    def build(graph, x, y):
        a = graph.call_function(aten.einsum.default, ("bij,bjk->bik", [x, y]))
        return graph.call_function(torch.einsum, ("bij,bkj->bik", x, a))

    sites = find_sites(_graph(build))
    assert [s.reduction_axes for s in sites] == [
        {"input": -1, "other": -2},
        {"input": -1, "other": -1},
    ]


def test_einsum_without_one_contracted_index_is_skipped():
    def build(graph, x, y):
        return graph.call_function(aten.einsum.default, ("i,j->ij", [x, y]))  # outer product

    assert find_sites(_graph(build)) == []


def test_sdpa_is_one_attention_site_with_query_key_value():
    def build(graph, x, y):
        first = _stack(graph.call_function(aten.scaled_dot_product_attention.default, (x, y, y)), "attn")
        return _stack(graph.call_function(aten.scaled_dot_product_attention.default, (first, y, y)), "two")

    sites = find_sites(_graph(build))
    assert [(s.name, s.kind) for s in sites] == [("attn.sdpa", SiteKind.ATTENTION),
                                                 ("two.sdpa", SiteKind.ATTENTION)]
    assert sites[0].reduction_axes == {"query": -1, "key": -1, "value": -2}


def test_two_attentions_in_one_module_are_numbered():
    def build(graph, x, y):
        first = graph.call_function(aten.scaled_dot_product_attention.default, (x, y, y))
        second = graph.call_function(aten.scaled_dot_product_attention.default, (_stack(first, "attn"), y, y))
        return _stack(second, "attn")

    assert [s.name for s in find_sites(_graph(build))] == ["attn.sdpa_0", "attn.sdpa_1"]


def test_attention_specs_follow_quantize_matmul_and_overrides():
    sites = [Site("attn.sdpa", SiteKind.ATTENTION, "sdpa", reduction_size=64)]
    int8 = RECIPES["int8"]
    (site,) = assign_specs(sites, int8)
    assert set(site.specs) == {"query", "key", "value"}
    assert site.specs["key"] == int8.linear.input
    (site,) = assign_specs(sites, int8.with_(quantize_matmul=False))
    assert site.status is SiteStatus.EXCLUDED and "quantize_matmul" in site.reason
    fp8_kv = int8.with_(overrides={"*.sdpa": SiteSpecs(input=QuantSpec("fp8"))})
    (site,) = assign_specs(sites, fp8_kv)
    assert site.specs["value"].format == "fp8"
    (site,) = assign_specs([Site("attn.sdpa", SiteKind.ATTENTION, "sdpa", reduction_size=8)],
                           Recipe(matmul=SiteSpecs(input=QuantSpec("mxfp8")), quantize_matmul=True))
    assert site.status is SiteStatus.UNSUPPORTED and "head dimension" in site.reason


class Gpt2Conv1D(nn.Module):
    """GPT-2's Conv1D: weight [in, out], `addmm(bias, x, weight)`."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 8))
        self.bias = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], 8)


def test_gpt2_conv1d_becomes_a_linear_on_the_transposed_weight():
    model = Gpt2Conv1D()
    x = torch.randn(2, 3, 16)
    gm = canonicalize(capture(model, (x,)))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.addmm.default not in targets and aten.linear.default in targets
    (site,) = find_sites(gm)
    assert site.kind is SiteKind.LINEAR and site.reduction_size == 16
    torch.testing.assert_close(gm(x), model(x))


def test_symbolic_trace_modules_become_functional_sites():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    gm = canonicalize(fx.symbolic_trace(model))
    assert [(s.name, s.kind) for s in find_sites(gm)] == [("0", SiteKind.CONV), ("2", SiteKind.LINEAR)]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))


def _site(name, kind=SiteKind.LINEAR, k=64):
    axes = {"input": -1, "weight": -1} if kind is not SiteKind.MATMUL else {"input": -1, "other": -2}
    return Site(name, kind, "n", reduction_axes=axes, reduction_size=k)


def test_assign_specs_excludes_heads_and_matmuls_when_asked():
    sites = [_site("layer.fc"), _site("lm_head"), _site("attn.matmul_0", SiteKind.MATMUL)]
    fc, head, matmul = assign_specs(sites, RECIPES["nvfp4"])
    assert fc.status is SiteStatus.QUANTIZED and set(fc.specs) == {"input", "weight"}
    assert head.status is SiteStatus.EXCLUDED and "output head" in head.reason
    assert matmul.status is SiteStatus.EXCLUDED and "quantize_matmul" in matmul.reason
    _, _, int8_matmul = assign_specs(sites, RECIPES["int8"])
    assert set(int8_matmul.specs) == {"input", "other"}


def test_block_formats_need_k_to_be_a_multiple_of_the_block():
    ok, odd, dynamic = assign_specs(
        [_site("a", k=256), _site("b", k=100), _site("c", k=None)], RECIPES["int4"]
    )
    assert ok.status is SiteStatus.QUANTIZED
    assert odd.status is SiteStatus.UNSUPPORTED and "K=100" in odd.reason and "128" in odd.reason
    assert dynamic.status is SiteStatus.UNSUPPORTED and "dynamic" in dynamic.reason


def test_overrides_win_over_excludes():
    recipe = RECIPES["fp8"].with_(
        overrides={"lm_head": SiteSpecs(weight=QuantSpec("fp8", dynamic=True)), "layer.*": None}
    )
    head, fc = assign_specs([_site("lm_head"), _site("layer.fc")], recipe)
    assert head.status is SiteStatus.QUANTIZED and set(head.specs) == {"weight"}
    assert fc.status is SiteStatus.EXCLUDED and "override" in fc.reason


def test_weight_only_recipe_leaves_matmuls_float():
    (matmul,) = assign_specs([_site("m", SiteKind.MATMUL)], Recipe(
        linear=SiteSpecs(weight=QuantSpec("int8", axis=0, dynamic=True)), quantize_matmul=True
    ))
    assert matmul.status is SiteStatus.EXCLUDED and "no input" in matmul.reason
