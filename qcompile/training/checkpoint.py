"""Checkpoints: save a prepared model mid-QAT/QAD and resume to the same result.

This module owns the checkpoint file (`save`, `load`: model and quantizer state, optimizer,
step, any other state such as an LR scheduler, and the RNG state) and the checks that run
before anything is loaded: a checkpoint or state dict saved from a model with other sites or
other specs is refused with a message naming them, and the model is left as it was. It
compares specs as plain data and reads sites back through `model_sites`; it knows nothing of
formats, graphs or numerics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompile.core.quantizer import METADATA_KEY, Quantizer, QuantSpec
from qcompile.passes.sites import model_sites, site_quantizers
from qcompile.version import __version__

FORMAT = "qcompile-checkpoint/1"
_MAX_LINES = 20


class CheckpointError(ValueError):
    """A checkpoint or state dict does not fit the model it is loaded into; nothing was loaded."""


def save(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
    *,
    rng: bool = True,
    **extra: Any,
) -> None:
    """Write a checkpoint of `model` (quantizer state included) to `path`.

    Args:
        model: a prepared model, or one wrapped in DistributedDataParallel.
        optimizer: its state is saved too.
        step: where training stands, returned by `load`.
        rng: save torch's RNG state (CPU, and CUDA where initialized) for `load` to restore,
            so that dropout continues as in an uninterrupted run.
        extra: anything else to keep, by name: objects with a `state_dict()` (LR scheduler,
            GradScaler) are saved as their state dict; other values (numbers, strings, lists,
            dicts, tensors) as they are.

    The file also records the recipe and every site with its specs, so that `load` refuses a
    model prepared differently. It is written to a temporary file first and then renamed, so
    an interrupted save never destroys the previous checkpoint. Under DDP, call it on one rank.
    """
    model = _unwrap(model)
    _refuse_sharded(model, "save")
    checkpoint = {
        "format": FORMAT,
        "qcompile_version": __version__,
        "recipe": _recipe_of(model),
        "sites": _site_records(model),
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "step": step,
        "extra": {
            name: value.state_dict() if hasattr(value, "state_dict") else value
            for name, value in extra.items()
        },
        "rng": _rng_state() if rng else None,
    }
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, path)


def load(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    rng: bool = True,
    **stateful: Any,
) -> dict[str, Any]:
    """Restore a checkpoint written by `save` into `model` (and `optimizer`, and `stateful`).

    Args:
        model: prepared the same way as the saved one (same model, same recipe); it need not
            be calibrated: the checkpoint brings the amax.
        optimizer: restored too. It must hold the parameters the saved optimizer held; with
            `learn_scales` the learned amax become parameters at calibration or at loading, so
            build it after `calibrate` or after a first `load(path, model)`.
        rng: restore the saved RNG state.
        stateful: objects saved by name through `save(..., name=obj)`, restored with
            `obj.load_state_dict(...)`, e.g. `scheduler=scheduler`.

    Returns the saved `step`, the saved optimizer state as `"optimizer"`, and the extra
    values by name. Every check (sites and specs, state-dict keys and shapes, optimizer
    parameters, names in `stateful`) runs before anything is loaded: on a mismatch a
    `CheckpointError` names what differs and the model, optimizer and RNG are untouched.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a qcompile checkpoint (written by qcompile.save); for a plain state "
            "dict use model.load_state_dict(torch.load(path))"
        )
    model = _unwrap(model)
    _refuse_sharded(model, "load")
    _check_sites(checkpoint, model)
    check_state_dict(model, checkpoint["model"])
    if optimizer is not None:
        _check_optimizer(checkpoint["optimizer"], optimizer)
    missing = sorted(set(stateful) - set(checkpoint["extra"]))
    if missing:
        raise CheckpointError(
            f"the checkpoint holds no {', '.join(map(repr, missing))}; it holds: "
            f"{', '.join(map(repr, checkpoint['extra'])) or 'no extra state'}"
        )
    nn.Module.load_state_dict(model, checkpoint["model"])
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    for name, target in stateful.items():
        target.load_state_dict(checkpoint["extra"][name])
    if rng and checkpoint["rng"] is not None:
        _set_rng_state(checkpoint["rng"])
    return {"step": checkpoint["step"], "optimizer": checkpoint["optimizer"],
            **checkpoint["extra"]}


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> None:
    """Raise a `CheckpointError` naming every way `state_dict` does not fit `model`.

    Checks the quantizer specs recorded in the state dict's metadata (where it has them), the
    keys (when `strict`) and the tensor shapes; a quantizer's amax may change shape (an
    uncalibrated quantizer takes a calibrated amax), and a quantizer takes a SmoothQuant
    `pre_scale` or searched weight scales (`scale_amax`) it does not have yet. `PreparedModel.load_state_dict` runs it
    first, so a refused state dict loads nothing.
    """
    quantizers = _quantizer_labels(model)
    metadata = getattr(state_dict, "_metadata", None) or {}
    problems = []
    for path, (label, quantizer) in quantizers.items():
        saved = metadata.get(path, {}).get(METADATA_KEY)
        if saved is not None and saved["spec"] != quantizer.spec.to_dict():
            problems.append(
                f"{label}: state dict {_describe(saved['spec'])}, this model "
                f"{quantizer.spec.describe()}"
            )
    expected = model.state_dict(keep_vars=True)
    if strict:
        for key in sorted(set(expected) - set(state_dict)):
            problems.append(f"{key}: missing from the state dict")
        # An unsmoothed model takes a pre_scale, a quantizer without stored scales takes them.
        taken = {f"{path}.{name}" for path in quantizers for name in ("pre_scale", "scale_amax")}
        for key in sorted(set(state_dict) - set(expected) - taken):
            problems.append(f"{key}: in the state dict only, not in this model")
    amax_keys = {f"{path}.amax" for path in quantizers}
    for key in expected.keys() & state_dict.keys():
        saved, own = state_dict[key], expected[key]
        if key in amax_keys or not isinstance(saved, torch.Tensor):
            continue
        if isinstance(own, torch.Tensor) and saved.shape != own.shape:
            problems.append(
                f"{key}: shape {tuple(saved.shape)} in the state dict, {tuple(own.shape)} here"
            )
    if problems:
        raise CheckpointError(
            f"the state dict does not fit this {type(model).__name__}; nothing was loaded:\n"
            + _lines(problems)
            + "\nprepare the same model with the recipe it was saved with, then load"
        )


def _check_sites(checkpoint: Mapping[str, Any], model: nn.Module) -> None:
    saved = {record["name"]: record for record in checkpoint["sites"]}
    own = {record["name"]: record for record in _site_records(model)}
    problems = [f"site {name}: in the checkpoint only" for name in saved if name not in own]
    problems += [f"site {name}: in this model only" for name in own if name not in saved]
    for name in saved.keys() & own.keys():
        if saved[name]["specs"] != own[name]["specs"]:
            problems.append(
                f"site {name}: checkpoint {_describe_site(saved[name])}, "
                f"this model {_describe_site(own[name])}"
            )
    if problems:
        saved_recipe, own_recipe = checkpoint["recipe"]["name"], _recipe_of(model)["name"]
        recipes = (
            f"recipe {saved_recipe!r} (checkpoint) vs {own_recipe!r} (this model)"
            if saved_recipe != own_recipe else f"both recipe {own_recipe!r}"
        )
        raise CheckpointError(
            f"the checkpoint was saved from a model prepared differently ({recipes}); "
            f"nothing was loaded:\n" + _lines(sorted(problems))
            + "\nprepare the model with the checkpoint's recipe (and the same exclude/override "
            "patterns) before loading"
        )


def _check_optimizer(saved: Mapping[str, Any] | None, optimizer: torch.optim.Optimizer) -> None:
    if saved is None:
        raise CheckpointError(
            "the checkpoint holds no optimizer state; save with qcompile.save(path, model, "
            "optimizer, ...) or load without optimizer="
        )
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    own_sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != own_sizes:
        raise CheckpointError(
            f"the optimizer holds {sum(own_sizes)} parameters in groups of {own_sizes}, the "
            f"saved one {sum(saved_sizes)} in groups of {saved_sizes}; nothing was loaded. "
            "Learned amax (learn_scales) become parameters at calibration or when a checkpoint "
            "is loaded: build the optimizer after qcompile.load(path, model) (or after "
            "calibrate), then load it with qcompile.load(path, model, optimizer)"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


def _refuse_sharded(model: nn.Module, verb: str) -> None:
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise NotImplementedError(
            f"qcompile.{verb} handles unsharded models; this one is sharded by FSDP2. Use "
            "torch.distributed.checkpoint (get_state_dict / set_state_dict) for FSDP2 models"
        )


def _recipe_of(model: nn.Module) -> dict[str, str | None]:
    recipe = getattr(model, "qcompile_recipe", None)
    return {"name": None if recipe is None else recipe.name,
            "repr": None if recipe is None else repr(recipe)}


def _site_records(model: nn.Module) -> list[dict[str, Any]]:
    """Every site as plain data, with the specs its quantizers have now (float: none)."""
    sites = model_sites(model)
    if sites is None:  # a hand-built model: one "site" per Quantizer submodule
        return [
            {"name": entry.path, "status": "quantized", "reason": "",
             "specs": {"quantizer": entry.quantizer.spec.to_dict()}}
            for entry in site_quantizers(model)
        ]
    specs: dict[str, dict[str, Any]] = {site.name: {} for site in sites}
    for entry in site_quantizers(model, unique=False):
        specs[entry.site.name][entry.role] = entry.quantizer.spec.to_dict()
    return [
        {"name": site.name, "status": site.status.value, "reason": site.reason,
         "specs": specs[site.name]}
        for site in sites
    ]


def _quantizer_labels(model: nn.Module) -> dict[str, tuple[str, Quantizer]]:
    """Quantizer path -> ("site <name> (role)", quantizer), for every Quantizer submodule."""
    labels = {
        entry.path: f"site {entry.label}" for entry in site_quantizers(model) if entry.site
    }
    return {
        path: (labels.get(path, path), module)
        for path, module in model.named_modules() if isinstance(module, Quantizer)
    }


def _describe(spec: Mapping[str, Any]) -> str:
    return QuantSpec.from_dict(spec).describe()


def _describe_site(record: Mapping[str, Any]) -> str:
    if not record["specs"]:
        reason = f" ({record['reason']})" if record["reason"] else ""
        return f"float{reason}"
    return "; ".join(f"{role} {_describe(spec)}" for role, spec in record["specs"].items())


def _lines(problems: list[str]) -> str:
    shown = [f"  - {problem}" for problem in problems[:_MAX_LINES]]
    if len(problems) > _MAX_LINES:
        shown.append(f"  ... and {len(problems) - _MAX_LINES} more")
    return "\n".join(shown)


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
