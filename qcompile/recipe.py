"""Recipes: which format quantizes which input of which site, as validated data.

A `Recipe` says, per site kind (Linear, activation-activation matmul, fused attention,
convolution), which `QuantSpec` guards the weight and which the activation input, which sites
stay in float (`exclude` glob patterns on site names) and per-site overrides. The named recipes
(`int8`, `fp8`, `nvfp4`, `mxfp4`, `mxfp8`, `mxfp4_ocp`, `mxfp8_ocp`,
`int4`, `w4a8`) are plain instances in `RECIPES`. A
recipe also says how a fused attention is quantized (`attention`), whether the attention's key
and value states are quantized as a serving engine's KV cache stores them (`kv_cache`), and
whether layers that serving engines fuse into one matmul (q/k/v, gate/up: `fused_group`) share
their per-tensor scales (`tie_fused`).
This module decides *what* to quantize; it knows nothing of graphs (passes apply it) or of
numerics (the specs describe formats, `qcompile.core.quantizer` runs them).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from qcompile.core.formats import get_format
from qcompile.core.quantizer import Granularity, QuantSpec
from qcompile.passes.sites import SiteKind

#: `Recipe.attention` values and what each quantizes.
ATTENTION_MODES: dict[str, str] = {
    "qkv": "query, key and value in front of the fused attention",
    "products": "decompose the attention and quantize both products, softmax output included",
}

#: Sibling Linear layers that serving engines (vLLM, SGLang, TensorRT-LLM) run as one matmul
#: with one input scale and one per-tensor weight scale: q/k/v -> qkv_proj, gate/up ->
#: gate_up_proj, Mixtral's w1/w3.
FUSED_LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("qkv", frozenset({"q_proj", "k_proj", "v_proj"})),
    ("gate_up", frozenset({"gate_proj", "up_proj"})),
    ("w13", frozenset({"w1", "w3"})),
)

#: KV-cache formats (`Recipe.kv_cache`): the per-tensor format of the stored keys and values.
KV_CACHE_FORMATS = ("fp8",)


def fused_group(name: str) -> str | None:
    """The fused layer a Linear site belongs to (`model.layers.0.self_attn.qkv` for
    `model.layers.0.self_attn.k_proj`), or None for a layer that engines run on its own."""
    parent, _, leaf = name.rpartition(".")
    for fused, members in FUSED_LAYERS:
        if leaf in members:
            return f"{parent}.{fused}" if parent else fused
    return None


#: Output heads stay in float unless an override names them.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "lm_head", "*.lm_head",
    "classifier", "*.classifier", "classifier.*", "*.classifier.*",
    "score", "*.score",
    "qa_outputs", "*.qa_outputs",
)

#: The reason a MoE router stays float (routers are tiny, and routing is sensitive).
ROUTER_REASON = "MoE router"


@dataclass(frozen=True)
class SiteSpecs:
    """The specs of one kind of site: `weight` for its weight, `input` for its activations.

    For an activation-activation matmul both operands take `input`; `weight` must be None.
    A None spec leaves that input in float.
    """

    weight: QuantSpec | None = None
    input: QuantSpec | None = None

    def __post_init__(self) -> None:
        for role in ("weight", "input"):
            spec = getattr(self, role)
            if spec is not None and not isinstance(spec, QuantSpec):
                raise TypeError(
                    f"SiteSpecs.{role} must be a QuantSpec or None, got {spec!r}; "
                    f"write e.g. {role}=QuantSpec('int8')"
                )

    def roles(self, kind: SiteKind) -> dict[str, QuantSpec]:
        """Role -> spec for a site of `kind` (roles as in `qcompile.passes.sites.ROLES`)."""
        if kind is SiteKind.MATMUL:
            specs = {"input": self.input, "other": self.input}
        elif kind is SiteKind.ATTENTION:
            specs = {"query": self.input, "key": self.input, "value": self.input}
        else:
            specs = {"input": self.input, "weight": self.weight}
        return {role: spec for role, spec in specs.items() if spec is not None}


@dataclass(frozen=True)
class Recipe:
    """What `qcompile.prepare` quantizes, and how.

    Args:
        name: shown in reports.
        linear: specs of Linear sites (`nn.Linear`, `F.linear`, GPT-2's `Conv1D`).
        matmul: specs of activation-activation matmuls (attention); None: the activation
            spec of `linear` for both operands.
        conv: specs of conv1d/conv2d sites; None: the same as `linear`.
        quantize_matmul: quantize activation-activation products at all: explicit matmuls
            (eager attention's `q @ k^T`, `p @ v`) and fused attention, as `attention` says.
        attention: how a fused `F.scaled_dot_product_attention` is quantized (with
            `quantize_matmul`), with the `matmul` specs:
            "qkv" (default): its query, key and value, in front of the unchanged fused op
            (the site `<module>.sdpa`, roles query/key/value: what FP8/INT8 attention kernels
            and a quantized KV cache consume). Training memory stays O(sequence) per head.
            "products": both operands of both products (the behaviour before "qkv"): the op is
            decomposed into `softmax(q @ k^T * scale) @ v` and the softmax output P is
            quantized too (sites `<module>.matmul_0` / `matmul_1`). Its backward keeps
            batch x heads x T x T tensors per layer (67 MB each in fp32 at batch 8, 8 heads,
            512 tokens; 16x that at 2,048 tokens) where the fused op keeps O(T): see README,
            "Training memory".
        exclude: glob patterns on site names (`encoder.layer.0.attention.self.query`) that
            stay in float. The default keeps output heads (`lm_head`, `classifier`, ...) float.
            MoE routers (a Linear whose output feeds the top-k expert choice) stay float too,
            unless an override names them.
        overrides: glob pattern -> `SiteSpecs` (or None for float), checked before `exclude`
            in the order given; the first matching pattern wins.
        learn_scales: calibrated (static) int8/int4/fp8 ranges become learnable parameters
            (LSQ-style) for QAT.
        kv_cache: "fp8" quantizes the key and value states that enter each
            `scaled_dot_product_attention` (after RoPE), per tensor with a calibrated scale, as
            a serving engine's FP8 KV cache stores them (sites of kind `kv_cache`, roles `key`
            and `value`); None leaves them in float.
        tie_fused: layers that serving engines fuse (`fused_group`: q/k/v, gate/up) get one
            calibrated input amax and, where their weight scale is per tensor (nvfp4's global
            scale, per-tensor fp8/int8), one static weight amax, the max over the group, so the
            checkpoint's scales are equal as the engines need (`qcompile.calibrate` ties them).
    """

    name: str = "custom"
    linear: SiteSpecs = field(default_factory=SiteSpecs)
    matmul: SiteSpecs | None = None
    conv: SiteSpecs | None = None
    quantize_matmul: bool = False
    attention: str = "qkv"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    overrides: tuple[tuple[str, SiteSpecs | None], ...] = ()
    learn_scales: bool = False
    kv_cache: str | None = None
    tie_fused: bool = True

    def __post_init__(self) -> None:
        for kind in ("linear", "matmul", "conv"):
            specs = getattr(self, kind)
            if isinstance(specs, QuantSpec):
                raise TypeError(
                    f"Recipe.{kind} takes SiteSpecs, not a QuantSpec; write "
                    f"{kind}=SiteSpecs(weight=..., input=...)"
                )
            if not isinstance(specs, SiteSpecs) and (kind == "linear" or specs is not None):
                raise TypeError(f"Recipe.{kind} must be SiteSpecs, got {type(specs).__name__}")
        if self.matmul is not None and self.matmul.weight is not None:
            raise ValueError(
                "activation-activation matmuls have no weight; write "
                "matmul=SiteSpecs(input=QuantSpec(...)) (it guards both operands)"
            )
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        object.__setattr__(self, "overrides", _overrides(self.overrides))
        if self.attention not in ATTENTION_MODES:
            raise ValueError(
                f"Recipe.attention={self.attention!r}; valid: "
                + ", ".join(f"{mode!r} ({what})" for mode, what in ATTENTION_MODES.items())
            )
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_FORMATS:
            raise ValueError(
                f"kv_cache={self.kv_cache!r} is not a KV-cache format; use one of "
                f"{', '.join(map(repr, KV_CACHE_FORMATS))} or None"
            )
        for flag in ("quantize_matmul", "learn_scales", "tie_fused"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"Recipe.{flag} must be True or False")
        if self.learn_scales and not any(
            _learnable(spec)
            for specs in self._all_specs()
            for spec in specs.roles(SiteKind.LINEAR).values()
        ):
            raise ValueError(
                f"learn_scales=True needs a static (calibrated) int8, int4 or fp8 spec; recipe "
                f"{self.name!r} has none. Use e.g. the 'int8' or 'fp8' recipe."
            )

    def _all_specs(self) -> list[SiteSpecs]:
        found = [self.linear, self.matmul, self.conv]
        found += [specs for _, specs in self.overrides]
        return [specs for specs in found if specs is not None]

    def kind_specs(self, kind: SiteKind) -> SiteSpecs | None:
        """The specs of sites of `kind`, before excludes and overrides (None: float)."""
        if kind in (SiteKind.MATMUL, SiteKind.ATTENTION):
            if not self.quantize_matmul:
                return None
            return self.matmul or SiteSpecs(input=self.linear.input)
        if kind is SiteKind.CONV:
            return self.conv or self.linear
        return self.linear

    def resolve(
        self, name: str, kind: SiteKind, *, router: bool = False
    ) -> tuple[dict[str, QuantSpec], str]:
        """Role -> spec for the site `name`, or ({}, reason) where it stays float. A MoE
        `router` stays float unless an override names it."""
        if kind is SiteKind.KV_CACHE:
            return self._kv_cache(name)
        roles, reason = self._resolve(name, kind, router)
        if self.tie_fused and kind is SiteKind.LINEAR and fused_group(name) is not None:
            roles = {role: _static_per_tensor(spec) if role == "weight" else spec
                     for role, spec in roles.items()}
        return roles, reason

    def _kv_cache(self, name: str) -> tuple[dict[str, QuantSpec], str]:
        if self.kv_cache is None:
            return {}, "kv_cache=None"
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(name, pattern):
                return {}, f"excluded (exclude pattern {pattern!r})"
        spec = QuantSpec(self.kv_cache)
        return self._finish({"key": spec, "value": spec}), ""

    def _resolve(
        self, name: str, kind: SiteKind, router: bool
    ) -> tuple[dict[str, QuantSpec], str]:
        for pattern, specs in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                if specs is None:
                    return {}, f"override {pattern!r} keeps it in float"
                return self._finish(specs.roles(kind)), ""
        if router:
            return {}, (f"{ROUTER_REASON} (its output picks the experts; an override "
                        "naming it quantizes it)")
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(name, pattern):
                reason = "output head" if pattern in DEFAULT_EXCLUDE else "excluded"
                return {}, f"{reason} (exclude pattern {pattern!r})"
        specs = self.kind_specs(kind)
        if specs is None:
            return {}, "quantize_matmul=False"
        roles = self._finish(specs.roles(kind))
        return roles, "" if roles else f"recipe {self.name!r} quantizes no input of a {kind.value}"

    def excludes(self, name: str) -> bool:
        """Whether an `exclude` pattern (and no override) keeps the site `name` in float.
        Effective bits per weight leave such sites out (output heads, by default)."""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern, _ in self.overrides):
            return False
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def unmatched_patterns(self, names: list[str]) -> list[tuple[str, str]]:
        """("exclude" or "override", pattern) for each user pattern that matches none of
        `names` (the default output-head patterns are expected to miss on most models)."""
        patterns = [("override", p) for p, _ in self.overrides]
        patterns += [("exclude", p) for p in self.exclude if p not in DEFAULT_EXCLUDE]
        return [(kind, p) for kind, p in patterns
                if not any(fnmatch.fnmatchcase(name, p) for name in names)]

    def _finish(self, roles: dict[str, QuantSpec]) -> dict[str, QuantSpec]:
        if not self.learn_scales:
            return roles
        return {role: spec.with_(learn_amax=True) if _learnable(spec) else spec
                for role, spec in roles.items()}

    def with_(self, **changes) -> Recipe:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @property
    def needs_calibration(self) -> bool:
        """Whether any spec of this recipe has a static (calibrated) range."""
        return self.kv_cache is not None or any(
            spec.needs_calibration
            for specs in self._all_specs()
            for spec in (specs.weight, specs.input)
            if spec is not None
        )

    def with_dynamic_ranges(self) -> Recipe:
        """A copy in which every static (calibrated) range is taken from each tensor as it
        arrives: the same formats, axes and blocks, no calibration needed. This is the scale
        policy of `torch.compile(model, backend="qcompile", options={"recipe": ...})`.

        A recipe with `learn_scales=True` has no such copy: its ranges are trained parameters.
        """
        if self.learn_scales:
            raise ValueError(
                f"recipe {self.name!r} learns its ranges (learn_scales=True), which needs "
                "calibrated starting values; prepare and calibrate the model instead"
            )
        if self.kv_cache is not None:
            raise ValueError(
                f"recipe {self.name!r} quantizes the KV cache (kv_cache={self.kv_cache!r}) "
                "with calibrated scales; prepare and calibrate the model, or drop kv_cache"
            )

        def dynamic(specs: SiteSpecs | None) -> SiteSpecs | None:
            if specs is None:
                return None
            return SiteSpecs(**{
                role: None if spec is None else spec.with_(dynamic=True)
                for role, spec in (("weight", specs.weight), ("input", specs.input))
            })

        return replace(
            self,
            linear=dynamic(self.linear),
            matmul=dynamic(self.matmul),
            conv=dynamic(self.conv),
            overrides=tuple((pattern, dynamic(specs)) for pattern, specs in self.overrides),
            tie_fused=False,  # a tie needs calibrated (static) ranges
        )


def _static_per_tensor(spec: QuantSpec) -> QuantSpec:
    """A dynamic weight spec whose amax is per tensor, made static so that fused layers can
    share it (nvfp4's global amax, per-tensor fp8/int8); other specs as they are."""
    if (spec.dynamic and get_format(spec.format).static_amax
            and spec.granularity is Granularity.TENSOR):
        return spec.with_(dynamic=False)
    return spec


def _learnable(spec: QuantSpec) -> bool:
    return not spec.dynamic and get_format(spec.format).learnable_amax


def _patterns(patterns, what: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        raise TypeError(f"{what} takes a list of glob patterns; write {what}=[{patterns!r}]")
    patterns = tuple(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{what} patterns must be strings, got {pattern!r}")
    return patterns


def _overrides(overrides) -> tuple[tuple[str, SiteSpecs | None], ...]:
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    result = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(
                "overrides maps glob patterns to SiteSpecs or None, e.g. "
                "overrides={'*.attention.*': SiteSpecs(input=QuantSpec('fp8'))}"
            )
        pattern, specs = item
        if not isinstance(pattern, str):
            raise TypeError(f"override pattern must be a string, got {pattern!r}")
        if isinstance(specs, QuantSpec):
            raise TypeError(
                f"override {pattern!r}: write SiteSpecs(weight=..., input=...) rather than a "
                "bare QuantSpec, so it is clear which input it quantizes"
            )
        if specs is not None and not isinstance(specs, SiteSpecs):
            raise TypeError(f"override {pattern!r} must map to SiteSpecs or None, got {specs!r}")
        result.append((pattern, specs))
    return tuple(result)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "int8",
            SiteSpecs(weight=QuantSpec("int8", axis=0, dynamic=True), input=QuantSpec("int8")),
            quantize_matmul=True,
        ),
        Recipe(
            "fp8",
            SiteSpecs(weight=QuantSpec("fp8", dynamic=True), input=QuantSpec("fp8")),
            quantize_matmul=True,
        ),
        Recipe(
            "nvfp4",
            SiteSpecs(weight=QuantSpec("nvfp4", dynamic=True), input=QuantSpec("nvfp4")),
        ),
        Recipe("mxfp4", SiteSpecs(weight=QuantSpec("mxfp4"), input=QuantSpec("mxfp4"))),
        Recipe("mxfp8", SiteSpecs(weight=QuantSpec("mxfp8"), input=QuantSpec("mxfp8"))),
        # The OCP MX 1.0 scale rule, for runtimes that follow the OCP text (README numerics).
        Recipe("mxfp4_ocp", SiteSpecs(weight=QuantSpec("mxfp4_ocp"), input=QuantSpec("mxfp4_ocp"))),
        Recipe("mxfp8_ocp", SiteSpecs(weight=QuantSpec("mxfp8_ocp"), input=QuantSpec("mxfp8_ocp"))),
        Recipe("int4", SiteSpecs(weight=QuantSpec("int4", dynamic=True))),
        Recipe(
            "w4a8",
            SiteSpecs(weight=QuantSpec("int4", dynamic=True), input=QuantSpec("fp8")),
        ),
    )
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A named recipe, or `recipe` itself; an unknown name lists the valid ones."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        raise TypeError(
            f"recipe must be a name such as 'int8' or a qcompile.Recipe, got {type(recipe).__name__}"
        )
    try:
        return RECIPES[recipe.lower()]
    except KeyError:
        raise ValueError(
            f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}, "
            "or build one with qcompile.Recipe(...)"
        ) from None


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """`recipe` as JSON-ready data; `recipe_from_dict` rebuilds an equal `Recipe`."""

    def specs(site_specs: SiteSpecs | None) -> dict[str, Any] | None:
        if site_specs is None:
            return None
        return {role: None if spec is None else spec.to_dict()
                for role, spec in (("weight", site_specs.weight), ("input", site_specs.input))}

    return {
        "name": recipe.name,
        "linear": specs(recipe.linear),
        "matmul": specs(recipe.matmul),
        "conv": specs(recipe.conv),
        "quantize_matmul": recipe.quantize_matmul,
        "attention": recipe.attention,
        "exclude": list(recipe.exclude),
        "overrides": [[pattern, specs(s)] for pattern, s in recipe.overrides],
        "learn_scales": recipe.learn_scales,
        "kv_cache": recipe.kv_cache,
        "tie_fused": recipe.tie_fused,
    }


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """The `Recipe` that `recipe_to_dict` described (validated as any Recipe is)."""

    def specs(value: Mapping[str, Any] | None) -> SiteSpecs | None:
        if value is None:
            return None
        return SiteSpecs(**{role: None if spec is None else QuantSpec.from_dict(spec)
                            for role, spec in value.items()})

    return Recipe(
        name=data["name"],
        linear=specs(data["linear"]),
        matmul=specs(data.get("matmul")),
        conv=specs(data.get("conv")),
        quantize_matmul=data.get("quantize_matmul", False),
        # recipes saved before the "attention" field quantized the products
        attention=data.get("attention", "products"),
        exclude=tuple(data.get("exclude", DEFAULT_EXCLUDE)),
        overrides=tuple((pattern, specs(s)) for pattern, s in data.get("overrides", ())),
        learn_scales=data.get("learn_scales", False),
        kv_cache=data.get("kv_cache"),
        tie_fused=data.get("tie_fused", False),
    )
