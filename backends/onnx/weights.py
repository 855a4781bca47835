"""Weight quantizers, resolved in torch before ONNX export.

This module owns the torch side of storing weights quantized: it finds the `Quantizer`
modules whose input is a parameter of the model (one probing forward pass), quantizes that
parameter once with `qcompile.core.weights` (the very arithmetic of the eval-mode model), and
swaps each such quantizer for a `QuantizedWeight` module that calls the export-only op
`qcompile_onnx::dequantize_weight` on the precomputed element values and scales. The ONNX
translation of that op (`backends.onnx.translations`) writes them as a low-precision
initializer feeding `DequantizeLinear`. It knows nothing of ONNX graphs; activation quantizers
are left in place and exported through the `qcompile::fake_quantize` translation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from qcompile.core.quantizer import Quantizer
from qcompile.core.weights import WeightQuantization, quantize_weight


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
    block scales by `global_scale` (`qcompile.core.weights.WeightQuantization.dequantize`).
    """
    return WeightQuantization(values, scale, global_scale, block_size, axis).dequantize()


@dequantize_weight.register_fake
def _(values, scale, global_scale, format, block_size, axis):
    return torch.empty_like(values)


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
