"""Exported models in onnxruntime's default session, with its optimizations off, in
`onnxruntime_session`, and per quantizer (`verify_onnx`).

Models (prepared, calibrated, exported): a residual MLP with ReLU (LayerNorm -> Linear ->
ReLU -> Linear, two blocks; a ReLU in front of an activation Q is what onnxruntime's
ReluQuantRewrite misreads) and a GPT-style block (causal SDPA attention, GELU MLP). References:
the eval-mode prepared model end to end (qcompile's numerics), onnxruntime with graph
optimizations off (the graph as written) and `onnx.reference` for nvfp4 (FLOAT4E2M1, which
onnxruntime cannot load). Where the default session departs from the graph (`ORT_RULES`),
export must have warned and `onnxruntime_session` must match instead.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile as qc
from qcompile.backends.onnx.export import OnnxRuntimeWarning, export_onnx
from qcompile.backends.onnx.ort import onnxruntime_session
from qcompile.backends.onnx.reference import reference_evaluator
from qcompile.backends.onnx.rules import inspect_onnx
from qcompile.backends.onnx.verify import verify_onnx
from qcompile.passes.sites import site_quantizers

TOLERANCE = 1e-3  # as in test_onnx_export
D = 128  # the smallest width int4's blocks of 128 take
#: recipes onnxruntime runs -> export target; nvfp4 runs in onnx.reference
ORT_RECIPES = {"int8": "tensorrt", "fp8": "tensorrt", "int4": "tensorrt", "w4a8": "tensorrt",
               "mxfp8": "onnx"}
#: recipe -> the onnxruntime rules its export must trigger (onnxruntime 1.32)
EXPECTED_RULES = {"int4": ["matmulnbits-int8-activations"]}


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(D), "fc1": nn.Linear(D, 2 * D),
                           "fc2": nn.Linear(2 * D, D)}) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["fc2"](torch.relu(b["fc1"](b["norm"](x))))
        return x


class GPTBlock(nn.Module):
    def __init__(self, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


MODELS = {"mlp": ResidualMLP, "gpt": GPTBlock}
#: the GPT block takes ~2-4 s per recipe on one core
NAMES = ["mlp", pytest.param("gpt", marks=pytest.mark.slow)]


def _data(batch: int, seed: int) -> torch.Tensor:
    """Normal activations with outlier channels (5x on every 37th)."""
    x = torch.randn(batch, 8, D, generator=torch.Generator().manual_seed(seed))
    x[..., ::37] *= 5
    return x


def _prepare(name: str, recipe: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    prepared = qc.prepare(model, recipe, example_inputs=(_data(2, 1),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qc.CalibrationWarning)  # dynamic recipes need none
        qc.calibrate(prepared, [(_data(2, 1),), (_data(2, 3),)], progress=False)
    return prepared.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, recipe, opset) -> (prepared, path, onnxruntime warnings of the export), cached."""
    cache = {}

    def get(name: str, recipe: str, opset: int | None = None):
        key = (name, recipe, opset)
        if key not in cache:
            prepared = _prepare(name, recipe)
            path = tmp_path_factory.mktemp(f"{name}_{recipe}") / "model.onnx"
            target = ORT_RECIPES.get(recipe, "onnx")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                export_onnx(prepared, (_data(2, 1),), path, target=target, opset=opset)
            found = [str(w.message) for w in caught if issubclass(w.category, OnnxRuntimeWarning)]
            cache[key] = prepared, str(path), found
        return cache[key]

    return get


def _relative(prepared: nn.Module, session_or_run, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = prepared(x).numpy()
    if callable(session_or_run):
        got = session_or_run(x.numpy())
    else:
        got = session_or_run.run(None, {session_or_run.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - want).max() / np.abs(want).max())


def _sessions(path: str) -> dict[str, ort.InferenceSession]:
    off = ort.SessionOptions()
    off.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    cpu = ["CPUExecutionProvider"]
    return {"off": ort.InferenceSession(path, off, providers=cpu),
            "default": ort.InferenceSession(path, providers=cpu),
            "qc.onnxruntime_session": onnxruntime_session(path, providers=cpu)}


def _optimized_op_types(path: str, tmp_path, make_session) -> list[str]:
    """Op types of the graph a session runs after its optimizations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    make_session(path, options)
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("recipe", list(ORT_RECIPES))
@pytest.mark.parametrize("name", NAMES)
def test_onnxruntime_default_session_matches_or_export_says_why(exported, name, recipe, tmp_path):
    prepared, path, warned = exported(name, recipe)
    rules = [finding.rule for finding in inspect_onnx(path).onnxruntime]
    assert rules == EXPECTED_RULES.get(recipe, [])
    assert len(warned) == len(rules) and all(r in w for r, w in zip(rules, warned))
    x = _data(3, seed=2)  # exported with batch 2: the batch axis is dynamic
    differences = {kind: _relative(prepared, session, x) for kind, session in _sessions(path).items()}
    assert differences["off"] < TOLERANCE, differences
    assert differences["qc.onnxruntime_session"] < TOLERANCE, differences
    if rules:  # the warning was right: the default session computes other numbers
        assert differences["default"] > TOLERANCE / 10, differences
    else:
        assert differences["default"] < TOLERANCE, differences
    report = verify_onnx(prepared, path, (x,))
    assert report.passed and report.runtime.startswith("onnxruntime"), report.render()


@pytest.mark.parametrize("name", NAMES)
def test_nvfp4_in_onnx_reference_and_per_quantizer(exported, name):
    prepared, path, warned = exported(name, "nvfp4")
    assert warned == [] and inspect_onnx(path).onnxruntime == []
    x = _data(3, seed=2)
    evaluator = reference_evaluator(path)
    assert _relative(prepared, lambda feed: evaluator.run(None, {evaluator.input_names[0]: feed})[0],
                     x) < TOLERANCE
    report = verify_onnx(prepared, path, (x,))
    assert report.passed and report.runtime == "onnx.reference", report.render()


def test_int4_session_keeps_the_fused_kernel_at_float_accuracy(exported, tmp_path):
    _, path, _ = exported("mlp", "int4")
    default = _optimized_op_types(path, tmp_path, lambda p, o: ort.InferenceSession(p, o))
    helped = _optimized_op_types(path, tmp_path, lambda p, o: onnxruntime_session(p, o))
    assert default.count("MatMulNBits") == helped.count("MatMulNBits") == 4


def test_fp8_at_opset_19_warns_and_the_session_restores_the_relu(exported, tmp_path):
    """Below opset 21 the FP8 Q needs a zero point, and onnxruntime then drops the ReLU."""
    prepared, path, warned = exported("mlp", "fp8", 19)
    assert onnx.load(path).opset_import[0].version == 19
    assert len(warned) == 1 and "ReluQuantRewrite" in warned[0]
    assert exported("mlp", "fp8")[2] == []  # the default opset (21) has no such Q
    x = _data(3, seed=2)
    differences = {kind: _relative(prepared, session, x) for kind, session in _sessions(path).items()}
    assert differences["off"] < TOLERANCE and differences["qc.onnxruntime_session"] < TOLERANCE
    assert differences["default"] > 0.05, "onnxruntime no longer drops the Relu: update ORT_RULES"
    assert "Relu" not in _optimized_op_types(path, tmp_path, lambda p, o: ort.InferenceSession(p, o))


def test_verify_names_the_one_quantizer_whose_scale_is_wrong(exported, tmp_path):
    prepared, path, _ = exported("mlp", "int8")
    labels = {sq.label: sq.path for sq in site_quantizers(prepared)}
    target = labels["blocks.0.fc2 (input)"]
    model = onnx.load(path)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
             and f"'{target}'" in {p.key: p.value for p in n.metadata_props}[
                 "pkg.torch.onnx.name_scopes"])
    scale = next(i for i in model.graph.initializer if i.name == q.input[1])
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 1.5, scale.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    report = verify_onnx(prepared, broken, (_data(3, seed=2),))
    assert not report.passed
    assert [row.label for row in report.failures] == ["blocks.0.fc2 (input)"], report.render()
    # the next quantizer gets another input (input drift), but computes its own Q/DQ right
    after = next(row for row in report.rows if row.label == "blocks.1.fc1 (input)")
    assert after.difference <= report.tolerance and after.input_difference > 1e-3, report.render()


def test_verify_refuses_trt_ops_and_wrong_inputs(exported, tmp_path):
    prepared = _prepare("mlp", "nvfp4")
    path = export_onnx(prepared, (_data(2, 1),), tmp_path / "trt.onnx")
    with pytest.raises(ValueError, match="target='onnx'"):
        verify_onnx(prepared, path, (_data(2, 1),))
    prepared, path, _ = exported("mlp", "int8")
    with pytest.raises(ValueError, match="2 tensor inputs, .* has 1"):
        verify_onnx(prepared, path, (_data(2, 1), _data(2, 1)))
