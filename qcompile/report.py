"""`qcompile.report`: one row per site of a prepared model, as data and as a text table.

This module owns what a user reads about a prepared model: each site's name, op kind, the
format of each quantized input, the calibrated amax (or why there is none), and whether the
site is quantized, excluded or unsupported, with the reason, the fraction of matmul weight
elements quantized and the effective bits per weight. It reads the sites through
`passes.sites` and the quantizers' state; it changes nothing and knows nothing of how the
model was built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from torch import nn

from qcompile.core.formats import get_format
from qcompile.core.quantizer import Granularity, Quantizer
from qcompile.passes.sites import WeightCoverage, model_sites, site_quantizers, weight_coverage

NONE = "-"


@dataclass(frozen=True)
class SiteRow:
    """One site: formats per input role ("-": not quantized) and the amax summary."""

    site: str
    kind: str
    weight: str
    input: str
    other: str
    amax: str
    status: str
    reason: str


@dataclass(frozen=True, repr=False)
class Report:
    """The rows of `report(model)`; `str()` (and the REPL) show them as an aligned table."""

    rows: list[SiteRow]
    #: Bits stored per weight element over the weights of all Linear/conv sites (scales
    #: included; float sites count 16), or None where no site's weight size is known.
    effective_bits: float | None = None
    #: The fraction of matmul weight elements quantized (None for an unprepared module).
    coverage: WeightCoverage | None = None

    def as_dicts(self) -> list[dict[str, str]]:
        return [asdict(row) for row in self.rows]

    def __str__(self) -> str:
        return format_report(self.rows, self.effective_bits, self.coverage)

    __repr__ = __str__


def describe_format(quantizer: Quantizer) -> str:
    """The format with its granularity ("int8 axis=0", "int4 block=128"); "(off)" if disabled."""
    spec = quantizer.spec
    text = spec.format
    if spec.granularity is Granularity.CHANNEL:
        text += f" axis={spec.axis}"
    elif spec.granularity is Granularity.BLOCK:
        text += f" block={get_format(spec.format).resolve_block_size(spec.block_size)}"
    return text if quantizer.enabled else f"{text} (off)"


def describe_amax(quantizer: Quantizer) -> str:
    """The amax as text: dynamic, uncalibrated, one value, or min..max (n) of n values."""
    if quantizer.spec.dynamic:
        return "dynamic"
    if not quantizer.calibrated:
        return "uncalibrated"
    amax = quantizer.amax.detach().float()
    if amax.numel() == 1:
        return f"{amax.item():.4g}"
    return f"{amax.min().item():.4g}..{amax.max().item():.4g} ({amax.numel()})"


def _row(name: str, kind: str, status: str, reason: str, by_role: dict[str, Quantizer]) -> SiteRow:
    formats = {role: describe_format(q) for role, q in by_role.items()}
    amax = ", ".join(f"{role}={describe_amax(q)}" for role, q in by_role.items()) or NONE
    return SiteRow(
        site=name,
        kind=kind,
        weight=formats.get("weight", NONE),
        input=formats.get("input", NONE),
        other=formats.get("other", NONE),
        amax=amax,
        status=status,
        reason=reason,
    )


def report_rows(model: nn.Module) -> list[SiteRow]:
    """One row per site of a prepared model, in order.

    A module that qcompile did not prepare gets one row per `Quantizer` submodule, named by
    its path, with its role guessed from the attribute name ("weight_quantizer" -> weight).
    """
    sites = model_sites(model)
    entries = site_quantizers(model, unique=False)
    if sites is None:
        return [_row(e.path, NONE, "quantized", "", {e.role: e.quantizer}) for e in entries]
    by_site: dict[str, dict[str, Quantizer]] = {site.name: {} for site in sites}
    for entry in entries:
        by_site[entry.site.name][entry.role] = entry.quantizer
    return [
        _row(site.name, site.kind.value, site.status.value, site.reason, by_site[site.name])
        for site in sites
    ]


def effective_bits(model: nn.Module) -> float | None:
    """Bits per weight element of a prepared model's Linear/conv sites, scales included (nvfp4
    4.5, fp8 8, float 16), weighted by each site's weight size; sites that an `exclude` pattern
    of the recipe keeps in float (output heads) are left out. None if no size is known."""
    sites = model_sites(model) or []
    recipe = getattr(model, "qcompile_recipe", None)
    weights = {e.site.name: e.quantizer for e in site_quantizers(model)
               if e.site is not None and e.role == "weight"}
    total, bits = 0, 0.0
    for site in sites:
        if not site.weight_size or (recipe is not None and recipe.excludes(site.name)):
            continue
        quantizer = weights.get(site.name)
        per_element = 16.0
        if quantizer is not None and quantizer.enabled:
            spec = quantizer.spec
            per_element = float(get_format(spec.format).storage_bits(spec.block_size))
        total += site.weight_size
        bits += site.weight_size * per_element
    return bits / total if total else None


def format_report(
    rows: list[SiteRow], effective_bits: float | None = None,
    coverage: WeightCoverage | None = None,
) -> str:
    """An aligned text table of `rows` with a header and a one-line summary (with the weight
    coverage and effective bits, where given)."""
    header = [f.name for f in fields(SiteRow)]
    table = [header] + [[getattr(row, name) for name in header] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {status: sum(row.status == status for row in rows)
              for status in ("quantized", "excluded", "unsupported")}
    summary = f"{len(rows)} sites: " + ", ".join(f"{n} {status}" for status, n in counts.items())
    if coverage is not None and coverage.total:
        summary += f"; {coverage.describe()}"
    if effective_bits is not None:
        summary += (f"; {effective_bits:.2f} effective bits per weight (scales included, "
                    "float 16, excluded sites not counted)")
    return "\n".join([*lines, summary])


def report(model: nn.Module) -> Report:
    """The sites of a prepared model, their formats, amax and status, the fraction of its
    matmul weight elements that is quantized (`.coverage`) and its effective bits per weight;
    print it for a table."""
    sites = model_sites(model)
    return Report(report_rows(model), effective_bits(model),
                  None if sites is None else weight_coverage(sites))
