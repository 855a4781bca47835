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
