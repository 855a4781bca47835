"""Devices: retarget the device constants baked into a captured graph.

torch.export records `device=` arguments (of `torch.ones`, `arange`, metadata asserts) as
constants; moving the parameters with `.to()` does not move them. `retarget_devices` rewrites
every constant on the old device to the new one. It knows nothing of quantization.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.node import map_aggregate


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def retarget_devices(gm: fx.GraphModule, old: torch.device, new: torch.device) -> fx.GraphModule:
    """Replace device constants equal to `old` by `new` in `gm` and in the graphs nested in
    it (the bodies of autocast regions, torch.cond branches), in place; returns `gm`."""

    def swap(value):
        return new if isinstance(value, torch.device) and _same(value, old) else value

    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                node.args = map_aggregate(node.args, swap)
                node.kwargs = map_aggregate(node.kwargs, swap)
            module.recompile()
    return gm
