"""KV cache: the sites where a serving engine's KV cache would store keys and values.

With `Recipe.kv_cache` set, each `scaled_dot_product_attention` node gets one site of kind
`KV_CACHE`, named by the attention module (`model.layers.0.self_attn`), whose roles `key` and
`value` quantize the SDPA's key and value operands (after RoPE, as engines cache them). This
pass only finds and names them; `insert_quantizers` puts the quantizers in front of the op,
before any decomposition of the attention, so both fused and decomposed attention see them.
It knows nothing of numerics.
"""

from __future__ import annotations

from collections import Counter

from torch import fx

from qcompile.passes._fx import SDPA_OPS, is_target
from qcompile.passes.match import module_path
from qcompile.passes.sites import Site, SiteKind, SiteStatus
from qcompile.recipe import Recipe


def kv_cache_sites(gm: fx.GraphModule, recipe: Recipe) -> list[Site]:
    """One KV-cache site per SDPA node of `gm` (none when `recipe.kv_cache` is None)."""
    if recipe.kv_cache is None:
        return []
    nodes = [node for node in gm.graph.nodes
             if node.op == "call_function" and is_target(node.target, SDPA_OPS)]
    paths = [module_path(node) for node in nodes]
    counts = Counter(paths)
    seen: Counter = Counter()
    sites = []
    for node, path in zip(nodes, paths):
        name = path if path and counts[path] == 1 else ".".join(
            filter(None, (path, f"kv_cache_{seen[path]}")))
        seen[path] += 1
        specs, reason = recipe.resolve(name, SiteKind.KV_CACHE)
        status = SiteStatus.QUANTIZED if specs else SiteStatus.EXCLUDED
        sites.append(Site(name, SiteKind.KV_CACHE, node.name, status=status, reason=reason,
                          specs=specs, reduction_axes={"key": -1, "value": -1}))
    return sites
