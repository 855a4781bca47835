"""QAD and QAT on tiny models: the loss of a quantized student falls, the teacher never moves."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qcompile as qc
import qcompile.training.distill as distill
from qcompile.core.quantizer import Quantizer, QuantSpec
from qcompile.training.distill import Distiller, kl_divergence, select_logits
from qcompile.training.train import freeze, train


class QuantizedMLP(nn.Module):
    """A two-layer classifier whose Linear inputs and weights pass through quantizers."""

    def __init__(self, float_model: nn.Sequential, fmt: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = copy.deepcopy(float_model[0]), copy.deepcopy(float_model[2])
        spec = QuantSpec(fmt, dynamic=True)
        self.q = nn.ModuleDict({name: Quantizer(spec) for name in ("in1", "w1", "in2", "w2")})

    def forward(self, x):
        h = F.relu(F.linear(self.q["in1"](x), self.q["w1"](self.fc1.weight), self.fc1.bias))
        return F.linear(self.q["in2"](h), self.q["w2"](self.fc2.weight), self.fc2.bias)


def float_teacher(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    with torch.no_grad():
        model[2].weight.mul_(8)  # confident logits, as a trained classifier has
    return model


def batches(n: int = 8, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 64, generator=generator) * 2 for _ in range(n)]


@pytest.mark.parametrize("fmt", ["nvfp4", "int4", "mxfp4"])
def test_qad_reduces_the_distillation_loss_and_teacher_never_changes(fmt):
    teacher = float_teacher()
    before = copy.deepcopy(teacher.state_dict())
    student = QuantizedMLP(teacher, fmt if fmt != "int4" else "int4")
    if fmt == "int4":  # int4 blocks of 128 do not divide 64; use blocks of 32
        for q in student.q.values():
            q.spec = QuantSpec("int4", block_size=32, dynamic=True)
    distiller = Distiller(teacher, student, temperature=2.0)
    data = batches()
    with torch.no_grad():
        initial = sum(distiller(x).item() for x in data) / len(data)
    losses = train(student, data, steps=60, lr=1e-3, distiller=distiller, progress=False)
    with torch.no_grad():
        final = sum(distiller(x).item() for x in data) / len(data)
    assert initial > 0
    assert final < 0.7 * initial, (initial, final)
    assert len(losses) == 60
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_qat_with_labels_reduces_the_task_loss():
    teacher = float_teacher()
    student = QuantizedMLP(teacher, "nvfp4")
    generator = torch.Generator().manual_seed(3)
    data = [(x, torch.randint(0, 32, (32,), generator=generator)) for x in batches(4)]

    def loss_fn(output, batch):
        return F.cross_entropy(output, batch[1])

    def evaluate():
        with torch.no_grad():
            return sum(loss_fn(student(x), (x, y)).item() for x, y in data) / len(data)

    class WithLabels(nn.Module):
        """Returns the task loss, as a Hugging Face model given labels does."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, y):
            return {"loss": F.cross_entropy(self.model(x), y)}

    initial = evaluate()
    wrapped = WithLabels(student)
    train(wrapped, data, steps=80, lr=3e-3, progress=False)
    assert evaluate() < 0.5 * initial


def test_kl_divergence_matches_its_definition_and_is_zero_for_equal_logits():
    torch.manual_seed(0)
    t, s = torch.randn(4, 10), torch.randn(4, 10)
    p = F.softmax(t / 2, -1)
    expected = (p * (p.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(kl_divergence(t, s, 2.0), expected)
    assert kl_divergence(t, t, 1.0).abs() < 1e-6


def test_select_logits_from_every_output_structure():
    logits = torch.randn(2, 3)
    assert select_logits(logits) is logits
    assert select_logits((logits, None)) is logits
    assert select_logits({"logits": logits, "hidden": 0}) is logits
    assert select_logits({"embedding": logits}) is logits
    assert select_logits({"a": 0, "b": logits}, "b") is logits
    assert select_logits([0, logits], 1) is logits
    assert select_logits({"x": logits}, lambda out: out["x"]) is logits
    transformers = pytest.importorskip("transformers")
    output = transformers.modeling_outputs.CausalLMOutput(logits=logits)
    assert select_logits(output) is logits
    with pytest.raises(KeyError, match="Pass logits="):
        select_logits({"logits": logits}, "scores")


def test_feature_loss_hooks_the_inputs_of_named_modules():
    teacher = float_teacher()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[2].weight.add_(0.1)
    distiller = Distiller(teacher, student, loss="mse", features=["2"], feature_weight=1.0)
    x = batches(1)[0]
    output_only = F.mse_loss(student(x), teacher(x)).item()
    # The input of layer 2 is identical (layer 0 unchanged), so the feature term adds nothing.
    assert distiller(x).item() == pytest.approx(output_only, rel=1e-5)
    with torch.no_grad():
        student[0].bias.add_(1.0)
    hidden_t, hidden_s = F.relu(teacher[0](x)), F.relu(student[0](x))
    expected = F.mse_loss(student(x), teacher(x)) + F.mse_loss(hidden_s, hidden_t)
    assert distiller(x).item() == pytest.approx(expected.item(), rel=1e-5)
    distiller.remove_hooks()
    with pytest.raises(ValueError, match="names no module"):
        Distiller(teacher, student, features=["missing"])


def test_features_of_a_prepared_student_are_its_quantized_sites():
    teacher = float_teacher()
    x = batches(1)[0]
    student = qc.prepare(copy.deepcopy(teacher), "nvfp4", (x,))
    qc.calibrate(student, [(x,)], progress=False)
    distiller = Distiller(teacher, student, loss="mse", features=["2"])
    # The student's feature is what enters the site's input quantizer: its own hidden layer.
    site = next(site for site in student.qcompile_sites if site.name == "2")
    seen = []
    student.get_submodule(site.quantizers["input"]).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        output_loss = F.mse_loss(student(x), teacher(x))
    feature_loss = F.mse_loss(seen[-1], F.relu(teacher[0](x)))
    assert feature_loss > 0
    assert distiller(x).item() == pytest.approx((output_loss + feature_loss).item(), rel=1e-5)
    # int4 quantizes weights only: nothing in the prepared graph sees the site's input.
    weight_only = qc.prepare(copy.deepcopy(teacher), "int4", (x,))
    with pytest.raises(ValueError, match="quantizes no input activation.*qc.report"):
        Distiller(teacher, weight_only, features=["2"])


def test_a_feature_that_no_forward_reaches_is_an_error_not_a_key_error():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = float_teacher(), nn.Linear(4, 4)

        def forward(self, x):
            return self.net(x)  # never calls self.unused

    teacher = WithUnused()
    distiller = Distiller(teacher, copy.deepcopy(teacher), loss="mse", features=["unused"])
    with pytest.raises(RuntimeError, match=r"\['unused'\] were never reached in the teacher"):
        distiller(batches(1)[0])


def test_teacher_in_bf16_and_bad_arguments():
    teacher = float_teacher()
    student = QuantizedMLP(teacher, "nvfp4")
    distiller = Distiller(teacher, student, teacher_dtype=torch.bfloat16)
    loss = distiller(batches(1)[0])
    assert torch.isfinite(loss) and next(teacher.parameters()).dtype == torch.bfloat16
    assert "teacher" not in dict(distiller.named_children())
    with pytest.raises(ValueError, match="loss must be one of"):
        Distiller(teacher, student, loss="l1")
    with pytest.raises(ValueError, match="same module"):
        Distiller(teacher, teacher)
    assert distill.OUTPUT_LOSSES == ("kl", "mse", "cosine")


def test_freeze_stops_scale_learning():
    quantizer = Quantizer(QuantSpec("int8", learn_amax=True))
    quantizer.set_amax(torch.tensor(2.0))
    assert quantizer.amax.requires_grad
    freeze(nn.Sequential(quantizer))
    assert not quantizer.amax.requires_grad and quantizer.observer is None


def test_train_rejects_a_model_without_loss():
    student = QuantizedMLP(float_teacher(), "nvfp4")
    with pytest.raises(ValueError, match="returns no loss"):
        train(student, batches(1), steps=1, progress=False)


class ModeRecorder(nn.Module):
    """A linear model with dropout that records the mode each forward ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.dropout = nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.fc(self.dropout(x))


@pytest.mark.parametrize("train_mode, expected", [(None, False), (True, True), (False, False)])
def test_qad_runs_the_student_without_dropout_unless_asked(train_mode, expected):
    teacher = nn.Linear(64, 32)
    student = ModeRecorder()
    distiller = Distiller(teacher, student)
    before = student.fc.weight.detach().clone()
    train(student, batches(2), steps=3, lr=1e-3, distiller=distiller, train_mode=train_mode,
          progress=False)
    assert student.modes == [expected] * 3
    assert not torch.equal(student.fc.weight, before)  # gradients flow in either mode


def test_qat_runs_in_train_mode_by_default():
    model = ModeRecorder()
    train(model, batches(2), steps=2, lr=1e-3, loss_fn=lambda out, x: out.square().mean(),
          progress=False)
    assert model.modes == [True, True]
