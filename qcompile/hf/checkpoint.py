"""Hugging Face style checkpoints of a prepared model: `save_quantized` and `load_quantized`.

A directory written by `save_quantized(qmodel, directory)` holds:

- `config.json`: the model's `PretrainedConfig`, with a `quantization_config` entry (below).
  Plain `AutoModel.from_pretrained(directory)` (transformers 5) ignores the entry and loads
  the float weights alone, reporting the quantizer keys as unexpected: the float model.
- `quantization_config.json`: the same entry on its own:
  `quant_method` ("qcompile"), `version`, `recipe` (`qcompile.recipe.recipe_to_dict`),
  `sites` (name -> kind, status, reason, and per role the `QuantSpec` of its quantizer),
  `excluded` / `unsupported` (site names left in float), `blocks` (the paths of the blocks
  of a block-wise prepared model, null for one graph), `example_inputs` (name ->
  dtype and shape of a tensor, or a constant `value`), `dynamic`, `dtype` (of the weights),
  `attn_implementation`, `architecture` (the transformers class), `causal_lm` (whether to
  wrap it in `QuantizedCausalLM`), `weights` (the file name), `tied` (alias -> saved name of
  weights stored once) and `buffers` (non-persistent buffers stored too, such as RoPE's
  `inv_freq`, so that a model rebuilt on the meta device is exact).
- `model.safetensors` (`model.pt` with `torch.save` where safetensors is missing): the float
  weights under the original module paths (`transformer.h.0.attn.c_attn.weight`), each
  quantizer's calibrated range `<site>.<role>_quantizer.amax` (float32; empty where
  uncalibrated), and the buffers above.
- `generation_config.json` where the model has one.

`load_quantized(directory)` rebuilds the float architecture on the meta device (no weight is
allocated twice), prepares it with the saved recipe and example call, checks that the same
sites come out, and loads every tensor: it returns a `PreparedModel`, the model's own class
prepared block by block, or a `QuantizedCausalLM` for checkpoints of one. Import only where transformers is installed.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from qcompile.core.quantizer import Quantizer
from qcompile.input_check import TensorSpec
from qcompile.passes.sites import SiteStatus, model_sites
from qcompile.prepare import PreparedModel, prepare
from qcompile.recipe import recipe_from_dict, recipe_to_dict
from qcompile.version import __version__

CONFIG_NAME = "quantization_config.json"
QUANT_METHOD = "qcompile"


def prepared_parts(qmodel: nn.Module, config, caller: str) -> tuple[nn.Module, Any, Any, bool]:
    """(prepared model, config, generation config, is a `QuantizedCausalLM`) of what `caller`
    (`save_quantized`, `export_checkpoint`) writes: a `QuantizedCausalLM`, a transformers
    model prepared block by block, or a `PreparedModel` with the float model's `config`."""
    if isinstance(qmodel, transformers.PreTrainedModel) and isinstance(
        getattr(qmodel, "prepared", None), PreparedModel
    ):  # a QuantizedCausalLM
        return qmodel.prepared, qmodel.config, qmodel.generation_config, True
    if getattr(qmodel, "qcompile_blocks", None) is not None:  # prepared block by block
        config = config if config is not None else getattr(qmodel, "config", None)
        generation_config = getattr(qmodel, "generation_config", None)
    elif not isinstance(qmodel, PreparedModel) or model_sites(qmodel) is None:
        raise TypeError(
            f"{caller} takes a model from qcompile.prepare or qcompile.hf.prepare_causal_lm, "
            f"got {type(qmodel).__name__}: prepare (and calibrate) it first"
        )
    else:
        generation_config = None
    if not isinstance(config, transformers.PretrainedConfig):
        raise TypeError(
            f"{caller} needs the float model's config for a PreparedModel: write "
            f"{caller}(qmodel, directory, config=model.config)"
        )
    return qmodel, config, generation_config, False


def _example_inputs(prepared: PreparedModel) -> dict[str, Any]:
    described = {}
    for name, leaves in prepared.qcompile_inputs.arguments.items():
        if set(leaves) != {""}:
            raise ValueError(
                f"example input {name!r} is nested ({', '.join(leaves)}); save_quantized "
                "records top-level tensors and constants only"
            )
        leaf = leaves[""]
        if isinstance(leaf, TensorSpec):
            described[name] = {"dtype": str(leaf.dtype).removeprefix("torch."),
                               "shape": list(leaf.shape)}
        elif leaf is ...:
            raise ValueError(f"example input {name!r} is neither a tensor nor a constant")
        else:
            described[name] = {"value": leaf}
    return described


def _tensors(prepared: PreparedModel) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(name -> tensor stored once, alias -> stored name, non-persistent buffer names)."""
    state = prepared.state_dict()
    buffers = [n for n, _ in prepared.named_buffers() if n not in state]
    state.update((n, prepared.get_buffer(n)) for n in buffers)
    stored: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape,
               tensor.stride(), tensor.dtype)
        if tensor.numel() and key in first:
            tied[name] = first[key]
            continue
        first.setdefault(key, name)
        stored[name] = tensor.detach().cpu().contiguous()
    return stored, tied, buffers


def quantization_config(prepared: nn.Module) -> dict[str, Any]:
    """The `quantization_config` entry of a checkpoint, without the file-level fields."""
    all_sites = model_sites(prepared)
    sites = {
        site.name: {
            "kind": site.kind.value,
            "status": site.status.value,
            "reason": site.reason,
            "formats": {role: spec.to_dict() for role, spec in site.specs.items()},
        }
        for site in all_sites
    }
    dtype = next((p.dtype for p in prepared.parameters() if p.is_floating_point()), None)
    return {
        "quant_method": QUANT_METHOD,
        "version": __version__,
        "recipe": recipe_to_dict(prepared.qcompile_recipe),
        "sites": sites,
        "excluded": [s.name for s in all_sites if s.status is SiteStatus.EXCLUDED],
        "unsupported": [s.name for s in all_sites if s.status is SiteStatus.UNSUPPORTED],
        "blocks": getattr(prepared, "qcompile_blocks", None),
        "example_inputs": _example_inputs(prepared),
        "dynamic": prepared.qcompile_inputs.dynamic,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
    }


def save_quantized(
    qmodel: nn.Module,
    directory: str | os.PathLike,
    *,
    config: transformers.PretrainedConfig | None = None,
    safe_serialization: bool = True,
) -> Path:
    """Write `qmodel` (weights, quantizer state, recipe, sites) to `directory`.

    Args:
        qmodel: a `PreparedModel` of a transformers model, a transformers model prepared
            block by block, or a `QuantizedCausalLM`.
        directory: created if missing; the layout is in this module's docstring.
        config: the float model's config (taken from a `QuantizedCausalLM` itself).
        safe_serialization: safetensors (default, where installed) or `torch.save`.

    Quantizers still calibrating are refused; the model is not changed.
    """
    prepared, config, generation_config, causal_lm = prepared_parts(
        qmodel, config, "save_quantized")
    calibrating = [n for n, m in prepared.named_modules()
                   if isinstance(m, Quantizer) and m.observer is not None]
    if calibrating:
        raise RuntimeError(f"quantizers {calibrating[:3]} are still calibrating; finish first")
    entry = quantization_config(prepared)
    tensors, tied, buffers = _tensors(prepared)
    safe = safe_serialization and _has_safetensors()
    entry.update(
        architecture=prepared.qcompile_model_class,
        attn_implementation=getattr(config, "_attn_implementation", None),
        causal_lm=causal_lm,
        weights="model.safetensors" if safe else "model.pt",
        tied=tied,
        buffers=buffers,
    )
    if not hasattr(transformers, entry["architecture"]):
        raise ValueError(
            f"{entry['architecture']} is not a transformers class; save_quantized writes "
            "Hugging Face models (save others with state_dict())"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if safe:
        from safetensors.torch import save_file

        save_file(tensors, directory / entry["weights"], metadata={"format": "pt"})
    else:
        torch.save(tensors, directory / entry["weights"])
    saved_config = config.__class__.from_dict(config.to_dict())
    saved_config.quantization_config = entry
    saved_config.save_pretrained(directory)
    (directory / CONFIG_NAME).write_text(json.dumps(entry, indent=2) + "\n")
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    return directory


def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _load_tensors(directory: Path, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = directory / entry["weights"]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _example_kwargs(entry: dict[str, Any], device: torch.device) -> dict[str, Any]:
    kwargs = {}
    for name, described in entry["example_inputs"].items():
        if "value" in described:
            kwargs[name] = described["value"]
        else:
            dtype = getattr(torch, described["dtype"])
            kwargs[name] = torch.ones(described["shape"], dtype=dtype, device=device)
    return kwargs


@dataclass
class LoadedCheckpoint:
    """What `read_checkpoint` rebuilt: the prepared model (eval mode), its config and
    generation config, and whether it was saved as a causal LM (`QuantizedCausalLM`)."""

    prepared: PreparedModel
    config: Any
    generation_config: Any
    causal_lm: bool


def read_checkpoint(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Rebuild the prepared model that `save_quantized` wrote to `directory`, on `device`;
    `qcompile.hf.load_quantized` wraps it as the causal LM it was saved as."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}: it was not written by qcompile.hf.save_quantized"
        )
    entry = json.loads((directory / CONFIG_NAME).read_text())
    if entry.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{directory / CONFIG_NAME} is not a qcompile checkpoint")
    config = transformers.AutoConfig.from_pretrained(directory)
    model_class = getattr(transformers, entry["architecture"], None)
    if model_class is None:
        raise ValueError(
            f"transformers {transformers.__version__} has no class {entry['architecture']!r}"
        )
    options = {}
    if entry.get("attn_implementation"):
        options["attn_implementation"] = entry["attn_implementation"]
    if entry.get("dtype"):
        options["dtype"] = getattr(torch, entry["dtype"])
    with torch.device("meta"):
        model = model_class._from_config(config, **options).eval()
    with warnings.catch_warnings():  # the checkpoint stores the non-persistent buffers
        warnings.filterwarnings("ignore", message=".*non-persistent buffer")
        prepared = prepare(model, recipe_from_dict(entry["recipe"]),
                           example_kwargs=_example_kwargs(entry, torch.device("meta")),
                           dynamic=entry["dynamic"], blocks=entry.get("blocks"))
    rebuilt = [s.name for s in model_sites(prepared)]
    if sorted(rebuilt) != sorted(entry["sites"]):
        differ = sorted(set(rebuilt) ^ set(entry["sites"]))[:4]
        raise ValueError(
            f"the rebuilt {entry['architecture']} has other sites than the saved one "
            f"({len(rebuilt)} against {len(entry['sites'])}; differing: {differ}); was it "
            f"saved with another transformers version? (saved by qcompile {entry['version']})"
        )
    prepared.to_empty(device=device)
    _load_into(prepared, _load_tensors(directory, entry), entry)
    prepared.eval()
    generation_config = None
    if (directory / "generation_config.json").is_file():
        generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return LoadedCheckpoint(prepared, config, generation_config, entry["causal_lm"])


def _load_into(prepared: PreparedModel, tensors: dict[str, torch.Tensor], entry: dict) -> None:
    buffers = set(entry["buffers"])
    state = {k: v for k, v in tensors.items() if k not in buffers}
    result = prepared.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - set(entry["tied"])
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not fit the rebuilt model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    for alias, name in entry["tied"].items():  # to_empty unties; tie them again
        owner, _, leaf = alias.rpartition(".")
        source = _get(prepared, name)
        module = prepared.get_submodule(owner)
        if isinstance(source, nn.Parameter):
            setattr(module, leaf, source)
        else:
            module.register_buffer(leaf, source, persistent=leaf not in buffers)
    for name in buffers:
        owner, _, leaf = name.rpartition(".")
        module = prepared.get_submodule(owner)
        module.register_buffer(leaf, tensors[name].to(_get(prepared, name).device),
                               persistent=False)


def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner), leaf)
