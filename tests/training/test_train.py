"""QAT on a prepared model: learnable scales, any optimizer and scheduler, gradient
accumulation and bf16 autocast, in `qcompile.training.train` and in a user's own loop."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qcompile as qc


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


LABELLER = torch.randn(32, 10, generator=torch.Generator().manual_seed(7))


def _labels(x: torch.Tensor) -> torch.Tensor:
    return (x @ LABELLER).argmax(-1)


def _data(n: int = 8, batch: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 32, generator=g) * 2 for _ in range(n)]


def _prepared(learn_scales: bool) -> qc.PreparedModel:
    torch.manual_seed(0)
    recipe = qc.get_recipe("int8").with_(learn_scales=learn_scales)
    data = _data()
    qmodel = qc.prepare(Classifier(), recipe, example_inputs=(data[0],))
    qc.calibrate(qmodel, data, progress=False)
    return qmodel


def _task_loss(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.float(), _labels(x))


def _mean_loss(model: nn.Module, data) -> float:
    with torch.no_grad():
        return sum(float(_task_loss(model(x), x)) for x in data) / len(data)


def test_learned_scales_train_under_bf16_autocast_with_accumulation():
    qmodel = _prepared(learn_scales=True)
    amax = {n: p.detach().clone() for n, p in qmodel.named_parameters() if n.endswith("amax")}
    assert amax, "learn_scales=True makes each static amax a Parameter"
    data = _data()
    before = _mean_loss(qmodel, data)
    qc.train(qmodel, data, steps=40, lr=3e-3, loss_fn=_task_loss,
             accumulate=2, autocast_dtype=torch.bfloat16, progress=False)
    assert _mean_loss(qmodel, data) < 0.7 * before
    moved = [n for n, p in qmodel.named_parameters() if n in amax and not torch.equal(p, amax[n])]
    assert moved, "the learnable amax received gradients and moved"
    assert all(torch.isfinite(p).all() for p in qmodel.parameters())


def test_gradient_accumulation_equals_one_large_batch():
    """Two half batches accumulated give the gradients of the full batch (mean loss)."""
    x = _data(n=1, batch=32)[0]
    full = _prepared(learn_scales=True)
    halves = copy.deepcopy(full)
    _task_loss(full(x), x).backward()
    for part in (slice(0, 16), slice(16, 32)):
        (_task_loss(halves(x[part]), x[part]) / 2).backward()
    for (name, a), (_, b) in zip(full.named_parameters(), halves.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=3e-3),
    lambda p: torch.optim.RMSprop(p, lr=1e-3),
])
def test_a_users_own_loop_with_any_optimizer_and_scheduler(make_optimizer):
    qmodel = _prepared(learn_scales=False)
    data = _data()
    before = _mean_loss(qmodel, data)
    optimizer = make_optimizer(qmodel.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    qmodel.train()
    for step in range(30):
        x = data[step % len(data)]
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _task_loss(qmodel(x), x)
        loss.backward()
        optimizer.step()
        scheduler.step()
    assert _mean_loss(qmodel, data) < 0.8 * before


def test_freeze_keeps_learned_scales_fixed():
    qmodel = _prepared(learn_scales=True)
    qc.freeze(qmodel)
    amax = {n: p.detach().clone() for n, p in qmodel.named_parameters() if n.endswith("amax")}
    qc.train(qmodel, _data(), steps=5, lr=1e-2, loss_fn=_task_loss, progress=False)
    for name, value in amax.items():
        assert torch.equal(qmodel.get_parameter(name), value), name
