"""Insert: put a `Quantizer` module in front of each quantized input of each site.

For every QUANTIZED site and every role it quantizes, this pass adds a `Quantizer` submodule at
`<site name>.<role>_quantizer` (`encoder.layer.0.attention.self.query.input_quantizer`),
reached through a `call_module` node, so its state is in `state_dict()` and moves with `.to()`.
Where a block-scaled spec meets an operand whose reduction axis is not the last (the second
operand of a matmul), the quantizer sees that operand transposed so blocks run along K.
Weights stay float parameters; nothing else in the graph changes.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from qcompile.core.formats import get_format
from qcompile.core.quantizer import Quantizer, QuantSpec
from qcompile.passes._fx import get_operand, operand_positions, set_operand
from qcompile.passes.sites import Site, SiteStatus

aten = torch.ops.aten


def quantizer_path(site: Site, role: str) -> str:
    return f"{site.name}.{role}_quantizer"


def insert_quantizers(gm: fx.GraphModule, sites: list[Site]) -> list[Site]:
    """Add quantizers to `gm` (in place) for the QUANTIZED sites; returns the sites with
    `quantizers` filled in."""
    nodes = {node.name: node for node in gm.graph.nodes}
    device = next(gm.parameters(), torch.empty(0)).device
    placed = []
    for site in sites:
        if site.status is SiteStatus.QUANTIZED:
            site = replace(site, quantizers=_insert(gm, nodes[site.node_name], site, device))
        placed.append(site)
    gm.recompile()
    return placed


def _insert(gm: fx.GraphModule, node: fx.Node, site: Site, device: torch.device) -> dict[str, str]:
    positions = operand_positions(node)
    paths = {}
    for role, spec in site.specs.items():
        if role not in positions:
            raise ValueError(f"site {site.name}: {node.target} has no {role!r} operand to quantize")
        path = quantizer_path(site, role)
        try:
            gm.get_submodule(path)
        except AttributeError:
            pass
        else:
            raise ValueError(f"site {site.name}: {path} exists already; is the model prepared twice?")
        gm.add_submodule(path, Quantizer(spec).to(device))
        operand = get_operand(node.args, positions[role])
        with gm.graph.inserting_before(node):
            quantized = _quantize(gm.graph, path, operand, spec, site.reduction_axes[role])
        node.args = set_operand(node.args, positions[role], quantized)
        paths[role] = path
    return paths


def _quantize(graph: fx.Graph, path: str, operand: fx.Node, spec: QuantSpec, axis: int) -> fx.Node:
    blocked = get_format(spec.format).resolve_block_size(spec.block_size) is not None
    if not blocked or axis == -1:
        return graph.call_module(path, (operand,))
    moved = graph.call_function(aten.transpose.int, (operand, axis, -1))
    return graph.call_function(aten.transpose.int, (graph.call_module(path, (moved,)), axis, -1))
