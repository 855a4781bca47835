"""Data-parallel runs: what the ranks of a `torch.distributed` job must agree on.

This module owns the collective side of quantization. `merged_across_ranks` makes every rank's
calibration observers hold the statistics of all ranks' data, so that each rank installs the
same amax (`qcompile.calibrate` uses it whenever a process group of more than one rank is
initialized); `fully_shard` applies FSDP2 to a prepared model. Observers say how their
statistics combine (max or sum, see `qcompile.observers.AmaxObserver.merge`); this module only
moves tensors. It knows nothing of formats or graphs. DDP needs nothing from here: wrap the
calibrated prepared model in `DistributedDataParallel` as any other module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from qcompile.observers import AmaxObserver
from qcompile.quantizer import Quantizer

_OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM} if dist.is_available() else {}


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, and in a run that is not distributed."""
    return not is_distributed() or dist.get_rank() == 0


def all_reduce(x: torch.Tensor, op: Literal["max", "sum"]) -> torch.Tensor:
    """`x` combined over all ranks, as a new tensor on x's device (x is left as it was).

    NCCL reduces only CUDA tensors; CPU statistics (histogram counts) travel through the
    current CUDA device there.
    """
    device = x.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    combined = x.detach().to(device, copy=True)
    dist.all_reduce(combined, op=_OPS[op])
    return combined.to(x.device)


def parallel_wrapper(model: nn.Module) -> str | None:
    """"DistributedDataParallel" or "FSDP" when `model` is wrapped by one, else None."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "DistributedDataParallel"
    if dist.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            return "FSDP"
    return None


@contextmanager
def merged_across_ranks(observers: Sequence[tuple[str, AmaxObserver]]) -> Iterator[None]:
    """Around a calibration run: afterwards every rank's observers hold all ranks' statistics.

    Each observer is labelled with its site, for messages. No-op outside a distributed run.
    On exit the ranks first exchange, in one collective, whether their run failed and what each
    observer saw; if any rank failed, every rank raises (the failing one its own error), so no
    rank waits for the others forever and none installs scales the others lack. Then each
    observer merges (`AmaxObserver.merge`): max for running maxima, sums for histograms and
    for the mse candidates' errors. Every rank must calibrate the same prepared model.
    """
    if not is_distributed():
        yield
        return
    try:
        yield
    except Exception as error:
        _exchange(observers, error)
        raise
    for (name, observer), (num_batches, amax_shape) in zip(
        observers, _exchange(observers, None)
    ):
        if num_batches:
            observer.merge(all_reduce, num_batches, amax_shape)


def _exchange(
    observers: Sequence[tuple[str, AmaxObserver]], error: BaseException | None
) -> list[tuple[int, tuple[int, ...] | None]]:
    """All ranks' failures and observations in one `all_gather_object`; the agreed totals."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local = [(name, obs.num_batches, obs.amax_shape) for name, obs in observers]
    status = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, (status, local))
    if error is not None:
        return []  # the caller re-raises its own error
    for other, (other_status, _) in enumerate(gathered):
        if other_status is not None:
            raise RuntimeError(
                f"calibration failed on rank {other} ({other_status}); every rank stops so that "
                "all keep the same scales. Fix that rank's data or model and calibrate again"
            )
    names = [name for name, _, _ in local]
    for other, (_, seen) in enumerate(gathered):
        other_names = [name for name, _, _ in seen]
        if other_names != names:
            differ = sorted(set(names) ^ set(other_names)) or ["(same sites, other order)"]
            raise ValueError(
                f"rank {other} calibrates other quantizers than rank {rank}: "
                f"{', '.join(differ[:5])}; every rank must calibrate the same prepared model"
            )
    totals = []
    for index, name in enumerate(names):
        shapes = [seen[index][2] for _, seen in gathered]
        known = {shape for shape in shapes if shape is not None}
        if len(known) > 1:
            per_rank = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes) if s is not None)
            raise ValueError(
                f"{name}: the ranks computed amax of different shapes ({per_rank}); a "
                "per-channel or per-block quantizer needs batches of one shape on every rank"
            )
        num_batches = sum(seen[index][1] for _, seen in gathered)
        totals.append((num_batches, known.pop() if known else None))
    return totals


def fully_shard(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """Shard a calibrated prepared model with FSDP2 (`torch.distributed.fsdp.fully_shard`).

    Two things differ from calling `fully_shard` yourself:
    - FSDP2 cannot shard 0-d parameters, which the per-tensor learned amax of a
      `learn_scales=True` recipe are. They stay replicated (`ignored_params`) and their
      gradients are averaged over the ranks during backward, as FSDP2 averages the others.
    - It shards `model` as one unit. A prepared model's captured graph reads every weight in
      the root's forward, so `fully_shard` on a submodule (one unit per block) leaves those
      weights sharded when the graph reads them ("Operator qcompile.fake_quantize.default
      does not have a sharding strategy registered"); it refuses a model with sharded parts.
      Parameters, gradients and optimizer state are still sharded between steps; the forward
      gathers all weights at once.

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
            "itself, once: its graph reads every weight in the root's forward, so a submodule's "
            "FSDP unit is never gathered (fake_quantize then meets a sharded DTensor)"
        )
    scalars = {
        param for module in model.modules() if isinstance(module, Quantizer)
        for param in module.parameters(recurse=False) if param.ndim == 0
    }
    mesh = fsdp_kwargs.get("mesh")
    if mesh is not None and mesh.ndim != 1:
        raise NotImplementedError(
            "qcompile.fully_shard takes a 1-d device mesh; for HSDP call "
            "torch.distributed.fsdp.fully_shard with ignored_params= the 0-d amax parameters "
            "and average their gradients over the replicate and shard groups yourself"
        )
    group = None if mesh is None else mesh.get_group()
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_averaged_over(group))
    ignored = scalars | set(fsdp_kwargs.pop("ignored_params", None) or ())
    return torch_fully_shard(model, ignored_params=ignored or None, **fsdp_kwargs)


def _averaged_over(group):
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.AVG, group=group)

    return hook
