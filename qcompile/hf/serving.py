"""Serving checkpoints: `export_checkpoint` writes a prepared Hugging Face model as a
quantized checkpoint that vLLM, SGLang and TensorRT-LLM load; `load_checkpoint` reads it back.

A directory written by `export_checkpoint(qmodel, directory, format)` holds `config.json`
(the model's config with the format's `quantization_config`), `hf_quant_config.json`
(ModelOpt format only), the weights as `model.safetensors` (or shards and
`model.safetensors.index.json` beyond `max_shard_size`), `generation_config.json` and the
tokenizer files where given, and `qcompile_serving.json`: the recipe, the example call, every
calibrated amax and searched weight scales (`Quantizer.scale_amax`), which `load_checkpoint`
needs to rebuild the prepared model exactly (the engines ignore it). Each quantized Linear is stored packed with its scales, exactly the element
values and scales of the model's own fake quantization (`qcompile.core.weights`), so the
served weights dequantize bit for bit to the weights the model was calibrated / trained with;
what a format cannot hold exactly is refused, never requantized.

This module owns the model side (which sites, which tensors, checks, files); the formats'
tensors and configs are `qcompile.hf.serving_formats`. Import only where transformers is
installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from qcompile.core.formats import get_format
from qcompile.core.numerics import amax_scale
from qcompile.core.quantizer import Quantizer
from qcompile.core.weights import WeightQuantization, quantize_weight
from qcompile.hf.checkpoint import prepared_parts, quantization_config
from qcompile.hf.serving_formats import (
    FORMATS,
    MODELOPT,
    InexpressibleError,
    LayerTensors,
    Scheme,
    check_expressible,
    compressed_tensors_config,
    decode_layer,
    encode_layer,
    input_scale_matches,
    kv_scale_names,
    kv_scale_tensor,
    modelopt_configs,
    scheme_of,
)
from qcompile.passes.sites import (
    Site,
    SiteKind,
    SiteStatus,
    model_sites,
    prepared_graphs,
    site_quantizers,
)
from qcompile.prepare import PreparedModel, prepare
from qcompile.recipe import fused_group, recipe_from_dict
from qcompile.version import __version__

__all__ = ["InexpressibleError", "export_checkpoint", "load_checkpoint"]

SIDECAR = "qcompile_serving.json"
HF_QUANT_CONFIG = "hf_quant_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- the model side


def _checkpoint_modules(prepared: nn.Module, config) -> dict[str, str]:
    """Module path in the model -> module path in its checkpoints, for the modules that
    transformers renames on load (GPT-NeoX's `lm_head` is `embed_out` in checkpoints): engines
    read the checkpoint names. Models whose checkpoints store weights in another layout
    (converted on load, such as the fused 3-D experts of MoE models, stored per expert) are
    refused: writing our layout would give engines weights they cannot find."""
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        reference = getattr(transformers, prepared.qcompile_model_class)._from_config(config)
    state = reference.state_dict()
    by_identity = {id(t): k for k, t in revert_weight_conversion(reference, dict(state)).items()}
    renamed: dict[str, str] = {}
    for key, tensor in state.items():
        target = by_identity.get(id(tensor))
        module, _, leaf = key.rpartition(".")
        if target is None or target.rpartition(".")[2] != leaf:
            raise InexpressibleError(
                f"{prepared.qcompile_model_class} stores {key} in checkpoints in another layout "
                "than in memory (transformers converts it on load; e.g. mixture-of-experts "
                "weights, fused per layer in memory, stored per expert): export_checkpoint does "
                "not write that layout yet. Save with qcompile.hf.save_quantized (qcompile "
                "reloads it), or export ONNX"
            )
        if target != key:
            renamed[module] = target.rpartition(".")[0]
    return renamed


def _renamed(name: str, modules: dict[str, str]) -> str:
    """`name` (a module path or a tensor under one) with its longest prefix in `modules`
    replaced by what it maps to."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return ".".join([modules[prefix], *parts[end:]]) if modules[prefix] else \
                ".".join(parts[end:])
    return name


def _weight_name(prepared: nn.Module, quantizer_path: str) -> str | None:
    """The parameter a weight quantizer reads directly (a `get_attr` node), by its path in
    `prepared`; None where it reads it through an op."""
    for prefix, graph_module in prepared_graphs(prepared):
        local = quantizer_path[len(prefix) + 1:] if prefix else quantizer_path
        if prefix and not quantizer_path.startswith(prefix + "."):
            continue
        for node in graph_module.graph.nodes:
            if node.op == "call_module" and node.target == local:
                source = node.args[0]
                if isinstance(source, torch.fx.Node) and source.op == "get_attr":
                    return f"{prefix}.{source.target}" if prefix else source.target
                return None
    return None


@dataclass
class _Layer:
    """One quantized Linear to store: its scheme, weight parameter name, weight quantization
    and input scale, and the weight's block size."""

    scheme: Scheme
    weight_name: str
    tensors: LayerTensors
    block_size: int | None


@dataclass
class _Plan:
    """What one export writes: the quantized Linears by site name, per KV-cache site its key
    and value scales, and the float Linears to list as ignored."""

    layers: dict[str, _Layer]
    kv: dict[str, dict[str, torch.Tensor]]
    ignore: list[str]


def _static_scale(quantizer: Quantizer, label: str) -> torch.Tensor:
    if not quantizer.calibrated:
        raise ValueError(
            f"{label} has no calibrated range: run qcompile.calibrate(qmodel, data) before "
            "export_checkpoint"
        )
    amax = quantizer.amax.detach().float().reshape(())
    return amax_scale(amax, get_format(quantizer.spec.format))


def _plan(prepared: PreparedModel) -> _Plan:
    entries = site_quantizers(prepared, unique=False)
    calibrating = [e.label for e in entries if e.quantizer.observer is not None]
    if calibrating:
        raise RuntimeError(f"quantizers {calibrating[:3]} are still calibrating; finish first")
    uncalibrated = [e.label for e in entries if e.quantizer.enabled
                    and e.quantizer.spec.needs_calibration and not e.quantizer.calibrated]
    if uncalibrated:
        raise ValueError(
            f"{len(uncalibrated)} quantizers have no calibrated range "
            f"({', '.join(uncalibrated[:3])}"
            f"{', ...' if len(uncalibrated) > 3 else ''}): run qcompile.calibrate(qmodel, data) "
            "before export_checkpoint"
        )
    smoothed = [e.label for e in entries if e.quantizer.pre_scale is not None]
    if smoothed:
        raise InexpressibleError(
            f"{smoothed[0]} is smoothed (SmoothQuant pre_scale): the serving formats have no "
            "per-channel input scale; export a model quantized without qcompile.smooth"
        )
    layers, kv, ignore = {}, {}, []
    for site in model_sites(prepared):
        quantizers = {role: prepared.get_submodule(path) for role, path in site.quantizers.items()}
        enabled = {role: q for role, q in quantizers.items() if q.enabled}
        if site.kind is SiteKind.KV_CACHE:
            if enabled:
                kv[site.name] = {role: _static_scale(q, f"{site.name} ({role})")
                                 for role, q in enabled.items()}
            continue
        if site.kind is not SiteKind.LINEAR:
            if enabled:
                raise InexpressibleError(
                    f"{site.name} is a quantized {site.kind.value}: serving engines quantize "
                    "Linear layers (and the KV cache) only. Prepare with quantize_matmul=False "
                    "(use kv_cache='fp8' for the attention) and no quantized convolution"
                )
            continue
        if site.status is not SiteStatus.QUANTIZED or not enabled:
            ignore.append(site.name)
            continue
        layers[site.name] = _layer(prepared, site, enabled)
    if kv and len(kv) != sum(s.kind is SiteKind.KV_CACHE for s in model_sites(prepared)):
        raise InexpressibleError(
            "the KV cache is quantized in some attention layers only; the formats have one "
            "kv_cache_quant_algo for the whole model: quantize all or none")
    _check_fused(layers)
    return _Plan(layers, kv, ignore)


def _layer(prepared: PreparedModel, site: Site, enabled: dict[str, Quantizer]) -> _Layer:
    weight_q, input_q = enabled.get("weight"), enabled.get("input")
    scheme = scheme_of(site.name, weight_q and weight_q.spec, input_q and input_q.spec)
    if site.expert is not None:
        raise InexpressibleError(
            f"{site.name} is one expert of a mixture-of-experts layer ({site.weight}): exporting "
            "MoE experts to a serving checkpoint is not supported yet. Keep the experts float "
            "(exclude=['*.experts*']) to export the rest, or save with qc.save / "
            "hf.save_quantized"
        )
    name = _weight_name(prepared, site.quantizers["weight"])
    if name is None:
        raise InexpressibleError(
            f"the weight of {site.name} reaches its quantizer through an op (such as GPT-2's "
            "Conv1D transpose): the serving formats store nn.Linear weights [out, in] only"
        )
    weight = prepared.get_parameter(name) if name in dict(prepared.named_parameters()) \
        else prepared.get_buffer(name)
    wq = quantize_weight(weight, weight_q, e8m0_scales=True)
    input_scale = None
    if input_q is not None and not input_q.spec.dynamic:
        input_scale = _static_scale(input_q, f"{site.name} (input)")
    block = get_format(weight_q.spec.format).resolve_block_size(weight_q.spec.block_size)
    return _Layer(scheme, name, LayerTensors(scheme, wq, input_scale), block)


def _check_fused(layers: dict[str, _Layer]) -> None:
    """Layers that engines fuse (q/k/v, gate/up) need one scheme and equal per-tensor scales."""
    groups: dict[str, list[str]] = {}
    for name in layers:
        group = fused_group(name)
        if group is not None:
            groups.setdefault(group, []).append(name)
    for group, names in groups.items():
        schemes = {layers[n].scheme for n in names}
        if len(schemes) > 1:
            raise InexpressibleError(
                f"{', '.join(names)} run as one matmul in serving engines but are quantized "
                f"differently ({', '.join(sorted(s.value for s in schemes))}); give them one "
                "recipe (an override pattern that covers all of them)"
            )
        per_tensor = {"weight": [], "input": []}
        for n in names:
            tensors = layers[n].tensors
            if tensors.weight.global_scale is not None:
                per_tensor["weight"].append(tensors.weight.global_scale)
            elif tensors.weight.scale.ndim == 0:
                per_tensor["weight"].append(tensors.weight.scale)
            if tensors.input_scale is not None:
                per_tensor["input"].append(tensors.input_scale)
        for role, scales in per_tensor.items():
            if len({float(s) for s in scales}) > 1:
                raise InexpressibleError(
                    f"{', '.join(names)} run as one matmul in serving engines, which keep one "
                    f"{role} scale for them, but their {role} scales differ: prepare with "
                    "tie_fused=True (the default) and calibrate again, which ties them"
                )


# ----------------------------------------------------------------------------- tensors


def _state(prepared: PreparedModel, plan: _Plan, format: str) -> dict[str, torch.Tensor]:
    quantizer_paths = {e.path for e in site_quantizers(prepared)}
    quantized = {layer.weight_name: (name, layer.tensors) for name, layer in plan.layers.items()}
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in prepared.state_dict().items():
        owner = key.rpartition(".")[0]
        if any(owner == p or owner.startswith(p + ".") for p in quantizer_paths):
            continue
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                    tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and identity in seen:  # tied (lm_head = embeddings): stored once
            if key in quantized or seen[identity] in quantized:
                raise InexpressibleError(
                    f"{key} is tied to {seen[identity]} and quantized: a checkpoint stores "
                    "tied weights once; exclude one of them from the recipe")
            continue
        seen[identity] = key
        if key in quantized:
            name, tensors = quantized[key]
            for local, value in encode_layer(format, tensors).items():
                out[f"{name}.{local}"] = value.cpu()
        else:
            out[key] = tensor.detach().cpu().contiguous()
    for attention, scales in plan.kv.items():
        names = kv_scale_names(format, attention)
        for role, scale in scales.items():
            out[names[role]] = kv_scale_tensor(format, scale).cpu()
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r}: write an int (bytes) or e.g. '5GB', '500MB'")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(number * base ** {"K": 1, "M": 2, "G": 3}[unit[0]])


def _write_weights(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (directory / INDEX).is_file():
        files = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
        tensors = {}
        for file in files:
            tensors.update(load_file(directory / file))
        return tensors
    return load_file(directory / WEIGHTS)


# ----------------------------------------------------------------------------- export


def _check_directory(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{directory} exists and is not empty; pass overwrite=True to replace it, or "
            "choose another directory")


def export_checkpoint(
    qmodel: nn.Module,
    directory: str | os.PathLike,
    format: str = MODELOPT,
    *,
    overwrite: bool = False,
    tokenizer: Any = None,
    config: transformers.PretrainedConfig | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write `qmodel` as a quantized Hugging Face checkpoint that serving engines load.

    Args:
        qmodel: a calibrated (or QAT/QAD-trained) transformers model prepared block by
            block (what `qcompile.prepare` gives for a decoder called with its KV cache), a
            `QuantizedCausalLM` from `qcompile.hf.prepare_causal_lm`, or a `PreparedModel`
            of a transformers model (then pass `config=model.config`).
        directory: written whole or not at all (a temporary directory renamed at the end).
        format: "modelopt" (ModelOpt's unified checkpoint: vLLM, SGLang, TensorRT-LLM) or
            "compressed-tensors" (llm-compressor's: vLLM, SGLang).
        overwrite: replace a non-empty `directory`.
        tokenizer: saved alongside (`tokenizer.save_pretrained`).
        max_shard_size: bytes, or text such as "5GB"; larger checkpoints are sharded with a
            `model.safetensors.index.json`.

    What each format holds exactly (README: "Serve with vLLM / SGLang / TensorRT-LLM"):
    modelopt: nvfp4 (W4A4 or weight-only), per-tensor fp8, mxfp8, and mixes of nvfp4 and fp8;
    compressed-tensors: those, per-channel fp8, int4 weight-only and int8 too. Anything else
    (a quantized attention matmul, SmoothQuant, different scales in layers that engines fuse,
    a model whose checkpoints store weights in another layout than it holds them, such as
    the fused experts of MoE models) raises `InexpressibleError` naming what fits; a missing
    calibration or an unprepared model raises too. Nothing is written then. Tensors are named
    as the model's checkpoints name them (modules transformers renames on load included).
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {', '.join(map(repr, FORMATS))}")
    prepared, config, generation_config, causal_lm = prepared_parts(
        qmodel, config, "export_checkpoint")
    directory = Path(directory)
    _check_directory(directory, overwrite)
    shard_bytes = _parse_size(max_shard_size)
    if not hasattr(transformers, prepared.qcompile_model_class):
        raise ValueError(
            f"{prepared.qcompile_model_class} is not a transformers class; export_checkpoint "
            "writes Hugging Face models")
    modules = _checkpoint_modules(prepared, config)
    plan = _plan(prepared)
    schemes = {_renamed(name, modules): layer.scheme for name, layer in plan.layers.items()}
    check_expressible(format, schemes)
    tensors = {_renamed(key, modules): t for key, t in _state(prepared, plan, format).items()}
    ignore = [_renamed(name, modules) for name in plan.ignore]
    if format == MODELOPT:
        nested, entry = modelopt_configs(schemes, ignore, bool(plan.kv), f"qcompile-{__version__}")
    else:
        nested = None
        entry = compressed_tensors_config(
            {_renamed(n, modules): (layer.scheme, layer.block_size)
             for n, layer in plan.layers.items()}, ignore, bool(plan.kv))
    sidecar = _sidecar(prepared, config, format, causal_lm)
    sidecar["checkpoint_modules"] = modules
    sidecar["global_scales"] = {  # exact: compressed-tensors stores their reciprocals
        name: float(layer.tensors.weight.global_scale) for name, layer in plan.layers.items()
        if layer.tensors.weight.global_scale is not None}

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write_weights(staging, tensors, shard_bytes)
        saved = config.__class__.from_dict(config.to_dict())
        saved.quantization_config = entry
        saved.save_pretrained(staging)
        if nested is not None:
            (staging / HF_QUANT_CONFIG).write_text(json.dumps(nested, indent=2) + "\n")
        (staging / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _sidecar(prepared: PreparedModel, config, format: str, causal_lm: bool) -> dict[str, Any]:
    entry = quantization_config(prepared)
    entry.update(
        format=format,
        architecture=prepared.qcompile_model_class,
        attn_implementation=getattr(config, "_attn_implementation", None),
        causal_lm=causal_lm,
        ranges={e.path: e.quantizer.amax.detach().float().cpu().tolist()
                for e in site_quantizers(prepared)
                if e.quantizer.calibrated and not e.quantizer.spec.dynamic},
        disabled=[e.path for e in site_quantizers(prepared) if not e.quantizer.enabled],
        stored_scales={e.path: e.quantizer.scale_amax.detach().float().cpu().tolist()
                       for e in site_quantizers(prepared) if e.quantizer.scale_amax is not None},
    )
    return entry


# ----------------------------------------------------------------------------- load


def load_checkpoint(directory: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Rebuild the prepared model that `export_checkpoint` wrote to `directory` (either
    format), in eval mode on `device`: the model's own class prepared block by block, a
    `QuantizedCausalLM` or a `PreparedModel` (as it was exported), whose outputs are those
    of the exported model.

    Weights are decoded from the format's packed tensors (the quantized weights themselves);
    every calibrated range comes from `qcompile_serving.json` and is checked against the
    format's scales. The loaded weight is one that quantizes to the decoded one (int4: with
    each block's amax put back, `WeightQuantization.latent`); a weight quantizer stays on where
    quantizing it gives the decoded weight bit for bit (so QAT can go on), and is switched off
    (with the decoded weight loaded, and a warning) where not,
    e.g. for a bf16 model whose nvfp4 values do not all fit bf16.
    """
    directory = Path(directory)
    if not (directory / SIDECAR).is_file():
        raise FileNotFoundError(
            f"{directory} has no {SIDECAR}: it was not written by qcompile.hf.export_checkpoint")
    entry = json.loads((directory / SIDECAR).read_text())
    format = entry["format"]
    config = transformers.AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model_class = getattr(transformers, entry["architecture"])
    options = {}
    if entry.get("attn_implementation"):
        options["attn_implementation"] = entry["attn_implementation"]
    if entry.get("dtype"):
        options["dtype"] = getattr(torch, entry["dtype"])
    with torch.device(device):
        model = model_class._from_config(config, **options).eval()
    kwargs = {}
    for name, described in entry["example_inputs"].items():
        kwargs[name] = described["value"] if "value" in described else torch.ones(
            described["shape"], dtype=getattr(torch, described["dtype"]), device=device)
    prepared = prepare(model, recipe_from_dict(entry["recipe"]), example_kwargs=kwargs,
                       dynamic=entry["dynamic"], blocks=entry.get("blocks"))
    if sorted(s.name for s in model_sites(prepared)) != sorted(entry["sites"]):
        raise ValueError(f"the rebuilt {entry['architecture']} has other sites than the exported "
                         "one; was it exported with another transformers version?")
    internal = {stored: module for module, stored in entry.get("checkpoint_modules", {}).items()}
    tensors = {_renamed(key, internal): t for key, t in _read_weights(directory).items()}
    _load_into(prepared, tensors, entry, format)
    prepared.eval()
    if not entry["causal_lm"]:
        return prepared
    from qcompile.hf.causal_lm import QuantizedCausalLM

    generation_config = None
    if (directory / "generation_config.json").is_file():
        generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return QuantizedCausalLM(prepared, config, generation_config).eval()


def _load_into(prepared: PreparedModel, tensors: dict[str, torch.Tensor], entry: dict,
               format: str) -> None:
    entries = {e.path: e for e in site_quantizers(prepared)}
    for path, amax in entry["ranges"].items():
        entries[path].quantizer.set_amax(torch.tensor(amax, dtype=torch.float32))
    for path in entry["disabled"]:
        entries[path].quantizer.enabled = False
    for path, scale_amax in entry.get("stored_scales", {}).items():  # searched weight scales
        entries[path].quantizer.set_scale_amax(torch.tensor(scale_amax, dtype=torch.float32))
    from qcompile.algorithms.calibrate import tie_fused_ranges

    tie_fused_ranges(prepared)  # learned ranges of fused layers: one shared parameter again
    params = dict(prepared.named_parameters())  # a tied alias (lm_head) once, by its first name
    params.update(prepared.named_buffers())
    persistent = set(prepared.state_dict())
    loaded, requantized = set(), []
    with torch.no_grad():
        for site in model_sites(prepared):
            if site.kind is SiteKind.KV_CACHE:
                _check_kv(prepared, site, tensors, format)
                continue
            weight_path = site.quantizers.get("weight")
            if site.kind is not SiteKind.LINEAR or weight_path is None:
                continue
            quantizer = prepared.get_submodule(weight_path)
            if not quantizer.enabled:
                continue
            name = _weight_name(prepared, weight_path)
            wq, scale = _decode(site, quantizer, tensors, format, entry)
            _check_input_scale(prepared, site, scale, format)
            target = params[name]
            dequantized = wq.dequantize().to(target.dtype)
            latent = wq.dequantize() if quantizer.scale_amax is not None else wq.latent(
                quantizer.spec.format)  # int4's dynamic scales: each block's amax put back
            target.copy_(latent.to(target.dtype))
            loaded.add(name)
            if not torch.equal(quantizer(target), dequantized):
                target.copy_(dequantized)
                quantizer.enabled = False
                requantized.append(site.name)
        missing = []
        for key, target in params.items():
            if key in loaded or key not in persistent or key.rpartition(".")[0] in entries:
                continue
            if key not in tensors:
                missing.append(key)
                continue
            target.copy_(tensors[key].to(target.dtype))
    if missing:
        raise ValueError(f"the checkpoint lacks {', '.join(missing[:5])}")
    if requantized:
        warnings.warn(
            f"the weights of {len(requantized)} layers ({', '.join(requantized[:3])}"
            f"{', ...' if len(requantized) > 3 else ''}) are loaded quantized with their "
            "weight quantizers off: quantizing them again would not give them back bit for bit",
            stacklevel=3,
        )


def _decode(site: Site, quantizer: Quantizer, tensors: dict[str, torch.Tensor], format: str,
            entry: dict) -> tuple[WeightQuantization, torch.Tensor | None]:
    prefix = site.name + "."
    local = {k[len(prefix):]: v for k, v in tensors.items()
             if k.startswith(prefix) and "." not in k[len(prefix):]}
    scheme = scheme_of(site.name, quantizer.spec, site.specs.get("input"))
    block = get_format(quantizer.spec.format).resolve_block_size(quantizer.spec.block_size)
    exact = entry.get("global_scales", {}).get(site.name)
    exact = None if exact is None else torch.tensor(exact, dtype=torch.float32)
    try:
        return decode_layer(format, scheme, local, block, exact)
    except KeyError as missing:
        raise ValueError(f"the checkpoint lacks {prefix}{missing.args[0]}") from None


def _check_input_scale(prepared: PreparedModel, site: Site, stored: torch.Tensor | None,
                       format: str) -> None:
    path = site.quantizers.get("input")
    if stored is None or path is None:
        return
    quantizer = prepared.get_submodule(path)
    if not quantizer.enabled:
        return
    expected = _static_scale(quantizer, f"{site.name} (input)")
    scheme = scheme_of(site.name, site.specs["weight"], quantizer.spec)
    if not input_scale_matches(format, scheme, stored, expected):
        raise ValueError(
            f"{site.name}: the checkpoint's input scale {float(stored)!r} is not the one of "
            f"the recorded range ({float(expected)!r}); was the checkpoint edited?")


def _check_kv(prepared: PreparedModel, site: Site, tensors: dict, format: str) -> None:
    for role, name in kv_scale_names(format, site.name).items():
        path = site.quantizers.get(role)
        if path is None or not prepared.get_submodule(path).enabled:
            continue
        expected = _static_scale(prepared.get_submodule(path), f"{site.name} ({role})")
        if name not in tensors or float(tensors[name]) != float(expected):
            raise ValueError(f"{name} is missing or is not the recorded KV-cache range's scale")

