"""The inference weight cache of `Quantizer` (`qcompile.core.weight_cache`): reused only while
nothing it depends on changed, never while gradients are needed, never in traces or copies."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.core import weight_cache
from qcompile.core.fake_quant import fake_quantize
from qcompile.core.quantizer import Quantizer, QuantSpec

SPECS = {
    "int8 per channel": QuantSpec("int8", axis=0, dynamic=True),
    "nvfp4 static": QuantSpec("nvfp4"),
    "int8 static": QuantSpec("int8"),
}


def _weight(seed: int = 0, shape=(8, 32)) -> nn.Parameter:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator)
    w[0, :3] = torch.tensor([0.0, 7.5, -7.5])  # zero and outliers
    return nn.Parameter(w)


def _quantizer(spec: QuantSpec, w: torch.Tensor) -> Quantizer:
    q = Quantizer(spec)
    if not spec.dynamic:
        q.set_amax(w.detach().abs().amax() * 0.8)  # clips the outliers
    return q.eval()


def _expected(q: Quantizer, w: torch.Tensor) -> torch.Tensor:
    """What the quantizer must return now, computed from its current state without the cache."""
    x = w.detach()
    if q.pre_scale is not None:
        x = x * q.pre_scale.to(x.dtype)
    if not q.enabled:
        return x
    amax = None if q.spec.dynamic else q.amax
    return fake_quantize(x, q.spec.format, amax=amax, axis=q.spec.axis,
                         block_size=q.spec.block_size)


_OUTPUTS: list[torch.Tensor] = []


def _check(q: Quantizer, w: torch.Tensor) -> torch.Tensor:
    """q(w) in inference, checked against the quantizer's current state."""
    with torch.no_grad():
        out = q(w)
    torch.testing.assert_close(out, _expected(q, w), rtol=0, atol=0)
    _OUTPUTS.append(out)
    return out


@pytest.fixture(params=list(SPECS))
def spec(request) -> QuantSpec:
    return SPECS[request.param]


def test_a_second_inference_call_returns_the_cached_tensor(spec):
    w = _weight()
    q = _quantizer(spec, w)
    first = _check(q, w)
    assert _check(q, w) is first
    assert not torch.equal(first, w.detach())  # quantized, not passed through


def _mutations(spec: QuantSpec):
    """(name, fn(q, w) -> the weight to call with) for each way a user changes what the
    output depends on."""

    def optimizer_step(q, w):
        w.grad = torch.ones_like(w)
        torch.optim.SGD([w], lr=0.5).step()
        return w

    def load_state_dict(q, w):
        module = nn.Module()
        module.weight = w
        module.load_state_dict({"weight": w.detach() * -1.5})
        return w

    def new_parameter(q, w):
        return nn.Parameter(w.detach() + 0.25)

    def half(q, w):
        return nn.Parameter(w.detach().to(torch.bfloat16))

    def set_pre_scale(q, w):
        q.set_pre_scale(torch.linspace(0.5, 2.0, w.shape[-1]))
        return w

    def pre_scale_in_place(q, w):
        q.set_pre_scale(torch.full((w.shape[-1],), 1.5))
        with torch.no_grad():
            _check(q, w)
            q.pre_scale.mul_(2)
        return w

    def remove_pre_scale(q, w):
        q.set_pre_scale(torch.full((w.shape[-1],), 3.0))
        _check(q, w)
        q.set_pre_scale(None)
        return w

    def disable(q, w):
        q.enabled = False
        return w

    def reenable(q, w):
        q.enabled = False
        _check(q, w)
        with torch.no_grad():
            w.mul_(-1)
        q.enabled = True
        return w

    def other_spec(q, w):
        q.spec = QuantSpec("int4", block_size=16, dynamic=True)
        return w

    def clear_data_write(q, w):  # .data bypasses the version counter: clear by hand
        w.data.mul_(3)
        qc.clear_weight_cache(q)
        return w

    def train_then_eval(q, w):
        q.train()
        w.data.mul_(2)  # invisible to the version counter, but train() dropped the cache
        q.eval()
        return w

    def in_place(q, w):
        with torch.no_grad():
            w.mul_(-2)
        return w

    def copy_in(q, w):
        with torch.no_grad():
            w.copy_(torch.flip(w.detach(), [0]))
        return w

    mutations = [
        ("in place under no_grad", in_place),
        ("copy_ under no_grad", copy_in),
        ("optimizer step", optimizer_step),
        ("load_state_dict", load_state_dict),
        ("new parameter", new_parameter),
        ("bfloat16 copy", half),
        ("set_pre_scale", set_pre_scale),
        ("pre_scale in place", pre_scale_in_place),
        ("pre_scale removed", remove_pre_scale),
        ("disabled", disable),
        ("enabled again after a change", reenable),
        ("other spec", other_spec),
        ("write through .data, then clear_weight_cache", clear_data_write),
        ("train() then eval()", train_then_eval),
    ]
    if not spec.dynamic:
        def set_amax(q, w):
            q.set_amax(q.amax * 0.5)
            return w

        def amax_in_place(q, w):
            with torch.no_grad():
                q.amax.mul_(0.25)
            return w

        def learned_amax_step(q, w):
            q.spec = q.spec.with_(learn_amax=True) if q.spec.format != "nvfp4" else q.spec
            q.set_amax(q.amax.detach())
            _check(q, w)
            if isinstance(q.amax, nn.Parameter):
                q.amax.grad = torch.ones_like(q.amax)
                torch.optim.SGD([q.amax], lr=0.5).step()
            else:
                with torch.no_grad():
                    q.amax.sub_(0.5)
            return w

        mutations += [("set_amax", set_amax), ("amax in place", amax_in_place),
                      ("learned amax step", learned_amax_step)]
    return mutations


@pytest.mark.parametrize("spec_name,name", [
    (spec_name, name) for spec_name, spec in SPECS.items() for name, _ in _mutations(spec)])
def test_the_output_follows_every_change(spec_name, name):
    spec = SPECS[spec_name]
    mutate = dict(_mutations(spec))[name]
    w = _weight()
    q = _quantizer(spec, w)
    before = _check(q, w)
    assert _check(q, w) is before  # cached
    w = mutate(q, w)
    before = _OUTPUTS[-1]  # the last output before the mutation's final change
    after = _check(q, w)  # equals what the current state gives ...
    assert not torch.equal(after, before), name  # ... which differs from the cached one
    assert _check(q, w) is after  # ... and the new value is cached in turn


def test_a_caller_writing_into_the_output_does_not_change_the_next_one():
    w = _weight()
    q = _quantizer(SPECS["int8 per channel"], w)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = q(w)
            out.mul_(0)
            torch.testing.assert_close(q(w), _expected(q, w), rtol=0, atol=0)
            assert q(w) is q(w)


def test_never_used_while_gradients_are_needed(spec):
    w = _weight()
    q = _quantizer(spec, w)
    _check(q, w)  # fills the cache
    for mode in (q.eval, q.train):
        mode()
        out = q(w)  # gradients on
        assert out.requires_grad and out.grad_fn is not None
        assert weight_cache.ENTRY not in q.__dict__  # dropped: no memory held in training
        out.sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
        w.grad = None
        torch.testing.assert_close(out.detach(), _expected(q, w), rtol=0, atol=0)


def test_only_parameters_in_eval_mode_are_cached():
    w = _weight()
    q = _quantizer(SPECS["int8 per channel"], w)
    activation = w.detach().clone()
    with torch.no_grad():
        assert q(activation) is not q(activation)  # not a parameter: an activation
        q.train()
        assert q(w) is not q(w)  # training mode
        q.eval()
        assert q(w) is q(w)
    with torch.inference_mode():
        assert q(w) is q(w)
        made_here = _quantizer(SPECS["int8 static"], w)  # an inference-mode amax has no
        assert made_here(w) is not made_here(w)         # version counter: never cached


def test_nothing_traced_or_intercepted_uses_the_cache():
    w = _weight()
    q = _quantizer(SPECS["int8 per channel"], w)
    with torch.no_grad():
        first = q(w)
        with torch.device("cpu"):  # a torch function mode
            assert q(w) is not first
        from torch.utils._python_dispatch import TorchDispatchMode

        class Seen(TorchDispatchMode):
            ops: list = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.append(func)
                return func(*args, **(kwargs or {}))

        with Seen():
            q(w)
        assert any("fake_quantize" in str(op) for op in Seen.ops)


def test_torch_export_after_inference_keeps_the_quantize_op():
    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = _weight()
            self.weight_quantizer = _quantizer(SPECS["int8 per channel"], self.weight)

        def forward(self, x):
            return x @ self.weight_quantizer(self.weight).t()

    model = Lin().eval()
    x = torch.randn(2, 32)
    with torch.no_grad():
        model(x)
        model(x)  # cached
        exported = torch.export.export(model, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert any("qcompile.fake_quantize" in t for t in targets), targets
    with torch.no_grad():
        model.weight.mul_(2)
        torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)


def test_off_in_a_distributed_process(monkeypatch):
    w = _weight()
    q = _quantizer(SPECS["int8 per channel"], w)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with torch.no_grad():
        assert q(w) is not q(w)


def test_set_weight_cache_turns_it_off_and_on():
    model = nn.Sequential(nn.Linear(4, 4))
    w = _weight()
    model[0].weight_quantizer = _quantizer(SPECS["int8 per channel"], w)
    q = model[0].weight_quantizer
    with torch.no_grad():
        q(w)
        assert weight_cache.ENTRY in q.__dict__
        qc.set_weight_cache(model, False)
        assert weight_cache.ENTRY not in q.__dict__
        assert q(w) is not q(w)
        qc.set_weight_cache(model, True)
        assert q(w) is q(w)
    with pytest.raises(TypeError, match="True or False"):
        qc.set_weight_cache(model, "no")


def test_not_in_state_dict_copies_or_pickles():
    w = _weight()
    q = _quantizer(SPECS["int8 per channel"], w)
    with torch.no_grad():
        q(w)
    assert weight_cache.ENTRY in q.__dict__
    assert list(q.state_dict()) == ["amax"]
    copied = copy.deepcopy(q)
    assert weight_cache.ENTRY not in copied.__dict__
    buffer = io.BytesIO()
    torch.save(q, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert weight_cache.ENTRY not in loaded.__dict__
    assert weight_cache.ENTRY not in pickle.loads(pickle.dumps(q)).__dict__
    with torch.no_grad():  # a copy's cache follows the copy's weight, not the original's
        other = nn.Parameter(w.detach() * 2)
        torch.testing.assert_close(copied(other), _expected(copied, other), rtol=0, atol=0)
