"""`verify_onnx`: each quantizer of an exported graph against the model's quantizer, fed the
same input.

End to end, an exported int8/fp8 model can differ from the torch model by more than float
noise although every Q/DQ pair is right: one activation that lands within float rounding of
a rounding boundary rounds the other way after a different matmul accumulation order, and the
difference propagates. This module tells the two apart. It runs the file (onnxruntime with
graph optimizations off, or `onnx.reference` for what onnxruntime cannot run) with the input
and output of every quantizer's nodes exposed, feeds each quantizer of the model the very
input its ONNX nodes received (weights: the weight itself), and reports per quantizer how far
the ONNX output is from the quantizer's, and how far its input already was from the input the
torch model gave it (the upstream drift). Quantizer nodes are found by the module path
torch.onnx records in each node's `pkg.torch.onnx.name_scopes` metadata. It knows nothing of
how the model was prepared; it reads quantizers through `site_quantizers`.
"""

from __future__ import annotations

import ast
import inspect
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from qcompile.backends.onnx.attention import HOISTED_LAYOUT_KEY
from qcompile.backends.onnx.passes import FOLDED_PERM_KEY
from qcompile.backends.onnx.reference import reference_evaluator
from qcompile.backends.onnx.trt_ops import TRT_DOMAIN
from qcompile.core.quantizer import Quantizer
from qcompile.passes.sites import site_quantizers

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
RUNTIMES = ("auto", "onnxruntime", "reference")


@dataclass(frozen=True)
class QuantizerParity:
    """One call of one quantizer: its ONNX output against the quantizer fed the same input.

    `difference` and `input_difference` are max |a - b| / max |b| (b: the torch side);
    `input_difference` is None for a weight (its ONNX form holds no float input).
    """

    label: str
    format: str
    difference: float
    mismatches: int
    size: int
    input_difference: float | None

    def __str__(self) -> str:
        drift = "-" if self.input_difference is None else f"{self.input_difference:.2e}"
        return (f"{self.label:<44} {self.format:<6} {self.difference:>10.2e} "
                f"{self.mismatches:>9}/{self.size:<9} {drift:>10}")


@dataclass
class ParityReport:
    runtime: str
    tolerance: float
    rows: list[QuantizerParity] = field(default_factory=list)
    #: quantizers with no nodes in the graph: their output reaches no graph output (the
    #: exporter drops such nodes, e.g. an unused pooler), or the file is another model's
    missing: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[QuantizerParity]:
        return [row for row in self.rows if not row.difference <= self.tolerance]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.failures

    @property
    def max_difference(self) -> float:
        return max((row.difference for row in self.rows), default=0.0)

    def render(self) -> str:
        header = (f"{'quantizer':<44} {'format':<6} {'max diff':>10} {'mismatched':>19} "
                  f"{'input drift':>10}")
        title = f"per-quantizer parity ({self.runtime}; tolerance {self.tolerance:.0e} of max |output|)"
        lines = [title, header]
        lines += [str(row) for row in self.rows]
        lines += [f"{name}: not in the graph (its output is unused there)" for name in self.missing]
        verdict = "passed" if self.passed else (
            f"FAILED: {len(self.failures)} of {len(self.rows)} quantizer call(s) over tolerance")
        lines.append(verdict)
        return "\n".join(lines)


def _scopes(node: ir.Node) -> list[str]:
    text = node.metadata_props.get(_SCOPES_KEY)
    return ast.literal_eval(text) if text else []


def _is_constant(value: ir.Value) -> bool:
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and not producer.inputs


@dataclass
class _Call:
    """The nodes of one call of a quantizer: its float input (None: a weight) and output."""

    nodes: list[ir.Node]
    input: ir.Value | None
    output: ir.Value
    perm: list[int] | None
    #: layout ops moved above the Q (`HOISTED_LAYOUT_KEY`; only over per-tensor Q/DQ, which
    #: layout does not change): input and output are in the graph's layout, not torch's
    hoisted: list[str]


def _components(nodes: list[ir.Node]) -> list[list[ir.Node]]:
    """`nodes` split into groups connected through values they pass each other, in graph order."""
    index = {id(node): i for i, node in enumerate(nodes)}
    parent = list(range(len(nodes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, node in enumerate(nodes):
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and id(producer) in index:
                parent[root(i)] = root(index[id(producer)])
    groups: dict[int, list[ir.Node]] = {}
    for i, node in enumerate(nodes):
        groups.setdefault(root(i), []).append(node)
    return list(groups.values())


def _call(nodes: list[ir.Node], graph: ir.Graph) -> _Call | str:
    """The call these nodes make, or why they are not one Q/DQ call."""
    inside = {id(node) for node in nodes}
    inputs, outputs = [], []
    graph_outputs = {id(v) for v in graph.outputs}
    for node in nodes:
        for value in node.inputs:
            if value is None or _is_constant(value) or value in inputs:
                continue
            if value.producer() is None or id(value.producer()) not in inside:
                inputs.append(value)
        for value in node.outputs:
            used_outside = any(id(use.node) not in inside for use in value.uses())
            if (used_outside or id(value) in graph_outputs) and not _is_constant(value):
                outputs.append(value)
    if len(inputs) > 1 or len(outputs) != 1:
        return f"{len(inputs)} float inputs and {len(outputs)} outputs"
    perm = next((node.metadata_props[FOLDED_PERM_KEY] for node in nodes
                 if FOLDED_PERM_KEY in node.metadata_props), None)
    hoisted = next((node.metadata_props[HOISTED_LAYOUT_KEY] for node in nodes
                    if HOISTED_LAYOUT_KEY in node.metadata_props), "")
    return _Call(nodes, inputs[0] if inputs else None, outputs[0],
                 [int(p) for p in perm.split(",")] if perm else None,
                 hoisted.split(";") if hoisted else [])


def _before_hoisted(value: ir.Value, hoisted: list[str]) -> ir.Value:
    """The value the hoisted layout ops read: the quantizer's input in its torch layout."""
    for _ in hoisted:
        value = value.producer().inputs[0]
    return value


def _quantizer_calls(model: ir.Model, paths: Iterable[str]) -> dict[str, list[_Call] | str]:
    """Quantizer path -> its calls in graph order (or why they could not be read)."""
    by_path: dict[str, list[ir.Node]] = {path: [] for path in paths}
    for node in model.graph:
        if node.op_type == "Constant" and not node.inputs:
            continue
        for scope in _scopes(node):
            if scope in by_path:
                by_path[scope].append(node)
    found: dict[str, list[_Call] | str] = {}
    for path, nodes in by_path.items():
        if not nodes:
            continue
        calls = [_call(group, model.graph) for group in _components(nodes)]
        problem = next((c for c in calls if isinstance(c, str)), None)
        found[path] = problem if problem is not None else calls
    return found


def _flat_tensors(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor inputs of the call in the order torch.onnx makes them graph inputs."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        values: list[Any] = list(bound.arguments.values())
    except TypeError:
        values = [*args, *kwargs.values()]
    leaves, _ = torch.utils._pytree.tree_flatten(values)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _run_torch(model: nn.Module, args: tuple, kwargs: dict,
               quantizers: dict[str, Quantizer]) -> dict[str, list[torch.Tensor]]:
    """Quantizer path -> the input of each of its calls in the torch model."""
    seen: dict[str, list[torch.Tensor]] = {path: [] for path in quantizers}
    handles = [q.register_forward_pre_hook(lambda q, a, path=path: seen[path].append(a[0].detach()))
               for path, q in quantizers.items()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _uses_trt_ops(model: ir.Model) -> bool:
    return any(node.domain == TRT_DOMAIN for node in model.graph)


def _run_onnx(model: ir.Model, feeds: dict[str, np.ndarray], names: list[str],
              runtime: str) -> tuple[dict[str, np.ndarray], str]:
    """Run `model` with the values `names` exposed as outputs; returns them and the runtime."""
    graph = model.graph
    inputs = {v.name for v in graph.inputs}
    present = {v.name for v in graph.outputs}
    values = {v.name: v for node in graph for v in node.outputs}
    for name in names:
        if name not in inputs and name not in present:
            graph.outputs.append(values[name])
            present.add(name)
    wanted = [n for n in names if n not in inputs]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "verify.onnx"
        ir.save(model, path, external_data="verify.onnx.data")
        results: list[np.ndarray] | None = None
        if runtime in ("auto", "onnxruntime"):
            try:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
                session = onnxruntime.InferenceSession(str(path), options,
                                                       providers=["CPUExecutionProvider"])
            except Exception:  # types onnxruntime cannot load (FP4, ...)
                if runtime == "onnxruntime":
                    raise
            else:
                results, runtime = session.run(wanted, feeds), "onnxruntime (optimizations off)"
        if results is None:
            results, runtime = reference_evaluator(path).run(wanted, feeds), "onnx.reference"
    out = dict(zip(wanted, results))
    out.update({name: feeds[name] for name in names if name in inputs})
    return out, runtime


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.abs(want).max()) if want.size else 0.0
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if want.size else 0.0
    return diff / scale if scale > 0 else diff


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: tuple = (),
    *,
    example_kwargs: dict[str, Any] | None = None,
    runtime: str = "auto",
    tolerance: float = 1e-6,
) -> ParityReport:
    """Compare every quantizer of `model` with its Q/DQ nodes in the exported file at `path`.

    Args:
        model: the model `export_onnx` exported (a prepared model, or any module with
            `Quantizer` modules), in the state it was exported in. A block-wise prepared
            model is compared through the one graph `export_onnx` traced (same quantizer state).
        example_inputs / example_kwargs: one call of the model; the file is run on the same
            tensors.
        runtime: "onnxruntime" (graph optimizations off, so the graph runs as written),
            "reference" (`onnx.reference`, which also runs FLOAT4E2M1), or "auto" (onnxruntime
            where it can load the file). Files with TensorRT's `trt` ops (nvfp4/mxfp8
            activations of `target="tensorrt"`) run in neither: export with `target="onnx"`.
        tolerance: largest accepted max |onnx - quantizer| / max |quantizer| per call.

    Returns a `ParityReport` (`.passed`, `.render()`): per quantizer call, that difference, the
    number of elements that differ, and the input drift (how far the input the graph gave the
    quantizer is from the one the torch model gave it: upstream rounding flips show there,
    not in the quantizer's own difference).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    if getattr(model, "qcompile_blocks", None):  # block by block: the one graph it exported
        from qcompile.prepare import one_graph

        model, args, kwargs = one_graph(model, args, kwargs)
    quantizers = {sq.path: sq.quantizer for sq in site_quantizers(model)
                  if sq.quantizer.enabled}
    labels = {sq.path: sq.label for sq in site_quantizers(model)}
    onnx_model = ir.load(path)
    if _uses_trt_ops(onnx_model):
        raise ValueError(f"{path} uses TensorRT's '{TRT_DOMAIN}' ops (nvfp4/mxfp8 activations for "
                         "target='tensorrt'), which neither onnxruntime nor onnx.reference run; "
                         "export with target='onnx' to verify the quantizers")
    tensors = _flat_tensors(model, args, kwargs)
    graph_inputs = list(onnx_model.graph.inputs)
    if len(tensors) != len(graph_inputs):
        raise ValueError(f"the example call has {len(tensors)} tensor inputs, {path} has "
                         f"{len(graph_inputs)} ({[v.name for v in graph_inputs]}); pass the "
                         "inputs the model was exported with")
    feeds = {v.name: t.detach().cpu().numpy() for v, t in zip(graph_inputs, tensors)}
    calls = _quantizer_calls(onnx_model, quantizers)
    training = model.training
    model.eval()
    try:
        torch_inputs = _run_torch(model, args, kwargs, quantizers)
        exposed = [v.name for found in calls.values() if not isinstance(found, str)
                   for call in found for v in (call.input, call.output) if v is not None]
        exposed += [_before_hoisted(call.input, call.hoisted).name
                    for found in calls.values() if not isinstance(found, str)
                    for call in found if call.hoisted and call.input is not None]
        values, used = _run_onnx(onnx_model, feeds, exposed, runtime)
        report = ParityReport(runtime=used, tolerance=tolerance)
        for path_, quantizer in quantizers.items():
            found = calls.get(path_)
            if found is None:
                report.missing.append(labels[path_])
                continue
            if isinstance(found, str):  # why its nodes could not be read
                raise ValueError(f"quantizer {labels[path_]}: its ONNX nodes are not one Q/DQ "
                                 f"call ({found})")
            report.rows += _compare(labels[path_], quantizer, found, torch_inputs[path_], values)
    finally:
        model.train(training)
    return report


def _compare(label: str, quantizer: Quantizer, calls: list[_Call],
             torch_inputs: list[torch.Tensor], values: dict[str, np.ndarray]) -> list[QuantizerParity]:
    if len(calls) != len(torch_inputs):
        raise ValueError(f"quantizer {label}: called {len(torch_inputs)} times in torch, "
                         f"{len(calls)} times in the graph")
    rows = []
    for i, (call, seen) in enumerate(zip(calls, torch_inputs)):
        if call.input is None:  # a weight: the graph holds it quantized
            given, drift = seen, None
        else:
            onnx_input = values[call.input.name]
            given = torch.from_numpy(np.ascontiguousarray(onnx_input)).to(seen.dtype)
            source = values[_before_hoisted(call.input, call.hoisted).name]
            drift = _relative(source, seen.float().cpu().numpy())
        with torch.no_grad():
            want = quantizer(given.to(quantizer.amax.device)).float().cpu().numpy()
        got = values[call.output.name]
        if call.perm is not None:
            got = np.transpose(got, np.argsort(call.perm))
        if got.shape != want.shape:
            raise ValueError(f"quantizer {label}: ONNX output {got.shape}, torch {want.shape}")
        name = label if len(calls) == 1 else f"{label} #{i + 1}"
        rows.append(QuantizerParity(name, quantizer.spec.format, _relative(got, want),
                                    int(np.count_nonzero(got != want)), int(want.size), drift))
    return rows
