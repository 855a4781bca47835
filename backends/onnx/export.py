"""`export_onnx`: a model with qcompile quantizers to a Q/DQ ONNX file for TensorRT.

This module owns the export pipeline and its user-facing checks: the target and opset, the
dynamic batch axis, and errors that name the failing node. The pieces live beside it:
`weights` (weight quantizers resolved in torch), `translations` (the onnxscript
translations of the qcompile ops), `trt_ops` (TensorRT's custom ops) and `passes`
(weights stored quantized, transposes folded into weight DQs). It takes any `nn.Module`
containing `Quantizer` modules or calls to `qcompile.fake_quantize`, and knows nothing of how
the model was prepared.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch import nn

from qcompile.backends.onnx import attention as onnx_attention
from qcompile.backends.onnx import passes as onnx_passes
from qcompile.backends.onnx import weights as onnx_weights
from qcompile.backends.onnx.rules import onnxruntime_findings, onnxruntime_version
from qcompile.backends.onnx.translations import (
    EXPORTER_MIN_OPSET,
    TARGETS,
    check_supported,
    preferred_opset,
    required_opset,
    translation_table,
)
from qcompile.core.formats import get_format
from qcompile.core.quantizer import Quantizer


class OnnxExportError(RuntimeError):
    """Export failed; the message names the graph node and op where it did."""


class OnnxRuntimeWarning(UserWarning):
    """The exported graph holds a pattern onnxruntime's default session computes differently
    (`rules.ORT_RULES`); `ort.onnxruntime_session` computes the graph's numbers."""


def _quantizers(model: nn.Module) -> dict[str, Quantizer]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, Quantizer) and m.enabled}
    calibrating = [n for n, m in found.items() if m.observer is not None]
    if calibrating:
        raise RuntimeError(
            f"quantizers {calibrating} are still calibrating; finish calibration before export"
        )
    return found


def choose_opset(quantizers: dict[str, Quantizer], requested: int | None) -> int:
    """`requested` if all quantizers can be expressed in it, else an error; unset, the
    lowest opset whose Q/DQ form every quantizer prefers (`preferred_opset`)."""
    needed, reason, culprit = EXPORTER_MIN_OPSET, "", ""
    preferred = EXPORTER_MIN_OPSET
    for name, quantizer in quantizers.items():
        fmt = get_format(quantizer.spec.format)
        block_size = fmt.resolve_block_size(quantizer.spec.block_size)
        opset, why = required_opset(fmt, block_size)
        if opset > needed:
            needed, reason, culprit = opset, why, f"{name} ({fmt.name})"
        preferred = max(preferred, preferred_opset(fmt, block_size))
    if requested is None:
        return preferred
    if requested < needed:
        raise ValueError(
            f"opset={requested} is too low: {culprit} needs opset {needed} ({reason}); "
            f"pass opset>={needed} or leave it unset"
        )
    return requested


def _dynamic_axes(
    model: nn.Module, args: tuple, kwargs: dict, sequence: bool
) -> dict[str, Any] | tuple:
    """dynamic_shapes marking axis 0 of every tensor input as one shared `batch` dimension,
    and with `sequence` axis 1 of every input of rank >= 2 as one shared `sequence` dimension."""
    batch = torch.export.Dim("batch")
    length = torch.export.Dim("sequence")

    def mark(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            axes = {0: batch} if value.ndim else {}
            if sequence and value.ndim >= 2:
                axes[1] = length
            return axes or None
        if isinstance(value, (list, tuple)):
            return type(value)(mark(v) for v in value)
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        return None

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return tuple(mark(a) for a in args)
    return {name: mark(value) for name, value in bound.arguments.items()}


def _failing_node(error: BaseException) -> tuple[str, str] | None:
    """(node name, op) from the exporter's 'Error when translating node %name : ... target=op'."""
    while error is not None:
        found = re.search(r"translating node %(\S+) : .*?target=([\w.:]+)", str(error))
        if found:
            return found.group(1), found.group(2)
        error = error.__cause__ or error.__context__
    return None


def _root_cause(error: BaseException) -> BaseException:
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the export; a torch.export'ed GraphModule refuses `.eval()` (its mode is
    baked into its graph), so it is exported in the mode it was captured or moved to."""
    training = model.training
    try:
        model.eval()
    except NotImplementedError:
        yield
        return
    try:
        yield
    finally:
        model.train(training)


def _run_exporter(model: nn.Module, args: tuple, kwargs: dict, opset: int, target: str,
                  dynamic_shapes: Any) -> ir.Model:
    # torch.onnx logs a warning per optional library it finds missing (torchvision, ...).
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            model, args, kwargs=kwargs, dynamo=True, opset_version=opset, optimize=False,
            dynamic_shapes=dynamic_shapes, verbose=False,
            custom_translation_table=translation_table(target, opset),
        )
    except Exception as error:  # the exporter wraps everything; report where and why
        root = _root_cause(error)
        cause = f"{type(root).__name__}: {root}".strip()
        node = _failing_node(error)
        if node is None:
            raise OnnxExportError(f"ONNX export failed while capturing the model: {cause}") from None
        raise OnnxExportError(
            f"ONNX export failed at node '{node[0]}' (op {node[1]}): {cause}"
        ) from None
    finally:
        registration_log.setLevel(previous_level)
    return program.model


def export_onnx(
    model: nn.Module,
    example_inputs: tuple,
    path: str | os.PathLike,
    *,
    example_kwargs: dict[str, Any] | None = None,
    target: str = "tensorrt",
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = False,
    dynamic_shapes: Any = None,
    quantize_softmax: bool = False,
) -> Path:
    """Export `model` to `path` as an ONNX graph with explicit quantization.

    Args:
        model: any module whose forward calls `Quantizer` modules or `qcompile.fake_quantize`.
            A block-wise prepared model (`prepare(..., blocks=...)`, Hugging Face decoders by
            default) is exported as one graph of the same numbers (`qcompile.prepare.one_graph`;
            `use_cache=False` is added to the call where its forward takes `use_cache`).
        example_inputs / example_kwargs: inputs for tracing (batch of at least 2 with
            `dynamic_batch`).
        target: "tensorrt" (what TensorRT's explicit-quantization path builds: static Q/DQ,
            TensorRT's dynamic-quantize ops for NVFP4/MXFP8) or "onnx" (standard ops only,
            dynamic scales computed in the graph; runs in onnx.reference).
        opset: default the lowest opset the formats need (FP8: 21, where its
            QuantizeLinear has no zero point, see `translations.preferred_opset`); one lower
            than they can be expressed in is refused.
        dynamic_batch: make axis 0 of every tensor input a dynamic `batch` dimension.
        dynamic_sequence: also make axis 1 of every input of rank >= 2 a dynamic `sequence`
            dimension (text models: token ids and attention masks).
        dynamic_shapes: passed to torch.onnx.export instead (overrides `dynamic_batch`).
        quantize_softmax: put a fixed-scale Q/DQ (amax 1: scale 1/448 for FP8, 1/127 for
            INT8) on each attention's softmax output whose product with V is quantized, as
            TensorRT's fused FP8/INT8 attention needs (`attention.quantize_softmax`). Off by
            default: it rounds P, which the model (`Recipe.attention="qkv"`, P inside the fused
            `scaled_dot_product_attention`) does not, so the file then computes other numbers
            than the model (README, "Attention in ONNX"). With `Recipe.attention="products"` P
            is quantized in the model already and this does nothing.

    Attention (README, "Attention in ONNX"): a Shape of a Q/DQ output reads the Q's input, and
    layout ops between a per-tensor Q/DQ and a MatMul move above the Q, so that each quantized
    product reads DequantizeLinear directly (exact rewrites).

    Weight quantizers (those fed a parameter) are quantized once in torch and stored as
    INT8 / INT4 / FLOAT8E4M3FN / FLOAT4E2M1 initializers feeding DequantizeLinear.

    Warns (`OnnxRuntimeWarning`) where onnxruntime's default session would compute other
    numbers than the file (blocked INT4 weights: int8 activations); `onnxruntime_session`
    builds one that does not.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    if getattr(model, "qcompile_blocks", None):  # prepared block by block: trace one graph
        from qcompile.prepare import one_graph

        model, args, kwargs = one_graph(model, args, kwargs)
    quantizers = _quantizers(model)
    opset = choose_opset(quantizers, opset)
    if dynamic_shapes is None and (dynamic_batch or dynamic_sequence):
        if not dynamic_batch:
            raise ValueError("dynamic_sequence needs dynamic_batch=True (or pass dynamic_shapes)")
        dynamic_shapes = _dynamic_axes(model, args, kwargs, dynamic_sequence)
    with _eval_mode(model):
        weights = onnx_weights.find_weight_quantizers(model, args, kwargs)
        for name, quantizer in quantizers.items():
            fmt = get_format(quantizer.spec.format)
            try:
                check_supported(fmt, quantizer.spec.dynamic, name in weights, target)
            except ValueError as error:
                raise ValueError(f"quantizer {name}: {error}") from None
        with onnx_weights.weights_quantized(model, weights, e8m0_scales=target == "tensorrt"):
            onnx_model = _run_exporter(model, args, kwargs, opset, target, dynamic_shapes)
    onnx_passes.store_quantized_weights(onnx_model)
    onnxscript.optimizer.optimize_ir(onnx_model, should_fold=_should_fold)
    onnx_passes.fold_weight_transposes(onnx_model)
    onnx_attention.rebase_shapes(onnx_model)
    onnx_attention.hoist_layout_ops(onnx_model)
    if quantize_softmax:
        onnx_attention.quantize_softmax(onnx_model)
    RemoveUnusedNodesPass()(onnx_model)
    path = Path(path)
    ir.save(onnx_model, path)
    for finding in onnxruntime_findings(onnx_model):
        warnings.warn(f"{path}: onnxruntime ({onnxruntime_version()}) computes other numbers "
                      f"than this graph in its default session: {finding}", OnnxRuntimeWarning,
                      stacklevel=2)
    return path


def _should_fold(node: ir.Node) -> bool | None:
    """onnxscript's constant folder evaluates nodes with onnx.reference, whose GatherElements
    fails on more than 64 choices (BERT's buffered token-type ids, gathered by position):
    the folder logs 'Evaluation failed' and keeps the node. Leave such nodes to the runtime."""
    return False if (node.domain, node.op_type) == ("", "GatherElements") else None
