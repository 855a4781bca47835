"""FSDP2 for prepared models: `fully_shard`.

What ranks must agree on during calibration, SmoothQuant and GPTQ (merged statistics) lives in
`qcompile.algorithms.data`; DDP needs nothing from qcompile: wrap the calibrated prepared
model in `DistributedDataParallel` as any other module. It knows nothing of formats or graphs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qcompile.core.quantizer import Quantizer


def fully_shard(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """Shard a calibrated prepared model with FSDP2 (`torch.distributed.fsdp.fully_shard`).

    Three things differ from calling `fully_shard` yourself:
    - FSDP2 cannot shard 0-d parameters, which the per-tensor learned amax of a
      `learn_scales=True` recipe are. They stay replicated (`ignored_params`) and their
      gradients are averaged over the ranks during backward, as FSDP2 averages the others.
    - A block-wise prepared model (`qcompile.prepare(..., blocks=...)`) is sharded as users
      shard Hugging Face models: each prepared block its own FSDP unit, then the root. A
      rank gathers one block's weights at a time, so its peak is about its shard of the
      model plus one block.
    - A model prepared as one graph is sharded as one unit: its graph reads every weight in
      the root's forward, so `fully_shard` on a submodule would leave those weights sharded
      when the graph reads them; it refuses a model with sharded parts. Parameters,
      gradients and optimizer state are still sharded between steps; the forward gathers
      all weights at once.

    Calibrate first (learned amax become parameters at calibration) and build the optimizer
    after sharding. `fsdp_kwargs` go to `fully_shard` (mesh, reshard_after_forward,
    mp_policy, ...). Returns `model`, now an FSDP module.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    sharded = [path for path, module in model.named_modules() if isinstance(module, FSDPModule)]
    if sharded:
        raise ValueError(
            f"{sharded[0] or 'the model'} is sharded already; shard only the prepared model "
            "itself, once (qcompile.fully_shard shards the blocks of a block-wise model too)"
        )
    mesh = fsdp_kwargs.get("mesh")
    if mesh is not None and mesh.ndim != 1:
        raise NotImplementedError(
            "qcompile.fully_shard takes a 1-d device mesh; for HSDP call "
            "torch.distributed.fsdp.fully_shard with ignored_params= the 0-d amax parameters "
            "and average their gradients over the replicate and shard groups yourself"
        )
    group = None if mesh is None else mesh.get_group()
    scalars = _scalar_amax(model)
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_averaged_over(group))
    ignored = scalars | set(fsdp_kwargs.pop("ignored_params", None) or ())
    for path in getattr(model, "qcompile_blocks", None) or ():
        block = model.get_submodule(path)
        own = {p for p in block.parameters() if p in ignored}
        torch_fully_shard(block, ignored_params=own or None, **fsdp_kwargs)
    return torch_fully_shard(model, ignored_params=ignored or None, **fsdp_kwargs)


def _scalar_amax(model: nn.Module) -> set[nn.Parameter]:
    return {
        param for module in model.modules() if isinstance(module, Quantizer)
        for param in module.parameters(recurse=False) if param.ndim == 0
    }


def _averaged_over(group):
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.AVG, group=group)

    return hook
