"""Sites: the places in a graph where a quantizer can sit, as the match pass finds them.

A site is one matmul-like op (a Linear, an activation-activation matmul, a convolution) with a
stable, human-readable name derived from the module path (`encoder.layer.0.attention.self.query`,
`encoder.layer.0.attention.self.matmul_0`). The match pass produces sites; the insert pass fills
in which quantizer modules guard which inputs; `calibrate` and `report` read them back from the
prepared model through `model_sites`, and `site_quantizers` lists every quantizer of a
prepared model with its site and role. A model prepared block by block holds one graph per
block (a module with `qcompile_block`); `model_sites` and `prepared_graphs` gather them, with
names and quantizer paths relative to the model. Nothing here knows about numerics or ONNX.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from torch import fx, nn

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
    #: Path of the parameter the site's weight is read from (a Linear's `<module>.weight`,
    #: a fused-experts `<module>.gate_up_proj`); None for activation matmuls or unknown.
    weight: str | None = None
    #: Which expert's slice `weight[expert]` the site multiplies by (3-D expert weights).
    expert: int | None = None
    #: Number of elements of the weight of a Linear/conv site (one expert's slice for an
    #: expert; None for an activation-activation matmul, or where the shape is unknown): what
    #: effective-bits budgets and the weight coverage count.
    weight_size: int | None = None
    #: A MoE router: its output picks the experts (stays float unless an override names it).
    router: bool = False


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


def prepared_graphs(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """(path, graph module) of every prepared graph of `model`: the model itself where it was
    prepared as one graph (path ""), else each prepared block (`model.layers.3`)."""
    if getattr(model, "qcompile_sites", None) is not None and not hasattr(model, "qcompile_block"):
        return [("", model)]
    found: list[tuple[str, fx.GraphModule]] = []
    for path, module in model.named_modules():
        if hasattr(module, "qcompile_block") and not any(
            path.startswith(f"{outer}.") for outer, _ in found
        ):
            found.append((path, module))
    return found


def model_sites(model: nn.Module) -> list[Site] | None:
    """The sites `prepare` found in `model` (quantized or not), or None for a module that
    holds no prepared part. A block-wise prepared model's sites are gathered from its blocks,
    named by their path in `model` (`model.layers.3.mlp.down_proj`), followed by the float
    Linear layers outside the blocks (`qcompile_outside`)."""
    graphs = prepared_graphs(model)
    if not graphs:
        return None
    if graphs[0][0] == "":
        return graphs[0][1].qcompile_sites
    sites = [prefixed(site, path) for path, block in graphs for site in block.qcompile_sites]
    return sites + list(getattr(model, "qcompile_outside", ()))


def prefixed(site: Site, prefix: str) -> Site:
    """`site` named relative to a module `prefix` levels up (name, weight and quantizer paths)."""
    if not prefix:
        return site
    weight = None if site.weight is None else f"{prefix}.{site.weight}"
    return replace(site, name=f"{prefix}.{site.name}", weight=weight,
                   quantizers={role: f"{prefix}.{path}" for role, path in site.quantizers.items()})


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


@dataclass(frozen=True)
class WeightCoverage:
    """How much of a model's matmul weights (the weights of Linear, convolution and expert
    sites, and of products listed as unsupported; embedding lookups aside) is quantized, in
    elements. `floating` lists each weight left in float: (site name, elements, reason)."""

    quantized: int
    total: int
    floating: tuple[tuple[str, int, str], ...]

    @property
    def fraction(self) -> float:
        return self.quantized / self.total if self.total else 1.0

    def describe(self) -> str:
        """e.g. "matmul weights quantized: 97.3% (81,920 of 84,224 elements)"."""
        return (f"matmul weights quantized: {100 * self.fraction:.1f}% "
                f"({self.quantized:,} of {self.total:,} elements)")


def weight_coverage(sites: list[Site]) -> WeightCoverage:
    """The `WeightCoverage` of these sites; a weight several sites use (tied, shared) counts
    once, as quantized if any site quantizes it."""
    sizes: dict[tuple, int] = {}
    quantized: set[tuple] = set()
    reasons: dict[tuple, tuple[str, str]] = {}
    for site in sites:
        if site.kind is SiteKind.MATMUL or not site.weight_size:
            continue
        key = (site.weight or site.name, site.expert)
        sizes[key] = site.weight_size
        if site.status is SiteStatus.QUANTIZED and "weight" in site.specs:
            quantized.add(key)
        else:
            reason = site.reason or "the recipe quantizes no weight"
            reasons.setdefault(key, (site.name, reason))
    floating = tuple((reasons[k][0], sizes[k], reasons[k][1]) for k in reasons if k not in quantized)
    return WeightCoverage(sum(sizes[k] for k in quantized), sum(sizes.values()), floating)


def _role_from_path(path: str) -> str:
    attribute = path.rsplit(".", 1)[-1]
    return next((role for role in ROLES if role in attribute), "input")
