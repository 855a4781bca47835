"""The quantization formats, described once as data.

This module owns *what* a format is: its element type (integer or small float), how its
scale is derived (fp32 from amax, two-level E4M3 x fp32, or power-of-two E8M0) and its block
size. It knows nothing of tensors or graphs; `qcompile.core.numerics` turns these descriptions into
arithmetic, per *kind* of element and scale, so adding a format is one row of `FORMATS`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from fractions import Fraction


class ElementKind(enum.Enum):
    INT = "int"
    FLOAT = "float"


@dataclass(frozen=True)
class ElementType:
    """The type each quantized value is stored in.

    For integers the representable values are the integers in [qmin, qmax]. For small floats
    (sign, `exponent_bits`, `mantissa_bits`, no inf) the values are the finite numbers of that
    encoding; `min_exponent` is the exponent of the smallest normal number and `max_value` the
    largest finite value, where quantization saturates.
    """

    name: str
    kind: ElementKind
    bits: int
    max_value: float
    min_value: float
    mantissa_bits: int = 0
    min_exponent: int = 0
    max_exponent: int = 0

    def __post_init__(self) -> None:
        if self.max_value <= 0 or self.min_value >= 0:
            raise ValueError(f"element {self.name}: range must straddle zero")


INT8 = ElementType("int8", ElementKind.INT, 8, max_value=127.0, min_value=-128.0)
INT4 = ElementType("int4", ElementKind.INT, 4, max_value=7.0, min_value=-8.0)
E4M3 = ElementType(
    "float8_e4m3fn", ElementKind.FLOAT, 8, max_value=448.0, min_value=-448.0,
    mantissa_bits=3, min_exponent=-6, max_exponent=8,
)
E2M1 = ElementType(
    "float4_e2m1fn", ElementKind.FLOAT, 4, max_value=6.0, min_value=-6.0,
    mantissa_bits=1, min_exponent=0, max_exponent=2,
)


class ScaleKind(enum.Enum):
    """How a scale is derived from an amax.

    - FP32: `scale = amax / divisor`, one fp32 number per tensor, channel or block; the
      divisor is the element max unless the format names another (`QuantFormat.divisor`).
    - E4M3_TWO_LEVEL: per block `e4m3((amax_block / element.max_value) / global_scale)` times
      the fp32 `global_scale = amax / (element.max_value * 448)` (NVFP4).
    - E8M0: per block a power of two `2 ** k`, k in [-127, 127], chosen by the format's
      `ScaleRule` from the block amax.
    """

    FP32 = "fp32"
    E4M3_TWO_LEVEL = "e4m3_two_level"
    E8M0 = "e8m0"


class ScaleRule(enum.Enum):
    """How an E8M0 (power-of-two) block scale is chosen from the block amax.

    - CEIL: the smallest `2 ** k >= amax / element.max_value` (fp32 quotient, rounded to
      nearest), so no element of the block clips. What NVIDIA's runtimes compute: Transformer
      Engine, cuDNN, flashinfer/TensorRT-LLM (vLLM), ModelOpt, and the ONNX op TensorRT runs
      (bench/RESULTS.md, #26). A zero block gets 2**-127.
    - OCP: `2 ** (floor(log2(amax)) - element.max_exponent)`, the OCP MX 1.0 text; blocks whose
      amax has a larger significand than the element max clip their top (torchao's default).
    Both clamp k to [-127, 127].
    """

    CEIL = "ceil"
    OCP = "ocp"


@dataclass(frozen=True)
class QuantFormat:
    """One quantization format: element type, scale kind and block size.

    `block_size` is the default number of consecutive elements along the last axis that share
    a scale (None: one scale per tensor or per channel). `fixed_block_size` marks formats whose
    block size is part of their definition (NVFP4's 16, MX's 32).
    `static_amax` says whether the format can use a calibrated amax: the global amax of NVFP4,
    the tensor/channel/block amax of FP32-scaled formats; MX formats derive every scale from
    the data itself. `scale_rule` picks the power of two of E8M0 scales (None otherwise).
    `scale_divisor` (FP32 scales only) replaces the element max in `scale = amax / divisor`:
    int4's 7.5 puts the amax on the rounding edge between 7 and 8, so a block spends the whole
    [-8, 7] range (its positive max saturates to 7, a negative one rounds to -8 or, one fp32
    ulp away, -7); what torchao and compressed-tensors compute (bench/RESULTS.md, #25).
    """

    name: str
    element: ElementType
    scale: ScaleKind
    block_size: int | None = None
    fixed_block_size: bool = False
    static_amax: bool = True
    scale_rule: ScaleRule | None = None
    scale_divisor: float | None = None

    def __post_init__(self) -> None:
        if self.scale is not ScaleKind.FP32 and self.block_size is None:
            raise ValueError(f"format {self.name}: {self.scale.value} scales need a block size")
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"format {self.name}: block_size must be positive")
        if (self.scale is ScaleKind.E8M0) != (self.scale_rule is not None):
            raise ValueError(f"format {self.name}: E8M0 scales need a scale_rule, others none")
        if self.scale_divisor is not None and (
            self.scale is not ScaleKind.FP32 or not self.scale_divisor >= self.element.max_value
        ):
            raise ValueError(f"format {self.name}: scale_divisor applies to fp32 scales and is "
                             f"at least the element max {self.element.max_value}")

    @property
    def divisor(self) -> float:
        """What an FP32 scale divides the amax by: `scale_divisor`, else the element max."""
        return self.element.max_value if self.scale_divisor is None else self.scale_divisor

    @property
    def learnable_amax(self) -> bool:
        """Whether an amax tensor may require grad (LSQ-style): only where scale = amax / max."""
        return self.scale is ScaleKind.FP32

    def resolve_block_size(self, block_size: int | None) -> int | None:
        """The block size to use: the format's own unless a valid override is given."""
        if block_size is None:
            return self.block_size
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if self.fixed_block_size and block_size != self.block_size:
            raise ValueError(
                f"{self.name} is defined with blocks of {self.block_size}; "
                f"block_size={block_size} is not {self.name}. Leave block_size unset."
            )
        return block_size

    def storage_bits(self, block_size: int | None = None) -> Fraction:
        """Bits stored per element, block scales included (NVFP4 4 + 8/16 = 4.5, MXFP4 4.25,
        int4 with fp32 scales per 128 4.25); one scale per tensor or channel counts as 0."""
        block = self.resolve_block_size(block_size)
        if block is None:
            return Fraction(self.element.bits)
        scale_bits = 32 if self.scale is ScaleKind.FP32 else 8  # fp32, or E4M3 / E8M0
        return self.element.bits + Fraction(scale_bits, block)


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("int8", INT8, ScaleKind.FP32),
        QuantFormat("int4", INT4, ScaleKind.FP32, block_size=128, scale_divisor=7.5),
        QuantFormat("fp8", E4M3, ScaleKind.FP32),
        QuantFormat("nvfp4", E2M1, ScaleKind.E4M3_TWO_LEVEL, block_size=16, fixed_block_size=True),
        *(
            QuantFormat(f"{name}{suffix}", element, ScaleKind.E8M0, block_size=32,
                        fixed_block_size=True, static_amax=False, scale_rule=rule)
            for name, element in (("mxfp4", E2M1), ("mxfp8", E4M3))
            # Default: the rule NVIDIA's runtimes compute; `_ocp`: the OCP MX 1.0 text.
            for suffix, rule in (("", ScaleRule.CEIL), ("_ocp", ScaleRule.OCP))
        ),
    )
}

#: Largest finite value of the E4M3 block scales of NVFP4.
E4M3_MAX = E4M3.max_value


def get_format(fmt: str | QuantFormat) -> QuantFormat:
    """Look a format up by name; an unknown name lists the valid ones."""
    if isinstance(fmt, QuantFormat):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a name such as 'int8', got {type(fmt).__name__}")
    try:
        return FORMATS[fmt.lower()]
    except KeyError:
        raise ValueError(
            f"unknown format {fmt!r}; valid formats: {', '.join(sorted(FORMATS))}"
        ) from None
