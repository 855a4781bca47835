"""Experts: give fused mixture-of-experts modules a forward that torch.export captures and
that shows each expert's products as plain Linears.

Hugging Face (transformers 5) stores a MoE layer's experts as one module with 3-D parameters
(`gate_up_proj` [E, 2I, H] or `up_proj`, and `down_proj` [E, H, I]; [E, K, N] when
`is_transposed`) and picks its forward by `config._experts_implementation`: the eager loop
iterates over the experts that received tokens (data-dependent control flow: torch.export
cannot capture it), `batched_mm` gathers one weight copy per token (memory S x N x K) and
`grouped_mm` hides the experts in one grouped product. For the capture, `capturable_experts`
replaces the forward of each such module (on the copy `capture` traces, never the caller's
model) by a loop over *every* expert, whatever the configured implementation:
`F.linear(x[tokens of e], W[e], b[e])`. The output equals the eager loop's (the same products
and additions in the same order), every expert's products are ordinary Linear sites whose
weight is `W[e]`, and an expert that receives no tokens computes on an empty slice.

It recognises the modules by what `transformers.integrations.moe.use_experts_implementation`
gives them (`has_gate`, `is_transposed`, `has_bias`, 3-D weights); it never imports
transformers and knows nothing of quantization.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers fused-experts module (3-D expert weights, implementation switch)."""
    if not all(hasattr(module, a) for a in ("has_gate", "is_transposed", "has_bias")):
        return False
    up = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return all(isinstance(w, torch.Tensor) and w.ndim == 3 for w in (up, down))


def capturable_experts(model: nn.Module) -> list[str]:
    """Replace (in place) the forward of each fused-experts module of `model` by the
    per-expert loop; returns their paths. Meant for the copy that `capture` traces."""
    paths = []
    for path, module in model.named_modules():
        if is_fused_experts(module):
            if getattr(module, "_is_expert_parallel", False):
                raise NotImplementedError(
                    f"{path}: expert-parallel experts cannot be prepared; prepare the model "
                    "before sharding its experts"
                )
            module.forward = types.MethodType(experts_loop_forward, module)
            paths.append(path)
    return paths


def _linear(x: torch.Tensor, weight: torch.Tensor, bias, transposed: bool) -> torch.Tensor:
    return F.linear(x, weight.t() if transposed else weight, bias)


def experts_loop_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The eager experts forward, looping over all experts (statically) instead of over the
    experts hit (data-dependent)."""
    up = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    down_bias = self.down_proj_bias if self.has_bias else None
    final = torch.zeros_like(hidden_states)
    for expert in range(up.shape[0]):
        token_idx, top_k_pos = torch.where(top_k_index == expert)
        x = hidden_states[token_idx]
        x = _linear(x, up[expert], None if up_bias is None else up_bias[expert], self.is_transposed)
        x = self._apply_gate(x) if self.has_gate else self.act_fn(x)
        x = _linear(x, self.down_proj[expert], None if down_bias is None else down_bias[expert],
                    self.is_transposed)
        if getattr(self, "has_post_expert_norm", False):
            x = self.post_expert_norm(x)
        x = x * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, x.to(final.dtype))
    return final
