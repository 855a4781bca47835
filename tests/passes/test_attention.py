"""attention: decomposed scaled_dot_product_attention matches torch's fused op."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile as qc
from qcompile.passes.attention import decompose_sdpa, scale_query
from qcompile.passes.capture import capture
from qcompile.passes.match import find_sites
from qcompile.passes.sites import site_quantizers

aten = torch.ops.aten


class Attention(nn.Module):
    def __init__(self, **sdpa_kwargs) -> None:
        super().__init__()
        self.sdpa_kwargs = sdpa_kwargs

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.sdpa_kwargs)


def _decomposed(model, *inputs):
    gm = capture(model, inputs)
    names = {s.node_name for s in find_sites(gm)}
    decompose_sdpa(gm, names)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.scaled_dot_product_attention.default not in targets
    assert targets.count(aten.matmul.default) == 2
    return gm


@pytest.mark.parametrize("mask_kind, sdpa_kwargs", [  # SDPA takes a mask or is_causal
    (None, {}), ("bool", {}), ("float", {}), (None, {"is_causal": True}),
    (None, {"scale": 0.3}), ("bool", {"scale": 0.3}), ("float", {"scale": 0.3}),
])
def test_matches_fused_attention(mask_kind, sdpa_kwargs):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 16) for _ in range(3))
    mask = {None: None, "bool": torch.rand(2, 1, 6, 6) > 0.3,
            "float": torch.randn(2, 1, 6, 6)}[mask_kind]
    model = Attention(**sdpa_kwargs)
    gm = _decomposed(model, q, k, v, mask)
    torch.testing.assert_close(gm(q, k, v, mask), model(q, k, v, mask))


def test_grouped_query_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    model = Attention(enable_gqa=True)
    torch.testing.assert_close(_decomposed(model, q, k, v)(q, k, v), model(q, k, v))


def test_other_sequence_lengths_after_decomposition():
    q = torch.randn(1, 2, 6, 8)
    model = Attention(is_causal=True)
    gm = _decomposed(model, q, q, q)
    longer = torch.randn(1, 2, 9, 8)
    torch.testing.assert_close(gm(longer, longer, longer), model(longer, longer, longer))


@pytest.mark.parametrize("mask_kind, sdpa_kwargs", [
    (None, {}), ("float", {"scale": 0.3}), (None, {"is_causal": True}),
])
def test_scale_query_moves_the_scale_onto_the_query(mask_kind, sdpa_kwargs):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 16) for _ in range(3))
    mask = None if mask_kind is None else torch.randn(2, 1, 6, 6)
    model = Attention(**sdpa_kwargs)
    gm = capture(model, (q, k, v, mask))
    scale_query(gm, {s.node_name for s in find_sites(gm)})
    (sdpa,) = [n for n in gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    assert sdpa.kwargs["scale"] == 1.0
    assert sdpa.args[0].target == aten.mul.Scalar
    torch.testing.assert_close(gm(q, k, v, mask), model(q, k, v, mask))


def test_qkv_query_quantizer_sees_the_scaled_query():
    """TensorRT quantizes q * scale (the scale before the first product's Q/DQ): so does the
    query quantizer; key and value are quantized as they are."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 16) for _ in range(3))
    prepared = qc.prepare(Attention(), "fp8", example_inputs=(q, k, v))
    qc.calibrate(prepared, [(q, k, v)], progress=False)
    amax = {sq.role: sq.quantizer.amax for sq in site_quantizers(prepared)}
    torch.testing.assert_close(amax["query"], q.abs().max() / 4)
    torch.testing.assert_close(amax["key"], k.abs().max())
    torch.testing.assert_close(amax["value"], v.abs().max())
