"""Canonicalize: rewrite every spelling of a Linear or convolution into one form.

After this pass a Linear is `aten.linear(x, weight[out, in], bias)` and a convolution is a
functional conv, whatever the model wrote:

- `call_module` nodes of `nn.Linear`, `nn.Conv1d`, `nn.Conv2d` (symbolic_trace's IR) become
  functional calls on `get_attr` weights, so that a quantizer can sit in front of the weight;
- a product with a 2-D parameter, `addmm(bias, x, W)` (GPT-2's `Conv1D`, W is [in, out]),
  `mm(x, W)` or `x @ W`, becomes `linear(x, W.t(), bias)`, and `x @ W.T` (Falcon's
  `FalconLinear`, any `nn.Linear` subclass with its own forward) `linear(x, W)`: the weight
  enters as [out, in], so per-channel scales are along axis 0 and blocks along K as for
  any Linear.

The numbers computed are unchanged. It knows nothing of quantization.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile.passes._fx import is_parameter_input, recorded_value

aten = torch.ops.aten

_WEIGHT_PRODUCTS = frozenset({
    aten.addmm.default, aten.mm.default, aten.matmul.default,
    torch.addmm, torch.mm, torch.matmul, operator.matmul,
})
_TRANSPOSES = frozenset({aten.t.default, aten.numpy_T.default, aten.permute.default,
                         aten.transpose.int, torch.t, torch.transpose})


def _is_transpose(node) -> bool:
    """`W.t()`, `W.T`, `W.permute(1, 0)` or `W.transpose(0, 1)` of a 2-D tensor."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and _in(node.target, _TRANSPOSES)):
        return False
    if node.target in (aten.permute.default,):
        return [d % 2 for d in node.args[1]] == [1, 0]
    if node.target in (aten.transpose.int, torch.transpose):
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return True


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Apply both rewrites to `gm` in place; returns `gm`."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            _functional_module(gm, node)
        elif node.op == "call_function" and _in(node.target, _WEIGHT_PRODUCTS):
            _weight_product(gm, node)
    gm.recompile()
    return gm


def _in(target, ops: frozenset) -> bool:
    try:
        return target in ops
    except TypeError:
        return False


def _functional_module(gm: fx.GraphModule, node: fx.Node) -> None:
    module = gm.get_submodule(node.target)
    if type(module) is nn.Linear:
        op, extra = F.linear, ()
    elif type(module) in (nn.Conv1d, nn.Conv2d) and module.padding_mode == "zeros":
        op = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
        extra = (module.stride, module.padding, module.dilation, module.groups)
    else:
        return
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{node.target}.weight")
        bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        call = graph.call_function(op, (node.args[0], weight, bias, *extra))
    call.meta = dict(node.meta)
    stack = dict(node.meta.get("nn_module_stack", {}))
    stack[node.target] = (node.target, type(module))
    call.meta["nn_module_stack"] = stack
    node.replace_all_uses_with(call)
    graph.erase_node(node)


def _parameter(gm: fx.GraphModule, node) -> bool:
    """A 2-D parameter: read with get_attr (torch.export, symbolic_trace) or a graph input
    that holds one (dynamo)."""
    if is_parameter_input(node):
        return recorded_value(node).ndim == 2
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return False
    return value.ndim == 2


def _weight_product(gm: fx.GraphModule, node: fx.Node) -> None:
    """x @ W (W a 2-D parameter, [in, out]) -> linear(x, W.t(), bias)."""
    if node.target in (aten.addmm.default, torch.addmm):
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return
        bias, x, weight = node.args[:3]
    else:
        (x, weight), bias = node.args[:2], None
    graph = gm.graph
    with graph.inserting_before(node):
        if _is_transpose(weight) and _parameter(gm, weight.args[0]):
            transposed = weight.args[0]  # x @ W.t() or W.T: W is already [out, in]
        elif _parameter(gm, weight):
            transposed = graph.call_function(aten.t.default, (weight,))
        else:
            return
        linear = graph.call_function(aten.linear.default, (x, transposed, bias))
    linear.meta = dict(node.meta)
    node.replace_all_uses_with(linear)
    graph.erase_node(node)
    if transposed is not weight and weight.op == "call_function" and not weight.users:
        graph.erase_node(weight)
