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
import itertools
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from qcompile.passes.match import get_operand, operand_positions

#: Constants compared at call time; other Python objects are not checked.
_CONSTANTS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class TensorSpec:
    """An example tensor: dtype, device and shape, whether dtype and device were the model's
    (then they must follow the model when it is converted or moved), and the sizes the
    captured graph fixed (None where a dimension may vary; all None where unknown)."""

    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, ...]
    model_dtype: bool
    model_device: bool
    fixed: tuple[int | None, ...] = ()


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    """The dtype of the first floating-point parameter (or buffer), and its device."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return None, None


def _leaves(value: Any) -> list[tuple[str, Any]]:
    """(path, leaf) of a pytree; the path is '' for the value itself, '[0]', "['a']" below."""
    leaves, _ = pytree.tree_flatten_with_path(value)
    return [(pytree.keystr(path), leaf) for path, leaf in leaves]


def _describe(value: Any, dtype: torch.dtype | None, device: torch.device | None) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(value.dtype, value.device, tuple(value.shape),
                          value.dtype == dtype, value.device == device)
    return value if isinstance(value, _CONSTANTS) else ...


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)} on {value.device}"
    return repr(value)


def describe_call(model: nn.Module, args: tuple, kwargs: dict) -> str:
    """"x: float32[4, 32] on cpu, mode: 'a'" for error messages."""
    try:
        items = list(inspect.signature(model.forward).bind(*args, **kwargs).arguments.items())
    except (TypeError, ValueError):
        items = [(f"input {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return ", ".join(f"{name}{path}: {_show(leaf)}"
                     for name, value in items for path, leaf in _leaves(value))


@dataclass
class InputSignature:
    """The example call of `prepare`: argument names in order, and per argument its leaves."""

    names: tuple[str, ...]
    arguments: dict[str, dict[str, Any]]
    dynamic: bool = True

    @classmethod
    def record(
        cls, model: nn.Module, args: tuple, kwargs: dict, dynamic: bool = True
    ) -> InputSignature:
        """Describe `model(*args, **kwargs)`; `model` gives the dtype and device."""
        dtype, device = model_dtype_device(model)
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        arguments = {
            name: {path: _describe(leaf, dtype, device) for path, leaf in _leaves(value)}
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
            for path, leaf in _leaves(value):
                if path in expected:
                    _check_leaf(f"{name}{path}", expected[path], leaf, dtype, device)


def _check_leaf(name: str, expected: Any, got: Any, dtype, device) -> None:
    if expected is ...:
        return
    if not isinstance(expected, TensorSpec):
        if isinstance(got, torch.Tensor) or got != expected:
            raise ValueError(
                f"argument {name!r} was {expected!r} when the model was prepared, and that "
                f"value is fixed in the captured graph; got {_show(got)}. Call it with "
                f"{name}={expected!r}, or prepare again with this value in the example call."
            )
        return
    if not isinstance(got, torch.Tensor):
        raise ValueError(
            f"input {name!r} was a tensor ({_show_spec(expected)}) when the model was "
            f"prepared; got {_show(got)}. Pass a tensor, or prepare again with this value."
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


def site_operand_problem(gm: fx.GraphModule, sites: list) -> str | None:
    """Why the model cannot run on its example inputs, where a site's two operands differ in
    dtype or its activation is not floating point (export traces that; eager fails); else None.
    """
    if any("autocast" in str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes):
        return None  # autocast regions compute in another dtype than their inputs are
    nodes = {node.name: node for node in gm.graph.nodes}
    for site in sites:
        node = nodes[site.node_name]
        operands = [get_operand(node.args, p) for p in operand_positions(node).values()]
        dtypes = [_val_dtype(o) for o in operands]
        if None in dtypes:
            continue
        if dtypes[0] == dtypes[1] and dtypes[0].is_floating_point:
            continue
        weight = _dtype(dtypes[1])
        culprits = [p for p in _placeholders(operands[0]) if _val_dtype(p) not in (dtypes[1], None)]
        named = ", ".join(f"{p.target!r} ({_dtype(_val_dtype(p))})" for p in culprits)
        return (
            f"the model cannot run on the example inputs: site {site.name} ({site.kind.value}) "
            f"multiplies a {_dtype(dtypes[0])} input by a {weight} operand"
            + (f"; it comes from example input {named}" if named else "")
            + f". Fix example_inputs / example_kwargs: pass floating-point tensors in the "
            f"model's dtype ({weight}), e.g. x.to(torch.{weight}), or convert the model."
        )
    return None


def _val_dtype(node: Any) -> torch.dtype | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    return getattr(val, "dtype", None)


def _placeholders(node: fx.Node) -> list[fx.Node]:
    """The graph inputs that `node` is computed from."""
    seen, stack, found = set(), [node], []
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            found.append(current)
        stack.extend(current.all_input_nodes)
    return found
