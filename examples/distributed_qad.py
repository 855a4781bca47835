"""Distributed QAD: distil a float character-level GPT into its quantized copy on every rank.

    torchrun --nproc_per_node=2 examples/distributed_qad.py --recipe nvfp4 --steps 40 \\
        --checkpoint qad.pt

Every rank holds the whole float teacher and the prepared student (DDP replicates; see
`qcompile.fully_shard` for FSDP2). Each rank calibrates on its own share of the text, and
`qcompile.calibrate` merges the statistics across ranks, so all ranks start from the same
scales; each then trains on its own batches while DDP averages the gradients. Rank 0 saves a
checkpoint every `--save-every` steps; running the same command again resumes from it. It runs
on CPU (gloo) or on one GPU per rank (nccl), and without torchrun as a single process.

The teacher is a small CharGPT with random weights unless `--teacher` names a state dict of
one: the point here is the mechanics, not the accuracy. The text is qcompile's own source.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import qcompile as qc
from qcompile.demo.char_gpt import CharGPT, GPTConfig, encode, sample_batches

CONFIG = GPTConfig(layers=2, d_model=64, heads=2, seq_len=32)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="nvfp4")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--calibration-batches", type=int, default=4, help="per rank")
    parser.add_argument("--checkpoint", help="save here, and resume from here if it exists")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--teacher", help="state dict of a trained CharGPT with CONFIG")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[float]:
    """Run QAD; returns rank 0's view of each step's loss averaged over ranks."""
    args = parse(argv)
    started_here = not dist.is_initialized() and "WORLD_SIZE" in os.environ
    if started_here:  # launched by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cpu")
    if torch.cuda.is_available() and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same teacher on every rank
    teacher = CharGPT(CONFIG)
    if args.teacher:
        teacher.load_state_dict(torch.load(args.teacher, map_location="cpu"))
    teacher.to(device).eval()
    text = encode("\n".join(p.read_text() for p in sorted(Path(qc.__file__).parent.rglob("*.py"))))
    # Each rank its own windows (seeded by rank): calibration data, then one batch per step.
    windows = sample_batches(text, args.batch_size, CONFIG.seq_len,
                             args.calibration_batches + args.steps, seed=1000 + rank)
    inputs = [window[:, :-1].to(device) for window in windows]
    calibration, batches = inputs[: args.calibration_batches], inputs[args.calibration_batches:]

    student = qc.prepare(teacher, args.recipe, example_inputs=(inputs[0],))
    resume = args.checkpoint is not None and os.path.exists(args.checkpoint)
    if resume:  # the checkpoint brings the scales: no calibration
        state = qc.load(args.checkpoint, student)
    else:
        qc.calibrate(student, calibration, progress=rank == 0)
    distiller = qc.Distiller(teacher=teacher, student=student)
    trained = DistributedDataParallel(student) if world > 1 else student
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)  # after the amax exist
    start = 0
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]

    losses = []
    student.train()
    for step in range(start, args.steps):
        loss = distiller.compute_loss(trained, batches[step])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())
        done = step + 1
        if rank == 0:
            print(f"step {done}/{args.steps}  KL {losses[-1]:.5f}", flush=True)
            if args.checkpoint and (done % args.save_every == 0 or done == args.steps):
                qc.save(args.checkpoint, trained, optimizer, step=done)
    if world > 1:
        dist.barrier()  # no rank leaves (or resumes) before rank 0's checkpoint is written
    if started_here:
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
