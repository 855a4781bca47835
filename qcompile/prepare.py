"""`qcompile.prepare`: capture a model, find its sites, and put quantizers in front of them.

This module composes the passes (capture -> canonicalize -> match -> decompose attention where
its products are quantized -> insert -> training mode; the middle four are `quantize_graph`, which the
torch.compile backend also runs) and owns the prepared model: a `torch.fx.GraphModule`
that keeps the captured call signature and output structure (tuples, dicts, HF
`ModelOutput`), follows `.train()` / `.eval()`, moves with `.to()` (device constants in the
graph included), and saves and loads every quantizer in `state_dict()`.

Block-wise (`blocks=`), it prepares each repeated block as its own `PreparedBlock` graph and
puts it back in place in a copy of the model: the result is the user's own class, its code
outside the blocks untouched. A `PreparedBlock` runs one captured graph per call structure
(captured and compiled once per block class, and run by each block with its own weights and
quantizers; a new structure, such as the decode steps of a KV cache, is captured when first
met, once for the class) and feeds a Hugging Face KV cache (`qcompile.blocks`); `one_graph`
gives a block-wise model as one graph for what traces the whole model (ONNX export). It
knows nothing of numerics (quantizers do) or of backends.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import itertools
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from qcompile.blocks import (
    BlockError,
    CacheSlot,
    TensorCache,
    cache_slot,
    call_key,
    find_blocks,
    layer_index,
    put_cache,
    read_past,
    record_calls,
    take_cache,
)
from qcompile.core.quantizer import Quantizer
from qcompile.input_check import InputSignature
from qcompile.passes.attention import decompose_sdpa, positional_operands, scale_query
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.capture import (
    CacheOutputError,
    CaptureError,
    capture,
    site_operand_problem,
)
from qcompile.passes.devices import retarget_devices
from qcompile.passes.insert import insert_quantizers
from qcompile.passes.kv_cache import kv_cache_sites
from qcompile.passes.match import assign_specs, find_sites
from qcompile.passes.sites import Site, SiteKind, SiteStatus, model_sites, weight_coverage
from qcompile.passes.train_mode import bind_training_mode
from qcompile.recipe import ROUTER_REASON, Recipe, get_recipe
from qcompile.training.checkpoint import check_state_dict

# GraphModule.__deepcopy__ keeps only the attributes listed under this key of `meta`.
_PRESERVED = "_user_preserved_attributes"


class PrepareWarning(UserWarning):
    """`prepare` worked, but not quite as asked: a recipe pattern matches no site, no site is
    quantized, more than `FLOAT_WEIGHT_LIMIT` of the matmul weights stay float (output heads
    and MoE routers aside), or an example size of 0 or 1 was fixed in the graph."""


#: The share of matmul weight elements (output heads and routers aside) that may stay float
#: without a warning.
FLOAT_WEIGHT_LIMIT = 0.02


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
    gm: fx.GraphModule, sites: list[Site], recipe: Recipe, inputs: InputSignature, source: str,
    base: type[PreparedModel] = PreparedModel, compiled: bool = False,
) -> PreparedModel:
    """Make `gm` a prepared model (of a per-instance subclass of `base`, as GraphModule
    installs forward per instance) with its attributes; `compiled`: `gm` is one already and
    runs the code its class inherits (a block sharing another's code)."""
    if not compiled:
        class GraphModuleImpl(base):  # GraphModule installs forward on a per-instance class
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
    if base is PreparedModel:
        inputs.fix_dims(gm)
    gm.register_forward_pre_hook(_check_call, with_kwargs=True)
    if not compiled:
        gm.recompile()
    if base is PreparedModel:
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
    blocks: str | Iterable[str] | None = "auto",
) -> nn.Module:
    """Return a quantization-ready copy of `model`; `model` itself is not modified.

    Args:
        model: any `nn.Module` that `torch.export` can capture (non-strict).
        recipe: a named recipe (int8, fp8, nvfp4, mxfp4, mxfp8, int4, w4a8) or a `Recipe`.
        example_inputs / example_kwargs: how `model` is called, e.g. `(input_ids,)` and
            `{"attention_mask": mask}`. The prepared model takes the same arguments.
        dynamic: let every dimension of the example tensors vary (batch, sequence length);
            False fixes the shapes as given.
        blocks: which modules to prepare one by one. None: the whole model is one graph
            (a `PreparedModel`). Glob patterns on module paths ("model.layers.*"): each
            matching module is captured as its own graph and put back in place in a copy of
            `model`, which stays an instance of its class (Hugging Face `generate` with its KV
            cache, `save_pretrained`, FSDP per block and activation checkpointing work on it);
            its sites are named by their full path (`model.layers.3.mlp.down_proj`), and the
            Linear layers outside the blocks stay float (listed in a `PrepareWarning`).
            "auto" (default): block-wise for models whose repeated blocks (the longest
            `ModuleList` of one class holding matmul weights: Linear, GPT-2's Conv1D,
            experts) receive a KV cache object in the example call, by keyword or position
            (Hugging Face decoders called with `use_cache` at its default), the whole model
            as one graph otherwise.

    Static quantizers (the activations of int8, fp8, nvfp4, w4a8) need
    `qcompile.calibrate` before the first forward pass.

    Errors leave `model` as it was. A model in float16 or bfloat16 works as is (quantizers
    compute in float32 and return the model's dtype; their amax stays float32). A model on
    the meta device is captured without allocating weights; then
    `qmodel.to_empty(device=...)` and `qmodel.load_state_dict(float_state, strict=False)`
    (the missing keys are the quantizers' amax) give it weights. Non-persistent buffers
    (RoPE's `inv_freq`) are in no state dict: after `to_empty` they need their values again
    (a Hugging Face model prepared block by block: `qmodel.initialize_weights()` before
    `load_state_dict`); a `PrepareWarning` names them.
    """
    recipe = get_recipe(recipe)
    _check_not_prepared(model)
    _warn_meta_buffers(model)
    if not example_inputs and not example_kwargs:
        raise ValueError(
            "prepare needs an example call to capture the model: write "
            "prepare(model, recipe, example_inputs=(x,)) or example_kwargs={...}"
        )
    if blocks is not None:
        blockwise = _prepare_blockwise(model, recipe, tuple(example_inputs),
                                       dict(example_kwargs or {}), dynamic, blocks)
        if blockwise is not None:
            return blockwise
    try:
        gm = capture(model, example_inputs, example_kwargs, dynamic=dynamic)
    except CacheOutputError as error:
        found = _blocks_with_cache(model, tuple(example_inputs), dict(example_kwargs or {}))
        if blocks is None and found:
            raise CacheOutputError(
                f"{error} Or leave blocks at 'auto' (the default): it prepares {found} block "
                "by block and keeps the cache."
            ) from error
        raise
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
    _warn_float_weights(sites)
    _warn_fixed_small_dims(inputs)
    return prepared


def quantize_graph(
    gm: fx.GraphModule, recipe: Recipe, model_name: str = "the model", prefix: str = ""
) -> list[Site]:
    """Put the recipe's quantizers into a captured graph (in place): canonicalize, match,
    decompose the quantized attention where the recipe quantizes its products
    (`Recipe.attention="products"`; by default query, key and value are quantized in front of
    the fused op, the attention scale moved onto the query first), insert. Returns every site.

    `prepare` runs it on torch.export's graph; the `qcompile` torch.compile backend on the
    graph dynamo captured. A site whose operands cannot be quantized raises a `CaptureError`.
    `prefix` is the graph's module path in the model (a block's): the recipe's patterns are
    matched against `prefix.site`, the returned sites are named relative to the graph.
    """
    canonicalize(gm)
    positional_operands(gm)
    sites = _assign(find_sites(gm), recipe, prefix)
    problem = site_operand_problem(gm, sites)
    if problem is not None:
        raise CaptureError(f"cannot capture {model_name}: {problem}")
    kv_cache = insert_quantizers(gm, kv_cache_sites(gm, recipe))  # in front of the fused op
    attention = _quantized_attention(sites)
    if attention and recipe.attention == "products":
        decompose_sdpa(gm, attention)
        sites = _assign(find_sites(gm), recipe, prefix)
    elif attention:  # "qkv": the query quantizer sees q * scale, as TensorRT quantizes it
        scale_query(gm, attention)
    return insert_quantizers(gm, sites) + kv_cache


def _assign(sites: list[Site], recipe: Recipe, prefix: str) -> list[Site]:
    """`assign_specs` on the full names (`prefix.site`); the sites keep their own names."""
    if not prefix:
        return assign_specs(sites, recipe)
    full = assign_specs([replace(s, name=f"{prefix}.{s.name}") for s in sites], recipe)
    return [replace(f, name=s.name) for s, f in zip(sites, full)]


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


def _warn_float_weights(sites: list[Site]) -> None:
    """Warn where more than `FLOAT_WEIGHT_LIMIT` of the matmul weight elements stay float for
    other reasons than the defaults (output heads, MoE routers), naming the weights."""
    coverage = weight_coverage(sites)
    chosen = [(name, size, reason) for name, size, reason in coverage.floating
              if not reason.startswith(("output head", ROUTER_REASON))]
    left = sum(size for _, size, _ in chosen)
    if not coverage.total or left <= FLOAT_WEIGHT_LIMIT * coverage.total or not any(
        s.status is SiteStatus.QUANTIZED for s in sites
    ):
        return
    chosen.sort(key=lambda item: -item[1])
    shown = "; ".join(f"{name} ({size:,}): {reason}" for name, size, reason in chosen[:6])
    warnings.warn(
        f"{100 * left / coverage.total:.1f}% of the matmul weight elements stay float "
        f"({len(chosen)} weights; {coverage.describe()}): {shown}"
        f"{'; ...' if len(chosen) > 6 else ''}. qcompile.report(qmodel) lists them all.",
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


def _warn_meta_buffers(model: nn.Module) -> None:
    """Warn where non-persistent buffers are on the meta device: no state dict restores them,
    so after `to_empty` they would hold uninitialised memory (silently wrong numbers)."""
    names = [f"{path}.{name}" if path else name
             for path, module in model.named_modules()
             for name in module._non_persistent_buffers_set
             if module._buffers.get(name) is not None and module._buffers[name].is_meta]
    if names:
        warnings.warn(
            f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}: non-persistent "
            f"buffer{'s' if len(names) > 1 else ''} on the meta device, which no state dict "
            "holds: after qmodel.to_empty(...) give them their values before use (a Hugging "
            "Face model prepared block by block: qmodel.initialize_weights() after to_empty, "
            "then load_state_dict; or load them with the weights) or their uninitialised "
            "memory gives wrong outputs", PrepareWarning, stacklevel=3)


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


# ---------------------------------------------------------------------------------------------
# Block-wise prepare

#: A block called with more structures than this is refused (each needs its own graph).
_MAX_VARIANTS = 8
#: Numbers the attributes of graphs captured in use (unique in the process).
_VARIANT_IDS = itertools.count()
#: On the holder class of a block class's code (and, while a block is made, on its graph).
_SHARED_CODE = "qcompile_shared_code"
#: Set on a block that runs its holder class's graph, not yet a copy of its own.
_GRAPH_SHARED = "_qcompile_graph_shared"


@dataclass
class _Variant:
    """One captured graph of a block, for one call structure (`qcompile.blocks.call_key`).
    `forward` None: the block's own graph; else generated code run against the block, which
    reads the block's weights and quantizers and `extras` (constants and training switches,
    installed on each block of the class that runs it: `PreparedBlock._install`)."""

    out_spec: Any
    forward: Callable | None = None
    graph: fx.Graph | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __deepcopy__(self, memo):  # never changed once made; copies drop captured ones
        return self


@dataclass
class BlockInfo:
    """What a `PreparedBlock` needs besides its graph: its path in the model, the KV-cache
    layer it reads, the float block on the meta device (to capture a new call structure), the
    recipe, and its graphs by call structure (one dict shared by the blocks of a class that
    share their graph: a structure met in use is captured once for all of them), and those
    whose extras this block holds."""

    path: str
    layer_idx: int
    template: nn.Module
    recipe: Recipe
    dynamic: bool
    variants: dict[tuple, _Variant] = field(default_factory=dict)
    installed: set[tuple] = field(default_factory=set)


class PreparedBlock(PreparedModel):
    """One block of a block-wise prepared model, in the block's place.

    It takes the block's own call (`block(hidden_states, attention_mask=..., cache=...)`):
    a Hugging Face KV cache passed to it is read (this layer's past keys/values go into the
    graph as tensors) and updated with the keys/values the graph computed. Each call structure
    (argument structure, constants, sizes 0 and 1, a past or none) runs its own graph; the
    first one met in use is captured then from the float block's structure (on the meta
    device), with the block's parameters and quantizers. `qcompile_sites` are relative to the
    block; `qcompile.passes.sites.model_sites(model)` names them from the model's root."""

    qcompile_block: BlockInfo

    @property
    def graph(self) -> fx.Graph:
        """The block's graph; one shared with the other blocks of its class is copied first,
        so that a pass changing it changes this block alone."""
        if self.__dict__.pop(_GRAPH_SHARED, False):
            self._graph = _copy_graph(self._graph)
            self._graph.owning_module = self
        return self._graph

    @graph.setter
    def graph(self, graph: fx.Graph) -> None:
        self.__dict__.pop(_GRAPH_SHARED, None)
        fx.GraphModule.graph.fset(self, graph)

    def recompile(self):
        code = self._graph.__dict__.pop(_SHARED_CODE, None)
        if code is not None:  # a node-for-node copy of the graph whose code cls inherits
            self._code, self._lineno_map, self._prologue_start = code
            return None
        result = super().recompile()
        cls = type(self)  # GraphModule just installed the graph's code as cls.forward
        generated = cls.__dict__.get("forward")
        if generated is not None and generated is not PreparedBlock.forward:
            cls.graph_forward = generated
            cls.forward = PreparedBlock.forward
        return result

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)
        _drop_captured(copied.qcompile_block)
        return copied

    def _apply(self, fn, recurse=True):
        before = _device(self)
        result = super()._apply(fn, recurse)
        if _device(self) != before:  # graphs captured in use hold the old device
            _drop_captured(self.qcompile_block)
        return result

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        info = self.qcompile_block
        slot = cache_slot(args, kwargs)
        args, kwargs, cache = take_cache(args, kwargs, slot)
        past = None if cache is None else read_past(cache, info.layer_idx)
        key = (slot, call_key(args, kwargs, past))
        variant = info.variants.get(key)
        if variant is None:
            if torch.compiler.is_compiling():
                raise BlockError(
                    f"block {info.path} has no graph for this call structure yet, and none can "
                    "be captured while torch.export / torch.compile trace the model: call the "
                    "model once eagerly with the same arguments (e.g. use_cache=False) first"
                )
            variant = self._capture_variant(key, args, kwargs, past, slot)
        elif variant.forward is not None and key not in info.installed:
            self._install(key, variant)
        run = variant.forward or type(self).graph_forward
        flat = run(self, *pytree.tree_leaves((args, kwargs, past)))
        output, new = pytree.tree_unflatten(list(flat), variant.out_spec)
        if new is not None:
            cache.update(new[0], new[1], info.layer_idx)
        return output

    def _capture_variant(
        self, key: tuple, args: tuple, kwargs: dict, past: tuple | None, slot: CacheSlot | None
    ) -> _Variant:
        info = self.qcompile_block
        if len(info.variants) >= _MAX_VARIANTS:
            raise BlockError(
                f"block {info.path} was called with {len(info.variants)} different argument "
                "structures (constants, None or not, sizes 0 and 1); each needs its own graph. "
                "Call it consistently, or prepare with blocks=None"
            )
        structure = _float_block(info.template, self)
        call = (args, kwargs, past)
        if structure is None:  # the block's weights are not all here (or on meta): no values
            structure = info.template
            call = pytree.tree_map(
                lambda x: torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor)
                else x, call)
        # own saved-tensor hooks: an activation checkpoint's must not count the capture's
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            gm, out_spec = _capture_block(structure, *call, slot, info.dynamic)
        sites = quantize_graph(gm, info.recipe, type(info.template).__name__, info.path)
        bind_training_mode(gm)
        if structure is info.template:
            retarget_devices(gm, torch.device("meta"), _device(self) or torch.device("cpu"))
        mine = {(s.name, r): p for s in self.qcompile_sites for r, p in s.quantizers.items()}
        theirs = {(s.name, r): p for s in sites for r, p in s.quantizers.items()}
        if mine != theirs:
            differ = sorted(set(mine) ^ set(theirs))[:4]
            raise BlockError(
                f"block {info.path} called this way has other quantized sites than as prepared "
                f"(differing: {differ}); prepare it with an example call like this one"
            )
        weights = {n for n, _ in info.template.named_parameters()}
        weights |= {n for n, _ in info.template.named_buffers()}
        index = next(_VARIANT_IDS)
        extras: dict[str, Any] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in theirs.values():
                continue  # the block's own quantizer of that site and role
            if node.op == "get_attr" and node.target in weights:
                continue
            if node.op not in ("call_module", "get_attr"):
                continue
            value = _attribute(gm, node.target)
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                raise BlockError(
                    f"block {info.path}: a new call structure needs the tensor constant "
                    f"{node.target} that the block creates in forward, which cannot be "
                    "captured without weights; prepare with an example call like this one"
                )
            name = f"qcompile_variant{index}_{node.target.replace('.', '_')}"
            extras[name] = value
            node.target = name
        code = gm.graph.python_code("self")
        namespace = dict(code.globals)
        source = compile(code.src, f"<qcompile {type(info.template).__name__} variant {index}>",
                         "exec")
        exec(source, namespace)  # noqa: S102 - FX's own generated code, as GraphModule does
        gm.graph.owning_module = None  # the capture's module holds this block's weights
        variant = _Variant(out_spec, namespace["forward"], gm.graph, extras)
        self._install(key, variant)
        info.variants[key] = variant
        return variant

    def _install(self, key: tuple, variant: _Variant) -> None:
        """Give this block its own copies of what `variant`'s code reads besides the block's
        weights and quantizers: training switches (in this block's mode), constants."""
        info = self.qcompile_block
        if torch.compiler.is_compiling():
            raise BlockError(
                f"block {info.path} has not run this call structure yet, which it must once "
                "before torch.export / torch.compile trace it: call the model once eagerly "
                "with the same arguments first"
            )
        device = _device(self) or torch.device("cpu")
        for name, value in variant.extras.items():
            if isinstance(value, nn.Module):
                self.add_module(name, copy.deepcopy(value).to(device).train(self.training))
            elif isinstance(value, torch.Tensor):
                self.register_buffer(name, value.to(device), persistent=False)
            else:
                setattr(self, name, value)
        info.installed.add(key)


def _float_block(template: nn.Module, block: nn.Module) -> nn.Module | None:
    """The float block `template` (on the meta device) with `block`'s own parameters and
    buffers, shared (not copied); None where `block` lacks one of them, holds it on the meta
    device or sharded. Captured with real tensors, the constants a block makes in forward (Falcon's
    index tensors) get their values."""
    own = dict(block.named_parameters())
    own.update(block.named_buffers())
    memo: dict[int, Any] = {}
    for name, tensor in [*template.named_parameters(), *template.named_buffers()]:
        real = own.get(name)
        if real is None or real.is_meta or type(real) not in (torch.Tensor, nn.Parameter):
            return None  # a sharded (DTensor) parameter is no whole weight to capture with
        memo[id(tensor)] = real
    return copy.deepcopy(template, memo)


def _drop_captured(info: BlockInfo) -> None:
    """Keep only the variants that run the block's own graph (a copied or moved block
    captures the others again, for itself)."""
    info.variants = {key: v for key, v in info.variants.items() if v.forward is None}
    info.installed = set()


def _attribute(module: nn.Module, target: str) -> Any:
    owner, _, leaf = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _block_call(self: nn.Module, args: tuple, kwargs: dict, past: tuple | None) -> tuple:
    """The forward that a block is captured with: its own call, with a `TensorCache` holding
    `past` in place of the KV cache; returns (output, the new keys and values or None)."""
    slot = self.qcompile_cache_slot
    if slot is None:
        return type(self).forward(self, *args, **kwargs), None
    cache = TensorCache(past)
    args, kwargs = put_cache(args, kwargs, slot, cache)
    output = type(self).forward(self, *args, **kwargs)
    return output, cache.new


def _capture_block(
    block: nn.Module, args: tuple, kwargs: dict, past: tuple | None, slot: CacheSlot | None,
    dynamic: bool,
) -> tuple[fx.GraphModule, Any]:
    """Capture `block` (its tensors shared, not copied) called with (args, kwargs) and the
    cache replaced by a `TensorCache`; returns the graph module, taking the flat leaves of
    (args, kwargs, past) positionally, and the structure of its (output, new k/v)."""
    block.qcompile_cache_slot = slot
    block.forward = types.MethodType(_block_call, block)
    try:
        gm = capture(block, (args, kwargs, past), {}, dynamic=dynamic, share_tensors=True)
    finally:
        del block.forward, block.qcompile_cache_slot
    codegen = gm.graph._codegen
    out_spec = codegen.pytree_info.out_spec
    gm.graph._codegen = fx.graph.CodeGen()
    gm.recompile()
    return gm, out_spec


def _graph_for(
    block: nn.Module, template: fx.GraphModule, copy_modules: bool = False
) -> fx.GraphModule:
    """A copy of `template`'s graph reading `block`'s parameters and buffers; the rest
    (constants the graph made, and with `copy_modules` copies of its quantizers and
    training switches) comes from `template`. A `template` whose class shares its code
    (`_share_code`) gives a module of that class, which runs the code without compiling it."""
    shared = next((c for c in type(template).__mro__ if _SHARED_CODE in c.__dict__), None)
    if shared is None:
        graph = _copy_graph(template.graph)
    else:  # the class's graph, copied when first asked for (`PreparedBlock.graph`)
        graph = shared.qcompile_graph
        setattr(graph, _SHARED_CODE, shared.__dict__[_SHARED_CODE])
    own = {n for n, _ in block.named_parameters()} | {n for n, _ in block.named_buffers()}
    root = nn.Module()
    constants = []  # tensors the graph made (Falcon's index tensors), not the block's state
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            value = _attribute(block if node.target in own else template, node.target)
            owner = node.target.rpartition(".")[0]
            if node.op == "get_attr" and node.target not in own and not isinstance(
                    template.get_submodule(owner) if owner else template, Quantizer):
                constants.append(node.target)
            if copy_modules and isinstance(value, Quantizer) and not value.calibrated:
                value = Quantizer(value.spec).to(value.amax.device)  # fresh: cheaper than a copy
            elif copy_modules and isinstance(value, nn.Module):
                value = copy.deepcopy(value)
            _put(root, node.target, value)
    gm = (shared or fx.GraphModule)(root, graph)
    if shared is not None:
        graph.owning_module = None  # the class's, no block's
        gm.__dict__[_GRAPH_SHARED] = True
    # GraphModule registers every buffer as persistent: keep the block's own non-persistent
    # ones so, and the constants out of state_dict
    for name in [*(n for n, _ in block.named_buffers() if _is_non_persistent(block, n)),
                 *constants]:
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if leaf in module._buffers:
            module._non_persistent_buffers_set.add(leaf)
    return gm


def _share_code(block: PreparedBlock) -> None:
    """Let the blocks made from `block` (`_graph_for`) run its graph and the code it was
    compiled to: its class becomes their holder, owned by no instance. A block gets its own
    copy of the graph when first asked for it, and its own class when it recompiles (after
    its graph changed), so nothing it does reaches the others."""
    code = (block._code, block._lineno_map, block._prologue_start)
    # nn.Module's call: GraphModule's call wrapper calls the next class's, which would be
    # this one's again for a block that recompiled into its own class
    holder = type("PreparedBlockCode", (type(block),), {
        _SHARED_CODE: code, "qcompile_graph": block._graph, "__call__": nn.Module.__call__})
    block.__class__ = type("GraphModuleImpl", (holder,), {})
    block._graph.owning_module = None
    block.__dict__[_GRAPH_SHARED] = True


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A node-for-node copy of `graph` (names kept: it generates the same code)."""
    copied = fx.Graph()
    copied.output(copied.graph_copy(graph, {}))
    copied._codegen = copy.deepcopy(graph._codegen)
    return copied


def _same_specs(sites: list[Site], path: str, other: str, recipe: Recipe) -> bool:
    """Whether the recipe gives the sites of the block at `other` what it gave `path`'s
    (its exclude and override patterns may name blocks)."""
    raw = [replace(s, status=SiteStatus.QUANTIZED, reason="", specs={}, quantizers={})
           for s in sites]
    mine, theirs = _assign(raw, recipe, path), _assign(raw, recipe, other)
    return all((a.status, a.specs, a.reason) == (b.status, b.specs, b.reason)
               for a, b in zip(mine, theirs))


def _is_non_persistent(block: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in (block.get_submodule(owner) if owner else block)._non_persistent_buffers_set


def _put(root: nn.Module, target: str, value: Any) -> None:
    *owners, leaf = target.split(".")
    module = root
    for owner in owners:
        if not hasattr(module, owner):
            module.add_module(owner, nn.Module())
        module = getattr(module, owner)
    if isinstance(value, nn.Parameter):
        module.register_parameter(leaf, value)
    elif isinstance(value, nn.Module):
        module.add_module(leaf, value)
    elif isinstance(value, torch.Tensor):
        module.register_buffer(leaf, value)
    else:
        setattr(module, leaf, value)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are on the meta device."""
    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (nn.Parameter(meta, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else meta)
    return copy.deepcopy(module, memo)


def _check_loaded(module, state_dict, prefix, *_: Any) -> None:
    """Load-state-dict pre-hook of a block-wise prepared model: refuse a state dict saved with
    other quantizer specs or holding other shapes before anything is loaded (torch itself
    then reports missing and unexpected keys, as `strict` asks)."""
    if not prefix:
        check_state_dict(module, state_dict, strict=False)


def _prepare_blockwise(
    model: nn.Module, recipe: Recipe, args: tuple, kwargs: dict, dynamic: bool,
    blocks: str | Iterable[str],
) -> nn.Module | None:
    """`prepare` block by block, or None where "auto" keeps the model one graph."""
    paths = find_blocks(model, blocks)
    if not paths:
        return None
    try:
        calls = record_calls(model, paths, args, kwargs)
    except Exception:  # "auto" leaves explaining a failing call to capture
        if blocks == "auto":
            return None
        raise
    if blocks == "auto" and all(cache_slot(a, kw) is None for a, kw, _ in calls.values()):
        return None
    root = copy.deepcopy(model)
    captured: dict[tuple, tuple[fx.GraphModule, Any]] = {}
    quantized: dict[tuple, tuple[str, PreparedBlock, nn.Module]] = {}
    for path in paths:
        block = root.get_submodule(path)
        block_args, block_kwargs, past = calls[path]
        slot = cache_slot(block_args, block_kwargs)
        graph_args, graph_kwargs, _ = take_cache(block_args, block_kwargs, slot)
        key = (slot, call_key(graph_args, graph_kwargs, past))
        if (type(block), key) not in captured:
            captured[type(block), key] = _capture_block(
                block, graph_args, graph_kwargs, past, slot, dynamic)
        template, out_spec = captured[type(block), key]
        first = quantized.get((type(block), key))
        if first is not None and _same_specs(first[1].qcompile_sites, first[0], path, recipe):
            # the graph of the first such block, with this block's weights and own quantizers
            gm, sites, meta = _graph_for(block, first[1], copy_modules=True), \
                first[1].qcompile_sites, first[2]
        else:
            gm = _graph_for(block, template)
            sites = quantize_graph(gm, recipe, type(block).__name__, path)
            bind_training_mode(gm)
            meta = _meta_copy(block)
        # the cache is no input the signature checks (a positional one keeps its place)
        kept = slot if isinstance(slot, int) else None
        inputs = InputSignature.record(block, *put_cache(graph_args, graph_kwargs, kept, None),
                                       dynamic)
        inputs.check_constants = False
        inputs.names = tuple(
            n for n, p in inspect.signature(block.forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        shares = isinstance(gm, PreparedBlock)  # the first such block's graph and code
        prepared = _as_prepared(gm, sites, recipe, inputs, type(block).__name__, PreparedBlock,
                                compiled=shares)
        if first is None:
            _share_code(prepared)
        # graphs captured in use: once for all the blocks that share a graph
        variants = first[1].qcompile_block.variants if shares else {key: _Variant(out_spec)}
        info = BlockInfo(path, layer_index(block, path), meta, recipe, dynamic, variants)
        prepared.meta[_PRESERVED]["qcompile_block"] = info
        prepared.qcompile_block = info
        prepared.train(block.training)
        quantized.setdefault((type(block), key), (path, prepared, meta))
        owner, _, leaf = path.rpartition(".")
        (root.get_submodule(owner) if owner else root).add_module(leaf, prepared)
    root.qcompile_recipe = recipe
    root.qcompile_model_class = type(model).__name__
    root.qcompile_inputs = InputSignature.record(model, args, kwargs, dynamic)
    root.qcompile_blocks = paths
    root.qcompile_outside = _outside_sites(root, paths, recipe)
    root.register_load_state_dict_pre_hook(_check_loaded)
    sites = model_sites(root)
    _warn_unmatched(recipe, sites)
    _warn_float_outside(root.qcompile_outside)
    _warn_nothing_quantized(model, sites)
    return root


def one_graph(
    model: nn.Module, example_inputs: tuple = (), example_kwargs: dict[str, Any] | None = None
) -> tuple[PreparedModel, tuple, dict[str, Any]]:
    """A block-wise prepared `model` as one graph, for what must trace the whole model
    (`qcompile.export_onnx` calls it): the model's float structure with the blocks' own
    tensors (shared, not copied) prepared with `blocks=None` and the model's recipe, loaded
    with its quantizer state. Returns it and the call to trace it with: the example call, with
    `use_cache=False` added where the forward takes `use_cache` (one graph carries no cache).
    The two compute the same numbers (`tests/test_blocks.py`); the graph's quantizers are its
    own, named as the model's.
    """
    paths = getattr(model, "qcompile_blocks", None)
    if not paths:
        raise ValueError(f"{type(model).__name__} is not prepared block by block")
    memo: dict[int, Any] = {}
    for path in paths:
        block = model.get_submodule(path)
        float_block = _float_block(block.qcompile_block.template, block)
        if float_block is None:
            raise BlockError(
                f"block {path} cannot be rebuilt as a float block with its own weights (they "
                "are on the meta device or sharded, or the float block holds tensors its graph "
                "does not use): give the model its weights (to_empty + load_state_dict; gather "
                "FSDP shards) before tracing it as one graph, or prepare it with blocks=None"
            )
        memo[id(block)] = float_block
    for tensor in [*model.parameters(), *model.buffers()]:  # the rest shared too
        memo.setdefault(id(tensor), tensor)
    float_model = copy.deepcopy(model, memo)
    for name in ("qcompile_recipe", "qcompile_model_class", "qcompile_inputs",
                 "qcompile_blocks", "qcompile_outside"):
        float_model.__dict__.pop(name, None)
    float_model._load_state_dict_pre_hooks.clear()
    kwargs = dict(example_kwargs or {})
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    with warnings.catch_warnings():  # prepare's warnings were given when `model` was prepared
        warnings.simplefilter("ignore", PrepareWarning)
        whole = prepare(float_model, model.qcompile_recipe, tuple(example_inputs), kwargs,
                        dynamic=model.qcompile_inputs.dynamic, blocks=None)
    whole.load_state_dict(model.state_dict())
    whole.train(model.training)
    return whole, tuple(example_inputs), kwargs


def _blocks_with_cache(model: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """The glob of the blocks that `blocks="auto"` prepares one by one with their KV cache
    (e.g. 'transformer.h.*'), or None where it would not."""
    paths = find_blocks(model, "auto")
    try:
        calls = record_calls(model, paths, args, kwargs) if paths else {}
    except Exception:  # noqa: BLE001 - then "auto" does not prepare block-wise either
        return None
    if all(cache_slot(a, kw) is None for a, kw, _ in calls.values()):
        return None
    return f"'{paths[0].rpartition('.')[0]}.*'" if "." in paths[0] else "'*'"


#: Why a Linear outside the blocks is float, where the recipe would quantize it.
OUTSIDE_BLOCKS = "outside the prepared blocks (prepare with blocks=None to quantize it)"


def _outside_sites(root: nn.Module, paths: list[str], recipe: Recipe) -> list[Site]:
    """The Linear layers outside the blocks, as float sites: the recipe's reason (output
    head, excluded) where it leaves them float, else `OUTSIDE_BLOCKS`."""
    names = [
        name for name, module in root.named_modules()
        if isinstance(module, nn.Linear) and not any(name.startswith(f"{p}.") for p in paths)
    ]
    sites = assign_specs([Site(name, SiteKind.LINEAR, "") for name in names], recipe)
    return [
        replace(site, specs={}, status=SiteStatus.EXCLUDED, reason=OUTSIDE_BLOCKS)
        if site.status is SiteStatus.QUANTIZED else site
        for site in sites
    ]


def _warn_float_outside(sites: list[Site]) -> None:
    left = [site.name for site in sites if site.reason == OUTSIDE_BLOCKS]
    if left:
        warnings.warn(
            f"Linear layers outside the prepared blocks stay float: {', '.join(left[:6])}"
            f"{', ...' if len(left) > 6 else ''}; prepare with blocks=None to quantize them too",
            PrepareWarning,
            stacklevel=3,
        )
