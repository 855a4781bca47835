"""TensorRT's fused-attention Q/DQ pattern in an exported graph.

TensorRT fuses `MatMul -> Softmax -> MatMul` into one FP8/INT8 attention kernel when each
product's operands come straight from DequantizeLinear: the attention scale applied to the
query before its Q/DQ (TensorRT's "Fused Attention" guide: Q or K multiplied by the scale
before the first product), K's transpose in front of its Q/DQ, and a Q/DQ on the softmax
output P with a fixed, data-independent scale (Model Optimizer's FP8 exporter writes 1/448).
`qcompile.prepare` already puts the scale on the query in torch (`Recipe.attention="qkv"`), so
the query's `Mul` sits before its Q/DQ; this module owns the rewrites of the exported graph:

- `rebase_shapes`: `Shape(DQ(Q(x)))` reads `Shape(x)` (the same shape), so no DQ feeds a
  float op (torch's SDPA translation takes the mask's size from the quantized query and key).
- `hoist_layout_ops`: `Q(x) -> DQ -> Reshape/Transpose -> ... -> MatMul` becomes
  `Reshape/Transpose(x) -> Q -> DQ -> MatMul` for per-tensor Q/DQ, so DQ feeds the product.
- `quantize_softmax` (opt-in): a fixed-scale Q/DQ (amax 1: 1/448 for FP8, 1/127 for INT8) on
  each Softmax output (after torch's NaN guard for fully masked rows, where there is one)
  whose consumers are MatMuls with a dequantized other operand.

The first two are exact (a per-tensor Q/DQ is elementwise, and commutes with layout ops). The
third changes the numbers: P is rounded to the 8-bit grid, which the torch model (P fused in
`scaled_dot_product_attention`) does not do. It knows nothing of torch or of how the graph
was produced.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.backends.onnx.trt_ops import DEQUANTIZE_OPS

#: Layout ops moved above a per-tensor Q/DQ (first input: data; the others: shape or axes).
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze"})

#: Metadata key on a Q node whose input layout ops were hoisted above it: the ops, in the
#: order applied to the quantizer's own input ("Transpose:0,2,1,3" or "Reshape", ";"-joined),
#: so that `verify_onnx` can bring the Q/DQ's values back to the torch layout.
HOISTED_LAYOUT_KEY = "qcompile.hoisted_layout"
#: Largest magnitude of each 8-bit element type: the softmax Q/DQ scale is 1 / this (amax 1).
SOFTMAX_QMAX = {ir.DataType.FLOAT8E4M3FN: 448.0, ir.DataType.INT8: 127.0}


def _is_standard(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.domain == "" and node.op_type == op_type


def _quantize_pair(dq: ir.Node) -> ir.Node | None:
    """The QuantizeLinear feeding `dq` alone, or None (a weight DQ, a TensorRT dynamic op)."""
    if not _is_standard(dq, "DequantizeLinear"):
        return None
    q = dq.inputs[0].producer()
    if not _is_standard(q, "QuantizeLinear") or len(q.outputs[0].uses()) != 1:
        return None
    return q


def _per_tensor(q: ir.Node, dq: ir.Node) -> bool:
    """Scalar scales (and zero points), no blocks: the Q/DQ acts element by element."""
    for node in (q, dq):
        if node.attributes.get("block_size") is not None and node.attributes["block_size"].as_int():
            return False
        for value in node.inputs[1:]:
            if value is not None and (value.shape is None or value.shape.numpy() not in ((), (1,))):
                return False
    return True


def rebase_shapes(model: ir.Model) -> int:
    """Point each `Shape` of a Q/DQ output at the Q's input; returns how many."""
    count = 0
    for node in list(model.graph):
        if not _is_standard(node, "Shape"):
            continue
        dq = node.inputs[0].producer()
        q = _quantize_pair(dq) if dq is not None else None
        if q is None:
            continue
        node.replace_input_with(0, q.inputs[0])
        count += 1
    return count


def hoist_layout_ops(model: ir.Model) -> int:
    """Move layout ops between a per-tensor Q/DQ and a MatMul above the Q; returns how many."""
    graph = model.graph
    count = 0
    changed = True
    while changed:
        changed = False
        for dq in list(graph):
            q = _quantize_pair(dq)
            if q is None or not _per_tensor(q, dq):
                continue
            uses = dq.outputs[0].uses()
            if len(uses) != 1 or uses[0].idx != 0:
                continue
            layout = uses[0].node
            if layout.domain != "" or layout.op_type not in _LAYOUT_OPS:
                continue
            if not _reaches_matmul(layout.outputs[0]):
                continue
            _swap(graph, q, dq, layout)
            count += 1
            changed = True
    if count:
        graph.sort()
    return count


def _reaches_matmul(value: ir.Value) -> bool:
    """Whether `value` flows, through layout ops only, into MatMuls only."""
    uses = value.uses()
    if not uses:
        return False
    for use in uses:
        node = use.node
        if node.domain != "":
            return False
        if node.op_type in _LAYOUT_OPS and use.idx == 0:
            if not _reaches_matmul(node.outputs[0]):
                return False
        elif node.op_type != "MatMul":
            return False
    return True


def _swap(graph: ir.Graph, q: ir.Node, dq: ir.Node, layout: ir.Node) -> None:
    """`Q(x) -> DQ -> L` into `L(x) -> Q -> DQ`: a new L on x, the Q reading it, and L's
    consumers reading the DQ."""
    source = q.inputs[0]
    moved = ir.Node("", layout.op_type, [source, *layout.inputs[1:]],
                    attributes=list(layout.attributes.values()), name=f"{layout.name}_hoisted")
    moved.outputs[0].name = f"{layout.outputs[0].name}_hoisted"
    moved.outputs[0].dtype = source.dtype
    moved.outputs[0].shape = layout.outputs[0].shape
    graph.insert_before(q, moved)
    q.replace_input_with(0, moved.outputs[0])
    step = layout.op_type
    if step == "Transpose":
        step += ":" + ",".join(str(int(p)) for p in layout.attributes["perm"].value)
    before = q.metadata_props.get(HOISTED_LAYOUT_KEY)
    q.metadata_props[HOISTED_LAYOUT_KEY] = step if not before else f"{before};{step}"
    q.outputs[0].shape = layout.outputs[0].shape
    dq.outputs[0].shape = layout.outputs[0].shape
    layout.outputs[0].replace_all_uses_with(dq.outputs[0])
    graph.remove(layout, safe=True)


def _dequantized_operand(value: ir.Value) -> ir.Node | None:
    """The per-tensor Q/DQ's DQ producing `value` (through layout ops), or None."""
    node = value.producer()
    while node is not None and node.domain == "" and node.op_type in _LAYOUT_OPS:
        node = node.inputs[0].producer()
    if node is None or (node.domain, node.op_type) not in DEQUANTIZE_OPS:
        return None
    q = _quantize_pair(node)
    return node if q is not None and _per_tensor(q, node) else None


def _probabilities(value: ir.Value) -> ir.Node | None:
    """The Softmax whose output `value` is, directly or through torch's NaN guard for fully
    masked rows (`Where(IsNaN(p), 0, p)`); None otherwise."""
    node = value.producer()
    if _is_standard(node, "Where"):
        guard, probs = node.inputs[0].producer(), node.inputs[2]
        if not (_is_standard(guard, "IsNaN") and guard.inputs[0] is probs):
            return None
        node = probs.producer()
    return node if _is_standard(node, "Softmax") else None


def quantize_softmax(model: ir.Model) -> int:
    """Insert a fixed-scale Q/DQ (amax 1, the element type of the other operand's Q/DQ) on
    each softmax output that feeds only MatMuls whose other operand is dequantized per
    tensor; returns how many. Changes the numbers (P is rounded)."""
    graph = model.graph
    count = 0
    done: set[int] = set()
    for matmul in list(graph):
        if not _is_standard(matmul, "MatMul"):
            continue
        probs = matmul.inputs[0]
        softmax = _probabilities(probs)
        if softmax is None or id(probs) in done:
            continue
        uses = probs.uses()
        if not all(_is_standard(u.node, "MatMul") and u.idx == 0 for u in uses):
            continue
        partners = [_dequantized_operand(u.node.inputs[1]) for u in uses]
        if any(p is None for p in partners):
            continue
        done.add(id(probs))
        template_dq = partners[0]
        template_q = _quantize_pair(template_dq)
        element = template_dq.inputs[0].dtype
        if element not in SOFTMAX_QMAX:
            continue
        scale_dtype = template_q.inputs[1].dtype or ir.DataType.FLOAT
        array = np.array(1.0 / SOFTMAX_QMAX[element], dtype=scale_dtype.numpy())
        name = f"{softmax.name}_p_scale"
        scale = ir.Value(name=name, shape=ir.Shape(()), const_value=ir.tensor(array, name=name))
        scale.type = ir.TensorType(scale_dtype)
        graph.register_initializer(scale)
        zero = template_q.inputs[2] if len(template_q.inputs) > 2 else None
        q = ir.Node("", "QuantizeLinear", [probs, scale, *([zero] if zero is not None else [])],
                    attributes=list(template_q.attributes.values()), name=f"{softmax.name}_p_quantize")
        q.outputs[0].dtype = element
        q.outputs[0].shape = probs.shape
        dq_zero = template_dq.inputs[2] if len(template_dq.inputs) > 2 else None
        dq = ir.Node("", "DequantizeLinear",
                     [q.outputs[0], scale, *([dq_zero] if dq_zero is not None else [])],
                     attributes=list(template_dq.attributes.values()),
                     name=f"{softmax.name}_p_dequantize")
        dq.outputs[0].dtype = probs.dtype
        dq.outputs[0].shape = probs.shape
        graph.insert_after(probs.producer(), [q, dq])
        for use in uses:
            use.node.replace_input_with(use.idx, dq.outputs[0])
        count += 1
    return count
