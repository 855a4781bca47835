"""Weights quantized once: the element values and scales a weight quantizer stands for.

This module owns turning one weight and its `Quantizer` into stored form: element values
(fp32, the weight's layout) and their scales, computed with `qcompile.core.numerics`, the very
arithmetic of the eval-mode model, so that `WeightQuantization.dequantize()` is bit for bit the
quantizer's output (in fp32). ONNX export (`backends.onnx.weights`) and the serving checkpoints
(`qcompile.hf.serving`) both store weights from it. It knows nothing of files or graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.core import numerics
from qcompile.core.fake_quant import canonical_amax
from qcompile.core.formats import QuantFormat, ScaleKind, get_format
from qcompile.core.quantizer import Quantizer

#: Exponent bias of E8M0 scale bytes (OCP MX): the byte b stands for 2 ** (b - 127).
E8M0_BIAS = 127


def e8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales as uint8 E8M0 exponents (the fp32 exponent field)."""
    return ((scale.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


@dataclass
class WeightQuantization:
    """A weight quantized once: element values (fp32, weight layout) and their scales.

    `scale`: 0-d (per tensor), 1-d along `axis` (per channel), or with `block_size` > 0 one
    value per block of the last axis (`values.shape[:-1] + (K // block_size,)`): fp32, or
    uint8 E8M0 exponents for MX formats when asked for. NVFP4's `scale` holds the E4M3 block
    scales (as fp32 values) and `global_scale` its fp32 second level.
    """

    values: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None
    block_size: int
    axis: int

    def dequantize(self) -> torch.Tensor:
        """values * scale in fp32, the scale built as the quantizer builds it (the NVFP4
        block scale times the global scale first), so the result is the fake-quantized
        weight bit for bit."""
        scale = self.scale
        if scale.dtype == torch.uint8:
            scale = numerics.exp2_int(scale.to(torch.int32) - E8M0_BIAS)
        if self.global_scale is not None:
            scale = scale * self.global_scale
        if self.block_size > 0:
            blocks = numerics.to_blocks(self.values, self.block_size)
            return (blocks * scale.unsqueeze(-1)).flatten(-2)
        if scale.ndim == 1:
            shape = [1] * self.values.ndim
            shape[self.axis] = -1
            scale = scale.reshape(shape)
        return self.values * scale

    def latent(self, format: str) -> torch.Tensor:
        """A float weight that the format's dynamic quantization turns back into exactly these
        values and scales (fp32, the weight's layout).

        Where the scale divides the amax by the element max, the dequantized weight is such a
        weight. int4's `amax / 7.5` maps the block max to 7.5, which rounds to 7 (or -8), so
        there each block's amax must be put back: the element with the largest |value| (a
        positive one first: a positive amax always rounds to 7) and every element at the grid's
        negative end get +-amax, an amax whose `amax / 7.5` is the stored scale. A caller that needs the guarantee checks it by quantizing again.
        """
        dequantized = self.dequantize()
        fmt = get_format(format)
        if fmt.scale is not ScaleKind.FP32 or fmt.divisor == fmt.element.max_value:
            return dequantized
        if self.block_size <= 0:
            raise ValueError(f"{fmt.name} latent weights are written for block scales")
        values = numerics.to_blocks(self.values.float(), self.block_size)
        scale = self.scale.float().unsqueeze(-1)
        latent = numerics.to_blocks(dequantized, self.block_size).clone()
        top = (values.abs() + 0.5 * (values > 0)).argmax(dim=-1, keepdim=True)  # 7 before -7
        top_value = values.gather(-1, top)
        bottom = values == fmt.element.min_value
        amax = _amax_of_scale(scale, top_value, bottom.any(dim=-1, keepdim=True), fmt)
        latent.scatter_(-1, top, torch.where(top_value < 0, -amax, amax))
        latent = torch.where(bottom & (scale > 0), -amax, latent)
        return numerics.from_blocks(latent, self.block_size)


def _amax_of_scale(scale: torch.Tensor, top: torch.Tensor, has_bottom: torch.Tensor,
                   fmt: QuantFormat) -> torch.Tensor:
    """Per block an fp32 amax with `amax / divisor == scale` in fp32 whose +-amax rounds to
    the block's top value `top` (and -amax to the element min where the block holds it):
    `scale * divisor` or one of its fp32 neighbours, the first that fits."""
    divisor = torch.tensor(fmt.divisor, dtype=torch.float32, device=scale.device)
    guess = scale * divisor
    best = guess
    for candidate in (torch.nextafter(guess, torch.full_like(guess, float("inf"))),
                      torch.nextafter(guess, torch.zeros_like(guess)), guess):
        divided = candidate / torch.where(scale > 0, scale, torch.ones_like(scale))
        fits = (candidate / divisor == scale) & (
            numerics.round_to_element(torch.copysign(divided, top), fmt.element) == top)
        fits &= ~has_bottom | (numerics.round_to_element(-divided, fmt.element)
                               == fmt.element.min_value)
        best = torch.where(fits, candidate, best)
    return best


def quantize_weight(
    weight: torch.Tensor, quantizer: Quantizer, e8m0_scales: bool
) -> WeightQuantization:
    """Quantize `weight` exactly as `quantizer` does in eval mode, its SmoothQuant
    `pre_scale` and stored scales (`scale_amax`) included.

    `e8m0_scales`: store MX scales as uint8 E8M0 exponents instead of fp32.
    """
    spec = quantizer.spec
    fmt = get_format(spec.format)
    block_size = fmt.resolve_block_size(spec.block_size)
    w = weight.detach().float()
    if quantizer.pre_scale is not None:  # SmoothQuant: stored weight is W * s
        w = w * quantizer.pre_scale.detach().float()
    amax = None if spec.dynamic else quantizer.amax.detach()
    block_amax = quantizer.scale_amax  # stored scales (a search's), else the data's own
    if block_amax is not None and fmt.scale is ScaleKind.FP32:
        amax, block_amax = block_amax, None
    elif block_amax is not None:
        block_amax = block_amax.reshape(*w.shape[:-1], -1, 1)
    amax = canonical_amax(w, fmt, amax, spec.axis, block_size)
    values, scales = numerics.quantize(w, amax, fmt, block_size, block_amax)
    values = numerics.from_blocks(values, block_size)
    if block_size is not None:
        scale = scales.block_scale if fmt.scale is ScaleKind.E4M3_TWO_LEVEL else scales.scale
        scale = scale.expand(*w.shape[:-1], w.shape[-1] // block_size, 1).squeeze(-1)
        if e8m0_scales and fmt.scale is ScaleKind.E8M0:
            scale = e8m0_bytes(scale)
        global_scale = scales.global_scale
        return WeightQuantization(values, scale.contiguous(), global_scale, block_size, w.ndim - 1)
    scale = scales.scale
    if scale.numel() == 1:
        return WeightQuantization(values, scale.reshape(()), None, 0, 0)
    axis = next(d for d, n in enumerate(scale.shape) if n != 1)
    return WeightQuantization(values, scale.reshape(-1), None, 0, axis)
