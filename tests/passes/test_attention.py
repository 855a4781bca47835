"""attention: decomposed scaled_dot_product_attention matches torch's fused op."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile.passes.attention import decompose_sdpa
from qcompile.passes.capture import capture
from qcompile.passes.match import find_sites

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
