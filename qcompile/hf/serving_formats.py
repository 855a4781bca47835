"""The two serving checkpoint formats: ModelOpt's unified Hugging Face checkpoint and
compressed-tensors, as tensors and configs.

This module owns what each format can express and how: which layer schemes (`Scheme`) exist,
which format takes which (`check_expressible`), the tensors of one quantized Linear
(`encode_layer`) and back (`decode_layer`), the KV-cache scale names, and the
`quantization_config` (plus ModelOpt's `hf_quant_config.json`). The facts come from the
formats' own code (ModelOpt `export/unified_export_hf.py`, `quant_utils.py`,
`qtensor/nvfp4_tensor.py`; compressed-tensors `config/`, `compressors/`; vLLM
`quantization/modelopt.py`, `compressed_tensors/`). It stores the element values and scales
that `qcompile.core.weights` computed and never quantizes anything itself; it knows nothing of
models, files or directories (`qcompile.hf.serving` does).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch

from qcompile.core.formats import get_format
from qcompile.core.quantizer import QuantSpec
from qcompile.core.weights import WeightQuantization

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
FORMATS = (MODELOPT, COMPRESSED_TENSORS)

#: The E2M1 magnitudes; a 4-bit code is sign << 3 | index into this table.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: compressed-tensors version whose config layout is written (and tested against).
CT_VERSION = "0.20.1"


class Scheme(enum.Enum):
    """How one Linear layer is quantized, in terms the serving formats share."""

    NVFP4 = "nvfp4"                # nvfp4 weights, nvfp4 activations with a static global scale
    NVFP4_W4A16 = "nvfp4_w4a16"    # nvfp4 weights only
    FP8 = "fp8"                    # per-tensor fp8 weights, static per-tensor fp8 activations
    FP8_CHANNEL = "fp8_channel"    # per-channel fp8 weights, static per-tensor fp8 activations
    MXFP8 = "mxfp8"                # mxfp8 weights and (dynamic) activations
    INT4 = "int4"                  # int4 weights only, per block
    INT8 = "int8"                  # per-channel int8 weights, static per-tensor int8 activations


#: ModelOpt's `quant_algo` per scheme (those vLLM's ModelOpt path loads).
MODELOPT_ALGOS = {
    Scheme.NVFP4: "NVFP4",
    Scheme.NVFP4_W4A16: "W4A16_NVFP4",
    Scheme.FP8: "FP8",
    Scheme.MXFP8: "MXFP8",
}
#: The per-layer algorithms vLLM runs inside ModelOpt's MIXED_PRECISION.
MODELOPT_MIXED = (Scheme.NVFP4, Scheme.NVFP4_W4A16, Scheme.FP8)


class InexpressibleError(ValueError):
    """The model's quantization has no exact counterpart in the requested format."""


def _fmt(spec: QuantSpec | None) -> str | None:
    return None if spec is None else spec.format


def scheme_of(name: str, weight: QuantSpec | None, input: QuantSpec | None) -> Scheme:
    """The scheme of the Linear `name` whose weight and input are quantized with these specs
    (None: left in float); raises `InexpressibleError` where no serving format has one."""
    w, x = _fmt(weight), _fmt(input)
    block = None if weight is None else get_format(weight.format).resolve_block_size(
        weight.block_size)
    if w == "nvfp4":
        if x is None:
            return Scheme.NVFP4_W4A16
        if x == "nvfp4" and not input.dynamic:
            return Scheme.NVFP4
    elif w == "fp8" and block is None and x == "fp8" and not input.dynamic \
            and input.axis is None and input.block_size is None:
        if weight.axis is None:
            return Scheme.FP8
        if weight.axis in (0, -2):
            return Scheme.FP8_CHANNEL
    elif w == "mxfp8" and x == "mxfp8":
        return Scheme.MXFP8
    elif w == "int4" and x is None and weight.axis is None and block is not None:
        return Scheme.INT4
    elif w == "int8" and weight.axis in (0, -2) and x == "int8" and not input.dynamic \
            and input.axis is None and input.block_size is None:
        return Scheme.INT8
    shown = f"weight {weight.describe() if weight else 'float'}, input " \
            f"{input.describe() if input else 'float'}"
    raise InexpressibleError(
        f"layer {name} ({shown}) has no exact counterpart in a serving checkpoint: vLLM, SGLang "
        "and TensorRT-LLM load nvfp4 (static input amax, or weight-only), per-tensor fp8 with "
        "static fp8 inputs, mxfp8, int4 weight-only and per-channel int8 with static int8 "
        "inputs. Prepare with such a recipe (e.g. 'nvfp4', 'fp8' with quantize_matmul=False, "
        "'mxfp8', 'int4')."
    )


def check_expressible(format: str, schemes: dict[str, Scheme]) -> None:
    """Refuse (`InexpressibleError`) layer schemes that `format` cannot hold, naming the fit."""
    if format == COMPRESSED_TENSORS:
        return
    if not schemes:
        raise InexpressibleError(
            "no Linear layer is quantized: there is nothing for a quantized checkpoint to hold")
    outside = {n: s for n, s in schemes.items() if s not in MODELOPT_ALGOS}
    if outside:
        name, scheme = next(iter(outside.items()))
        raise InexpressibleError(
            f"format='modelopt' has no algorithm for {scheme.value} layers ({name} and "
            f"{len(outside) - 1} more) that vLLM loads (ModelOpt's FP8 is per tensor, its int4 "
            "W4A16_AWQ is TensorRT-LLM's own); use format='compressed-tensors', which holds it "
            "exactly"
        )
    used = set(schemes.values())
    if len(used) > 1 and not used <= set(MODELOPT_MIXED):
        raise InexpressibleError(
            f"format='modelopt' mixes per-layer algorithms (MIXED_PRECISION) of "
            f"{', '.join(s.value for s in MODELOPT_MIXED)} only, not "
            f"{', '.join(sorted(s.value for s in used - set(MODELOPT_MIXED)))}; use "
            "format='compressed-tensors' for this recipe"
        )


# ----------------------------------------------------------------------------- packing


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8, sign << 3 | index) of fp32 values that are E2M1 values."""
    magnitude = values.abs()
    index = torch.where(magnitude < 2, magnitude * 2,
                        torch.where(magnitude < 4, magnitude + 2, magnitude / 2 + 4))
    return (index.to(torch.uint8) | (torch.signbit(values).to(torch.uint8) << 3))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last axis, the even element in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """fp32 E2M1 values of bytes holding two codes each (low nibble first)."""
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    values = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8).bool(), -values, values)


def pack_int4_int32(values: torch.Tensor) -> torch.Tensor:
    """compressed-tensors `pack-quantized`: int4 values (fp32 in [-8, 7]) stored as value + 8,
    eight to an int32 along the last axis, element i at bits 4i..4i+3."""
    offset = (values.to(torch.int64) + 8).unflatten(-1, (-1, 8))
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (offset << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4_int32(packed: torch.Tensor) -> torch.Tensor:
    """fp32 int4 values of `pack_int4_int32` words."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return (nibbles - 8).flatten(-2).float()


def reciprocal_scale(scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' NVFP4 global scales are reciprocals of ModelOpt's: the fp32 g
    nearest 1/scale whose own fp32 reciprocal is `scale` again (exact round trip), found among
    the neighbours of fl(1/scale); fl(1/scale) where none is."""
    first = (1.0 / scale.float()).reshape(())
    candidate = first
    for _ in range(4):
        if float(1.0 / candidate) == float(scale):
            return candidate
        towards = torch.tensor(float("inf") if float(1.0 / candidate) > float(scale) else 0.0)
        candidate = torch.nextafter(candidate, towards)
    return first


def _scalar(value: torch.Tensor, format: str) -> torch.Tensor:
    """ModelOpt writes fp32 0-d scalars, compressed-tensors fp32 [1]."""
    value = value.detach().float().reshape(())
    return value.clone() if format == MODELOPT else value.reshape(1).clone()


# ----------------------------------------------------------------------------- layers


@dataclass
class LayerTensors:
    """A quantized Linear as the model holds it: weight and input quantization."""

    scheme: Scheme
    weight: WeightQuantization
    input_scale: torch.Tensor | None  # fp32 scale of a static input amax (`numerics.amax_scale`)


def encode_layer(format: str, layer: LayerTensors) -> dict[str, torch.Tensor]:
    """The format's tensors of one quantized Linear, by local name (`weight`, ...)."""
    wq, scheme = layer.weight, layer.scheme
    out: dict[str, torch.Tensor] = {}
    if scheme in (Scheme.NVFP4, Scheme.NVFP4_W4A16):
        packed = pack_nibbles(e2m1_codes(wq.values))
        block = wq.scale.to(torch.float8_e4m3fn)
        if format == MODELOPT:
            out.update(weight=packed, weight_scale=block,
                       weight_scale_2=_scalar(wq.global_scale, format))
            if layer.input_scale is not None:
                out["input_scale"] = _scalar(layer.input_scale, format)
        else:
            out.update(weight_packed=packed, weight_scale=block,
                       weight_global_scale=_scalar(reciprocal_scale(wq.global_scale), format))
            if layer.input_scale is not None:
                out["input_global_scale"] = _scalar(reciprocal_scale(layer.input_scale), format)
    elif scheme in (Scheme.FP8, Scheme.FP8_CHANNEL, Scheme.INT8):
        dtype = torch.int8 if scheme is Scheme.INT8 else torch.float8_e4m3fn
        out["weight"] = wq.values.to(dtype)
        if scheme is Scheme.FP8:
            out["weight_scale"] = _scalar(wq.scale, format)
        else:
            out["weight_scale"] = wq.scale.float().reshape(-1, 1).clone()
        out["input_scale"] = _scalar(layer.input_scale, format)
    elif scheme is Scheme.MXFP8:
        out.update(weight=wq.values.to(torch.float8_e4m3fn), weight_scale=wq.scale.clone())
    elif scheme is Scheme.INT4:
        out.update(weight_packed=pack_int4_int32(wq.values),
                   weight_shape=torch.tensor(list(wq.values.shape), dtype=torch.int64),
                   weight_scale=wq.scale.float().clone())
    else:  # pragma: no cover - every Scheme is handled above
        raise NotImplementedError(scheme)
    return {k: v.contiguous() for k, v in out.items()}


def decode_layer(
    format: str,
    scheme: Scheme,
    tensors: dict[str, torch.Tensor],
    block_size: int | None,
    global_scale: torch.Tensor | None = None,
) -> tuple[WeightQuantization, torch.Tensor | None]:
    """The weight quantization and the stored input scale that `encode_layer` wrote.

    compressed-tensors stores NVFP4's global scales as reciprocals, which fp32 cannot always
    invert exactly: pass the exact `global_scale` (checked against the stored reciprocal);
    the input scale is returned as stored (see `input_scale_matches`).
    """
    if scheme in (Scheme.NVFP4, Scheme.NVFP4_W4A16):
        if format == MODELOPT:
            packed, stored = tensors["weight"], tensors["weight_scale_2"].float().reshape(())
            input_scale = tensors.get("input_scale")
        else:
            packed = tensors["weight_packed"]
            reciprocal = tensors["weight_global_scale"].float().reshape(())
            if global_scale is None or float(reciprocal_scale(global_scale)) != float(reciprocal):
                raise ValueError("weight_global_scale is not the reciprocal of the recorded "
                                 "global scale; was the checkpoint edited?")
            stored = global_scale.float().reshape(())
            input_scale = tensors.get("input_global_scale")
        values = unpack_e2m1(packed)
        scale = tensors["weight_scale"].float()
        return (WeightQuantization(values, scale, stored, 16, 1),
                None if input_scale is None else input_scale.float().reshape(()))
    if scheme in (Scheme.FP8, Scheme.FP8_CHANNEL, Scheme.INT8):
        scale = tensors["weight_scale"].float()
        axis = 0
        scale = scale.reshape(()) if scheme is Scheme.FP8 else scale.reshape(-1)
        return (WeightQuantization(tensors["weight"].float(), scale, None, 0, axis),
                tensors["input_scale"].float().reshape(()))
    if scheme is Scheme.MXFP8:
        return WeightQuantization(tensors["weight"].float(), tensors["weight_scale"], None,
                                  32, 1), None
    if scheme is Scheme.INT4:
        values = unpack_int4_int32(tensors["weight_packed"])
        shape = tuple(int(d) for d in tensors["weight_shape"])
        values = values[..., : shape[-1]].reshape(shape)
        return WeightQuantization(values, tensors["weight_scale"].float(), None,
                                  block_size, 1), None
    raise NotImplementedError(scheme)  # pragma: no cover


def input_scale_matches(format: str, scheme: Scheme, stored: torch.Tensor,
                        scale: torch.Tensor) -> bool:
    """Whether a stored input scale is what `encode_layer` writes for `scale`."""
    if format == COMPRESSED_TENSORS and scheme in (Scheme.NVFP4, Scheme.NVFP4_W4A16):
        scale = reciprocal_scale(scale)
    return float(stored) == float(scale)


def kv_scale_names(format: str, attention: str) -> dict[str, str]:
    """role (`key`, `value`) -> tensor name of that KV-cache scale for attention module
    `attention`: ModelOpt `<attn>.k_proj.k_scale`, compressed-tensors `<attn>.k_scale`."""
    if format == MODELOPT:
        return {"key": f"{attention}.k_proj.k_scale", "value": f"{attention}.v_proj.v_scale"}
    return {"key": f"{attention}.k_scale", "value": f"{attention}.v_scale"}


def kv_scale_tensor(format: str, scale: torch.Tensor) -> torch.Tensor:
    return _scalar(scale, format)


# ----------------------------------------------------------------------------- configs

_FP8_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
             "dynamic": False}
_KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                    "dynamic": False}


def _ct_group(scheme: Scheme, block_size: int | None) -> tuple[str, dict, dict | None]:
    """(format, weights args, input_activations args) of a compressed-tensors config group."""
    if scheme in (Scheme.NVFP4, Scheme.NVFP4_W4A16):
        weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16,
                   "strategy": "tensor_group", "dynamic": False}
        inputs = None if scheme is Scheme.NVFP4_W4A16 else {**weights, "dynamic": "local"}
        return "nvfp4-pack-quantized", weights, inputs
    if scheme is Scheme.FP8:
        return "float-quantized", dict(_FP8_ARGS), dict(_FP8_ARGS)
    if scheme is Scheme.FP8_CHANNEL:
        return "float-quantized", {**_FP8_ARGS, "strategy": "channel"}, dict(_FP8_ARGS)
    if scheme is Scheme.INT8:
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                   "dynamic": False}
        return "int-quantized", weights, {**weights, "strategy": "tensor"}
    if scheme is Scheme.MXFP8:
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": 32,
                   "strategy": "group", "dynamic": False, "scale_dtype": "torch.uint8"}
        return "mxfp8-quantized", weights, {**weights, "dynamic": True}
    if scheme is Scheme.INT4:
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": block_size,
                   "strategy": "group", "dynamic": False}
        return "pack-quantized", weights, None
    raise NotImplementedError(scheme)  # pragma: no cover


def compressed_tensors_config(
    layers: dict[str, tuple[Scheme, int | None]], ignore: list[str], kv_cache: bool
) -> dict[str, Any]:
    """config.json's `quantization_config` for compressed-tensors: one config group per
    distinct layer scheme, targeting its layers by name."""
    distinct = sorted(set(layers.values()), key=lambda s: (s[0].value, s[1] or 0))
    groups = {}
    formats = set()
    for i, key in enumerate(distinct):
        format, weights, inputs = _ct_group(*key)
        formats.add(format)
        # The layers by name: model-free readers (compressed-tensors' own dequantizer) cannot
        # tell a Linear's `weight` from an embedding's by a class target such as "Linear".
        targets = sorted(n for n, s in layers.items() if s == key)
        group = {"targets": targets, "weights": weights, "input_activations": inputs,
                 "output_activations": None, "format": format}
        groups[f"group_{i}"] = group
    return {
        "quant_method": "compressed-tensors",
        "version": CT_VERSION,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": dict(_KV_CACHE_SCHEME) if kv_cache else None,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def _mo_layer(scheme: Scheme) -> dict[str, Any]:
    entry: dict[str, Any] = {"quant_algo": MODELOPT_ALGOS[scheme]}
    if scheme in (Scheme.NVFP4, Scheme.NVFP4_W4A16):
        entry["group_size"] = 16
    elif scheme is Scheme.MXFP8:
        entry["group_size"] = 32
    return entry


def _mo_group(scheme: Scheme) -> dict[str, Any] | None:
    """The flat config's config_group args ModelOpt writes for an algorithm (none for MXFP8)."""
    if scheme is Scheme.FP8:
        args = {"dynamic": False, "num_bits": 8, "type": "float"}
        return {"input_activations": args, "weights": dict(args)}
    if scheme in (Scheme.NVFP4, Scheme.NVFP4_W4A16):
        args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        group = {"weights": args}
        if scheme is Scheme.NVFP4:
            group["input_activations"] = dict(args)
        return group
    return None


def modelopt_configs(
    layers: dict[str, Scheme], ignore: list[str], kv_cache: bool, producer_version: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hf_quant_config.json, config.json's flat `quantization_config`) of ModelOpt's unified
    checkpoint (MO `get_quant_config` and `convert_hf_quant_config_format`)."""
    producer = {"name": "modelopt", "version": producer_version}
    kv_algo = "FP8" if kv_cache else None
    used = sorted(set(layers.values()), key=lambda s: s.value)
    flat: dict[str, Any] = {}
    if len(used) == 1:
        (scheme,) = used
        quantization = {"quant_algo": MODELOPT_ALGOS[scheme], "kv_cache_quant_algo": kv_algo,
                        **{k: v for k, v in _mo_layer(scheme).items() if k != "quant_algo"},
                        "exclude_modules": sorted(ignore)}
        group = _mo_group(scheme)
        if group is not None:
            flat["config_groups"] = {"group_0": {**group, "targets": ["Linear"]}}
        flat.update(ignore=sorted(ignore), quant_algo=MODELOPT_ALGOS[scheme])
    else:
        quantized = {name: _mo_layer(s) for name, s in sorted(layers.items())}
        quantization = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": kv_algo,
                        "quantized_layers": quantized}
        groups = {}
        for i, scheme in enumerate(used):
            group = _mo_group(scheme)
            targets = sorted(n for n, s in layers.items() if s is scheme)
            groups[f"group_{i}"] = {**(group or {}), "targets": targets}
        flat.update(config_groups=groups, ignore=[], quant_algo="MIXED_PRECISION",
                    quantized_layers=quantized)
    if kv_cache:
        flat["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    flat.update(producer=producer, quant_method="modelopt")
    return {"producer": producer, "quantization": quantization}, flat
