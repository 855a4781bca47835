"""Sites: the places in a graph where a quantizer can sit, as the match pass finds them.

A site is one matmul-like op (a Linear, an activation-activation matmul, a convolution) with a
stable, human-readable name derived from the module path (`encoder.layer.0.attention.self.query`,
`encoder.layer.0.attention.self.matmul_0`). The match pass produces sites; the insert pass fills
in which quantizer modules guard which inputs; `calibrate` and `report` read them back from the
prepared model's `qcompile_sites` attribute, and `site_quantizers` lists every quantizer of a
prepared model with its site and role. Nothing here knows about numerics or ONNX.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from torch import nn

from qcompile.core.quantizer import Quantizer, QuantSpec


class SiteKind(enum.Enum):
    LINEAR = "linear"
    MATMUL = "matmul"
    CONV = "conv"
    #: a fused `scaled_dot_product_attention`, quantized at its query, key and value inputs
    ATTENTION = "attention"
    #: The key and value states entering an attention op, as a serving engine's KV cache
    #: stores them (`Recipe.kv_cache`); the site is named by the attention module.
    KV_CACHE = "kv_cache"


class SiteStatus(enum.Enum):
    QUANTIZED = "quantized"
    EXCLUDED = "excluded"  # the recipe left it in float (exclude pattern, output head, ...)
    UNSUPPORTED = "unsupported"  # cannot be quantized as is (shape, dtype, ...); left in float


#: Input roles: "input" is the activation operand (first), "weight" the Linear/conv weight,
#: "other" the second activation operand of an activation-activation matmul; "query", "key"
#: and "value" the inputs of a fused attention site, "key" and "value" also the states a
#: KV-cache site quantizes (each quantizer addressable on its own).
ROLES = ("input", "weight", "other", "query", "key", "value")


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
    #: Number of elements of the weight of a Linear/conv site (None for an activation-activation
    #: matmul, or where the shape is unknown): what effective-bits budgets count.
    weight_size: int | None = None


@dataclass(frozen=True)
class SiteQuantizer:
    """One quantizer of a prepared model: the site and role it guards, and its module path.
    `site` is None for a `Quantizer` that no site lists (a hand-built module's)."""

    site: Site | None
    role: str
    path: str
    quantizer: Quantizer

    @property
    def label(self) -> str:
        """"encoder.q (input)" for a site's quantizer; its module path otherwise."""
        return self.path if self.site is None else f"{self.site.name} ({self.role})"


def model_sites(model: nn.Module) -> list[Site] | None:
    """The sites `prepare` found in `model` (quantized or not), or None for a module that
    qcompile did not prepare."""
    return getattr(model, "qcompile_sites", None)


def site_quantizers(model: nn.Module, *, unique: bool = True) -> list[SiteQuantizer]:
    """Every quantizer of `model`, in site order; with `unique`, each once (a quantizer two
    sites share is listed under the first), else once per site and role.

    A prepared model's come from its sites; a module that qcompile did not prepare gets one
    entry per `Quantizer` submodule, its role guessed from the attribute name
    ("weight_quantizer" -> weight, else input). Calibrate, smooth, gptq, report and
    checkpoints all read quantizers through this one function.
    """
    sites = model_sites(model)
    if sites is None:
        return [
            SiteQuantizer(None, _role_from_path(path), path, module)
            for path, module in model.named_modules() if isinstance(module, Quantizer)
        ]
    found: dict[object, SiteQuantizer] = {}
    for site in sites:
        for role, path in site.quantizers.items():
            quantizer = model.get_submodule(path)
            key = id(quantizer) if unique else (id(quantizer), site.name, role)
            found.setdefault(key, SiteQuantizer(site, role, path, quantizer))
    return list(found.values())


def _role_from_path(path: str) -> str:
    attribute = path.rsplit(".", 1)[-1]
    return next((role for role in ROLES if role in attribute), "input")
