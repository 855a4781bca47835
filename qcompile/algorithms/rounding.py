"""Column-by-column rounding of a weight onto its quantization grid, as GPTQ needs it.

GPTQ quantizes a weight one input column at a time and moves the rounding error into the
columns not yet quantized, so the scales must be fixed before the columns they cover are
rounded: per tensor or per output channel at the start, per block when the block's first
column comes up (from the values as they are by then).

qcompile stores a latent float weight that rounds to the GPTQ values, which the model's weight
quantizer fake-quantizes again on every forward, with dynamic scales derived from that weight.
For that second quantization to reproduce the rounded values, every dynamic scale must come
out the same: the element that sets a scale's amax keeps that amax as its latent value (it
rounds to whatever the amax rounds to: 7 or -8 under int4's amax / 7.5, so a rounded weight is
*not* a fixed point of its own quantization), no other latent value may exceed it, and the
rounded values stay between what -amax and +amax round to (the whole [-8, 7] for int4; a
value there whose original does not round to it gets -amax or +amax as its latent). E8M0
scales have their own rules (below). For NVFP4 the tensor's largest element also keeps its
value, which pins the global scale. A static (calibrated) amax, or stored scales
(`Quantizer.scale_amax`), fix the scales by themselves and pin nothing: for integer weights
with dynamic block scales (int4) GPTQ stores the scales it fixes (`stored_scale_choices`), so
that no block max is held at its 1/15-of-amax error under amax / 7.5.

This module owns that rule; `qcompile.algorithms.gptq` owns the algorithm and the model plumbing, and
`qcompile.core.numerics` the arithmetic of each format.
"""

from __future__ import annotations

import torch

from qcompile.core import numerics
from qcompile.core.fake_quant import canonical_amax
from qcompile.core.formats import ElementKind, ScaleKind, ScaleRule, get_format
from qcompile.core.quantizer import QuantSpec


def stored_scale_choices(spec: QuantSpec, weight: torch.Tensor) -> list[torch.Tensor]:
    """The block amaxes (shaped as `Quantizer.scale_amax`: (rows, K / block)) that GPTQ may
    store for an [out, in] weight with dynamic integer block scales (int4): each block's max
    on the rule's edge (the format's scale, amax / 7.5 for int4) and on the top grid point
    (amax / 7). Stored scales pin no element (see the module docstring); which one each output
    channel gets is GPTQ's choice. Empty where the scales are not dynamic integer block scales
    (static, learned or already stored ones fix them as they are)."""
    fmt = get_format(spec.format)
    block = fmt.resolve_block_size(spec.block_size)
    if (block is None or fmt.scale is not ScaleKind.FP32 or fmt.element.kind is not ElementKind.INT
            or not spec.dynamic or spec.learn_amax):
        return []
    own = numerics.dynamic_amax(numerics.to_blocks(weight.detach().float(), block), block)
    own = own.squeeze(-1)
    top = fmt.element.max_value
    divisors = dict.fromkeys((top + 0.5, top))  # max on the rounding edge, max on the grid
    return [own * (fmt.divisor / d) for d in divisors]


class UnsupportedWeight(ValueError):
    """The weight's quantization spec has no column-wise rounding here (the message says why)."""


class ColumnRounder:
    """Rounds the columns of one [out, in] weight in order, with scales fixed as GPTQ needs.

    Call `start_group(column, values)` at every multiple of `group_size` with the current
    values of the group's columns (block formats; a no-op otherwise), then `round(column, w)`
    for each column in order. Or call `fix_all_groups(weight)` once: every block's scales from
    the original weight ("static groups"), after which columns may come in any order.

    `scale_amax`: the weight quantizer's stored scales (`Quantizer.scale_amax`), which fix
    every scale as a static amax does (NVFP4's global scale, if dynamic, stays pinned).
    """

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, amax: torch.Tensor | None,
                 scale_amax: torch.Tensor | None = None) -> None:
        fmt = get_format(spec.format)
        self.fmt = fmt
        self.element = fmt.element
        self.block = fmt.resolve_block_size(spec.block_size)
        rows, columns = weight.shape
        self.group_size = self.block or columns
        weight = weight.float()
        static = None if spec.dynamic else amax.detach().float()
        #: Stored block amax of NVFP4 / MX weights, (rows, K / block).
        self._block_amax: torch.Tensor | None = None
        if scale_amax is not None and fmt.scale is ScaleKind.FP32:
            static = scale_amax.detach().float()
        elif scale_amax is not None:
            self._block_amax = scale_amax.detach().float().reshape(rows, -1)
        if spec.axis is not None and spec.axis % 2 != 0:
            raise UnsupportedWeight(
                f"per-input-channel scales (axis={spec.axis}) change along the columns GPTQ "
                "walks; use per-output-channel (axis=0) or block scales"
            )
        self._static = static
        self._global_amax: torch.Tensor | None = None
        self._pin: tuple[int, int] | None = None  # (row, column) of the NVFP4 global amax
        device = weight.device
        self.force_column = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.force_value = torch.zeros(rows, device=device)
        #: The latent value of each forced element: the amax it sets (E8M0: see start_group).
        self.force_latent = self.force_value
        #: Rounded values stay in [low, high], |latent values| within latent_bound (per row).
        self.high = torch.full((rows,), float("inf"), device=device)
        self.low = -self.high
        self.latent_bound = self.high
        self.scale = torch.ones(rows, device=device)
        self._groups: list[tuple[torch.Tensor, ...]] | None = None  # per block, once all are fixed
        if self.block is None:
            self._fix_whole_weight(weight, spec.axis)
        elif fmt.scale is ScaleKind.E4M3_TWO_LEVEL:
            if static is None:
                magnitude = numerics.finite_abs(weight)
                self._global_amax = magnitude.amax()
                flat = int(magnitude.argmax())
                self._pin = (flat // columns, flat % columns)
            else:
                self._global_amax = static.reshape(())
        elif static is not None:
            self._static = canonical_amax(weight, fmt, static, None, self.block)  # (rows, K/b, 1)

    def _fix_whole_weight(self, weight: torch.Tensor, axis: int | None) -> None:
        """Per-tensor or per-output-channel scales, fixed once from the original weight."""
        rows = weight.shape[0]
        if self._static is not None:
            amax = canonical_amax(weight, self.fmt, self._static, axis, None)
            self.scale = numerics.amax_scale(amax, self.fmt).expand(rows, 1).reshape(rows).clone()
            return
        magnitude = numerics.finite_abs(weight)
        if axis is None:
            flat = int(magnitude.argmax())
            row, column = flat // weight.shape[1], flat % weight.shape[1]
            amax = magnitude[row, column].expand(rows)
            rows_index = torch.tensor([row], device=weight.device)
            columns = torch.tensor([column], device=weight.device)
        else:
            amax, columns = magnitude.max(dim=1)
            rows_index = torch.arange(rows, device=weight.device)
        self.scale = numerics.amax_scale(amax, self.fmt).clone()
        self.force_column[rows_index] = columns
        reference = weight[rows_index, columns]
        self.force_value = self.force_value.clone()
        self.force_value[rows_index] = self._round_values(reference, self.scale[rows_index])
        self.force_latent = self.force_value.clone()
        self.force_latent[rows_index] = reference
        self._bound_by(amax.clone())

    def _bound_by(self, amax: torch.Tensor) -> None:
        """Rounded values between what -amax and +amax round to, latent values within amax."""
        self.latent_bound = amax
        self.high = self._round_values(amax, self.scale)
        self.low = self._round_values(-amax, self.scale)

    def _round_values(self, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
        return numerics.round_to_element(values / divisor, self.element) * scale

    def start_group(self, column: int, values: torch.Tensor) -> None:
        """Fix the scales of the block starting at `column` from its current `values`."""
        if self.block is None:
            return
        if column % self.block:
            raise ValueError(f"a group starts at a multiple of {self.block}, not {column}")
        rows = values.shape[0]
        values = values.float()
        if self._static is not None and self.fmt.scale is ScaleKind.FP32:
            self.scale = numerics.amax_scale(self._static[:, column // self.block, 0], self.fmt)
            return
        if self._block_amax is not None:
            self._start_stored_group(column, values)
            return
        magnitude = numerics.finite_abs(values)
        amax, offsets = magnitude.max(dim=1)
        reference = values.gather(1, offsets[:, None]).squeeze(1)
        if self._pin is not None and column <= self._pin[1] < column + self.block:
            row, offset = self._pin[0], self._pin[1] - column
            amax[row] = torch.maximum(amax[row], self._global_amax)
            offsets[row] = offset
            sign = 1.0 if float(values[row, offset]) >= 0 else -1.0
            reference[row] = sign * self._global_amax
        # A block's scale depends only on its amax: compute it from blocks of one element.
        amax_blocks = amax.reshape(rows, 1, 1)
        self.scale = numerics.compute_scales(amax_blocks, self._global_amax, self.fmt, 1).scale.reshape(rows)
        self.force_column = column + offsets
        self.force_value = self._round_values(reference, self.scale)
        self.force_latent = self.force_value
        self.high = torch.full_like(self.scale, float("inf"))
        self.low = -self.high
        if self.fmt.scale_rule is ScaleRule.CEIL:
            # Ceil E8M0: any value up to max * scale keeps the scale. The forced element may
            # round down to exactly half of that, which alone would requantize with half the
            # scale: its latent value is then the next float up, in the same rounding bin.
            # (The smallest scale, 2**-127, cannot fall.)
            self.latent_bound = self.scale * self.element.max_value
            half = self.latent_bound / 2
            above = torch.nextafter(half, torch.full_like(half, float("inf")))
            magnitude = self.force_value.abs()
            keep = (magnitude > half) | (self.scale <= 2.0**-127)
            self.force_latent = torch.copysign(torch.where(keep, magnitude, above), self.force_value)
        elif self.fmt.scale is ScaleKind.E8M0:
            # OCP E8M0 scales depend on the amax's exponent only: any value keeps it below the
            # next power of two (the forced element keeps it from falling).
            limit = self.scale * 2.0 ** (self.element.max_exponent + 1)
            self.latent_bound = torch.nextafter(limit, torch.zeros_like(limit))
        else:
            self.force_latent = reference
            self._bound_by(amax)

    def _start_stored_group(self, column: int, values: torch.Tensor) -> None:
        """Scales from the stored block amax: nothing to force but NVFP4's pinned global max,
        and no latent value may pass that max (it would move the global scale)."""
        rows = values.shape[0]
        amax_blocks = self._block_amax[:, column // self.block].reshape(rows, 1, 1)
        self.scale = numerics.compute_scales(amax_blocks, self._global_amax, self.fmt, 1).scale.reshape(rows)
        self.force_column = torch.full_like(self.force_column, -1)
        self.high = torch.full_like(self.scale, float("inf"))
        self.low = -self.high
        self.latent_bound = self.high
        if self._pin is None:
            return
        self.latent_bound = self._global_amax.expand(rows).clone()
        if column <= self._pin[1] < column + self.block:
            row, offset = self._pin[0], self._pin[1] - column
            reference = torch.copysign(self._global_amax, values[row, offset].float())
            self.force_column[row] = self._pin[1]
            self.force_value = self.force_value.clone()
            self.force_value[row] = self._round_values(reference, self.scale[row])
            self.force_latent = self.force_value.clone()
            self.force_latent[row] = reference

    def fix_all_groups(self, weight: torch.Tensor) -> None:
        """Fix every block's scales now, from `weight` (the original): columns may then be
        rounded in any order (GPTQ's act-order); no `start_group` calls."""
        if self.block is None:
            return
        groups = []
        for column in range(0, weight.shape[1], self.block):
            self.start_group(column, weight[:, column : column + self.block])
            groups.append((self.scale, self.force_column, self.force_value, self.low, self.high,
                           self.latent_bound, self.force_latent))
        self._groups = groups

    def _select(self, column: int) -> None:
        if self._groups is not None:
            (self.scale, self.force_column, self.force_value, self.low, self.high,
             self.latent_bound, self.force_latent) = self._groups[column // self.block]

    def round(self, column: int, w: torch.Tensor) -> torch.Tensor:
        """The quantized values of column `column` (current values `w`, one per row)."""
        self._select(column)
        q = self._round_values(w.float(), self.scale)
        q = torch.maximum(torch.minimum(q, self.high), self.low)
        forced = self.force_column == column
        return torch.where(forced, self.force_value, q)

    def latent(self, column: int, original: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """A latent value per row that quantizes to `q` with this column's scales: the
        original weight where it already does (within the scale's span), else `q` itself.

        Keeping the original values keeps where each weight sits inside its rounding bin,
        which later training (QAT/QAD) moves weights across; a weight on its grid point is
        half a step from either neighbour. A rounded value beyond the amax (int4's -8) gets
        the amax as its latent value, which rounds to it.
        """
        self._select(column)
        bound = self.latent_bound
        kept = torch.maximum(torch.minimum(original.float(), bound), -bound)
        forced = self.force_column == column
        same = (self._round_values(kept, self.scale) == q) & ~forced
        q = torch.where(forced, self.force_latent, torch.maximum(torch.minimum(q, bound), -bound))
        return torch.where(same, kept, q)
