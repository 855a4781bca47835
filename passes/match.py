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
A Linear whose weight is one expert's slice `W[e]` of a 3-D parameter (fused MoE experts, see
`passes.experts`) is named `<experts module>.<e>.<parameter>`
(`model.layers.0.mlp.experts.3.gate_up_proj`). Each weight site records its parameter's path,
expert and size (`Site.weight`, `.expert`, `.weight_size`), and a Linear whose output feeds a
top-k is flagged as a MoE router. Every other parameter of 2+ dimensions that feeds a product
becomes an UNSUPPORTED site named by its path, so no multiplied weight goes unlisted.
`assign_specs` applies a `Recipe` (routers stay float unless an override names them).
Neither changes the graph.
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
    PASS_THROUGH_OPS,
    get_operand,
    is_parameter_input,
    is_target,
    is_weight_consumer,
    operand_positions,
    parameter_value,
    recorded_value,
    shape,
    weight_source,
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


def _describe(
    gm: fx.GraphModule, node: fx.Node, data: set[fx.Node]
) -> list[tuple[SiteKind, dict[str, int], int | None]]:
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
    if any(weight_source(gm, o) is not None for o in operands):
        return []  # a weight gathered per token (`W[expert_ids]`) is no activation
    k = _dim(operands[0], axes["input"]) or _dim(operands[1], axes["other"])
    return [(SiteKind.MATMUL, axes, k)]


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every site of `gm` in graph order: QUANTIZED and no specs yet, then one UNSUPPORTED
    site per parameter that feeds a product no site quantizes (see `unquantizable_weights`)."""
    data = activations(gm.graph)
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            path = module_path(node)
            found += [(node, path, *d) for d in _describe(gm, node, data)]
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
        site = Site(name, kind, node.name, reduction_axes=axes, reduction_size=k)
        if kind in (SiteKind.LINEAR, SiteKind.CONV):
            site = _with_weight(gm, node, site)
        sites.append(site)
    return sites + unquantizable_weights(gm, sites)


def _parameter_name(node: fx.Node) -> str:
    return str(node.target)


def _with_weight(gm: fx.GraphModule, node: fx.Node, site: Site) -> Site:
    """`site` with its weight's parameter, expert and size; an expert's slice named
    `<experts module>.<expert>.<parameter>` (`model.layers.0.mlp.experts.3.gate_up_proj`),
    and a router flagged."""
    source = weight_source(gm, node.args[1])
    size = _weight_size(node, site.kind)
    router = site.kind is SiteKind.LINEAR and _feeds_routing(node)
    if source is None:
        return replace(site, weight_size=size, router=router)
    param, expert = source
    path = _parameter_name(param)
    size = size or parameter_value(gm, param).numel()
    name = site.name
    if expert is not None and param.op == "get_attr":
        parent, _, leaf = path.rpartition(".")
        name = ".".join(filter(None, (parent, str(expert), leaf)))
    return replace(site, name=name, weight=path, expert=expert, weight_size=size, router=router)


#: Between a router's logits and the top-k: casts, views, a softmax or sigmoid, a bias.
_ROUTING_STEPS = ("softmax", "sigmoid", "_to_copy", "to.", "view", "reshape", "add", "sub",
                  "mul", "div", "float", "type_as", "getitem")


def _feeds_routing(node: fx.Node, depth: int = 5) -> bool:
    """Whether `node`'s output reaches a `topk` within `depth` steps of elementwise ops: a MoE
    router (`mlp.gate` of Mixtral, Qwen-MoE, DeepSeek, OLMoE...)."""
    frontier = [node]
    for _ in range(depth):
        following = []
        for current in frontier:
            for user in current.users:
                name = str(user.target)
                if "topk" in name:
                    return True
                if any(step in name for step in _ROUTING_STEPS):
                    following.append(user)
        frontier = following
    return False


def unquantizable_weights(gm: fx.GraphModule, sites: list[Site]) -> list[Site]:
    """One UNSUPPORTED site per parameter of 2+ dimensions that feeds a matmul-like product
    (directly or through views, casts and slices) which no site takes as its weight, named by
    the parameter's path: nothing that multiplies goes unlisted (embedding lookups do not
    multiply and are not listed)."""
    taken = {(s.node_name, s.weight) for s in sites if s.weight is not None}
    found = []
    for node in gm.graph.nodes:
        value = parameter_value(gm, node)
        if value is None or value.ndim < 2:
            continue
        path = _parameter_name(node)
        consumers = [c for c in _consumers(node) if (c.name, path) not in taken]
        if consumers:
            first = consumers[0]
            found.append(Site(
                path, SiteKind.LINEAR, first.name, status=SiteStatus.UNSUPPORTED,
                reason=(f"weight {list(value.shape)} feeds {_op_name(first)} ({first.name}), "
                        "a product qcompile cannot quantize; it stays float"),
                weight=path, weight_size=value.numel(),
            ))
    return found


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _consumers(param: fx.Node) -> list[fx.Node]:
    """The matmul-like nodes that `param` reaches through pass-through ops."""
    found, stack, seen = [], [param], set()
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op != "call_function":
                continue
            if is_weight_consumer(user.target):
                found.append(user)
            elif is_target(user.target, PASS_THROUGH_OPS) and user.args and user.args[0] is node:
                stack.append(user)
    return found


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
    if site.status is SiteStatus.UNSUPPORTED and site.reason:
        return site  # a weight no site quantizes (`unquantizable_weights`)
    specs, reason = recipe.resolve(site.name, site.kind, router=site.router)
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
