"""devices: device constants follow a move, also inside nested graphs (autocast bodies)."""

import torch
from torch import fx, nn

from qcompile.passes.devices import retarget_devices


class Ones(nn.Module):
    def forward(self, x):
        return x + torch.ones(x.shape, device=torch.device("cpu"))


def _devices(gm: fx.GraphModule) -> set[str]:
    return {
        str(node.kwargs["device"]) for module in gm.modules() if isinstance(module, fx.GraphModule)
        for node in module.graph.nodes if "device" in node.kwargs
    }


def test_nested_graph_modules_are_retargeted():
    outer = fx.symbolic_trace(Ones())
    outer.add_submodule("body", fx.symbolic_trace(Ones()))  # stands in for an autocast body
    assert _devices(outer) == {"cpu"}
    retarget_devices(outer, torch.device("cpu"), torch.device("meta"))
    assert _devices(outer) == {"meta"}
    assert outer.body(torch.zeros(2, device="meta")).device.type == "meta"  # recompiled
