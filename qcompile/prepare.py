"""`qcompile.prepare`: capture a model, find its sites, and put quantizers in front of them.

This module composes the passes (capture -> canonicalize -> match -> decompose attention where
its products are quantized -> insert -> training mode; the middle four are `quantize_graph`, which the
torch.compile backend also runs) and owns the prepared model: a `torch.fx.GraphModule`
that keeps the captured call signature and output structure (tuples, dicts, HF
`ModelOutput`), follows `.train()` / `.eval()`, moves with `.to()` (device constants in the
graph included), and saves and loads every quantizer in `state_dict()`. It knows nothing of
numerics (quantizers do) or of backends.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from typing import Any

import torch
from torch import fx, nn

from qcompile.core.quantizer import Quantizer
from qcompile.input_check import InputSignature
from qcompile.passes.attention import decompose_sdpa, positional_operands
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.capture import CaptureError, capture, site_operand_problem
from qcompile.passes.devices import retarget_devices
from qcompile.passes.insert import insert_quantizers
from qcompile.passes.kv_cache import kv_cache_sites
from qcompile.passes.match import assign_specs, find_sites
from qcompile.passes.sites import Site, SiteKind, SiteStatus
from qcompile.passes.train_mode import bind_training_mode
from qcompile.recipe import Recipe, get_recipe
from qcompile.training.checkpoint import check_state_dict

# GraphModule.__deepcopy__ keeps only the attributes listed under this key of `meta`.
_PRESERVED = "_user_preserved_attributes"


class PrepareWarning(UserWarning):
    """`prepare` worked, but not quite as asked: a recipe pattern matches no site, no site is
    quantized, or an example size of 0 or 1 was fixed in the graph."""


class PreparedModel(fx.GraphModule):
    """A captured model with quantizers in front of its sites.

    Attributes:
        qcompile_sites: every site found, quantized or not (with the reason it is not).
        qcompile_recipe: the recipe it was prepared with.
        qcompile_inputs: the example call; each call is checked against it (dtype and device
            of tensors that had the model's, rank, sizes and constants fixed in the graph).
        qcompile_model_class: the class name of the model it was prepared from.
    """

    qcompile_sites: list[Site]
    qcompile_recipe: Recipe
    qcompile_inputs: InputSignature
    qcompile_model_class: str

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)  # GraphModule drops forward hooks when it copies
        copied.register_forward_pre_hook(_check_call, with_kwargs=True)
        return copied

    def _apply(self, fn, recurse=True):
        before = _device(self)
        result = super()._apply(fn, recurse)
        after = _device(self)
        if before is not None and after is not None and after != before:
            retarget_devices(self, before, after)
        return result

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, checked first: a state dict saved with other quantizer
        specs (recorded in its metadata), other keys or other shapes raises a
        `qcompile.CheckpointError` naming each, and nothing is loaded."""
        check_state_dict(self, state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _device(module: nn.Module) -> torch.device | None:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return None if tensor is None else tensor.device


def _check_call(module: PreparedModel, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the call must fit the example call (not checked while compiling)."""
    if not torch.compiler.is_compiling():
        module.qcompile_inputs.check_call(module, args, kwargs)


def _as_prepared(
    gm: fx.GraphModule, sites: list[Site], recipe: Recipe, inputs: InputSignature, source: str
) -> PreparedModel:
    class GraphModuleImpl(PreparedModel):  # GraphModule installs forward on a per-instance class
        pass

    gm.__class__ = GraphModuleImpl
    # ExportedProgram.module() insists that each argument comes exactly as in the example
    # (positional or keyword); the generated forward binds them by name, so let it.
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
    preserved = gm.meta.setdefault(_PRESERVED, {})
    preserved.update(qcompile_sites=sites, qcompile_recipe=recipe, qcompile_inputs=inputs,
                     qcompile_model_class=source)
    gm.qcompile_sites = sites
    gm.qcompile_recipe = recipe
    gm.qcompile_inputs = inputs
    gm.qcompile_model_class = source
    inputs.fix_dims(gm)
    gm.register_forward_pre_hook(_check_call, with_kwargs=True)
    gm.recompile()
    inputs.names = tuple(  # how the prepared forward binds positional arguments
        name for name, parameter in inspect.signature(gm.forward).parameters.items()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    )
    return gm


def prepare(
    model: nn.Module,
    recipe: str | Recipe = "int8",
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
) -> PreparedModel:
    """Return a quantization-ready copy of `model`; `model` itself is not modified.

    Args:
        model: any `nn.Module` that `torch.export` can capture (non-strict).
        recipe: a named recipe (int8, fp8, nvfp4, mxfp4, mxfp8, int4, w4a8) or a `Recipe`.
        example_inputs / example_kwargs: how `model` is called, e.g. `(input_ids,)` and
            `{"attention_mask": mask}`. The prepared model takes the same arguments.
        dynamic: let every dimension of the example tensors vary (batch, sequence length);
            False fixes the shapes as given.

    Static quantizers (the activations of int8, fp8, nvfp4, w4a8) need
    `qcompile.calibrate` before the first forward pass.

    Errors leave `model` as it was. A model in float16 or bfloat16 works as is (quantizers
    compute in float32 and return the model's dtype; their amax stays float32). A model on
    the meta device is captured without allocating weights; then
    `qmodel.to_empty(device=...)` and `qmodel.load_state_dict(float_state, strict=False)`
    (the missing keys are the quantizers' amax) give it weights.
    """
    recipe = get_recipe(recipe)
    _check_not_prepared(model)
    if not example_inputs and not example_kwargs:
        raise ValueError(
            "prepare needs an example call to capture the model: write "
            "prepare(model, recipe, example_inputs=(x,)) or example_kwargs={...}"
        )
    gm = capture(model, example_inputs, example_kwargs, dynamic=dynamic)
    inputs = InputSignature.record(
        model, tuple(example_inputs), dict(example_kwargs or {}), dynamic
    )
    sites = quantize_graph(gm, recipe, type(model).__name__)
    _warn_unmatched(recipe, sites)
    _warn_no_kv_cache(recipe, sites)
    bind_training_mode(gm)
    prepared = _as_prepared(gm, sites, recipe, inputs, type(model).__name__)
    prepared.train(model.training)
    _warn_nothing_quantized(model, sites)
    _warn_fixed_small_dims(inputs)
    return prepared


def quantize_graph(gm: fx.GraphModule, recipe: Recipe, model_name: str = "the model") -> list[Site]:
    """Put the recipe's quantizers into a captured graph (in place): canonicalize, match,
    decompose the quantized attention where the recipe quantizes its products
    (`Recipe.attention="products"`; by default query, key and value are quantized in front of
    the fused op), insert. Returns every site.

    `prepare` runs it on torch.export's graph; the `qcompile` torch.compile backend on the
    graph dynamo captured. A site whose operands cannot be quantized raises a `CaptureError`.
    """
    canonicalize(gm)
    positional_operands(gm)
    sites = assign_specs(find_sites(gm), recipe)
    problem = site_operand_problem(gm, sites)
    if problem is not None:
        raise CaptureError(f"cannot capture {model_name}: {problem}")
    kv_cache = insert_quantizers(gm, kv_cache_sites(gm, recipe))  # in front of the fused op
    if recipe.attention == "products":
        attention = _quantized_attention(sites)
        if attention:
            decompose_sdpa(gm, attention)
            sites = assign_specs(find_sites(gm), recipe)
    return insert_quantizers(gm, sites) + kv_cache


def _check_not_prepared(model: nn.Module) -> None:
    if isinstance(model, PreparedModel):
        raise ValueError("this model is prepared already; prepare the original model instead")
    quantizer = next((n for n, m in model.named_modules() if isinstance(m, Quantizer)), None)
    if quantizer is not None:
        raise ValueError(
            f"the model holds a qcompile quantizer already ({quantizer}): it is, or contains, a "
            "prepared model. Prepare the original float model instead, once."
        )


def _warn_unmatched(recipe: Recipe, sites: list[Site]) -> None:
    names = [site.name for site in sites]
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    for kind, pattern in recipe.unmatched_patterns(names):
        close = difflib.get_close_matches(pattern.strip("*"), names, n=3, cutoff=0.5)
        if close:
            hint = f" (did you mean {' or '.join(map(repr, close))}?)"
        elif "*" not in pattern:
            hint = f" (patterns match whole names: write '*{pattern}*' to match a part)"
        else:
            hint = ""
        warnings.warn(
            f"{kind} pattern {pattern!r} matches no site{hint}; the {len(names)} sites are "
            f"named like: {shown or '(none)'} (qcompile.report(qmodel) lists them all)",
            PrepareWarning,
            stacklevel=3,
        )


def _warn_no_kv_cache(recipe: Recipe, sites: list[Site]) -> None:
    if recipe.kv_cache is not None and not any(s.kind is SiteKind.KV_CACHE for s in sites):
        warnings.warn(
            f"kv_cache={recipe.kv_cache!r} found no scaled_dot_product_attention to quantize "
            "the key and value of; load a Hugging Face model with attn_implementation='sdpa'",
            PrepareWarning,
            stacklevel=3,
        )


def _warn_fixed_small_dims(inputs: InputSignature) -> None:
    fixed = inputs.fixed_small_dims()
    if fixed:
        shown = ", ".join(f"{name!r} dimension {axis} (size {size})" for name, axis, size in fixed)
        warnings.warn(
            f"the prepared model only takes the example's size in {shown}: torch.export fixes "
            "sizes 0 and 1. Prepare with an example of size 2 or more there (e.g. a batch of 2) "
            "to keep it dynamic.",
            PrepareWarning,
            stacklevel=3,
        )


def _warn_nothing_quantized(model: nn.Module, sites: list[Site]) -> None:
    if any(site.status is SiteStatus.QUANTIZED for site in sites):
        return
    if not sites:
        message = (f"found no Linear, matmul or convolution in {type(model).__name__}; "
                   "nothing is quantized")
    else:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in sites[:4])
        message = (f"none of the {len(sites)} sites of {type(model).__name__} is quantized "
                   f"({reasons}{'; ...' if len(sites) > 4 else ''})")
    warnings.warn(message, PrepareWarning, stacklevel=3)


def _quantized_attention(sites: list[Site]) -> set[str]:
    """Names of the SDPA nodes that the recipe quantizes."""
    return {site.node_name for site in sites
            if site.status is SiteStatus.QUANTIZED and site.kind is SiteKind.ATTENTION}
