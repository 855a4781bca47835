"""Fuzz the pipeline: recipes x shapes x dtypes x data through prepare -> calibrate ->
forward -> backward, and (float32, small) -> export_onnx -> onnxruntime / onnx.reference.

Tiny random MLPs and single-head attention blocks with odd sizes (K not a multiple of the
block sizes: such sites must stay float with a reason naming K, never fail), data with zeros
and outliers. Bounded: few examples, derandomized (the same cases on every run, so CI is
stable); `QCOMPILE_FUZZ_EXAMPLES=200` runs more, and random ones. References: the float
model (closeness), the prepared model itself (ONNX parity, as in tests/backends).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile as qc
from qcompile.core.formats import get_format
from qcompile.passes.sites import SiteKind, SiteStatus

EXTRA = int(os.environ.get("QCOMPILE_FUZZ_EXAMPLES", "0"))


def _settings(examples: int):
    return settings(
        max_examples=EXTRA or examples, deadline=None, derandomize=not EXTRA, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


SIZES = [8, 16, 24, 32, 48, 64, 100, 128, 160, 256]  # odd ones: 8, 24, 48, 100, 160
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: Largest max|quantized - float| / max|float| of the model output, per recipe; outlier data
#: stretches per-tensor ranges, so those cases only need to be finite.
CLOSE = {"int8": 0.1, "fp8": 0.15, "mxfp8": 0.15, "mxfp8_ocp": 0.15, "nvfp4": 0.5, "mxfp4": 0.6,
         "mxfp4_ocp": 0.6, "int4": 0.5, "w4a8": 0.5}


class MLP(nn.Module):
    def __init__(self, k: int, hidden: int, out: int) -> None:
        super().__init__()
        self.up = nn.Linear(k, hidden)
        self.down = nn.Linear(hidden, out)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Attention(nn.Module):
    """One head: q, k, v and out projections around softmax(q k^T / sqrt(d)) v."""

    def __init__(self, k: int, hidden: int, out: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(k, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, out)
        self.scale = 1 / math.sqrt(hidden)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) * self.scale
        return self.out(scores.softmax(-1) @ self.v(x))


@st.composite
def cases(draw, recipe: str | None = None):
    """A random case; with `recipe` one for export: float32, batch and sequence of 2 or more,
    and first (where hypothesis starts) sizes that block formats take, attention where the
    recipe quantizes its products."""
    sizes = [128, 96, 160, 256, 64] if recipe else SIZES
    models = [MLP, Attention]
    if recipe and qc.get_recipe(recipe).quantize_matmul:
        models.reverse()
    return {
        "recipe": recipe or draw(st.sampled_from(list(qc.RECIPES))),
        "model": draw(st.sampled_from(models)),
        "k": draw(st.sampled_from(sizes)),
        "hidden": draw(st.sampled_from(sizes)),
        "out": draw(st.sampled_from([24, 1, 7, 16])),
        "batch": draw(st.integers(2 if recipe else 1, 3)),
        "seq": draw(st.integers(2 if recipe else 1, 5)),
        "dtype": torch.float32 if recipe else draw(st.sampled_from(DTYPES)),
        "data": draw(st.sampled_from(["normal", "zeros", "outliers", "zero rows"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _data(case: dict, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(case["seed"] + seed)
    x = torch.randn(batch or case["batch"], case["seq"], case["k"], generator=generator)
    if case["data"] == "zeros":
        x.zero_()
    elif case["data"] == "outliers":  # a few channels far outside the rest (float16: as far
        # as attention scores stay below its 65504, else the float model itself overflows)
        x[..., :: max(1, case["k"] // 5)] *= 30 if case["dtype"] == torch.float16 else 300
    elif case["data"] == "zero rows":
        x[:, 0] = 0
    return x.to(case["dtype"])


def _build(case: dict) -> tuple[nn.Module, qc.PreparedModel]:
    torch.manual_seed(case["seed"])
    model = case["model"](case["k"], case["hidden"], case["out"]).to(case["dtype"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qc.PrepareWarning)  # nothing quantized, size 1 fixed
        prepared = qc.prepare(model, case["recipe"], (_data(case),))
    return model, prepared


def _check_sites(case: dict, prepared: qc.PreparedModel) -> None:
    """Block formats leave a site of the wrong K in float, and say so; the rest is quantized."""
    recipe = prepared.qcompile_recipe
    for site in prepared.qcompile_sites:
        specs = recipe.kind_specs(site.kind)
        if specs is None:
            assert site.status is SiteStatus.EXCLUDED, site
            continue
        blocks = {get_format(s.format).resolve_block_size(s.block_size)
                  for s in specs.roles(site.kind).values()} - {None}
        misfit = [b for b in blocks if site.reduction_size is None or site.reduction_size % b]
        if misfit:
            assert site.status is SiteStatus.UNSUPPORTED, site
            assert "K=" in site.reason or "K is dynamic" in site.reason, site.reason
        else:
            assert site.status is SiteStatus.QUANTIZED, site


def _calibrate(prepared: qc.PreparedModel, case: dict, x: torch.Tensor) -> None:
    """Calibrate on two batches and on `x`, the batch checked after (no value past amax)."""
    quantizers = [m for m in prepared.modules() if isinstance(m, qc.Quantizer)]
    if any(q.spec.needs_calibration for q in quantizers):
        batches = [_data(case, seed=1), _data(case, batch=_other_batch(case), seed=2), x]
        qc.calibrate(prepared, batches, progress=False)


def _other_batch(case: dict) -> int:
    """Another batch size than at capture, where the example's was not fixed (1 is)."""
    return case["batch"] + (case["batch"] > 1)


@_settings(examples=25)
@given(case=cases())
def test_prepare_calibrate_forward_backward(case):
    model, prepared = _build(case)
    _check_sites(case, prepared)
    x = _data(case, batch=_other_batch(case), seed=3)
    _calibrate(prepared, case, x)

    with torch.no_grad():
        out, expected = prepared(x), model(x)
    assert out.shape == expected.shape and out.dtype == case["dtype"]
    assert out.isfinite().all()
    if case["data"] in ("normal", "zero rows") and case["dtype"] == torch.float32:
        scale = max(expected.abs().max().item(), 0.25)  # outputs near 0: compared absolutely
        error = (out - expected).abs().max().item() / scale
        assert error < CLOSE[case["recipe"]], error
    if case["data"] == "zeros":  # zeros quantize to zeros: the output is the float model's
        torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)

    prepared.train()
    x = _data(case, seed=4).requires_grad_()
    prepared(x).float().pow(2).mean().backward()
    for name, parameter in prepared.named_parameters():
        assert parameter.grad is not None and parameter.grad.isfinite().all(), name
    assert x.grad.isfinite().all()


def _run_onnx(path, recipe: str, x: torch.Tensor) -> np.ndarray:
    if recipe in ("int8", "fp8", "int4", "w4a8"):
        import onnxruntime as ort

        options = ort.SessionOptions()  # no fusions: evaluate the Q/DQ graph as written
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options)
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    from qcompile.backends.onnx.reference import reference_evaluator

    evaluator = reference_evaluator(path)
    return evaluator.run(None, {evaluator.input_names[0]: x.numpy()})[0]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(qc.RECIPES))
def test_export_onnx_matches_the_prepared_model(recipe, tmp_path_factory):
    pytest.importorskip("onnxruntime")

    @_settings(examples=1)  # an export takes seconds: one case per recipe unless asked
    @given(case=cases(recipe))
    def check(case):
        _check_export(case, tmp_path_factory.mktemp("fuzz") / "model.onnx")

    check()


def _check_export(case: dict, path) -> None:
    from qcompile.backends.onnx.export import export_onnx

    _, prepared = _build(case)
    x = _data(case, batch=case["batch"] + 1, seed=5)  # the batch axis is dynamic
    _calibrate(prepared, case, x)
    prepared.eval()
    ortable = case["recipe"] in ("int8", "fp8", "int4", "w4a8")
    export_onnx(prepared, (_data(case),), path, target="tensorrt" if ortable else "onnx")
    with torch.no_grad():
        expected = prepared(x).numpy()
    got = _run_onnx(path, case["recipe"], x)
    assert got.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-6)
    assert float(np.abs(got - expected).max()) / scale < 1e-3


def test_site_kinds_cover_matmuls():
    """The attention model really exercises activation-activation matmul sites."""
    case = {"recipe": "int8", "model": Attention, "k": 32, "hidden": 16, "out": 4, "batch": 2,
            "seq": 3, "dtype": torch.float32, "data": "normal", "seed": 0}
    _, prepared = _build(case)
    kinds = [s.kind for s in prepared.qcompile_sites if s.status is SiteStatus.QUANTIZED]
    assert kinds.count(SiteKind.MATMUL) == 2 and kinds.count(SiteKind.LINEAR) == 4
