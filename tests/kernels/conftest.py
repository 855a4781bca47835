"""Kernel tests run on the GPU where there is one, else under the Triton interpreter on CPU."""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the kernels are decorated: `triton.jit` picks the interpreter then.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # `import qcompile` imports the Triton kernels (qcompile.ops registers them for CUDA), so a
    # test module collected before this file may already have jitted them for a GPU;
    # re-executing the module decorates them again, now for the interpreter.
    _module = sys.modules.get("qcompile.kernels.triton_fake_quant")
    if _module is not None:
        importlib.reload(_module)


@pytest.fixture
def device() -> str:
    """Where the kernels under test run: CUDA when present, else CPU (Triton interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
