"""onnx-ir passes that finish an exported quantized graph for TensorRT.

This module owns two rewrites of the exported `ir.Model`, both local and shape-preserving:

- `store_quantized_weights`: a `Cast` of a float initializer that feeds only dequantize ops
  becomes an initializer of the cast's type (INT8, INT4, FLOAT8E4M3FN, FLOAT4E2M1), so the
  file holds the weight at its quantized precision. The values are exactly representable
  (they were quantized in torch), so the cast is exact.
- `fold_weight_transposes`: `DQ(weight) -> Transpose -> MatMul`, as torch.onnx writes a
  `Linear` with a >2-d input, becomes `DQ(transposed weight) -> MatMul`, with the DQ axis
  (per channel or per block) and block scales permuted to match: TensorRT then sees the
  weight in the [K, N] layout of the MatMul, per-channel scales on N and blocks along K;
  the DQ records the permutation in its metadata (`FOLDED_PERM_KEY`).

It knows nothing of torch or of how the graph was produced.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.backends.onnx.trt_ops import DEQUANTIZE_OPS

#: Metadata a folded weight DQ carries: the permutation from the weight's torch layout to its
#: output's ("1,0"), so a check can compare it with the torch weight.
FOLDED_PERM_KEY = "qcompile.folded_perm"


def _is_dequantize(node: ir.Node) -> bool:
    return (node.domain, node.op_type) in DEQUANTIZE_OPS


def _initializer(value: ir.Value | None) -> ir.Value | None:
    return value if value is not None and value.is_initializer() and value.const_value is not None else None


def _replace_with_initializer(graph: ir.Graph, old: ir.Value, array: np.ndarray, name: str) -> ir.Value:
    new = ir.Value(name=name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    new.type = ir.TensorType(new.const_value.dtype)
    graph.register_initializer(new)
    old.replace_all_uses_with(new)
    return new


def store_quantized_weights(model: ir.Model) -> int:
    """Replace `Cast(initializer) -> dequantize` by a low-precision initializer; returns count."""
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "Cast" or node.domain != "":
            continue
        source = _initializer(node.inputs[0])
        output = node.outputs[0]
        if source is None or not output.uses() or not all(_is_dequantize(u.node) for u in output.uses()):
            continue
        dtype = ir.DataType(node.attributes["to"].as_int())
        array = source.const_value.numpy().astype(dtype.numpy())
        _replace_with_initializer(graph, output, array, f"{source.name}_{dtype.name.lower()}")
        graph.remove(node, safe=True)
        if not source.uses() and not source.is_graph_output():
            graph.initializers.pop(source.name)
        count += 1
    return count


def _only_used_by(value: ir.Value, node: ir.Node) -> bool:
    return all(use.node is node for use in value.uses())


def _transpose_initializer(value: ir.Value, perm: list[int]) -> None:
    array = np.transpose(value.const_value.numpy(), perm)
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def _permute_dequantize(dq: ir.Node, perm: list[int]) -> bool:
    """Permute a weight DQ's data, its block scales and its axis; False if not a weight DQ.

    The scale is an initializer (per tensor, per channel or per block) or, for NVFP4, a
    per-tensor `DequantizeLinear` of an E4M3 block-scale initializer.
    """
    data, scale = _initializer(dq.inputs[0]), dq.inputs[1]
    if data is None or scale is None or not _only_used_by(data, dq):
        return False
    scale_dq = None if _initializer(scale) is not None else scale.producer()
    if scale_dq is not None:
        if scale_dq.op_type != "DequantizeLinear" or len(scale.uses()) != 1:
            return False
        scale = _initializer(scale_dq.inputs[0])
        if scale is None or not _only_used_by(scale, scale_dq):
            return False
    elif not _only_used_by(scale, dq):
        return False
    rank = len(data.shape)
    _transpose_initializer(data, perm)
    if len(scale.shape) == rank:  # block scales follow the data's layout
        _transpose_initializer(scale, perm)
        if scale_dq is not None:
            scale_dq.outputs[0].shape = scale.shape
    axis_attr = dq.attributes.get("axis")
    axis = (axis_attr.as_int() if axis_attr is not None else 1) % rank
    dq.attributes["axis"] = ir.AttrInt64("axis", perm.index(axis))
    dq.outputs[0].shape = data.shape
    return True


def fold_weight_transposes(model: ir.Model) -> int:
    """Fold `DQ(weight) -> Transpose` into the weight; returns how many were folded."""
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "":
            continue
        dq = node.inputs[0].producer()
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
            continue
        if len(dq.outputs[0].uses()) != 1:
            continue
        perm = list(node.attributes["perm"].as_ints())
        if not _permute_dequantize(dq, perm):
            continue
        dq.metadata_props[FOLDED_PERM_KEY] = ",".join(map(str, perm))
        node.outputs[0].replace_all_uses_with(dq.outputs[0])
        graph.remove(node, safe=True)
        count += 1
    return count
