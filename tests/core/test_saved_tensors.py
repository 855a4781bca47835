"""What fake_quantize keeps for the backward (#27): eager, a uint8 straight-through mask in
place of x, with gradients bit-identical to `numerics.fake_quantize_backward`; a learned amax
keeps x (its gradient needs it)."""

from __future__ import annotations

import pytest
import torch

from qcompile.core import numerics
from qcompile.core.fake_quant import fake_quantize
from qcompile.core.formats import get_format
from qcompile.core.kernels.cpu import COMPILE_MIN_NUMEL

#: (format, static amax or None, block size); static amaxes clip the outliers below
CASES = [("int8", 2.0, None), ("fp8", 3.0, None), ("nvfp4", 4.0, 16), ("mxfp8", None, 32),
         ("int4", None, 128), ("int8", None, None)]


def _inputs(numel_at_least: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = -(-numel_at_least // 256)
    x = torch.randn(rows, 256, generator=generator) * 2
    x[0, :8] = torch.tensor([0.0, -0.0, 1e4, -1e4, float("inf"), float("-inf"), float("nan"), 2.0])
    x[1] = 0  # an all-zero block
    grad = torch.randn(rows, 256, generator=generator)
    grad[2, :3] = torch.tensor([float("inf"), float("nan"), float("-inf")])
    return x.to(dtype), grad.to(dtype)


def _saved(fn):
    found = []

    def pack(tensor):
        found.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, found


#: every case through the eager kernel in float32; bfloat16 and the inductor-compiled kernel
#: (tensors of COMPILE_MIN_NUMEL elements or more) on a few, as compiling each costs seconds
MATRIX = ([(*case, 1024, torch.float32) for case in CASES]
          + [(*CASES[0], 1024, torch.bfloat16), (*CASES[2], 1024, torch.bfloat16)]
          + [(*CASES[0], COMPILE_MIN_NUMEL, torch.float32),
             (*CASES[3], COMPILE_MIN_NUMEL, torch.float32)])


@pytest.mark.parametrize("fmt, amax, block, numel, dtype", MATRIX)
def test_backward_keeps_a_uint8_mask_and_matches_the_reference(fmt, amax, block, numel, dtype):
    x, grad = _inputs(numel, dtype, seed=numel)
    leaf = x.clone().requires_grad_()
    out, saved = _saved(lambda: fake_quantize(leaf, fmt, amax=amax, block_size=block))
    big = [t for t in saved if t is not None and t.numel() == x.numel()]
    assert [t.dtype for t in big] == [torch.uint8]  # no copy of x, float or otherwise
    out.backward(grad)
    spec = get_format(fmt)
    block = spec.resolve_block_size(block)
    amax_t = None if amax is None else torch.tensor(amax)
    want = numerics.fake_quantize_backward(grad, x, amax_t, spec, block)
    assert leaf.grad.dtype == dtype
    assert torch.equal(leaf.grad.float().nan_to_num(7.0), want.float().nan_to_num(7.0))
    assert torch.equal(leaf.grad.isnan(), want.isnan())
    assert (leaf.grad == 0).any() and (leaf.grad != 0).any()  # the mask both passes and stops


def test_learned_amax_keeps_x_for_its_gradient():
    x, grad = _inputs(1024, torch.float32, seed=1)
    x = x.nan_to_num(0.0, 0.0, 0.0).requires_grad_()
    grad = grad.nan_to_num(0.0, 0.0, 0.0)
    amax = torch.tensor(2.0, requires_grad=True)
    out, saved = _saved(lambda: fake_quantize(x, "int8", amax=amax))
    assert any(t is not None and t.dtype == torch.float32 and t.shape == x.shape for t in saved)
    out.backward(grad)
    want = numerics.amax_gradient(grad, x.detach(), amax.detach(), get_format("int8"), None)
    assert torch.equal(amax.grad, want)
