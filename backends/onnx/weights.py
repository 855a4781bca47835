"""Weight quantizers, resolved in torch before ONNX export.

This module owns the torch side of storing weights quantized: it finds the `Quantizer`
modules whose input is a parameter of the model (one probing forward pass), quantizes that
parameter once with `qcompile.core.numerics` (the very arithmetic of the eval-mode model), and
swaps each such quantizer for a `QuantizedWeight` module that calls the export-only op
`qcompile_onnx::dequantize_weight` on the precomputed element values and scales. The ONNX
translation of that op (`backends.onnx.translations`) writes them as a low-precision
initializer feeding `DequantizeLinear`. It knows nothing of ONNX graphs; activation quantizers
are left in place and exported through the `qcompile::fake_quantize` translation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qcompile.core import numerics
from qcompile.core.fake_quant import canonical_amax
from qcompile.core.formats import ScaleKind, get_format
from qcompile.core.quantizer import Quantizer

_E8M0_BIAS = 127


@torch.library.custom_op("qcompile_onnx::dequantize_weight", mutates_args=())
def dequantize_weight(
    values: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    format: str,
    block_size: int,
    axis: int,
) -> torch.Tensor:
    """values * scale, where `values` hold element values (fp32) in the weight's layout.

    `scale` is a 0-d tensor, a 1-d per-channel tensor along `axis`, or, with `block_size`
    > 0, one value per block of the last axis (shape `values.shape[:-1] + (K // block_size,)`),
    stored as fp32, or as uint8 E8M0 exponents for TensorRT's MXFP8. NVFP4 multiplies its E4M3
    block scales by `global_scale`.
    """
    if scale.dtype == torch.uint8:
        scale = numerics.exp2_int(scale.to(torch.int32) - _E8M0_BIAS)
    if global_scale is not None:
        scale = scale * global_scale
    if block_size > 0:
        return (numerics.to_blocks(values, block_size) * scale.unsqueeze(-1)).flatten(-2)
    if scale.ndim == 1:
        shape = [1] * values.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return values * scale


@dequantize_weight.register_fake
def _(values, scale, global_scale, format, block_size, axis):
    return torch.empty_like(values)


@dataclass
class WeightQuantization:
    """A weight quantized once: element values (fp32, weight layout) and their scales."""

    values: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None
    block_size: int
    axis: int


def quantize_weight(weight: torch.Tensor, quantizer: Quantizer, e8m0_scales: bool) -> WeightQuantization:
    """Quantize `weight` exactly as `quantizer` does in eval mode (`qcompile.core.numerics`),
    its SmoothQuant `pre_scale` included.

    `e8m0_scales`: store MX scales as uint8 E8M0 exponents (TensorRT) instead of fp32.
    """
    spec = quantizer.spec
    fmt = get_format(spec.format)
    block_size = fmt.resolve_block_size(spec.block_size)
    w = weight.detach().float()
    if quantizer.pre_scale is not None:  # SmoothQuant: stored weight is W * s
        w = w * quantizer.pre_scale.detach().float()
    amax = None if spec.dynamic else quantizer.amax.detach()
    amax = canonical_amax(w, fmt, amax, spec.axis, block_size)
    values, scales = numerics.quantize(w, amax, fmt, block_size)
    values = numerics.from_blocks(values, block_size)
    if block_size is not None:
        scale = scales.block_scale if fmt.scale is ScaleKind.E4M3_TWO_LEVEL else scales.scale
        scale = scale.expand(*w.shape[:-1], w.shape[-1] // block_size, 1).squeeze(-1)
        if e8m0_scales and fmt.scale is ScaleKind.E8M0:
            scale = ((scale.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
        global_scale = scales.global_scale
        return WeightQuantization(values, scale.contiguous(), global_scale, block_size, w.ndim - 1)
    scale = scales.scale
    if scale.numel() == 1:
        return WeightQuantization(values, scale.reshape(()), None, 0, 0)
    axis = next(d for d, n in enumerate(scale.shape) if n != 1)
    return WeightQuantization(values, scale.reshape(-1), None, 0, axis)


class QuantizedWeight(nn.Module):
    """Stands in for a weight quantizer during export: returns the precomputed DQ(Q(weight))."""

    def __init__(self, quantization: WeightQuantization, format: str) -> None:
        super().__init__()
        self.format = format
        self.block_size = quantization.block_size
        self.axis = quantization.axis
        self.register_buffer("values", quantization.values)
        self.register_buffer("scale", quantization.scale)
        self.register_buffer("global_scale", quantization.global_scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out = torch.ops.qcompile_onnx.dequantize_weight(
            self.values, self.scale, self.global_scale, self.format, self.block_size, self.axis
        )
        return out.to(weight.dtype)


def find_weight_quantizers(
    model: nn.Module, args: tuple, kwargs: dict
) -> dict[str, torch.Tensor]:
    """Names of the enabled quantizers whose input is a parameter or buffer of `model`.

    Runs one forward pass with hooks; a quantizer counts as a weight quantizer when the tensor
    it receives *is* (by identity) a parameter or buffer, as for `self.weight_quantizer(
    self.linear.weight)` or a `call_module` node fed by a `get_attr` node, or is a view of the
    whole of one, as for the `weight.t()` in front of the weight quantizer of a Hugging Face
    `Conv1D`, or one whole expert `W[e]` of a 3-D MoE expert weight (possibly transposed); a
    view of another part of one, such as a slice whose length follows the input, is not
    constant and stays an activation). Returns {quantizer path: the tensor it receives}.
    """
    constants = {id(t) for t in (*model.parameters(), *model.buffers())}

    def is_constant(tensor: torch.Tensor) -> bool:
        if id(tensor) in constants:
            return True
        base = tensor._base
        if base is None or id(base) not in constants:
            return False
        return tensor.numel() == base.numel() or _is_expert_slice(tensor, base)

    found: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and module.enabled:

            def hook(module, inputs, name=name):
                if inputs and isinstance(inputs[0], torch.Tensor) and is_constant(inputs[0]):
                    found[name] = inputs[0]

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _is_expert_slice(tensor: torch.Tensor, base: torch.Tensor) -> bool:
    """`tensor` is `base[e]` (or its transpose) for one e: a whole expert of a 3-D weight."""
    if base.ndim != 3 or tensor.ndim != 2 or tensor.numel() != base[0].numel():
        return False
    offset = tensor.storage_offset() - base.storage_offset()
    if offset % base.stride(0) or not 0 <= offset // base.stride(0) < base.shape[0]:
        return False
    inner = list(zip(base.shape[1:], base.stride()[1:]))
    return sorted(zip(tensor.shape, tensor.stride())) == sorted(inner)


@contextlib.contextmanager
def weights_quantized(
    model: nn.Module, weights: dict[str, torch.Tensor], e8m0_scales: bool
) -> Iterator[None]:
    """Swap each weight quantizer named in `weights` for a `QuantizedWeight`; undo on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, weight in weights.items():
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            quantizer = getattr(parent, attr)
            quantization = quantize_weight(weight, quantizer, e8m0_scales)
            replacement = QuantizedWeight(quantization, quantizer.spec.format).to(weight.device)
            setattr(parent, attr, replacement)
            swapped.append((parent, attr, quantizer))
        yield
    finally:
        for parent, attr, quantizer in reversed(swapped):
            setattr(parent, attr, quantizer)
