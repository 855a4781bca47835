"""Sites: the places in a graph where a quantizer can sit, as the match pass finds them.

A site is one matmul-like op (a Linear, an activation-activation matmul, a convolution) with a
stable, human-readable name derived from the module path (`encoder.layer.0.attention.self.query`,
`encoder.layer.0.attention.self.matmul_0`). The match pass produces sites; the insert pass fills
in which quantizer modules guard which inputs; `calibrate` and `report` read them back from the
prepared model's `qcompile_sites` attribute. Nothing here knows about numerics or ONNX.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from qcompile.quantizer import QuantSpec


class SiteKind(enum.Enum):
    LINEAR = "linear"
    MATMUL = "matmul"
    CONV = "conv"


class SiteStatus(enum.Enum):
    QUANTIZED = "quantized"
    EXCLUDED = "excluded"  # the recipe left it in float (exclude pattern, output head, ...)
    UNSUPPORTED = "unsupported"  # cannot be quantized as is (shape, dtype, ...); left in float


#: Input roles: "input" is the activation operand (first), "weight" the Linear/conv weight,
#: "other" the second activation operand of an activation-activation matmul.
ROLES = ("input", "weight", "other")


@dataclass
class Site:
    name: str
    kind: SiteKind
    node_name: str
    status: SiteStatus = SiteStatus.QUANTIZED
    reason: str = ""
    specs: dict[str, QuantSpec] = field(default_factory=dict)
    #: role -> dotted path of the Quantizer submodule in the prepared model.
    quantizers: dict[str, str] = field(default_factory=dict)
    #: role -> the axis of that operand which the op reduces (K): -1 for activations and for
    #: [out, in] weights, -2 for the second operand of a matmul. Block scales run along it.
    reduction_axes: dict[str, int] = field(default_factory=dict)
    #: K, the length of the reduced axis; None where it is dynamic or unknown.
    reduction_size: int | None = None
