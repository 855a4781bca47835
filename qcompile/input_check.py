"""Inputs: what a model was prepared with, checked against what it is later given.

`InputSignature.record` describes the example call of `prepare` (per argument and pytree
path: a tensor's dtype, device and rank, or a constant's value), relative to the model's own
dtype and device. `site_operand_problem` finds example inputs that the model cannot compute
with (a float64 or integer tensor multiplied by float32 weights: torch.export traces that
without complaint, the model then fails on every call). `InputSignature.check_call` runs
before each call of the prepared model and names the argument, what the model expects and
what it got. It knows nothing of quantization.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from qcompile.core.calls import (
    TensorSpec,
    describe_value,
    leaves,
    model_dtype_device,
    show_value,
)


@dataclass
class InputSignature:
    """The example call of `prepare`: argument names in order, and per argument its leaves."""

    names: tuple[str, ...]
    arguments: dict[str, dict[str, Any]]
    dynamic: bool = True
    #: False where the call is not one captured graph (a block-wise prepared block runs a
    #: graph per call structure): only tensors given where the example had tensors are checked.
    check_constants: bool = True

    @classmethod
    def record(
        cls, model: nn.Module, args: tuple, kwargs: dict, dynamic: bool = True
    ) -> InputSignature:
        """Describe `model(*args, **kwargs)`; `model` gives the dtype and device."""
        dtype, device = model_dtype_device(model)
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        arguments = {
            name: {path: describe_value(leaf, dtype, device) for path, leaf in leaves(value)}
            for name, value in bound.arguments.items()
        }
        return cls(tuple(arguments), arguments, dynamic)

    def fix_dims(self, gm: fx.GraphModule) -> None:
        """Read which sizes torch.export fixed from the placeholders of `gm` (one per leaf,
        in order); a symbolic_trace graph keeps no such record and leaves them unchecked."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        leaves = [(name, path) for name, specs in self.arguments.items() for path in specs]
        if len(placeholders) != len(leaves):
            return
        for (name, path), node in zip(leaves, placeholders):
            spec, val = self.arguments[name][path], node.meta.get("val")
            if isinstance(spec, TensorSpec) and isinstance(val, torch.Tensor):
                fixed = tuple(int(d) if is_concrete_int(d) else None for d in val.shape)
                self.arguments[name][path] = replace(spec, fixed=fixed)

    def fixed_small_dims(self) -> list[tuple[str, int, int]]:
        """(input, axis, size) of every dimension fixed to 0 or 1 because the example had it
        (torch.export specializes those sizes even where the model would take others)."""
        if not self.dynamic:
            return []
        return [
            (f"{name}{path}", axis, size)
            for name, specs in self.arguments.items() for path, spec in specs.items()
            if isinstance(spec, TensorSpec)
            for axis, (size, fixed) in enumerate(zip(spec.shape, spec.fixed))
            if size in (0, 1) and fixed == size
        ]

    def check_call(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Raise a ValueError naming the first argument the prepared model cannot take."""
        dtype, device = model_dtype_device(model)
        given = dict(zip(self.names, args))
        given.update((k, v) for k, v in kwargs.items() if k in self.arguments)
        for name, value in given.items():
            expected = self.arguments.get(name)
            if expected is None:
                continue
            for path, leaf in leaves(value):
                if path not in expected:
                    continue
                if not self.check_constants and not (
                    isinstance(leaf, torch.Tensor) and isinstance(expected[path], TensorSpec)
                ):
                    continue
                _check_leaf(f"{name}{path}", expected[path], leaf, dtype, device)


def _check_leaf(name: str, expected: Any, got: Any, dtype, device) -> None:
    if expected is ...:
        return
    if not isinstance(expected, TensorSpec):
        if isinstance(got, torch.Tensor) or got != expected:
            raise ValueError(
                f"argument {name!r} was {expected!r} when the model was prepared, and that "
                f"value is fixed in the captured graph; got {show_value(got)}. Call it with "
                f"{name}={expected!r}, or prepare again with this value in the example call."
            )
        return
    if not isinstance(got, torch.Tensor):
        raise ValueError(
            f"input {name!r} was a tensor ({_show_spec(expected)}) when the model was "
            f"prepared; got {show_value(got)}. Pass a tensor, or prepare again with this value."
        )
    if got.ndim != len(expected.shape):
        raise ValueError(
            f"input {name!r} has {got.ndim} dimensions (shape {list(got.shape)}), but the "
            f"model was prepared with {len(expected.shape)} (example shape "
            f"{list(expected.shape)}); only the sizes of dimensions may change, not their number."
        )
    for axis, (size, fixed) in enumerate(zip(got.shape, expected.fixed)):
        if fixed is not None and size != fixed:
            why = ("torch.export fixes example sizes 0 and 1: prepare again with an example of "
                   "size 2 or more there" if fixed in (0, 1) else
                   "the model needs that size, or it was prepared with dynamic=False: pass "
                   "that size, or prepare again with an example of this shape")
            raise ValueError(
                f"input {name!r} has shape {list(got.shape)}, but dimension {axis} was fixed "
                f"to {fixed} when the model was prepared (example shape "
                f"{list(expected.shape)}); {why}."
            )
    if expected.model_device and device is not None and got.device != device:
        raise ValueError(
            f"input {name!r} is on {got.device} but the prepared model's parameters are on "
            f"{device}; move it with {_leaf_name(name)}.to({str(device)!r}) (or the model "
            f"with .to({str(got.device)!r}))."
        )
    if expected.model_dtype and dtype is not None and got.dtype != dtype:
        raise ValueError(
            f"input {name!r} is {_dtype(got.dtype)} but the prepared model's parameters are "
            f"{_dtype(dtype)}; convert it with {_leaf_name(name)}.to(torch.{_dtype(dtype)})"
            + (f" (or the model with .to(torch.{_dtype(got.dtype)}))." if got.dtype in
               (torch.float32, torch.float16, torch.bfloat16) else ".")
        )
    if _kind(got.dtype) != _kind(expected.dtype):
        raise ValueError(
            f"input {name!r} is {_dtype(got.dtype)} but the model was prepared with "
            f"{_dtype(expected.dtype)} ({_kind(expected.dtype)}) there; pass "
            f"{_leaf_name(name)}.to(torch.{_dtype(expected.dtype)})."
        )


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "boolean"
    if dtype.is_complex:
        return "complex"
    return "floating point" if dtype.is_floating_point else "integer"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _leaf_name(name: str) -> str:
    return name if name.isidentifier() else "x"


def _show_spec(spec: TensorSpec) -> str:
    return f"{_dtype(spec.dtype)}{list(spec.shape)} on {spec.device}"


