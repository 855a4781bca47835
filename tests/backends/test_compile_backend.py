"""The `qcompile` torch.compile backend: registered by entry point, decomposes our ops, exact."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import qcompile as qc
from qcompile.core.formats import FORMATS

STATIC = {"int8": True, "int4": False, "fp8": True, "nvfp4": True, "mxfp4": False, "mxfp8": False,
          "mxfp4_ocp": False, "mxfp8_ocp": False}


class QuantizedMLP(torch.nn.Module):
    """Activation and weight fake quantization around a Linear, with a learnable range."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt
        self.linear = torch.nn.Linear(128, 64)
        amax = torch.tensor(2.5) if STATIC[fmt] else None
        if qc.get_format(fmt).learnable_amax and amax is not None:
            self.amax = torch.nn.Parameter(amax)
        else:
            self.register_buffer("amax", amax)

    def forward(self, x):
        x = torch.nn.functional.gelu(x)
        x = qc.fake_quantize(x, self.fmt, amax=self.amax)
        weight = qc.fake_quantize(self.linear.weight, self.fmt)
        return torch.nn.functional.linear(x, weight, self.linear.bias)


def test_backend_is_registered_by_entry_point():
    assert "qcompile" in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_compiled_equals_eager_forward_and_gradients(fmt):
    torch.manual_seed(0)
    model = QuantizedMLP(fmt)
    x = torch.randn(4, 7, 128) * 3
    x[0, 0, :32] = 0  # an all-zero block
    x.requires_grad_(True)
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = [t.grad.clone() for t in (x, *model.parameters())]
    for t in (x, *model.parameters()):
        t.grad = None

    compiled = torch.compile(model, backend="qcompile", fullgraph=True)
    out, codes = run_and_get_code(compiled, x)
    out.square().sum().backward()
    # Same quantized values; only the matmul's accumulation order may differ.
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip([t.grad for t in (x, *model.parameters())], eager_grads):
        # Gradients are long sums whose order differs between the compiled and eager kernels
        # and by CPU (2 of 8192 weight-gradient elements off by 2e-4 on an AMD EPYC): atol 1e-3.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    # The op was decomposed into fusable aten ops, not called opaquely.
    calls = [line for code in codes for line in code.splitlines()
             if "torch.ops.qcompile" in line and not line.strip().startswith("#")]
    assert not calls


def test_changing_amax_does_not_recompile():
    torch._dynamo.reset()
    model = QuantizedMLP("int8")
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(8, 128)
    for step in range(3):
        with torch.no_grad():
            model.amax.fill_(1.0 + step)
        compiled(x)
    assert counter.frame_count == 1


def test_unknown_option_is_refused():
    model = QuantizedMLP("fp8")
    compiled = torch.compile(model, backend="qcompile", options={"bogus": 1})
    with pytest.raises(Exception, match="unknown qcompile backend options"):
        compiled(torch.randn(2, 128))


def test_kernel_lowering_keeps_the_op_opaque_and_exact_on_strided_inputs():
    """lowering="kernel": the op is an extern call; its output strides are what the fake
    kernel promised, also for a transposed (non-contiguous) input."""

    def attention_scores(q, k):
        q = qc.fake_quantize(q.transpose(1, 2), "int8", amax=torch.tensor(3.0))
        k = qc.fake_quantize(k.transpose(1, 2), "int8", amax=torch.tensor(3.0))
        return q @ k.transpose(-2, -1)

    q, k = torch.randn(2, 16, 4, 32), torch.randn(2, 16, 4, 32)
    torch._dynamo.reset()
    compiled = torch.compile(attention_scores, backend="qcompile", options={"lowering": "kernel"})
    out, codes = run_and_get_code(compiled, q, k)
    torch.testing.assert_close(out, attention_scores(q, k), rtol=1e-5, atol=1e-5)
    assert any("torch.ops.qcompile.fake_quantize" in code for code in codes)


# ------------------------------------------------------- straight-through backward on CPU
def _edge_values(lo: float, hi: float) -> torch.Tensor:
    """Both ends of [lo, hi] exactly and one ulp outside, zeros, NaN, +-inf, a spread."""
    ends = torch.tensor([lo, hi, 0.0, -0.0, float("nan"), float("inf"), float("-inf")])
    past = torch.nextafter(torch.tensor([lo, hi]), torch.tensor([-10.0, 10.0]))
    spread = torch.linspace(3 * lo, 3 * hi, 55)
    return torch.cat([ends, past, spread]).reshape(-1, 32)


@pytest.mark.parametrize("fmt,static", [("int8", True), ("fp8", True), ("nvfp4", True),
                                        ("int4", True), ("mxfp8", False), ("int8", False)])
def test_compiled_ste_gradient_equals_the_contract_at_the_edges(fmt, static):
    torch._dynamo.reset()
    amax = torch.tensor(2.0) if static else None
    fmt_info = qc.get_format(fmt)
    ratio = fmt_info.element.min_value / fmt_info.divisor  # the grid's bottom: -8/7.5 for int4
    lo = 2.0 * ratio if fmt in ("int8", "int4") else -2.0
    x = _edge_values(lo, 2.0)
    block = 16 if fmt == "int4" else None  # the others: their own blocks, or none

    def grad_of(fn):
        leaf = x.clone().requires_grad_(True)
        fn(leaf).sum().backward()
        return leaf.grad

    def quantize(t):
        return qc.fake_quantize(t, fmt, amax=amax, block_size=block)

    want = ((x >= lo) & (x <= 2.0)) if static else x.isfinite()
    assert torch.equal(grad_of(quantize), want.float())
    assert torch.equal(grad_of(torch.compile(quantize, backend="qcompile", fullgraph=True)),
                       want.float())


@pytest.mark.parametrize("recipe", ["int8", "fp8"])
def test_compiled_training_saves_no_bool_mask_for_backward_on_cpu(recipe):
    """Inductor's C++ backend stores bool tensors ~15x slower than float ones; the STE must
    hand the backward x itself or its pass mask as uint8, never a bool mask. Attention is
    where a mask was saved: its quantized q, k and v are kept for the backward anyway."""
    from qcompile.demo import char_gpt

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = char_gpt.GPTConfig(layers=1, d_model=64, heads=2, seq_len=32)
    tokens = torch.randint(0, char_gpt.VOCAB_SIZE, (2, config.seq_len))
    model = qc.prepare(char_gpt.CharGPT(config), recipe, (tokens,))
    qc.calibrate(model, [(tokens,)], progress=False)
    compiled = torch.compile(model.train(), backend="qcompile", fullgraph=True)
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = compiled(tokens)
    out.float().sum().backward()
    masks = [shape for dtype, shape in saved if dtype == torch.bool]
    # attention stays fused (is_causal), so the model keeps no bool either
    assert len(saved) > 10 and masks == [], masks
