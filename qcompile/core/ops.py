"""The `qcompile` custom ops: fake quantization and its straight-through backward.

The `torch.library` ops in the `qcompile` namespace, each with a fake (meta) kernel so
torch.export and torch.compile trace through them without graph breaks:

- `qcompile::fake_quantize(x, amax, format, block_size) -> Tensor`
- `qcompile::fake_quantize_backward(grad, x, amax, format, block_size) -> Tensor` (STE)
- `qcompile::fake_quantize_amax_backward(grad, x, amax, format, block_size) -> Tensor` (LSQ)

and two that the eager backward uses to keep a uint8 mask instead of x: `qcompile::ste_keep`
(the mask) and `qcompile::masked_backward(grad, keep)` (the STE from it).

`amax` is None for dynamic scales and otherwise broadcastable to x (or to its block view);
`block_size` 0 means no blocks. The default kernel is `qcompile.core.kernels.cpu` (any device);
CUDA tensors use the Triton kernels where triton is installed. This module knows nothing of
graphs or modules; argument checking lives in `qcompile.core.fake_quant`.
"""

from __future__ import annotations

import importlib.util

import torch

from qcompile.core.kernels import cpu

_NAMESPACE = "qcompile"


def block_or_none(block_size: int) -> int | None:
    """The op's block_size argument (0: no blocks) as numerics takes it."""
    return block_size if block_size > 0 else None


@torch.library.custom_op(f"{_NAMESPACE}::fake_quantize", mutates_args=())
def fake_quantize(
    x: torch.Tensor, amax: torch.Tensor | None, format: str, block_size: int
) -> torch.Tensor:
    return cpu.run("forward", format, block_or_none(block_size), x, amax).contiguous()


def plain_eager() -> bool:
    """Whether this call runs plainly in eager mode: nothing compiles, exports or traces it,
    and no torch function or dispatch mode (FakeTensor, proxy tracing, `torch.device(...)`)
    or autocast intercepts it."""
    return not (torch.compiler.is_compiling()
                or torch.compiler.is_exporting()
                or torch.jit.is_tracing()
                or torch.jit.is_scripting()
                or torch._C._len_torch_function_stack() > 0
                or torch._C._len_torch_dispatch_stack() > 0
                or torch._C._is_any_autocast_enabled())


def fake_quantize_inference(
    x: torch.Tensor, amax: torch.Tensor | None, format: str, block_size: int
) -> torch.Tensor:
    """What `fake_quantize` computes, called straight to the kernel of x's device without the
    op's dispatch (about 0.1 ms a call on CPU, which dominates decoding small tensors). Only
    where nothing needs the op itself: gradients off and `plain_eager()`."""
    if x.device.type == "cuda" and TRITON_REGISTERED:
        from qcompile.core.kernels import triton_fake_quant

        return triton_fake_quant.fake_quantize(x, amax, format, block_size).contiguous()
    return cpu.run("forward", format, block_or_none(block_size), x, amax).contiguous()


def _contiguous_like(x: torch.Tensor) -> torch.Tensor:
    """The output of every kernel: x's shape and dtype, contiguous whatever x's strides (the
    compiled callers check the strides that the fake kernel promised)."""
    return x.new_empty(x.shape)


@fake_quantize.register_fake
def _(x, amax, format, block_size):
    return _contiguous_like(x)


@torch.library.custom_op(f"{_NAMESPACE}::fake_quantize_backward", mutates_args=())
def fake_quantize_backward(
    grad: torch.Tensor, x: torch.Tensor, amax: torch.Tensor | None, format: str, block_size: int
) -> torch.Tensor:
    return cpu.run("backward", format, block_or_none(block_size), grad, x, amax).contiguous()


@fake_quantize_backward.register_fake
def _(grad, x, amax, format, block_size):
    return _contiguous_like(grad)


@torch.library.custom_op(f"{_NAMESPACE}::fake_quantize_amax_backward", mutates_args=())
def fake_quantize_amax_backward(
    grad: torch.Tensor, x: torch.Tensor, amax: torch.Tensor, format: str, block_size: int
) -> torch.Tensor:
    return cpu.run("amax_backward", format, block_or_none(block_size), grad, x, amax).contiguous()


@fake_quantize_amax_backward.register_fake
def _(grad, x, amax, format, block_size):
    return _contiguous_like(amax)


@torch.library.custom_op(f"{_NAMESPACE}::ste_keep", mutates_args=())
def ste_keep(x: torch.Tensor, amax: torch.Tensor | None, format: str, block_size: int) -> torch.Tensor:
    return cpu.run("ste_keep", format, block_or_none(block_size), x, amax).contiguous()


@ste_keep.register_fake
def _(x, amax, format, block_size):
    return x.new_empty(x.shape, dtype=torch.uint8)


@torch.library.custom_op(f"{_NAMESPACE}::masked_backward", mutates_args=())
def masked_backward(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return cpu.run("masked_backward", "int8", None, grad, keep, None).contiguous()


@masked_backward.register_fake
def _(grad, keep):
    return _contiguous_like(grad)


def _setup_context(ctx, inputs, output) -> None:
    """Save the least the backward needs.

    Eager, with an amax that is not learned, that is the straight-through mask as uint8
    (`numerics.ste_keep`): a quarter of a float32 x (half of a bf16 one), and x itself can be
    freed where nothing else keeps it (the consumer keeps the quantized copy it multiplies).
    A learned amax needs x for its gradient; under torch.compile x is saved and the
    partitioner decides what to keep (it recomputes the mask, see `qcompile.backends.compile`).
    """
    x, amax, format, block_size = inputs
    ctx.format = format
    ctx.block_size = block_size
    learned = amax is not None and amax.requires_grad
    ctx.keep_mask = not learned and not torch.compiler.is_compiling()
    if not ctx.keep_mask:
        ctx.save_for_backward(x, amax)
    elif x.requires_grad:
        ctx.save_for_backward(ste_keep(x, amax, format, block_size), None)
    else:
        ctx.save_for_backward(None, None)


def _backward(ctx, grad):
    saved, amax = ctx.saved_tensors
    grad_x = grad_amax = None
    if ctx.keep_mask:
        if ctx.needs_input_grad[0]:
            grad_x = masked_backward(grad, saved)
        return grad_x, None, None, None
    x = saved
    if ctx.needs_input_grad[0]:
        grad_x = fake_quantize_backward(grad, x, amax, ctx.format, ctx.block_size)
    if amax is not None and ctx.needs_input_grad[1]:
        grad_amax = fake_quantize_amax_backward(grad, x, amax, ctx.format, ctx.block_size)
    return grad_x, grad_amax, None, None


fake_quantize.register_autograd(_backward, setup_context=_setup_context)


def _triton_kernel(name: str):
    """A CUDA kernel that imports the Triton module on first use (keeps `import qcompile` light)."""

    def kernel(*args):
        from qcompile.core.kernels import triton_fake_quant

        return getattr(triton_fake_quant, name)(*args)

    kernel.__name__ = f"triton_{name}"
    return kernel


def _register_triton_kernels() -> bool:
    """Use the Triton kernels for CUDA tensors where triton is installed."""
    if importlib.util.find_spec("triton") is None:
        return False
    fake_quantize.register_kernel("cuda")(_triton_kernel("fake_quantize"))
    fake_quantize_backward.register_kernel("cuda")(_triton_kernel("fake_quantize_backward"))
    return True


TRITON_REGISTERED = _register_triton_kernels()
