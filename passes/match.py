"""Match: find the quantizable sites of a captured graph and give each its specs.

`find_sites` walks a graph (torch.export's aten IR or symbolic_trace's torch IR) and returns
one `Site` per Linear (`aten.linear`, `F.linear`; see `passes.canonicalize` for modules and
GPT-2's `Conv1D`), activation-activation matmul (`@`, `matmul`, `bmm`, `mm`, an `einsum`
that contracts one index), fused attention (`scaled_dot_product_attention`: one site with
roles query, key and value) and convolution (conv1d/conv2d). Names come from
`node.meta["nn_module_stack"]`: a module's only Linear is named by the module path
(`encoder.layer.0.attention.self.query`), a module's only fused attention `<path>.sdpa`,
otherwise `<path>.<kind>_<i>` in graph order (`encoder.layer.0.attention.self.matmul_0`,
`<path>.sdpa_1`).
`assign_specs` applies a `Recipe`. Neither changes the graph.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from qcompile.core.formats import get_format
from qcompile.passes._fx import (
    CONV_OPS,
    EINSUM_OPS,
    LINEAR_OPS,
    MATMUL_OPS,
    SDPA_OPS,
    get_operand,
    is_parameter_input,
    is_target,
    operand_positions,
    recorded_value,
    shape,
)
from qcompile.passes.sites import Site, SiteKind, SiteStatus
from qcompile.recipe import Recipe


def _dim(node: Any, axis: int) -> int | None:
    dims = shape(node)
    if dims is None or not -len(dims) <= axis < len(dims):
        return None
    size = dims[axis]
    return int(size) if is_concrete_int(size) else None


def _carries_data(node: fx.Node) -> bool:
    """False for nodes that compute a size or a number (`sym_size`), not tensors."""
    return not isinstance(recorded_value(node), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def _is_float(node: Any) -> bool:
    val = recorded_value(node)
    dtype = getattr(node.meta.get("tensor_meta") if val is None else val, "dtype", None)
    return dtype is None or dtype.is_floating_point


def activations(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the data fed to the model (not on weights, buffers,
    constants or shapes alone): RoPE's `inv_freq @ positions` is no activation matmul."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and not is_parameter_input(node)) or any(
            arg in found and _carries_data(arg) for arg in node.all_input_nodes
        ):
            found.add(node)
    return found


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    path = re.sub(r"^L\['\w+'\]", "", path)  # the root module: torch.export's and dynamo's
    return re.sub(r"\[(\w+)\]", r".\1", path).strip(".")


def _einsum_axes(equation: str) -> tuple[int, int] | None:
    """Reduction axis of each operand of a two-operand einsum that contracts one index."""
    equation = equation.replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    left, right = terms
    contracted = [c for c in set(left) & set(right) if c not in output]
    if len(contracted) != 1:
        return None
    (index,) = contracted
    return left.index(index) - len(left), right.index(index) - len(right)


def _describe(node: fx.Node, data: set[fx.Node]) -> list[tuple[SiteKind, dict[str, int], int | None]]:
    """(kind, reduction axis per role, K) for each site at `node` (two for attention)."""
    args = node.args
    if is_target(node.target, LINEAR_OPS):
        return [(SiteKind.LINEAR, {"input": -1, "weight": -1}, _dim(args[0], -1) or _dim(args[1], -1))]
    if is_target(node.target, CONV_OPS):
        return [(SiteKind.CONV, {"input": 1, "weight": 1}, None)]
    if is_target(node.target, SDPA_OPS):
        # q @ k^T reduces the head dimension of query and key, p @ v the sequence of value;
        # one block size must divide both, so K is their gcd (None if either is unknown).
        head, length = _dim(args[0], -1), _dim(args[2], -2)
        k = math.gcd(head, length) if head and length else None
        return [(SiteKind.ATTENTION, {"query": -1, "key": -1, "value": -2}, k)]
    if is_target(node.target, MATMUL_OPS):
        axes = {"input": -1, "other": -2 if len(shape(args[1]) or (0, 0)) >= 2 else -1}
    elif is_target(node.target, EINSUM_OPS):
        found = _einsum_axes(args[0])
        if found is None:
            return []
        axes = dict(zip(("input", "other"), found))
    else:
        return []
    operands = [get_operand(args, p) for p in operand_positions(node).values()]
    if not all(isinstance(o, fx.Node) and o in data and _is_float(o) for o in operands):
        return []  # a product with a weight or constant, not between two activations
    k = _dim(operands[0], axes["input"]) or _dim(operands[1], axes["other"])
    return [(SiteKind.MATMUL, axes, k)]


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every site of `gm` in graph order, status QUANTIZED and no specs yet."""
    data = activations(gm.graph)
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            path = module_path(node)
            found += [(node, path, *d) for d in _describe(node, data)]
    counts = defaultdict(int)
    for _, path, kind, _, _ in found:
        counts[path, kind] += 1
    seen = defaultdict(int)
    sites = []
    for node, path, kind, axes, k in found:
        index = seen[path, kind]
        seen[path, kind] += 1
        unique = kind is not SiteKind.MATMUL and counts[path, kind] == 1
        if kind is SiteKind.ATTENTION:
            name = ".".join(filter(None, (path, "sdpa" if unique else f"sdpa_{index}")))
        elif path and unique:
            name = path
        else:
            name = ".".join(filter(None, (path, f"{kind.value}_{index}")))
        sites.append(Site(name, kind, node.name, reduction_axes=axes, reduction_size=k,
                          weight_size=_weight_size(node, kind)))
    return sites


def _weight_size(node: fx.Node, kind: SiteKind) -> int | None:
    """Elements of the weight operand of a Linear/conv node, where its shape is known."""
    if kind not in (SiteKind.LINEAR, SiteKind.CONV):  # activation products have no weight
        return None
    dims = shape(get_operand(node.args, operand_positions(node)["weight"]))
    if dims is None or not all(is_concrete_int(d) for d in dims):
        return None
    return math.prod(int(d) for d in dims)


def assign_specs(sites: list[Site], recipe: Recipe) -> list[Site]:
    """Copies of `sites` with the recipe's specs, or EXCLUDED / UNSUPPORTED and a reason."""
    return [_assign(site, recipe) for site in sites]


def _assign(site: Site, recipe: Recipe) -> Site:
    specs, reason = recipe.resolve(site.name, site.kind)
    if not specs:
        return replace(site, status=SiteStatus.EXCLUDED, reason=reason, specs={})
    for spec in specs.values():
        block_size = get_format(spec.format).resolve_block_size(spec.block_size)
        if block_size is None:
            continue
        if site.kind is SiteKind.CONV:
            problem = (f"{spec.format} scales blocks along K, which a convolution does not "
                       "have as a tensor axis")
        elif site.kind is SiteKind.ATTENTION and (site.reduction_size or 1) % block_size:
            problem = (f"{spec.format} needs the head dimension and the key/value sequence "
                       f"length to be multiples of its block size {block_size}")
        elif site.reduction_size is None:
            problem = f"K is dynamic or unknown; {spec.format} needs a multiple of {block_size}"
        elif site.reduction_size % block_size:
            problem = (f"K={site.reduction_size} is not a multiple of the {spec.format} "
                       f"block size {block_size}")
        else:
            continue
        return replace(site, status=SiteStatus.UNSUPPORTED, reason=problem, specs={})
    return replace(site, status=SiteStatus.QUANTIZED, reason="", specs=specs)
