"""Which NVIDIA GPU generations run which quantized formats in TensorRT, and what a graph needs.

This module owns two small facts and the check between them: the lowest compute capability
whose TensorRT kernels run each low-precision format (`MIN_CAPABILITY`, as data), and which of
those formats an exported ONNX graph uses (`formats_in_onnx`). It knows nothing of TensorRT's
API or of torch; `check_gpu_supports` runs before a build so that an engine the GPU cannot run
fails with a message that names the format and the generation it needs.

Sources: TensorRT's "Working with Quantized Types" (FP8 GEMMs on compute capability 8.9+,
FP4 on 10.0+), NVIDIA Model Optimizer's support matrix (INT4 weight-only: Ampere and later;
FP4: Blackwell), TensorRT 10's support matrix (INT8 tensor cores from Turing, SM 7.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from qcompile.backends.onnx.trt_ops import TRT_DOMAIN


@dataclass(frozen=True)
class Generation:
    name: str
    capability: tuple[int, int]  # the lowest compute capability of the generation
    examples: str


GENERATIONS = (
    Generation("Turing", (7, 5), "T4, RTX 20xx"),
    Generation("Ampere", (8, 0), "A100, A10, RTX 30xx"),
    Generation("Ada", (8, 9), "L4, L40S, RTX 40xx"),
    Generation("Hopper", (9, 0), "H100, H200"),
    Generation("Blackwell", (10, 0), "B200, GB200; RTX 50xx is 12.0"),
)
#: format found in a graph -> lowest compute capability whose TensorRT kernels run it.
MIN_CAPABILITY = {
    "int8": (7, 5),
    "int4": (8, 0),  # weight-only (W4A16)
    "fp8": (8, 9),
    "nvfp4": (10, 0),
    "mxfp8": (10, 0),
}


class UnsupportedGPUError(RuntimeError):
    """The GPU cannot run a format the graph uses; the message names both."""


def generation(capability: tuple[int, int]) -> str:
    """The generation name of a compute capability, e.g. (9, 0) -> "Hopper"."""
    name = "pre-Turing"
    for gen in GENERATIONS:
        if tuple(capability) >= gen.capability:
            name = gen.name
    return name


def supported_formats(capability: tuple[int, int]) -> list[str]:
    """The formats TensorRT runs on a GPU of this compute capability."""
    return [fmt for fmt, needed in MIN_CAPABILITY.items() if tuple(capability) >= needed]


def check_gpu_supports(formats: set[str] | list[str], capability: tuple[int, int]) -> None:
    """Raise `UnsupportedGPUError` if a GPU of `capability` cannot run one of `formats`."""
    capability = tuple(capability)
    missing = sorted((f for f in formats if capability < MIN_CAPABILITY[f]),
                     key=lambda f: MIN_CAPABILITY[f], reverse=True)
    if not missing:
        return
    fmt = missing[0]
    needed = MIN_CAPABILITY[fmt]
    raise UnsupportedGPUError(
        f"this graph uses {', '.join(missing)}; {fmt} needs compute capability "
        f"{needed[0]}.{needed[1]}+ ({generation(needed)} or newer), and this GPU is "
        f"{capability[0]}.{capability[1]} ({generation(capability)}), which runs "
        f"{', '.join(supported_formats(capability)) or 'none of the quantized formats'}. "
        f"Build on a newer GPU, or export the model with a recipe this GPU runs"
    )


def _zero_point_type(node: onnx.NodeProto, types: dict[str, int]) -> int:
    if len(node.input) > 2 and node.input[2]:
        return types.get(node.input[2], onnx.TensorProto.UNDEFINED)
    for attribute in node.attribute:
        if attribute.name == "output_dtype":
            return attribute.i
    return onnx.TensorProto.UINT8


def formats_in_onnx(model: onnx.ModelProto) -> set[str]:
    """The quantized formats (keys of `MIN_CAPABILITY`) a Q/DQ graph computes in.

    Reads element types from initializers and QuantizeLinear zero points only (no shape
    inference, so external weights need not be loaded). The FP8 block scales of NVFP4
    weights count as nvfp4, not fp8.
    """
    graph = model.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    scale_of_dq = {n.input[1] for n in graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 1}
    by_type = {
        onnx.TensorProto.INT8: "int8",
        onnx.TensorProto.INT4: "int4",
        onnx.TensorProto.FLOAT8E4M3FN: "fp8",
        onnx.TensorProto.FLOAT4E2M1: "nvfp4",
    }
    found: set[str] = set()
    for node in graph.node:
        if node.domain == TRT_DOMAIN:
            if node.op_type.startswith("TRT_MXFP8"):
                found.add("mxfp8")
            elif node.op_type == "TRT_FP4DynamicQuantize":
                found.add("nvfp4")
        elif node.op_type == "QuantizeLinear":
            found.add(by_type.get(_zero_point_type(node, types), ""))
        elif node.op_type == "DequantizeLinear" and node.input[0] in types:
            if any(out in scale_of_dq for out in node.output):
                continue  # the FP8 block scales of a two-level (NVFP4) weight
            found.add(by_type.get(types[node.input[0]], ""))
    found.discard("")
    return found
