"""`qcompile.prepare`: capture a model, find its sites, and put quantizers in front of them.

This module composes the passes (capture -> canonicalize -> match -> decompose attention where
quantized -> insert -> training mode; the middle four are `quantize_graph`, which the
torch.compile backend also runs) and owns the prepared model: a `torch.fx.GraphModule`
that keeps the captured call signature and output structure (tuples, dicts, HF
`ModelOutput`), follows `.train()` / `.eval()`, moves with `.to()` (device constants in the
graph included), and saves and loads every quantizer in `state_dict()`. It knows nothing of
numerics (quantizers do) or of backends.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from qcompile.passes.attention import decompose_sdpa
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.capture import capture
from qcompile.passes.devices import retarget_devices
from qcompile.passes.insert import insert_quantizers
from qcompile.passes.match import SDPA_OPS, assign_specs, find_sites, is_target
from qcompile.passes.sites import Site, SiteStatus
from qcompile.passes.train_mode import bind_training_mode
from qcompile.recipe import Recipe, get_recipe

# GraphModule.__deepcopy__ keeps only the attributes listed under this key of `meta`.
_PRESERVED = "_user_preserved_attributes"


class PreparedModel(fx.GraphModule):
    """A captured model with quantizers in front of its sites.

    Attributes:
        qcompile_sites: every site found, quantized or not (with the reason it is not).
        qcompile_recipe: the recipe it was prepared with.
    """

    qcompile_sites: list[Site]
    qcompile_recipe: Recipe

    def _apply(self, fn, recurse=True):
        before = _device(self)
        result = super()._apply(fn, recurse)
        after = _device(self)
        if before is not None and after is not None and after != before:
            retarget_devices(self, before, after)
        return result


def _device(module: nn.Module) -> torch.device | None:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return None if tensor is None else tensor.device


def _as_prepared(gm: fx.GraphModule, sites: list[Site], recipe: Recipe) -> PreparedModel:
    class GraphModuleImpl(PreparedModel):  # GraphModule installs forward on a per-instance class
        pass

    gm.__class__ = GraphModuleImpl
    # ExportedProgram.module() insists that each argument comes exactly as in the example
    # (positional or keyword); the generated forward binds them by name, so let it.
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
    preserved = gm.meta.setdefault(_PRESERVED, {})
    preserved.update(qcompile_sites=sites, qcompile_recipe=recipe)
    gm.qcompile_sites = sites
    gm.qcompile_recipe = recipe
    gm.recompile()
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
    """
    recipe = get_recipe(recipe)
    if isinstance(model, PreparedModel):
        raise ValueError("this model is prepared already; prepare the original model instead")
    if not example_inputs and not example_kwargs:
        raise ValueError(
            "prepare needs an example call to capture the model: write "
            "prepare(model, recipe, example_inputs=(x,)) or example_kwargs={...}"
        )
    gm = capture(model, example_inputs, example_kwargs, dynamic=dynamic)
    sites = quantize_graph(gm, recipe)
    bind_training_mode(gm)
    prepared = _as_prepared(gm, sites, recipe)
    prepared.train(model.training)
    return prepared


def quantize_graph(gm: fx.GraphModule, recipe: Recipe) -> list[Site]:
    """Put the recipe's quantizers into a captured graph (in place): canonicalize, match,
    decompose the attention whose products are quantized, insert. Returns every site.

    `prepare` runs it on torch.export's graph; the `qcompile` torch.compile backend on the
    graph dynamo captured.
    """
    canonicalize(gm)
    sites = assign_specs(find_sites(gm), recipe)
    attention = _quantized_attention(gm, sites)
    if attention:
        decompose_sdpa(gm, attention)
        sites = assign_specs(find_sites(gm), recipe)
    return insert_quantizers(gm, sites)


def _quantized_attention(gm: fx.GraphModule, sites: list[Site]) -> set[str]:
    """Names of the SDPA nodes of which the recipe quantizes a product."""
    targets = {node.name: node.target for node in gm.graph.nodes}
    return {
        site.node_name for site in sites
        if site.status is SiteStatus.QUANTIZED and is_target(targets[site.node_name], SDPA_OPS)
    }
