"""The quantizer module: the state of one quantized tensor and the one op it calls.

A `Quantizer` sits in front of one input of one site (a Linear's weight, a matmul's
activation). It holds a `QuantSpec` (format, axis, block size, static or dynamic range), the
calibrated `amax` buffer, an `enabled` flag and, when a calibration is running, an observer.
It knows nothing of graphs (passes put it there) or of ONNX (backends read its state).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import nn

from qcompile.fake_quant import fake_quantize
from qcompile.formats import ScaleKind, get_format


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        format: format name (int8, int4, fp8, nvfp4, mxfp4, mxfp8).
        axis: per-channel amax along this axis (None: per tensor or per block).
        block_size: override the format's block size (int4 only, or block-wise int8/fp8).
        dynamic: amax is taken from each tensor as it arrives (weights, MX formats); otherwise
            it is calibrated once and then static.
        learn_amax: the static amax is an `nn.Parameter` trained with LSQ-style gradients.
    """

    format: str
    axis: int | None = None
    block_size: int | None = None
    dynamic: bool = False
    learn_amax: bool = False

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        object.__setattr__(self, "format", fmt.name)
        fmt.resolve_block_size(self.block_size)
        if not fmt.static_amax and not self.dynamic:
            object.__setattr__(self, "dynamic", True)  # MX scales are always dynamic
        if self.learn_amax and not fmt.learnable_amax:
            raise ValueError(
                f"learn_amax is supported for int8, int4 and fp8, not {fmt.name} "
                "(its scales are not amax / max)"
            )
        if self.learn_amax and self.dynamic:
            raise ValueError("learn_amax needs a static amax; set dynamic=False")
        if self.axis is not None and fmt.resolve_block_size(self.block_size) is not None:
            raise ValueError(f"{fmt.name} uses blocks along the last axis; axis must be None")

    @property
    def needs_calibration(self) -> bool:
        return not self.dynamic

    @property
    def block_scaled(self) -> bool:
        return get_format(self.format).scale is not ScaleKind.FP32

    def with_(self, **changes) -> QuantSpec:
        return replace(self, **changes)


class Observer(Protocol):
    """Collects statistics of the tensors a quantizer sees during calibration."""

    def observe(self, x: torch.Tensor) -> None: ...

    def compute_amax(self) -> torch.Tensor: ...


class Quantizer(nn.Module):
    """Fake-quantizes its input according to `spec`; its state lives in `state_dict()`.

    - `amax`: the calibrated (static) range, an empty buffer until calibrated, or an
      `nn.Parameter` when `spec.learn_amax`.
    - `enabled`: when False the input passes through unchanged.
    - `observer`: set by calibration; while set, inputs are observed and passed through.
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.enabled = True
        self.observer: Observer | None = None
        self.register_buffer("amax", torch.empty(0))

    @property
    def calibrated(self) -> bool:
        return self.amax.numel() > 0

    def set_amax(self, amax: torch.Tensor) -> None:
        """Install a calibrated amax (a Parameter when the spec learns it)."""
        amax = amax.detach().float().to(self.amax.device)
        if self.spec.learn_amax:
            if "amax" in self._buffers:
                del self._buffers["amax"]
            self.amax = nn.Parameter(amax)
        else:
            self.amax = amax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x.detach())
            return x
        if not self.enabled:
            return x
        amax = None
        if not self.spec.dynamic:
            if not self.calibrated:
                raise RuntimeError(
                    f"quantizer ({self.spec.format}, static amax) is not calibrated; run "
                    "qcompile.calibrate(model, data) first, or use a recipe with dynamic scales"
                )
            amax = self.amax
        return fake_quantize(
            x, self.spec.format, amax=amax, axis=self.spec.axis, block_size=self.spec.block_size
        )

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(torch.bfloat16)` on the model must not round the range: amax (and
        # so every scale) stays float32, as the numerics contract has it; devices still move.
        before = self.amax.data
        result = super()._apply(fn, recurse)
        if self.amax.dtype != before.dtype and before.dtype == torch.float32:
            self.amax.data = before.to(self.amax.device)
        return result

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A calibrated amax may be loaded into a fresh (uncalibrated) quantizer.
        key = prefix + "amax"
        if key in state_dict and state_dict[key].shape != self.amax.shape:
            self.set_amax(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        spec = self.spec
        parts = [spec.format]
        if spec.axis is not None:
            parts.append(f"axis={spec.axis}")
        if spec.block_size is not None:
            parts.append(f"block_size={spec.block_size}")
        parts.append("dynamic" if spec.dynamic else ("learned" if spec.learn_amax else "static"))
        if not self.enabled:
            parts.append("disabled")
        return ", ".join(parts)
