"""`onnxruntime_session`: an onnxruntime session that computes what an exported graph says.

onnxruntime's default session rewrites Q/DQ patterns into fused kernels, and two rewrites
change the numbers of graphs qcompile can export (`backends.onnx.rules.ORT_RULES`): the
rule `ReluQuantRewrite` drops a Relu in front of an FP8 QuantizeLinear that has a zero point
(an onnxruntime bug; qcompile's default export has no such Q), and blocked INT4 weights fuse
into `MatMulNBits` with accuracy level 4, int8 activations (a speed-over-fidelity default). This
module owns the session options that keep every other optimization and undo those two. It
knows nothing of torch or of how the file was produced.
"""

from __future__ import annotations

import os
from typing import Any

#: Session config key of the accuracy level of the MatMulNBits that onnxruntime fuses from
#: DequantizeLinear -> MatMul; "1" computes in fp32 (levels 0-3 measured exact on CPU).
MATMULNBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
#: Rewrite rules to disable: ReluQuantRewrite drops a Relu before a Q that does not clamp at 0.
DISABLED_OPTIMIZERS = ("ReluQuantRewrite",)


def onnxruntime_session(
    path: str | os.PathLike | bytes,
    sess_options: Any = None,
    **kwargs: Any,
):
    """An `onnxruntime.InferenceSession` with the default graph optimizations except those
    that change a Q/DQ graph's numbers (see the module docstring).

    Args:
        path: the .onnx file (or its serialized bytes).
        sess_options: an `onnxruntime.SessionOptions` to start from (default: a new one); a
            MatMulNBits accuracy level already set in it is kept.
        kwargs: passed to `InferenceSession` (`providers`, ...); `disabled_optimizers` are
            added to `DISABLED_OPTIMIZERS`.
    """
    import onnxruntime

    options = sess_options if sess_options is not None else onnxruntime.SessionOptions()
    try:
        options.get_session_config_entry(MATMULNBITS_ACCURACY_KEY)
    except RuntimeError:  # not set: onnxruntime's default is "4"
        options.add_session_config_entry(MATMULNBITS_ACCURACY_KEY, "1")
    disabled = sorted({*DISABLED_OPTIMIZERS, *kwargs.pop("disabled_optimizers", ())})
    model = path if isinstance(path, bytes) else str(path)
    return onnxruntime.InferenceSession(model, options, disabled_optimizers=disabled, **kwargs)
