"""Run a test's worker in 2 (or `world`) gloo processes and read what each rank saved."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def run_ranks(worker, world: int, out_dir: Path, *, weights_only: bool,
              timeout: float = 300) -> list:
    """Spawn `worker(rank, world, out_dir)` in `world` processes, fail the test past `timeout`
    seconds, and load each rank's `rank{r}.pt`."""
    context = mp.spawn(worker, args=(world, out_dir), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world}-process run did not finish in {timeout:.0f} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=weights_only) for r in range(world)]
