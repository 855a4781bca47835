"""Prepared models under `torch.compile(backend="qcompile")` across QAT steps.

One graph, compiled once, for every recipe: optimizer steps change the weights and (with
learn_scales) the amax parameters, calibration changes static amax buffers, and none of it
recompiles. Inside that graph a weight used twice is quantized once per step, and a static
amax is read, never recomputed from the activation.
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile as qc
from qcompile.core.kernels import cpu
from qcompile.core.quantizer import Quantizer

#: One recipe per quantizer path under compile: static per-tensor input with dynamic
#: per-channel (int8) or per-tensor (fp8) weights, two-level blocks (nvfp4), MX blocks (mxfp4;
#: mxfp8 differs only in the element, an argument of the same op, and compiles in
#: test_compile_backend and test_compile_recipe), weight-only blocks (int4), int4 weights with
#: fp8 inputs (w4a8), learned amax parameters (int8+learn_scales).
RECIPES = ["int8", "fp8", "nvfp4", "mxfp4", "int4", "w4a8", "int8+learn_scales"]


class Block(nn.Module):
    """Causal attention and an MLP whose first Linear is applied twice (one weight, two uses)."""

    def __init__(self, width: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, seq, width))
        return x + self.out(F.gelu(self.fc(F.gelu(self.fc(x)))))


class Twice(nn.Module):
    """One Linear applied twice, then another: two weights, three weight uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(128, 128)
        self.out = nn.Linear(128, 64)

    def forward(self, x):
        return self.out(F.gelu(self.fc(F.gelu(self.fc(x)))))


def _recipe(name: str) -> qc.Recipe:
    base, _, extra = name.partition("+")
    recipe = qc.get_recipe(base)
    return recipe.with_(learn_scales=True) if extra == "learn_scales" else recipe


def _prepared(model: nn.Module, recipe, x: torch.Tensor) -> qc.PreparedModel:
    prepared = qc.prepare(model, recipe, (x,))
    qc.calibrate(prepared, [(x,)])
    return prepared.train()


def _static_quantizers(model: nn.Module) -> list[Quantizer]:
    return [q for q in model.modules() if isinstance(q, Quantizer) and not q.spec.dynamic]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_qat_steps_compile_once_without_graph_breaks(recipe):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 128)
    model = _prepared(Block(), _recipe(recipe), x)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("qcompile")
    compiled = torch.compile(model, backend=counter)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    weight = model.get_parameter("fc.weight")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(3):
        compiled(torch.randn(2, 32, 128)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        for quantizer in _static_quantizers(model):
            if not quantizer.spec.learn_amax:  # a recalibration changes buffers in place
                quantizer.amax.mul_(1.05)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    assert not torch.equal(weight, before["fc.weight"])
    learned = [name for name in before if name.endswith("amax")]
    assert bool(learned) == recipe.endswith("learn_scales")
    for name in learned:
        assert not torch.equal(model.get_parameter(name), before[name]), name


def _post_grad_graphs(model: nn.Module, x: torch.Tensor, lowering: str) -> list[torch.fx.Graph]:
    """The graphs inductor lowers (forward first, then backward) for one training step."""
    graphs = []
    torch._dynamo.reset()
    with torch._inductor.config.patch(
        post_grad_custom_post_pass=lambda graph: graphs.append(graph), fx_graph_cache=False
    ):
        compiled = torch.compile(model, backend="qcompile", options={"lowering": lowering})
        compiled(x).sum().backward()
    return graphs


def _op_counts(graph: torch.fx.Graph) -> Counter:
    return Counter(node.target for node in graph.nodes if node.op == "call_function")


@pytest.mark.slow
def test_weight_used_twice_is_quantized_once_and_static_amax_is_not_recomputed():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 128)
    model = _prepared(Twice(), "int8", x)  # int8: weights dynamic per channel, inputs static
    assert len(_static_quantizers(model)) == 3  # fc twice, out once
    forward = _post_grad_graphs(model, x, "decompose")[0]
    counts = _op_counts(forward)
    # One reduction per distinct weight (fc, out); none for the three static activation ranges.
    assert counts[torch.ops.aten.amax.default] == 2
    forward = _post_grad_graphs(model, x, "kernel")[0]
    # Three activation quantizations and two weight quantizations, not three.
    assert _op_counts(forward)[torch.ops.qcompile.fake_quantize.default] == 5


@pytest.mark.slow
def test_weight_quantization_runs_once_per_step(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 128)
    model = _prepared(Twice(), "int8", x)
    calls = Counter()
    run = cpu.run

    def counting(kind, format_name, block_size, *tensors):
        calls[kind, tuple(tensors[0].shape)] += 1
        return run(kind, format_name, block_size, *tensors)

    monkeypatch.setattr(cpu, "run", counting)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qcompile", options={"lowering": "kernel"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled(x).sum().backward()  # compiles
    calls.clear()
    steps = 3
    for _ in range(steps):
        compiled(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert calls["forward", (128, 128)] == steps  # fc.weight: one use per step, not two
    assert calls["forward", (64, 128)] == steps  # out.weight
    assert calls["forward", (4, 16, 128)] == 3 * steps  # the three activation inputs
