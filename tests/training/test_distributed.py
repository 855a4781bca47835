"""Data-parallel runs on 2 CPU processes (gloo): calibration merges across ranks, DDP and FSDP2
training equal the single-process run on the same global batch, QAD under DDP, and the
distributed QAD example with checkpoint and resume.

One spawn of 2 ranks runs every scenario (`SCENARIOS`) and saves what each rank saw; the tests
compare that with the single-process references computed here, the union of the ranks' data
being the single process's data.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import qcompile as qc
from tests.training.spawn import run_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with the gloo backend"),
]

WORLD = 2
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distributed_qad.py"
METHODS = ("max", "percentile", "mse", "entropy")
RECIPES = {"int8": qc.get_recipe("int8"),
           "int8-learn_scales": qc.get_recipe("int8").with_(learn_scales=True)}


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.classifier = nn.Linear(32, 8)

    def forward(self, x):
        return self.classifier(F.relu(self.fc2(F.relu(self.fc1(x)))))


FLOAT = Classifier()
_g = torch.Generator().manual_seed(1)
#: Calibration data per rank: different sizes and scales, so that the ranks' statistics differ.
SHARDS = [[torch.randn(4, 16, generator=_g), 2 * torch.randn(4, 16, generator=_g)],
          [3 * torch.randn(6, 16, generator=_g)]]
UNION = SHARDS[0] + SHARDS[1]
#: Global training batches; rank r trains on rows [4r, 4r + 4).
BATCHES = [(torch.randn(8, 16, generator=_g), torch.randint(0, 8, (8,), generator=_g))
           for _ in range(4)]


@functools.lru_cache
def _prepared_once(recipe: str):
    return qc.prepare(FLOAT, RECIPES[recipe], example_inputs=(UNION[0],))


def prepared(recipe="int8", data=None):
    """A fresh copy of the prepared model (`RECIPES[recipe]`), calibrated on `data` if given."""
    model = copy.deepcopy(_prepared_once(recipe))
    if data is not None:
        qc.calibrate(model, data, progress=False)
    return model.train()


def amaxes(model) -> dict[str, torch.Tensor]:
    return {name: q.amax.detach().clone() for name, q in model.named_modules()
            if isinstance(q, qc.Quantizer) and q.calibrated}


def local(tensor, rank, world):
    return tensor.chunk(world)[rank]


def train(model, optimizer, rank=0, world=1, loss_of=None):
    """One optimizer step per global batch; returns the global loss (mean over ranks)."""
    loss_of = loss_of or (lambda x, y: F.cross_entropy(model(x), y))
    losses = []
    for x, y in BATCHES:
        loss = loss_of(local(x, rank, world), local(y, rank, world))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())
    return losses


def full_state(model) -> dict[str, torch.Tensor]:
    """The model's state with FSDP2-sharded tensors gathered (a collective under FSDP2)."""
    return {key: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
            for key, value in model.state_dict().items()}


# --- what every rank runs ---------------------------------------------------------------------


def calibration_scenario(rank, world):
    out = {}
    for method in METHODS:
        out[method] = amaxes(_calibrated(method, SHARDS[rank]))
    out["rank 1 without data"] = amaxes(prepared(data=SHARDS[0] if rank == 0 else []))
    for alpha in (0.5, "auto"):
        out[f"smooth {alpha}"] = pre_scales(_smoothed(SHARDS[rank], alpha))
    out["gptq"] = gptq_weights(SHARDS[rank])
    model = prepared()
    try:
        qc.calibrate(model, [SHARDS[rank][0] * (float("nan") if rank == 1 else 1)],
                     progress=False)
    except Exception as error:
        out["failure"] = f"{type(error).__name__}: {error}"
    out["after failure"] = amaxes(model)
    return out


def _smoothed(data, alpha):
    model = prepared()
    qc.smooth(model, data, alpha=alpha, progress=False)
    return model


def gptq_weights(data) -> dict[str, torch.Tensor]:
    model = prepared(data=data)
    qc.gptq(model, data, progress=False)
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if name.endswith("weight")}


def pre_scales(model) -> dict[str, torch.Tensor]:
    return {name: q.pre_scale.clone() for name, q in model.named_modules()
            if isinstance(q, qc.Quantizer) and q.pre_scale is not None}


def _calibrated(method, data):
    model = prepared()
    qc.calibrate(model, data, method=method, progress=False)
    return model


def ddp_scenario(rank, world):
    out = {}
    for recipe in RECIPES:
        model = prepared(recipe, SHARDS[rank])
        wrapped = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        out[recipe] = {"losses": train(wrapped, optimizer, rank, world),
                       "state": full_state(model)}
    try:  # learned amax would become parameters that DDP does not know
        qc.calibrate(wrapped, SHARDS[rank], progress=False)
    except ValueError as error:
        out["calibrate after wrapping"] = str(error)
    return out


def fsdp_scenario(rank, world):
    out = {}
    for recipe in RECIPES:
        model = qc.fully_shard(prepared(recipe, SHARDS[rank]))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        out[recipe] = {"losses": train(model, optimizer, rank, world), "state": full_state(model)}
    return out


def qad_scenario(rank, world):
    teacher = copy.deepcopy(FLOAT)
    before = copy.deepcopy(teacher.state_dict())
    student = prepared("int8", SHARDS[rank])
    distiller = qc.Distiller(teacher=teacher, student=student, temperature=2.0)
    wrapped = DistributedDataParallel(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = train(wrapped, optimizer, rank, world,
                   loss_of=lambda x, y: distiller.compute_loss(wrapped, x))
    teacher_moved = any(not torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    return {"losses": losses, "state": full_state(student), "teacher moved": teacher_moved}


def example_scenario(rank, world, out_dir):
    example = _load_example()
    checkpoint = str(out_dir / "qad.pt")
    common = ["--recipe", "int8", "--batch-size", "2", "--calibration-batches", "2"]
    first = example.main([*common, "--steps", "2", "--checkpoint", checkpoint])
    resumed = example.main([*common, "--steps", "4", "--checkpoint", checkpoint])
    saved = torch.load(checkpoint, weights_only=True)
    return {"first": first, "resumed": resumed, "saved step": saved["step"],
            "saved sites": len(saved["sites"])}


def _load_example():
    spec = importlib.util.spec_from_file_location("distributed_qad", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCENARIOS = {
    "calibration": calibration_scenario,
    "ddp": ddp_scenario,
    "fsdp": fsdp_scenario,
    "qad": qad_scenario,
    "example": example_scenario,
}


def _worker(rank: int, world: int, out_dir: Path) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir / 'init'}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    results = {}
    for name, scenario in SCENARIOS.items():
        started = time.perf_counter()
        try:
            args = (rank, world, out_dir) if name == "example" else (rank, world)
            results[name] = scenario(*args)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name + " seconds"] = time.perf_counter() - started
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks saw, running every scenario once."""
    out_dir = tmp_path_factory.mktemp("distributed")
    seen = run_ranks(_worker, WORLD, out_dir, weights_only=True)
    print({k: round(v, 1) for k, v in seen[0].items() if k.endswith("seconds")})
    return seen


def result(ranks, name) -> list:
    for rank, seen in enumerate(ranks):
        if isinstance(seen[name], dict) and "error" in seen[name]:
            pytest.fail(f"rank {rank}, scenario {name}:\n{seen[name]['error']}")
    return [seen[name] for seen in ranks]


def assert_equal_tensors(a: dict, b: dict, **tolerance):
    assert a.keys() == b.keys()
    for key in a:
        if tolerance:
            torch.testing.assert_close(a[key], b[key], **tolerance, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_calibration_gives_every_rank_the_scales_of_all_ranks_data(ranks, method):
    rank0, rank1 = (seen[method] for seen in result(ranks, "calibration"))
    assert len(rank0) == 2  # the static inputs of fc1 and fc2 (weights are dynamic)
    assert_equal_tensors(rank0, rank1)  # bit-identical across ranks
    single = amaxes(_calibrated(method, UNION))
    # max, percentile and entropy merge exactly; mse sums its errors in another order.
    assert_equal_tensors(rank0, single, **({"rtol": 1e-6, "atol": 0} if method == "mse" else {}))


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_smoothing_gives_every_rank_the_same_scales(ranks, alpha):
    rank0, rank1 = (seen[f"smooth {alpha}"] for seen in result(ranks, "calibration"))
    assert rank0 and rank0.keys() == rank1.keys()
    assert_equal_tensors(rank0, rank1)
    if alpha == 0.5:  # a fixed alpha needs only the channel maxima: those of all the data
        # (fc2's input comes out of fc1, whose GEMM may round differently in another process)
        assert_equal_tensors(rank0, pre_scales(_smoothed(UNION, alpha)), rtol=1e-6, atol=0)


def test_gptq_gives_every_rank_the_weights_of_all_ranks_data(ranks):
    rank0, rank1 = (seen["gptq"] for seen in result(ranks, "calibration"))
    assert rank0 and rank0.keys() == rank1.keys()
    assert_equal_tensors(rank0, rank1)  # the summed Hessians: bit-identical weights
    single = gptq_weights(UNION)
    for name, weight in rank0.items():
        # The Hessian sums run in another order than one process's: a rare rounding tie
        # may fall the other way, never more than a few elements.
        assert float((weight != single[name]).float().mean()) < 0.01, name


def test_a_rank_without_data_takes_the_scales_of_the_others(ranks):
    rank0, rank1 = (seen["rank 1 without data"] for seen in result(ranks, "calibration"))
    assert_equal_tensors(rank0, rank1)
    assert_equal_tensors(rank0, amaxes(prepared(data=SHARDS[0])))


def test_a_calibration_failure_on_one_rank_stops_every_rank(ranks):
    rank0, rank1 = (seen["failure"] for seen in result(ranks, "calibration"))
    assert rank1.startswith("ValueError: calibration input of fc1 (input) contains NaN")
    assert rank0.startswith("RuntimeError: calibration failed on rank 1 (ValueError: ")
    assert all(seen["after failure"] == {} for seen in result(ranks, "calibration"))


@functools.lru_cache
def single_process_training(recipe: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = prepared(recipe, UNION)
    losses = train(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    return losses, full_state(model)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_data_parallel_training_equals_one_process_on_the_global_batch(ranks, parallel, recipe):
    rank0, rank1 = (seen[recipe] for seen in result(ranks, parallel))
    losses, state = single_process_training(recipe)
    assert rank0["losses"] == rank1["losses"]
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(losses),
                               rtol=1e-5, atol=0)
    assert_equal_tensors(rank0["state"], rank1["state"])
    assert_equal_tensors(rank0["state"], state, rtol=1e-5, atol=1e-6)
    if recipe == "int8-learn_scales":  # the learned amax moved, identically on both ranks
        calibrated = prepared(recipe, UNION).fc1.input_quantizer.amax
        assert not torch.equal(rank0["state"]["fc1.input_quantizer.amax"], calibrated)


def test_calibrating_after_ddp_wrapping_is_refused_where_scales_are_learned(ranks):
    for seen in result(ranks, "ddp"):
        assert seen["calibrate after wrapping"].startswith(
            "calibrate the prepared model before wrapping it in DistributedDataParallel"
        )


def test_qad_under_ddp_equals_one_process_and_never_moves_the_teacher(ranks):
    rank0, rank1 = result(ranks, "qad")
    teacher = copy.deepcopy(FLOAT)
    student = prepared("int8", UNION)
    distiller = qc.Distiller(teacher=teacher, student=student, temperature=2.0)
    expected = train(student, torch.optim.AdamW(student.parameters(), lr=1e-2),
                     loss_of=lambda x, y: distiller(x))
    assert not rank0["teacher moved"] and not rank1["teacher moved"]
    assert rank0["losses"] == rank1["losses"]
    # The distillation loss falls to ~1e-3 in these steps: atol covers the summation order
    # of the two ranks' gradients (3e-8 seen on an AMD EPYC).
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(expected),
                               rtol=1e-5, atol=1e-7)
    assert_equal_tensors(rank0["state"], full_state(student), rtol=1e-5, atol=1e-6)


def test_the_distributed_qad_example_trains_and_resumes_where_it_stopped(ranks):
    rank0, rank1 = result(ranks, "example")
    assert rank0 == rank1
    assert len(rank0["first"]) == 2 and len(rank0["resumed"]) == 2  # steps 1-2, then 3-4
    assert all(0 <= loss < 1 for loss in rank0["first"] + rank0["resumed"])
    assert rank0["saved step"] == 4 and rank0["saved sites"] > 0
