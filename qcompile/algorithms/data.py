"""Running data through a prepared model, and merging what it saw across ranks.

The plumbing that calibrate, smooth and gptq share: `run_data` feeds an iterable of batches or
a forward loop (with a progress bar), `eval_mode` runs it in eval mode without gradients and
restores every module's mode, `check_data_reached` turns "no site saw data" into an error and
"some did not" into a `CalibrationWarning`. The collective side of a `torch.distributed` run
lives here too: `all_reduce` combines one statistic over the ranks (GPTQ's Hessians, SmoothQuant's
maxima and errors), `merged_across_ranks` merges every calibration observer at once (each
observer says how its statistics combine, `AmaxObserver.merge`), so every rank installs the
same scales. It knows nothing of formats or graphs.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from qcompile.algorithms.observers import AmaxObserver
from qcompile.core.calls import call_with_batch

CalibrationData = Iterable[Any] | Callable[[nn.Module], Any]


class CalibrationWarning(UserWarning):
    """Calibration had nothing to do, or some quantizers saw no data."""


def check_data_reached(unseen: list[str], total: int, *, empty: str, partial: str) -> None:
    """Raise ValueError(`empty`, plus how to fix it) when none of `total` places saw data;
    warn `partial` (its `{names}` filled in, the count put first) when only `unseen` did not.
    The warning points at the caller of the public function that called this."""
    if len(unseen) == total:
        raise ValueError(
            f"{empty}; pass a non-empty iterable of batches or a forward loop that runs the "
            "model on data"
        )
    if unseen:
        warnings.warn(
            f"{len(unseen)} {partial.format(names=', '.join(unseen))}",
            CalibrationWarning,
            stacklevel=3,
        )


def run_data(
    model: nn.Module, data: CalibrationData, num_batches: int | None, progress: bool
) -> None:
    """Feed `data` to `model`: an iterable of batches, or a forward loop `data(model)`."""
    if isinstance(data, torch.Tensor):
        raise TypeError(
            "calibration data must be an iterable of batches or a forward loop, not one tensor "
            "(iterating it would feed its rows one by one); pass [x] for a single batch"
        )
    if callable(data) and not isinstance(data, Iterable):
        if num_batches is not None:
            raise ValueError(
                "num_batches applies to an iterable of batches; a forward loop decides itself "
                "how many batches it runs"
            )
        with tqdm(desc="calibrating", unit="batch", disable=not progress) as bar:
            hook = model.register_forward_pre_hook(lambda *_: bar.update())
            try:
                data(model)
            finally:
                hook.remove()
        return
    total = len(data) if hasattr(data, "__len__") else None
    if num_batches is not None:
        data = itertools.islice(data, num_batches)
        total = num_batches if total is None else min(total, num_batches)
    for batch in tqdm(data, total=total, desc="calibrating", unit="batch", disable=not progress):
        call_with_batch(model, batch)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; every module's previous train/eval flag restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(modes[model])
        for module, training in modes.items():
            module.training = training


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
