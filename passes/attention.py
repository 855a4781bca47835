"""Attention: put SDPA's operands in place, scale the query, or decompose the op.

`positional_operands` moves query, key and value of every `scaled_dot_product_attention`
into its positional arguments, where the match and insert passes find a fused attention
site's operands. `scale_query` moves an SDPA's attention scale onto its query
(`sdpa(q, k, v, scale=s)` -> `sdpa(q * s, k, v, scale=1.0)`), so that a query quantizer put in
front of the op quantizes `q * s`, as TensorRT's fused attention wants it (the scale applied
before the first product's Q/DQ). A fused attention op hides its products from the quantizer. Where the recipe
quantizes the products (`Recipe.attention="products"`), `decompose_sdpa` replaces the op by
the math it stands for (as torch's math backend computes it):
`softmax(q @ k.transpose(-2, -1) * scale + mask) @ v`, with causal masking, boolean or
additive masks, attention dropout and grouped-query heads. Other SDPA nodes are left fused.
The decomposed graph computes the same values up to float rounding; it knows nothing of
quantization.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Collection

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from qcompile.passes._fx import SDPA_OPS, is_target, shape

aten = torch.ops.aten


def positional_operands(gm: fx.GraphModule) -> fx.GraphModule:
    """Pass query, key and value of each SDPA node positionally (dynamo keeps the user's
    keywords); returns `gm`."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and is_target(node.target, SDPA_OPS) and len(node.args) < 3:
            kwargs = dict(node.kwargs)
            names = ("query", "key", "value")[len(node.args):]
            if all(name in kwargs for name in names):
                node.args = (*node.args, *(kwargs.pop(name) for name in names))
                node.kwargs = kwargs
    gm.recompile()
    return gm


def scale_query(gm: fx.GraphModule, node_names: Collection[str]) -> fx.GraphModule:
    """Multiply the query of each SDPA node named in `node_names` by the node's attention
    scale (its `scale`, default `head_dim ** -0.5`) and set the scale to 1.0; returns `gm`.
    In float this computes the same attention up to rounding."""
    for node in list(gm.graph.nodes):
        if node.name in node_names and is_target(node.target, SDPA_OPS):
            kwargs = normalize_function(
                aten.scaled_dot_product_attention.default, node.args, node.kwargs,
                normalize_to_only_use_kwargs=True,
            ).kwargs
            query = kwargs["query"]
            with gm.graph.inserting_before(node):
                scale = kwargs.get("scale")
                if scale is None:
                    head_dim = (shape(query) or (None,))[-1]
                    scale = (1 / math.sqrt(head_dim) if isinstance(head_dim, int) else
                             gm.graph.call_function(operator.pow, (
                                 gm.graph.call_function(aten.sym_size.int, (query, -1)), -0.5)))
                scaled = gm.graph.call_function(aten.mul.Scalar, (query, scale))
            if "nn_module_stack" in node.meta:
                scaled.meta["nn_module_stack"] = node.meta["nn_module_stack"]
            node.args = (scaled, *node.args[1:])
            node.kwargs = {**node.kwargs, "scale": 1.0}
    gm.recompile()
    return gm


def decompose_sdpa(gm: fx.GraphModule, node_names: Collection[str]) -> fx.GraphModule:
    """Replace the SDPA nodes named in `node_names` by explicit math; returns `gm`."""
    for node in list(gm.graph.nodes):
        if node.name in node_names and is_target(node.target, SDPA_OPS):
            _decompose(gm.graph, node)
    gm.recompile()
    return gm


def _decompose(graph: fx.Graph, node: fx.Node) -> None:
    kwargs = normalize_function(
        aten.scaled_dot_product_attention.default, node.args, node.kwargs,
        normalize_to_only_use_kwargs=True,
    ).kwargs
    query, key, value = kwargs["query"], kwargs["key"], kwargs["value"]
    mask, scale = kwargs.get("attn_mask"), kwargs.get("scale")
    stack = node.meta.get("nn_module_stack")

    def emit(op, *args) -> fx.Node:
        created = graph.call_function(op, args)
        if stack is not None:
            created.meta["nn_module_stack"] = stack
        return created

    with graph.inserting_before(node):
        if kwargs.get("enable_gqa", False):
            groups = emit(operator.floordiv, emit(aten.sym_size.int, query, -3),
                          emit(aten.sym_size.int, key, -3))
            key = emit(aten.repeat_interleave.self_int, key, groups, -3)
            value = emit(aten.repeat_interleave.self_int, value, groups, -3)
        scores = emit(aten.matmul.default, query, emit(aten.transpose.int, key, -2, -1))
        if scale is None:
            head_dim = (shape(query) or (None,))[-1]
            scale = (1 / math.sqrt(head_dim) if isinstance(head_dim, int)
                     else emit(operator.pow, emit(aten.sym_size.int, query, -1), -0.5))
        scores = emit(aten.mul.Scalar, scores, scale)
        if kwargs.get("is_causal", False):
            lengths = [emit(aten.sym_size.int, query, -2), emit(aten.sym_size.int, key, -2)]
            allowed = emit(aten.tril.default, emit(_ones_like_scores, scores, lengths))
            scores = emit(aten.masked_fill.Scalar, scores, emit(aten.logical_not.default, allowed),
                          -math.inf)
        if isinstance(mask, fx.Node):
            scores = emit(_apply_mask, scores, mask)
        probs = emit(aten._safe_softmax.default, scores, -1)
        if kwargs.get("dropout_p", 0.0) > 0:
            probs = emit(aten.dropout.default, probs, kwargs["dropout_p"], True)
        out = emit(aten.matmul.default, probs, value)
    out.meta.update({k: v for k, v in node.meta.items() if k != "nn_module_stack"})
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _ones_like_scores(scores: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """A boolean [L, S] all-true matrix on the device of `scores`."""
    return torch.ones(lengths, dtype=torch.bool, device=scores.device)


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA's `attn_mask`: boolean masks keep where True, float masks are added."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask.logical_not(), -math.inf)
    return scores + mask
