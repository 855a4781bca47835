"""A block-wise prepared decoder under FSDP2 on 2 CPU processes (gloo): each block its own
FSDP unit, training equals one process on the global batch, each rank holds half the weights.
And activation checkpointing per block gives the gradients of a run without it."""

from __future__ import annotations

import copy
import functools
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import qcompile as qc
from tests.training.spawn import run_ranks

transformers = pytest.importorskip("transformers")

WORLD = 2
STEPS = 3
RECIPE = qc.get_recipe("int8").with_(learn_scales=True)
CONFIG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "tie_word_embeddings": False}
_g = torch.Generator().manual_seed(5)
CALIBRATION = [torch.randint(0, 64, (2, 12), generator=_g) for _ in range(2)]
#: Global batches of 4 sequences; rank r trains on rows [2r, 2r + 2).
BATCHES = [torch.randint(0, 64, (4, 12), generator=_g) for _ in range(STEPS)]


@functools.lru_cache
def _prepared_once():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = qc.prepare(model, RECIPE, example_kwargs={"input_ids": CALIBRATION[0]})
    qc.calibrate(qmodel, [{"input_ids": ids} for ids in CALIBRATION], progress=False)
    return qmodel


def prepared():
    return copy.deepcopy(_prepared_once()).train()


def train(model, rows=slice(None)) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for ids in BATCHES:
        ids = ids[rows]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def _local_numel(model) -> tuple[int, int]:
    local = total = 0
    for param in model.parameters():
        total += param.numel()
        local += param.to_local().numel() if hasattr(param, "to_local") else param.numel()
    return local, total


def _worker(rank: int, world: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'init'}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        model = qc.fully_shard(prepared())
        units = [path for path, m in model.named_modules()
                 if isinstance(m, torch.distributed.fsdp.FSDPModule)]
        held = _local_numel(model)
        losses = train(model, slice(2 * rank, 2 * rank + 2))
        mean = torch.stack(losses)
        dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        result = {"losses": mean, "units": units, "held": held}
    except Exception:  # noqa: BLE001 - reported by the test
        result = {"error": traceback.format_exc()}
    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="needs torch.distributed with the gloo backend")
def test_fsdp2_per_block_trains_as_one_process_and_holds_half_the_weights(tmp_path):
    seen = run_ranks(_worker, WORLD, tmp_path, weights_only=False)
    for rank, result in enumerate(seen):
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
    assert seen[0]["units"] == ["", "model.layers.0", "model.layers.1"]
    local, total = seen[0]["held"]
    assert 0.45 * total <= local <= 0.55 * total + 64  # about half (0-d amax replicated)
    expected = torch.stack(train(prepared()))
    torch.testing.assert_close(seen[0]["losses"], expected, rtol=0, atol=1e-5)


def test_activation_checkpointing_per_block_gives_the_same_gradients():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    plain, checkpointed = prepared(), prepared()
    apply_activation_checkpointing(
        checkpointed, check_fn=lambda module: isinstance(module, qc.PreparedBlock))
    ids = BATCHES[0]
    for model in (plain, checkpointed):  # no cache in training, as HF's own checkpointing
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    got = {n.replace("_checkpoint_wrapped_module.", ""): p.grad
           for n, p in checkpointed.named_parameters() if p.grad is not None}
    assert grads.keys() == got.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
