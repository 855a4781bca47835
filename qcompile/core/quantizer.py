"""The quantizer module: the state of one quantized tensor and the one op it calls.

A `Quantizer` sits in front of one input of one site (a Linear's weight, a matmul's
activation). It holds a `QuantSpec` (format, axis, block size, static or dynamic range), the
calibrated `amax` buffer, an `enabled` flag and, when a calibration is running, an observer.
It knows nothing of graphs (passes put it there) or of ONNX (backends read its state).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn

from qcompile.core import numerics, weight_cache
from qcompile.core.fake_quant import fake_quantize
from qcompile.core.formats import ScaleKind, get_format


class Granularity(enum.Enum):
    """What one amax value covers."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        format: format name (int8, int4, fp8, nvfp4, mxfp4, mxfp8, mxfp4_ocp, mxfp8_ocp).
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

    def with_(self, **changes) -> QuantSpec:
        return replace(self, **changes)

    def describe(self) -> str:
        """Short text for tables and messages, e.g. "int8, axis=0, dynamic"."""
        parts = [self.format]
        if self.axis is not None:
            parts.append(f"axis={self.axis}")
        if self.block_size is not None:
            parts.append(f"block_size={self.block_size}")
        parts.append("dynamic" if self.dynamic else ("learned" if self.learn_amax else "static"))
        return ", ".join(parts)

    @property
    def granularity(self) -> Granularity:
        """What one amax value covers: per channel with an axis, per block for FP32-scaled
        block formats, else per tensor (NVFP4's static amax is per tensor: its block scales
        stay dynamic)."""
        fmt = get_format(self.format)
        if self.axis is not None:
            return Granularity.CHANNEL
        if fmt.scale is ScaleKind.FP32 and fmt.resolve_block_size(self.block_size) is not None:
            return Granularity.BLOCK
        return Granularity.TENSOR

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready data: the one serialisation of a spec (checkpoints,
        recipes, Hugging Face configs); `QuantSpec.from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """The spec `to_dict` described (validated as any spec is)."""
        return cls(**data)


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
    - `pre_scale`: None, or a per-channel factor along the last axis applied before anything
      else (SmoothQuant, `qcompile.algorithms.smooth`): the input quantizer of a Linear divides by s
      and its weight quantizer multiplies by s, so the product is unchanged in float.
    - `scale_amax`: None, or stored weight scales found by a search
      (`qcompile.algorithms.weight_scales`): the amax each scale is derived from, one per block
      (shape `weight.shape[:-1] + (K // block_size,)`), per channel or per tensor, used
      instead of the data's own. For FP32-scaled formats it is a static amax; NVFP4 derives
      its E4M3 block scales from it (the global amax stays as the spec says), MX formats their
      E8M0 exponents. The gradient passes where |x| is within it (the format's lower end
      for FP32 scales). A cache of quantized weights must be dropped when it changes.

    - `cache_weights`: in inference (eval mode, gradients off) a quantizer fed by a parameter
      keeps its fake-quantized output while the weight and its own state are unchanged
      (`qcompile.core.weight_cache`: one extra copy of the quantized weights; off with
      `qcompile.set_weight_cache(model, False)`); `set_scale_amax` installs a new buffer
      tensor, which drops it.

    `state_dict()` holds `amax` (and `pre_scale`, `scale_amax` once set); the spec and the `enabled` flag travel in the state dict's
    metadata (`state_dict._metadata[path]["qcompile"]`, kept by `torch.save`), so that
    `load_state_dict` restores `enabled` and a prepared model can refuse a state dict saved
    with other specs (see `qcompile.training.checkpoint`).
    """

    cache_weights: bool = True

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.enabled = True
        self.observer: Observer | None = None
        self.register_buffer("amax", torch.empty(0))
        self.register_buffer("pre_scale", None)
        self.register_buffer("scale_amax", None)
        self.register_state_dict_post_hook(_record_spec)

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

    def reset_amax(self) -> None:
        """Back to uncalibrated (an empty buffer, also where the amax was learned)."""
        device = self.amax.device
        if "amax" in self._parameters:
            del self._parameters["amax"]
        self.register_buffer("amax", torch.empty(0, device=device))

    def set_pre_scale(self, pre_scale: torch.Tensor | None) -> None:
        """Install (or, with None, remove) the per-channel factor along the last axis."""
        if pre_scale is not None:
            pre_scale = pre_scale.detach().float().reshape(-1).to(self.amax.device)
        self.pre_scale = pre_scale

    def set_scale_amax(self, scale_amax: torch.Tensor | None) -> None:
        """Install (or, with None, remove) searched weight scales (see the class docstring)."""
        if scale_amax is not None:
            if self.spec.learn_amax or (not self.spec.dynamic
                                        and get_format(self.spec.format).scale is ScaleKind.FP32):
                raise ValueError(
                    f"stored weight scales replace a dynamic amax; this quantizer's is "
                    f"{'learned' if self.spec.learn_amax else 'static'} ({self.spec.describe()})")
            scale_amax = scale_amax.detach().float().to(self.amax.device)
        self.scale_amax = scale_amax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # traced graphs never hold the cache
            if weight_cache.usable(self, x):
                return weight_cache.cached(self, x, self._fake_quantize)
            weight_cache.drop(self)
        return self._fake_quantize(x)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_scale is not None:
            x = x * self.pre_scale.to(x.dtype)
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
        if self.scale_amax is not None:
            return self._with_stored_scales(x, amax)
        return fake_quantize(
            x, self.spec.format, amax=amax, axis=self.spec.axis, block_size=self.spec.block_size
        )

    def _with_stored_scales(self, x: torch.Tensor, amax: torch.Tensor | None) -> torch.Tensor:
        fmt = get_format(self.spec.format)
        if fmt.scale is ScaleKind.FP32:  # a static amax of the op
            return fake_quantize(x, fmt, amax=self.scale_amax, axis=self.spec.axis,
                                 block_size=self.spec.block_size)
        block_size = fmt.resolve_block_size(self.spec.block_size)
        block_amax = self.scale_amax.reshape(*x.shape[:-1], -1, 1)
        amax = None if amax is None else amax.reshape(())
        return _StoredBlockScales.apply(x, amax, block_amax, fmt.name, block_size)

    def train(self, mode: bool = True) -> Quantizer:
        if mode:  # training frees the inference weight cache
            weight_cache.drop(self)
        return super().train(mode)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop(weight_cache.ENTRY, None)  # copies and pickles start without the cache
        return state

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(torch.bfloat16)` on the model must not round the range: amax and
        # pre_scale (so every scale) stay float32, as the numerics contract has it; devices move.
        before = {name: getattr(self, name) for name in ("amax", "pre_scale", "scale_amax")}
        before = {name: t.data for name, t in before.items() if t is not None}
        result = super()._apply(fn, recurse)
        for name, data in before.items():
            now = getattr(self, name)
            if now.dtype != data.dtype and data.dtype == torch.float32:
                now.data = data.to(now.device)
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # A calibrated amax may be loaded into a fresh (uncalibrated) quantizer.
        key = prefix + "amax"
        if key in state_dict and state_dict[key].shape != self.amax.shape:
            self.set_amax(state_dict[key])
        key = prefix + "pre_scale"
        if key in state_dict and self.pre_scale is None:
            self.set_pre_scale(state_dict[key])
        key = prefix + "scale_amax"
        if key in state_dict and (self.scale_amax is None
                                  or self.scale_amax.shape != state_dict[key].shape):
            self.scale_amax = state_dict[key].detach().float().to(self.amax.device)
        saved = (local_metadata or {}).get(METADATA_KEY)
        if saved is not None:
            self.enabled = bool(saved["enabled"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def extra_repr(self) -> str:
        smoothed = ", smoothed" if self.pre_scale is not None else ""
        stored = ", stored scales" if self.scale_amax is not None else ""
        return self.spec.describe() + smoothed + stored + ("" if self.enabled else ", disabled")


class _StoredBlockScales(torch.autograd.Function):
    """Fake quantization with per-block amax given (NVFP4, MX weights with stored scales):
    `numerics.fake_quantize(..., block_amax=...)`, gradient passed where |x| <= block amax."""

    @staticmethod
    def forward(ctx, x, amax, block_amax, format: str, block_size: int):
        fmt = get_format(format)
        y = numerics.fake_quantize(x, amax, fmt, block_size, block_amax)
        ctx.save_for_backward(numerics.ste_keep(x, block_amax, fmt, block_size))
        return y

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return numerics.masked_gradient(grad, keep).to(grad.dtype), None, None, None, None


#: Key of a quantizer's entry in its state-dict metadata: {"spec": {...}, "enabled": bool}.
METADATA_KEY = "qcompile"


def _record_spec(module: Quantizer, state_dict, prefix: str, local_metadata: dict) -> None:
    local_metadata[METADATA_KEY] = {"spec": module.spec.to_dict(), "enabled": module.enabled}
