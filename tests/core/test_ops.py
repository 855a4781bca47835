"""The `qcompile::` custom ops: opcheck, torch.compile without graph breaks, compiled kernels.

- `torch.library.opcheck` on fake_quantize, fake_quantize_backward and
  fake_quantize_amax_backward (schema, fake kernel, autograd registration, AOT dispatch).
- A small nn.Module calling `qcompile.fake_quantize` compiles with `fullgraph=True` (inductor,
  CPU), `torch._dynamo.explain` reports no graph break, and forward and grads equal eager.
- The inductor-compiled CPU kernel (tensors of >= 65536 elements) equals the eager aten
  reference (`QCOMPILE_CPU_KERNELS=eager`) bit for bit, special values included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_numerics import assert_bitwise_equal, make_data
from torch import nn

import qcompile
from qcompile.core import ops
from qcompile.core.kernels import cpu

# (format, static amax or None, block size as the op takes it: 0 = none)
OPCHECK_CASES = [
    ("int8", None, 0),
    ("int8", 0.8, 0),
    ("fp8", 0.5, 0),
    ("int4", None, 16),
    ("int4", 0.7, 16),
    ("nvfp4", None, 16),
    ("nvfp4", 0.9, 16),
    ("mxfp4", None, 32),
    ("mxfp8", None, 32),
]


def _inputs(fmt, amax, block_size, requires_grad):
    torch.manual_seed(0)
    x = (torch.randn(4, 64) * 0.5).requires_grad_(requires_grad)
    if amax is not None:
        amax = torch.tensor(amax, requires_grad=requires_grad and fmt in ("int8", "int4", "fp8"))
    return x, amax


@pytest.mark.parametrize("fmt,amax,block_size", OPCHECK_CASES)
def test_opcheck_fake_quantize(fmt, amax, block_size):
    x, amax_t = _inputs(fmt, amax, block_size, requires_grad=True)
    torch.library.opcheck(ops.fake_quantize, (x, amax_t, fmt, block_size))


@pytest.mark.parametrize("fmt,amax,block_size", OPCHECK_CASES)
def test_opcheck_fake_quantize_backward(fmt, amax, block_size):
    x, amax_t = _inputs(fmt, amax, block_size, requires_grad=False)
    grad = torch.randn_like(x)
    torch.library.opcheck(ops.fake_quantize_backward, (grad, x, amax_t, fmt, block_size))


@pytest.mark.parametrize("fmt,amax,block_size", [c for c in OPCHECK_CASES if c[1] and c[0] != "nvfp4"])
def test_opcheck_fake_quantize_amax_backward(fmt, amax, block_size):
    x, amax_t = _inputs(fmt, amax, block_size, requires_grad=False)
    grad = torch.randn_like(x)
    torch.library.opcheck(ops.fake_quantize_amax_backward, (grad, x, amax_t, fmt, block_size))
    # a per-block amax, as int4 weights have
    if block_size:
        per_block = torch.rand(4, 64 // block_size, 1) + 0.5
        torch.library.opcheck(
            ops.fake_quantize_amax_backward, (grad, x, per_block, fmt, block_size)
        )


class TinyQuantMLP(nn.Module):
    """Two Linears with quantized inputs and weights, a learnable int8 amax among them."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 16)
        self.act_amax = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        x = qcompile.fake_quantize(x, "int8", amax=self.act_amax)
        w1 = qcompile.fake_quantize(self.fc1.weight, "nvfp4")
        h = torch.relu(nn.functional.linear(x, w1, self.fc1.bias))
        h = qcompile.fake_quantize(h, "mxfp8")
        w2 = qcompile.fake_quantize(self.fc2.weight, "int4", block_size=16)
        h = nn.functional.linear(h, w2, self.fc2.bias)
        return qcompile.fake_quantize(h, "fp8", axis=-1)


def _grads(model, x, forward=None):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = (forward if forward is not None else model)(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = TinyQuantMLP()
    x = torch.randn(8, 64) * 1.5
    eager_out, eager_dx, eager_grads = _grads(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    out, dx, grads = _grads(model, x, forward=compiled)
    assert_bitwise_equal(out.numpy(), eager_out.numpy())
    assert_bitwise_equal(dx.numpy(), eager_dx.numpy())
    for name, grad in eager_grads.items():
        # the op's results are bit-identical; inductor may reorder the Linear's own reductions
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert eager_grads["act_amax"].abs() > 0


def test_dynamo_explain_has_no_graph_breaks():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(TinyQuantMLP())(torch.randn(8, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops_seen = {
        str(node.target)
        for graph in explanation.graphs
        for node in graph.graph.nodes
        if node.op == "call_function"
    }
    assert any("fake_quantize" in name for name in ops_seen), ops_seen


# ---------------------------------------------------------------- compiled CPU kernel path
COMPILED_CASES = [
    ("int8", {}),
    ("int8", {"amax": 3.0}),
    ("int4", {}),
    ("fp8", {"amax": 2.0}),
    ("fp8", {}),
    ("nvfp4", {}),
    ("mxfp4", {}),
    ("mxfp8", {}),
]


def _big_input(dtype=torch.float32):
    x = make_data((128, 1024), seed=7, zero_block=128)  # 131072 elements, every block size
    return torch.from_numpy(x).to(dtype)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,kwargs", COMPILED_CASES, ids=[f"{f}-{k or 'dynamic'}" for f, k in COMPILED_CASES])
def test_compiled_kernel_equals_eager(fmt, kwargs, monkeypatch):
    x = _big_input()
    assert x.numel() >= cpu.COMPILE_MIN_NUMEL
    compiled = qcompile.fake_quantize(x, fmt, **kwargs)
    monkeypatch.setenv("QCOMPILE_CPU_KERNELS", "eager")
    eager = qcompile.fake_quantize(x, fmt, **kwargs)
    assert not cpu._compile_failed, "the inductor kernel fell back to eager"
    assert_bitwise_equal(compiled.numpy(), eager.numpy())


@pytest.mark.slow
def test_compiled_kernel_bf16_and_backward_equal_eager(monkeypatch):
    x = _big_input(torch.bfloat16).requires_grad_(True)
    amax = torch.tensor(2.0, requires_grad=True)

    def run():
        y = qcompile.fake_quantize(x, "int8", amax=amax)
        weights = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
        dx, damax = torch.autograd.grad((y * weights).float().sum(), (x, amax))
        return y.detach(), dx, damax

    compiled = run()
    monkeypatch.setenv("QCOMPILE_CPU_KERNELS", "eager")
    eager = run()
    assert not cpu._compile_failed
    for a, b in zip(compiled[:2], eager[:2]):
        assert_bitwise_equal(a.float().numpy(), b.float().numpy())
    # the amax gradient is a sum over 131072 elements: compiled reduction order may differ
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-4, atol=1e-4)
    assert np.isfinite(compiled[2].item())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nvfp4", "int4"])
def test_compiled_kernel_after_shape_changes_equals_eager(fmt, monkeypatch):
    """New shapes recompile with symbolic sizes (automatic dynamic); still bit-exact."""
    outputs = []
    for seed, shape in enumerate([(256, 512), (3, 131, 256), (96, 1024), (5, 100, 256)]):
        x = torch.from_numpy(make_data(shape, seed=seed, zero_block=128))
        outputs.append((x, qcompile.fake_quantize(x, fmt)))
    monkeypatch.setenv("QCOMPILE_CPU_KERNELS", "eager")
    assert not cpu._compile_failed
    for x, compiled in outputs:
        assert_bitwise_equal(compiled.numpy(), qcompile.fake_quantize(x, fmt).numpy())


@pytest.mark.slow
def test_compiled_kernel_serves_weights_and_activations_of_every_rank_compiled(monkeypatch):
    """One entry per argument rank and dtype, fed plain tensors: a weight Parameter beside activations of
    other ranks and sizes (as in a prepared model) never exhausts dynamo's recompile limit,
    which would leave the kernel running uncompiled."""
    cpu._compiled.cache_clear()  # fresh entries: other tests fed them other shapes already
    calls = []
    compiled_kernel = cpu._compiled

    def recording(*key):
        calls.append(key)
        return compiled_kernel(*key)

    monkeypatch.setattr(cpu, "_compiled", recording)
    weight = nn.Parameter(torch.from_numpy(make_data((256, 512), seed=1, zero_block=128)))
    tensors = [weight] + [
        torch.from_numpy(make_data(shape, seed=seed, zero_block=128))
        for seed, shape in enumerate([(2, 128, 512), (4, 64, 512), (8, 2, 64, 512), (1024, 128)])
    ]
    amax = torch.tensor(3.0)
    # one shape change per entry at most, and hitting the limit is an error, not a silent
    # fall back to running the kernel uncompiled
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        outputs = [qcompile.fake_quantize(t, "int8", amax=amax) for t in tensors * 2]
    float32 = torch.float32
    assert {key[-1] for key in calls} == {
        ((rank, float32), (0, float32)) for rank in (2, 3, 4)}
    monkeypatch.setenv("QCOMPILE_CPU_KERNELS", "eager")
    assert not cpu._compile_failed
    for t, got in zip(tensors * 2, outputs):
        want = qcompile.fake_quantize(t.detach(), "int8", amax=amax)
        assert_bitwise_equal(got.detach().numpy(), want.numpy())
