"""Kernels behind the `qcompile` custom ops: `cpu` (aten, inductor-fused) and Triton (CUDA)."""
