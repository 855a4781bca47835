"""The `qcompile` torch.compile backend: inductor, with our fake-quant ops decomposed.

Inductor treats a custom op as an opaque call: one extra pass over memory that cannot fuse with
the element-wise kernels beside it. This backend hands inductor a decomposition of each
`qcompile` op into the aten reference of `qcompile.core.numerics` (the same code that defines the
numbers), so forward and backward fuse into their neighbours. On CPU the straight-through
backward is written so that no bool mask is saved between forward and backward (see
`_ste_backward`). Scales stay tensors, so changing them never recompiles. Compiling a prepared
model needs nothing from `prepare`; only the `recipe` option below runs prepare's graph passes
on the graph dynamo captured.

Registered through the `torch_dynamo_backends` entry point: `torch.compile(m, backend="qcompile")`
works after installation, without importing qcompile.

Options (`torch.compile(m, backend="qcompile", options={...})`):

- `recipe`: a recipe name or `qcompile.Recipe`. The model is *not* prepared: the backend runs
  prepare's graph passes (`qcompile.prepare.quantize_graph`) on the graph dynamo captured, so
  the compiled model simulates the recipe's quantization (PTQ inference, or QAT with the
  model's own parameters). There is no calibration here: every range is dynamic
  (`Recipe.with_dynamic_ranges`). Weights are quantized with their own amax at each call, as
  the named recipes do anyway; the ranges a recipe would calibrate (int8, fp8, nvfp4's global
  amax, w4a8's activations) are taken from each activation tensor as it arrives, the range
  a max calibration on that very batch would give. The result equals
  `qcompile.prepare(model, recipe.with_dynamic_ranges())` run eagerly. A recipe that learns
  its ranges (`learn_scales=True`) is refused, and so is a model that holds qcompile
  quantizers already. For calibrated static ranges: `qcompile.prepare`, `qcompile.calibrate`,
  then compile the prepared model without this option.
- `lowering`: `"decompose"` (default) hands inductor the aten decomposition of each op;
  `"kernel"` keeps each op an opaque call into its kernel (`qcompile.core.kernels`), for comparison.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from qcompile.core import numerics
from qcompile.core.fake_quant import fake_quantize
from qcompile.core.formats import get_format
from qcompile.core.kernels.cpu import REFERENCES
from qcompile.core.ops import block_or_none
from qcompile.core.quantizer import Quantizer

LOWERINGS = ("decompose", "kernel")

#: option -> what it takes, as the error for an unknown option lists them.
OPTIONS = {
    "recipe": "a recipe name (int8, fp8, ...) or a qcompile.Recipe: quantize an unprepared "
              "model, every range dynamic",
    "lowering": f"one of {', '.join(LOWERINGS)} (default decompose)",
}


def _decomposition(kind: str) -> Callable[..., Any]:
    reference = REFERENCES[kind]

    def decomposed(*args):  # (*tensors, amax, format, block_size), as the op takes them
        *tensors, format, block_size = args
        return reference(*tensors, get_format(format), block_or_none(block_size))

    return decomposed


def _ste_backward(grad, x, amax, format, block_size):
    """The straight-through backward as inductor gets it.

    The partitioner saves for the backward the smallest tensor that the STE mask can be
    recomputed from. Where the mask is written with comparisons that is a bool tensor, and
    inductor's C++ backend (torch 2.13) stores bool tensors about 15 times slower than float
    ones: on a 4-layer GPT it made the int8 and fp8 QAT steps 1.26x and 1.40x of float instead
    of 1.08x. On CPU the gradient is therefore `grad * ste_keep(x)`: the mask as uint8, which
    inductor stores faster than a float (and a quarter of its memory); it equals the reference
    wherever grad is finite (an inf or NaN gradient stays NaN where the reference gives 0).
    Other devices keep the reference's bool mask, also one byte per element.
    """
    fmt, block = get_format(format), block_or_none(block_size)
    if x.device.type != "cpu":
        return numerics.fake_quantize_backward(grad, x, amax, fmt, block)
    return grad * numerics.ste_keep(x, amax, fmt, block).to(grad.dtype)


def decompositions() -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """The aten decompositions of every qcompile op, keyed by op overload."""
    ops = torch.ops.qcompile
    return {
        ops.fake_quantize.default: _decomposition("forward"),
        ops.fake_quantize_backward.default: _ste_backward,
        ops.fake_quantize_amax_backward.default: _decomposition("amax_backward"),
    }


def _qcompile_ops() -> list[torch._ops.OpOverload]:
    return list(decompositions())


def _check_options(options: dict | None) -> dict[str, Any]:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        valid = "; ".join(f"{name!r}: {what}" for name, what in OPTIONS.items())
        raise ValueError(f"unknown qcompile backend options: {unknown}. Valid options: {valid}")
    lowering = options.setdefault("lowering", "decompose")
    if lowering not in LOWERINGS:
        raise ValueError(f"qcompile backend option lowering={lowering!r}; valid: {LOWERINGS}")
    return options


def quantize_captured(gm: torch.fx.GraphModule, recipe) -> torch.fx.GraphModule:
    """Insert the quantizers of `recipe` (every range dynamic) into a dynamo graph, in place;
    its sites (as `PreparedModel.qcompile_sites` lists them) go to `gm.meta["qcompile_sites"]`."""
    from qcompile.prepare import quantize_graph
    from qcompile.recipe import get_recipe

    quantized = set(_qcompile_ops()) | {op.overloadpacket for op in _qcompile_ops()}
    if any(node.op == "call_function" and node.target in quantized for node in gm.graph.nodes):
        raise ValueError(
            "the qcompile backend was given a recipe, but this model quantizes already (it "
            "holds qcompile quantizers or calls qcompile.fake_quantize); drop the recipe option "
            "to compile a prepared model"
        )
    gm.meta["qcompile_sites"] = quantize_graph(gm, get_recipe(recipe).with_dynamic_ranges())
    return _inline_quantizers(gm)


def _fake_quantize(x: torch.Tensor, format: str, axis: int | None, block_size: int | None):
    """What a `Quantizer` with a dynamic range computes."""
    return fake_quantize(x, format, axis=axis, block_size=block_size)


def _inline_quantizers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace each (dynamic, stateless) `Quantizer` call by the function it computes.

    Dynamo hands aot_autograd the graph with a map from each parameter and buffer to where it
    came from in the user's model; a quantizer's buffer came from nowhere, so it must go.
    """
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        quantizer = gm.get_submodule(node.target)
        if not isinstance(quantizer, Quantizer):
            continue
        spec = quantizer.spec
        assert spec.dynamic, "the backend quantizes with dynamic ranges only"
        node.op, node.target = "call_function", _fake_quantize
        node.args = (*node.args, spec.format, spec.axis, spec.block_size)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def qcompile_backend(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None
) -> Callable:
    """Compile a dynamo-captured graph with inductor, decomposing qcompile's ops first (see
    the module docstring for `options`)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    options = _check_options(options)
    if options.get("recipe") is not None:
        gm = quantize_captured(gm, options["recipe"])
    table = dict(select_decomp_table())
    if options["lowering"] == "decompose":
        table.update(decompositions())
    return compile_fx(gm, example_inputs, decompositions=table)
