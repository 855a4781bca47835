"""qcompile.save / load: a resumed QAT run equals the uninterrupted one bit for bit (CPU), and a
checkpoint or state dict from a model prepared differently is refused before anything loads."""

import copy
import functools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qcompile as qc

STEPS, SAVE_AT = 8, 4


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.2)  # training consumes the RNG: resuming must restore it
        self.fc2 = nn.Linear(32, 32)
        self.classifier = nn.Linear(32, 8)  # an output head: float

    def forward(self, x):
        return self.classifier(F.relu(self.fc2(self.drop(F.relu(self.fc1(x))))))


FLOAT = Classifier()
DATA = [
    (torch.randn(8, 16, generator=g), torch.randint(0, 8, (8,), generator=g))
    for g in [torch.Generator().manual_seed(1)] for _ in range(STEPS)
]
LEARNED = qc.get_recipe("int8").with_(learn_scales=True)


@functools.lru_cache
def _prepared_once(recipe):
    return qc.prepare(FLOAT, recipe, example_inputs=(DATA[0][0],))


def prepared(recipe="int8", calibrated=True):
    """A fresh copy of FLOAT prepared with `recipe` (as a new `prepare` call would give)."""
    model = copy.deepcopy(_prepared_once(recipe))
    if calibrated:
        qc.calibrate(model, [x for x, _ in DATA[:2]], progress=False)
    return model.train()


def training(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / STEPS))
    )
    return optimizer, scheduler


def run(model, optimizer, scheduler, steps):
    losses = []
    for step in steps:
        x, y = DATA[step]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert [type(p) for p in a.parameters()] == [type(p) for p in b.parameters()]


@pytest.mark.parametrize("recipe", ["int8", LEARNED], ids=["int8", "int8-learn_scales"])
def test_resume_equals_the_uninterrupted_run_bit_for_bit(recipe, tmp_path):
    start = prepared(recipe)
    torch.manual_seed(42)
    model = copy.deepcopy(start)
    expected = run(model, *training(model), range(STEPS))

    torch.manual_seed(42)
    first = copy.deepcopy(start)
    optimizer, scheduler = training(first)
    losses = run(first, optimizer, scheduler, range(SAVE_AT))
    qc.save(tmp_path / "ckpt.pt", first, optimizer, step=SAVE_AT, scheduler=scheduler, note="x")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    torch.randn(1000)  # a new process would start from another RNG state

    # Resume as a new process would: prepare again (uncalibrated), load, optimizer, load.
    resumed = prepared(recipe, calibrated=False)
    assert qc.load(tmp_path / "ckpt.pt", resumed)["step"] == SAVE_AT
    optimizer, scheduler = training(resumed)
    state = qc.load(tmp_path / "ckpt.pt", resumed, optimizer, scheduler=scheduler)
    assert state["step"] == SAVE_AT and state["note"] == "x"
    losses += run(resumed, optimizer, scheduler, range(state["step"], STEPS))

    assert losses == expected
    assert_same_state(resumed, model)
    if recipe is LEARNED:
        assert isinstance(resumed.fc1.input_quantizer.amax, nn.Parameter)
        assert not torch.equal(resumed.fc1.input_quantizer.amax, start.fc1.input_quantizer.amax)


def test_a_checkpoint_of_another_recipe_is_refused_naming_sites_and_formats(tmp_path):
    qc.save(tmp_path / "int8.pt", prepared("int8"))
    for recipe, expected in [
        ("fp8", ["recipe 'int8' (checkpoint) vs 'fp8' (this model)",
                 "site fc1: checkpoint input int8, static; weight int8, axis=0, dynamic, "
                 "this model input fp8, static; weight fp8, dynamic",
                 "site fc2:"]),
        (LEARNED, ["site fc1: checkpoint input int8, static;", "this model input int8, learned"]),
        (qc.get_recipe("int8").with_(exclude=[*qc.get_recipe("int8").exclude, "fc2"]),
         ["site fc2: checkpoint input int8, static; weight int8, axis=0, dynamic, this model "
          "float (excluded (exclude pattern 'fc2'))"]),
    ]:
        model = prepared(recipe)
        before = copy.deepcopy(model)
        with pytest.raises(qc.CheckpointError) as error:
            qc.load(tmp_path / "int8.pt", model)
        message = str(error.value)
        assert "nothing was loaded" in message
        for text in expected:
            assert text in message
        assert "classifier" not in message  # the head is float in both
        assert_same_state(model, before)


def test_load_state_dict_refuses_other_specs_and_loads_nothing():
    saved = prepared("int8").state_dict()
    model = prepared("fp8")
    model.fc2.input_quantizer.enabled = False
    before = copy.deepcopy(model)
    with pytest.raises(qc.CheckpointError) as error:
        model.load_state_dict(saved)
    message = str(error.value)
    assert "site fc1 (input): state dict int8, static, this model fp8, static" in message
    assert "site fc2 (weight): state dict int8, axis=0, dynamic, this model fp8, dynamic" in message
    assert_same_state(model, before)
    assert not model.fc2.input_quantizer.enabled

    partial = {k: v for k, v in prepared("fp8").state_dict().items() if not k.startswith("classifier.")}
    with pytest.raises(qc.CheckpointError, match="classifier.weight: missing from the state dict"):
        model.load_state_dict(partial)
    assert_same_state(model, before)


def test_state_dict_carries_the_enabled_flags_and_calibrates_a_fresh_model():
    model = prepared("int8")
    model.fc2.input_quantizer.enabled = False
    fresh = prepared("int8", calibrated=False)
    assert not fresh.fc1.input_quantizer.calibrated
    fresh.load_state_dict(model.state_dict())
    assert fresh.fc1.input_quantizer.calibrated and not fresh.fc2.input_quantizer.enabled
    assert_same_state(fresh, model)


def test_an_optimizer_without_the_learned_amax_is_refused_before_loading(tmp_path):
    trained = prepared(LEARNED)
    qc.save(tmp_path / "ckpt.pt", trained, torch.optim.AdamW(trained.parameters()))
    fresh = prepared(LEARNED, calibrated=False)
    optimizer = torch.optim.AdamW(fresh.parameters())  # built before the amax exist
    rng = torch.get_rng_state()
    with pytest.raises(qc.CheckpointError, match="build the optimizer after qcompile.load"):
        qc.load(tmp_path / "ckpt.pt", fresh, optimizer)
    assert not fresh.fc1.input_quantizer.calibrated
    assert torch.equal(torch.get_rng_state(), rng)


def test_bad_files_and_names_are_refused(tmp_path):
    model = prepared("int8")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(qc.CheckpointError, match="not a qcompile checkpoint"):
        qc.load(tmp_path / "plain.pt", model)
    qc.save(tmp_path / "ckpt.pt", model, step=3)
    with pytest.raises(qc.CheckpointError, match="holds no 'scheduler'"):
        qc.load(tmp_path / "ckpt.pt", model, scheduler=object())
    with pytest.raises(qc.CheckpointError, match="holds no optimizer state"):
        qc.load(tmp_path / "ckpt.pt", model, torch.optim.SGD(model.parameters(), lr=0.1))
