"""qcompile.prepare: the prepared model trains, moves, saves and loads like its original."""

import copy

import pytest
import torch
from torch import nn

from qcompile.core.quantizer import Quantizer, QuantSpec
from qcompile.passes.capture import CaptureError
from qcompile.passes.sites import SiteKind, SiteStatus
from qcompile.prepare import PreparedModel, prepare
from qcompile.recipe import Recipe, SiteSpecs


def set_static_amax(model: nn.Module, amax: float = 8.0) -> int:
    """Stand-in for calibration: a fixed amax on every static quantizer; returns how many."""
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer) and not m.spec.dynamic]
    for quantizer in quantizers:
        quantizer.set_amax(torch.tensor(amax))
    return len(quantizers)


class Block(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(dim, 4)

    def forward(self, x, bias=None):
        h = self.drop(torch.relu(self.fc(x)))
        scores = h @ h.transpose(-1, -2)
        mask = torch.ones(h.shape[1], h.shape[1], device=h.device).tril()  # a device constant
        h = (scores * mask).softmax(-1) @ h
        if bias is not None:
            h = h + bias
        return {"logits": self.head(h), "hidden": (h,)}


def _inputs():
    return (torch.randn(2, 5, 32),), {"bias": torch.randn(32)}


def _prepare(recipe="fp8"):
    torch.manual_seed(0)
    model = Block()
    args, kwargs = _inputs()
    return model, prepare(model, recipe, example_inputs=args, example_kwargs=kwargs)


def test_sites_names_and_excluded_head():
    _, prepared = _prepare(Recipe(linear=SiteSpecs(input=QuantSpec("fp8", dynamic=True)),
                                  quantize_matmul=True, exclude=["head"]))
    assert isinstance(prepared, PreparedModel)
    sites = {s.name: s for s in prepared.qcompile_sites}
    assert list(sites) == ["fc", "matmul_0", "matmul_1", "head"]
    assert sites["fc"].quantizers == {"input": "fc.input_quantizer"}
    assert sites["matmul_0"].kind is SiteKind.MATMUL and sites["matmul_0"].status is SiteStatus.QUANTIZED
    assert sites["head"].status is SiteStatus.EXCLUDED and "head" in sites["head"].reason
    assert prepared.qcompile_recipe.exclude == ("head",)


def test_original_model_is_not_modified():
    torch.manual_seed(0)
    model = Block().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [name for name, _ in model.named_modules()]
    args, kwargs = _inputs()
    prepared = prepare(model, "int8", example_inputs=args, example_kwargs=kwargs)
    assert [name for name, _ in model.named_modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and not prepared.training  # the mode is carried over
    assert prepared.get_parameter("fc.weight") is not model.fc.weight


def test_signature_outputs_and_float_closeness():
    model, prepared = _prepare("fp8")
    set_static_amax(prepared, 16.0)
    model.eval()
    prepared.eval()
    x, bias = torch.randn(3, 7, 32), torch.randn(32)  # other batch and sequence sizes
    out = prepared(x, bias=bias)
    assert set(out) == {"logits", "hidden"} and isinstance(out["hidden"], tuple)
    assert torch.equal(prepared(x=x, bias=bias)["logits"], out["logits"])  # keywords too
    reference = model(x, bias=bias)["logits"]
    assert not torch.equal(out["logits"], reference)  # quantized ...
    torch.testing.assert_close(out["logits"], reference, atol=0.1, rtol=0.1)  # ... but close


def test_train_eval_switch_dropout():
    _, prepared = _prepare("mxfp8")
    x, bias = torch.randn(2, 5, 32), torch.randn(32)
    prepared.train()
    assert not torch.equal(prepared(x, bias=bias)["logits"], prepared(x, bias=bias)["logits"])
    prepared.eval()
    assert torch.equal(prepared(x, bias=bias)["logits"], prepared(x, bias=bias)["logits"])


def test_qat_step_updates_float_weights_and_learned_amax():
    _, prepared = _prepare(Recipe(linear=SiteSpecs(weight=QuantSpec("int8", axis=0, dynamic=True),
                                                   input=QuantSpec("int8")), learn_scales=True))
    set_static_amax(prepared)
    amax = prepared.get_submodule("fc.input_quantizer").amax
    assert isinstance(amax, nn.Parameter)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    weight = prepared.get_parameter("fc.weight").detach().clone()
    prepared(torch.randn(2, 5, 32), bias=torch.randn(32))["logits"].pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(prepared.get_parameter("fc.weight"), weight)
    assert amax.grad is not None


def test_state_dict_round_trip_with_calibrated_amax():
    _, prepared = _prepare("int8")
    set_static_amax(prepared, 3.0)
    prepared.eval()
    state = prepared.state_dict()
    assert state["fc.input_quantizer.amax"] == 3.0
    _, fresh = _prepare("int8")  # uncalibrated: its amax buffers are empty
    fresh.eval()
    fresh.load_state_dict(state)
    x, bias = torch.randn(2, 5, 32), torch.randn(32)
    assert torch.equal(fresh(x, bias=bias)["logits"], prepared(x, bias=bias)["logits"])


def test_deepcopy_keeps_sites_and_class():
    _, prepared = _prepare("mxfp4")
    clone = copy.deepcopy(prepared)
    assert isinstance(clone, PreparedModel)
    with pytest.raises(ValueError, match="input 'x' is float16"):  # calls are still checked
        clone(torch.randn(2, 5, 32).half(), bias=torch.randn(32).half())
    assert [s.name for s in clone.qcompile_sites] == [s.name for s in prepared.qcompile_sites]
    assert clone.qcompile_recipe == prepared.qcompile_recipe


def test_to_moves_parameters_quantizers_and_graph_constants():
    _, prepared = _prepare("mxfp8")
    prepared.to("meta")
    assert prepared.get_parameter("fc.weight").device.type == "meta"
    out = prepared(torch.randn(2, 5, 32, device="meta"), bias=torch.randn(32, device="meta"))
    assert out["logits"].device.type == "meta"  # the baked-in torch.ones followed


def test_unsupported_block_size_stays_float_with_a_reason():
    model = nn.Sequential(nn.Linear(100, 128), nn.ReLU(), nn.Linear(128, 8))
    prepared = prepare(model, "int4", example_inputs=(torch.randn(2, 100),))
    first, second = prepared.qcompile_sites
    assert first.status is SiteStatus.UNSUPPORTED and "K=100" in first.reason
    assert second.status is SiteStatus.QUANTIZED
    prepared.eval()
    assert prepared(torch.randn(3, 100)).isfinite().all()


def test_errors():
    model = Block()
    with pytest.raises(ValueError, match="example_inputs=\\(x,\\)"):
        prepare(model, "int8")
    with pytest.raises(ValueError, match="valid recipes"):
        prepare(model, "int2", example_inputs=(torch.randn(2, 5, 32),))
    with pytest.raises(CaptureError, match="Fix example_inputs"):
        prepare(model, "int8", example_inputs=(torch.randn(2, 5, 31),))
    _, prepared = _prepare("int8")
    with pytest.raises(ValueError, match="prepared already"):
        prepare(prepared, "int8", example_inputs=(torch.randn(2, 5, 32),))


class TiedLM(nn.Module):
    """An embedding tied to its output head, and a buffer (as in GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("offset", torch.zeros(32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.embed(ids) + self.offset))


def test_prepared_model_owns_its_tensors_and_keeps_ties():
    model = TiedLM()
    prepared = prepare(model, "int8", example_inputs=(torch.randint(0, 50, (2, 5)),))
    original = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not original & {t.data_ptr() for t in (*prepared.parameters(), *prepared.buffers())}
    named = dict(prepared.named_parameters(remove_duplicate=False))
    assert named["head.weight"] is named["embed.weight"]  # the tie survives the copy
    with torch.no_grad():
        named["embed.weight"].add_(1.0)
    assert not torch.equal(model.embed.weight, named["embed.weight"])
