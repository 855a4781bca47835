"""Kernel tests run on the GPU where there is one, else under the Triton interpreter on CPU."""

import pytest
import torch
import triton.language as tl  # TRITON_INTERPRET is set by tests/conftest.py where no GPU is

#: Why the kernels cannot run here, or None. Triton's own library (tl.max, ...) is jitted when
#: triton is imported: if that happened before this file set TRITON_INTERPRET (a test module
#: elsewhere imported qcompile first), interpreted kernels fail deep inside Triton instead.
INTERPRETER_PROBLEM = None
if not torch.cuda.is_available() and type(tl.max).__name__ != "InterpretedFunction":
    INTERPRETER_PROBLEM = (
        "no CUDA GPU, and triton was imported before TRITON_INTERPRET=1 was set, so the Triton "
        "kernels cannot run under the interpreter. Set TRITON_INTERPRET=1 in the environment, "
        "or in tests/conftest.py before anything imports qcompile or triton."
    )


@pytest.fixture(autouse=True)
def _triton_can_run():
    if INTERPRETER_PROBLEM:
        pytest.fail(INTERPRETER_PROBLEM)


@pytest.fixture
def device() -> str:
    """Where the kernels under test run: CUDA when present, else CPU (Triton interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
