"""Run exported ONNX files with `onnx.reference`, the independent evaluator for FP4 and MX.

onnx.reference is the only evaluator that runs every standard Q/DQ type (FLOAT4E2M1 included);
this module wraps it with one correction: its GatherElements uses `np.choose`, which takes at
most 64 choices, and its fallback is wrong (Hugging Face BERT gathers its 512 buffered
token-type ids by position). It knows nothing of how the file was produced.
"""

from __future__ import annotations

import os

import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun


class GatherElements(OpRun):  # new_ops are matched by class name
    """GatherElements with `np.take_along_axis` (any number of choices, negative indices)."""

    def _run(self, data, indices, axis=0):
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, indices, axis=axis),)


def reference_evaluator(path: str | os.PathLike) -> ReferenceEvaluator:
    """An `onnx.reference.ReferenceEvaluator` for the file, with the corrections above."""
    return ReferenceEvaluator(str(path), new_ops=[GatherElements])
