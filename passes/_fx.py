"""FX helpers the passes share: which op a node is, where a site's operands sit in its args,
and what torch.export / dynamo / ShapeProp recorded on a node. Nothing here changes a graph or
knows of quantization."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

LINEAR_OPS = frozenset({aten.linear.default, F.linear})
CONV_OPS = frozenset({aten.conv1d.default, aten.conv2d.default, F.conv1d, F.conv2d})
MATMUL_OPS = frozenset({
    aten.matmul.default, aten.bmm.default, aten.mm.default,
    torch.matmul, torch.bmm, torch.mm, operator.matmul,
})
EINSUM_OPS = frozenset({aten.einsum.default, torch.einsum})
SDPA_OPS = frozenset({aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention})

#: Where an operand sits in a node's args: a path of indices (einsum nests them in a list).
Position = tuple[int, ...]


def is_target(target: Any, ops: frozenset) -> bool:
    """Whether a node target is one of `ops` (targets may be unhashable callables)."""
    try:
        return target in ops
    except TypeError:  # unhashable targets
        return False


def operand_positions(node: fx.Node) -> dict[str, Position]:
    """Role -> position in `node.args` of each quantizable operand of a site's node."""
    if is_target(node.target, SDPA_OPS):
        return {"query": (0,), "key": (1,), "value": (2,)}
    if is_target(node.target, EINSUM_OPS):
        nested = isinstance(node.args[1], (list, tuple))
        return {"input": (1, 0), "other": (1, 1)} if nested else {"input": (1,), "other": (2,)}
    second = "other" if is_target(node.target, MATMUL_OPS) else "weight"
    return {"input": (0,), second: (1,)}


def get_operand(args: tuple, position: Position) -> Any:
    for index in position:
        args = args[index]
    return args


def set_operand(args: tuple, position: Position, value: Any) -> tuple:
    """`args` with the operand at `position` replaced (tuples and lists rebuilt)."""
    head, *rest = position
    items = list(args)
    items[head] = set_operand(items[head], tuple(rest), value) if rest else value
    return type(args)(items) if isinstance(args, list) else tuple(items)


def recorded_value(node: fx.Node) -> Any:
    """The example value recorded on a node by torch.export (`val`) or dynamo
    (`example_value`), or None."""
    val = node.meta.get("val")
    return node.meta.get("example_value") if val is None else val


def shape(node: Any) -> tuple | None:
    """The shape recorded on a node by torch.export (`val`), dynamo (`example_value`) or
    ShapeProp (`tensor_meta`)."""
    if not isinstance(node, fx.Node):
        return None
    val = recorded_value(node)
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    tensor_meta = node.meta.get("tensor_meta")
    return tuple(tensor_meta.shape) if hasattr(tensor_meta, "shape") else None


def is_parameter_input(node: Any) -> bool:
    """A graph input that holds a parameter (dynamo passes a module's parameters as inputs)."""
    return (
        isinstance(node, fx.Node) and node.op == "placeholder"
        and isinstance(recorded_value(node), torch.nn.Parameter)
    )


#: Ops through which a tensor is still "the same weight": views, transposes, casts, copies,
#: and taking one expert's slice (`select` on axis 0, `index` by expert ids).
PASS_THROUGH_OPS = frozenset({
    aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.select.int,
    aten.slice.Tensor, aten.index.Tensor, aten._to_copy.default, aten.to.dtype,
    aten.to.dtype_layout, aten.to.device, aten.contiguous.default, aten.clone.default,
    aten.detach.default, aten.alias.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.default, aten.type_as.default, aten.lift_fresh_copy.default,
    torch.t, torch.transpose, torch.permute, torch.reshape, torch.select, torch.squeeze,
    torch.unsqueeze, operator.getitem,
})

#: Products a weight can feed: sites, and those qcompile cannot quantize (listed as such).
WEIGHT_CONSUMERS = LINEAR_OPS | CONV_OPS | MATMUL_OPS | EINSUM_OPS | frozenset({
    aten.addmm.default, aten.baddbmm.default, aten.addbmm.default, aten.addmv.default,
    aten.mv.default, torch.addmm, torch.baddbmm,
})


def is_weight_consumer(target: Any) -> bool:
    """A matmul-like op (grouped products included, whatever namespace they come from)."""
    return is_target(target, WEIGHT_CONSUMERS) or "grouped_mm" in str(target)


def parameter_value(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The parameter a `get_attr` node reads, or a graph input holds (dynamo); else None."""
    if is_parameter_input(node):
        return recorded_value(node)
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        return gm.get_parameter(node.target)
    except AttributeError:
        return None


def weight_source(gm: fx.GraphModule, node: Any) -> tuple[fx.Node, int | None] | None:
    """(parameter node, expert) that `node` is a view, cast or slice of, else None. `expert`
    is the index of `select(W, 0, e)` on a 3-D (or more) parameter, else None."""
    expert = None
    while isinstance(node, fx.Node):
        if parameter_value(gm, node) is not None:
            return node, expert
        if node.op != "call_function" or not is_target(node.target, PASS_THROUGH_OPS):
            return None
        source = node.args[0] if node.args else None
        if node.target is aten.select.int and node.args[1] == 0 and len(shape(source) or ()) >= 3:
            expert = node.args[2] if isinstance(node.args[2], int) else None
        node = source
    return None
