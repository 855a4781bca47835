"""Capture: turn an `nn.Module` into an FX `GraphModule`, or explain why it cannot be.

`capture` is the one place that calls `torch.export` (non-strict, training IR, so dropout and
batch-norm are still there to train) and, only where export fails, `torch.fx.symbolic_trace`
with a warning. It captures a copy of the model in training mode, so the caller's model is
never touched and every train-time op is in the graph (`passes.train_mode` makes them follow
`.train()`/`.eval()` again). The copy of the module tree shares the caller's tensors while
torch.export traces it; their own copies are made on a second thread meanwhile (a copy is
memory-bound, tracing is Python-bound) and swapped into the captured graph at the end. Failures become a `CaptureError` that names the construct, where
it is in the user's code, and what to write instead. Nothing here knows about quantization.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import os
import sys
import traceback
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import fx
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from qcompile.core.calls import describe_call, model_dtype_device
from qcompile.passes._fx import get_operand, operand_positions
from qcompile.passes.experts import capturable_experts

#: Frames in these directories are ours or torch's, never the construct to report.
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (torch.__file__, sys.modules["qcompile"].__file__, __file__)
)


class CaptureError(RuntimeError):
    """The model could not be captured as a graph; the message says why and what to do."""


class CacheOutputError(CaptureError):
    """The model returns a KV cache object (a Hugging Face decoder called with `use_cache` at
    its default), which one graph cannot return."""


def capture(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
    share_tensors: bool = False,
) -> fx.GraphModule:
    """Capture a training-mode copy of `model` called as `model(*args, **kwargs)`.

    With `share_tensors` the graph holds the caller's parameters and buffers themselves
    instead of copies (for a graph used only as a template, as block-wise prepare does).

    With `dynamic=True` every dimension of every example tensor may vary (torch.export's
    `Dim.AUTO`: dimensions the model fixes, and sizes 0 and 1, are specialized), so the graph
    accepts other batch sizes and sequence lengths. The returned module is `ep.module()`, or a
    `symbolic_trace` module (with a warning) where export fails but tracing works.
    """
    args, kwargs = _check_example_inputs(args, kwargs)
    with ThreadPoolExecutor(max_workers=1) as pool:
        copies = pool.submit((lambda _: {}) if share_tensors else _copy_tensors, model)
        structure = _structure_copy(model).train()
        capturable_experts(structure)
        try:
            return _own_tensors(_export(structure, args, kwargs, dynamic), copies)
        except Exception as error:  # noqa: BLE001 - every export failure is explained
            export_error = error
        try:
            gm = _own_tensors(fx.symbolic_trace(structure, concrete_args=_constants(
                structure, args, kwargs)), copies)
            _propagate_shapes(gm, structure, args, kwargs)
        except Exception:  # noqa: BLE001 - the export error is the one worth reporting
            model = _own_tensors(structure, copies)  # the explanation runs the model
            raise _explain(model, args, kwargs, export_error) from export_error
        warnings.warn(
            f"torch.export could not capture {type(model).__name__} "
            f"({_first_line(export_error)}); fell back to torch.fx.symbolic_trace. Python "
            "branches (including on self.training) are fixed as traced, and shapes as given.",
            stacklevel=3,
        )
        return gm


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _key(tensor: torch.Tensor) -> tuple:
    """What identifies a tensor's memory across the wrappers export puts around it."""
    return tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device


def _copy_tensors(model: torch.nn.Module) -> dict[tuple, torch.Tensor]:
    """An own copy of every parameter and buffer of `model`, keyed by its memory."""
    with torch.no_grad():
        return {_key(t): t.detach().clone() for t in _tensors(model)}


def _structure_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers are the caller's tensors."""
    return copy.deepcopy(model, memo={id(t): t for t in _tensors(model)})


def _own_tensors(module: torch.nn.Module, copies: Future) -> torch.nn.Module:
    """Swap each parameter/buffer of `module` that is memory of the caller's model for its
    copy (tied parameters stay tied); in place, returns `module`."""
    copied = copies.result()
    replaced: dict[int, torch.Tensor] = {}
    for owner in module.modules():
        for store, make in ((owner._parameters, _as_parameter), (owner._buffers, lambda t, _: t)):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                if id(tensor) not in replaced and _key(tensor) in copied:
                    replaced[id(tensor)] = make(copied[_key(tensor)], tensor)
                store[name] = replaced.get(id(tensor), tensor)
    return module


def _as_parameter(data: torch.Tensor, like: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(data, requires_grad=like.requires_grad)


def _check_example_inputs(args, kwargs) -> tuple[tuple, dict[str, Any]]:
    if isinstance(args, torch.Tensor):
        raise TypeError("example_inputs must be a tuple of positional arguments: write (x,)")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"example_inputs must be a tuple, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict, got {type(kwargs).__name__}")
    return tuple(args), dict(kwargs or {})


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {
        name: pytree.tree_map(
            lambda x: {d: Dim.AUTO for d in range(x.ndim)} if isinstance(x, torch.Tensor) else None,
            value,
        )
        for name, value in bound.arguments.items()
    }


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> fx.GraphModule:
    shapes = _dynamic_shapes(model, args, kwargs) if dynamic else None
    program = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
    return program.module()


def _constants(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments that hold no tensor: fixed in the trace, as export would fix them."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return {
        name: value for name, value in bound.arguments.items()
        if not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))
    }


def _propagate_shapes(
    gm: fx.GraphModule, model: torch.nn.Module, args: tuple, kwargs: dict
) -> None:
    """Shapes for the match pass, and a test run of the graph traced from `model`."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints every failure's traceback
        ShapeProp(gm).propagate(*bound.arguments.values())


def _explain(model: torch.nn.Module, args: tuple, kwargs: dict, error: Exception) -> CaptureError:
    name = type(model).__name__
    eager_error = _eager_failure(model, args, kwargs)
    if eager_error is not None:
        return CaptureError(
            f"cannot capture {name}: the model itself fails on the example inputs"
            f"{_where(eager_error)}: {type(eager_error).__name__}: {_first_line(eager_error)}. "
            f"{_inputs_and_model(model, args, kwargs)}. Fix example_inputs / example_kwargs "
            "so that model(*example_inputs, **example_kwargs) runs."
        )
    if "data-dependent" in str(error) or "data dependent" in str(error):
        return CaptureError(
            f"cannot capture {name}: data-dependent control flow{_where(error)} (a Python "
            "branch, .item() or .tolist() on a tensor's value). Use torch.cond for the branch, "
            "make it static (compute it from shapes or arguments, not values), move it out of "
            "forward(), or prepare only the submodules without it "
            "(qcompile.prepare(model.encoder, ...))."
        )
    if "Cache" in str(error) and "use_cache" in inspect.signature(model.forward).parameters:
        return CacheOutputError(
            f"cannot capture {name} as one graph: its output holds a KV cache object "
            f"({_first_line(error)}). Prepare it without the cache: "
            "example_kwargs={..., 'use_cache': False}."
        )
    return CaptureError(
        f"cannot capture {name}: torch.export cannot trace a construct{_where(error)}: "
        f"{type(error).__name__}: {_first_line(error)}. Rewrite it with torch operations, or "
        "move it out of forward()."
    )


def _eager_failure(model: torch.nn.Module, args: tuple, kwargs: dict) -> Exception | None:
    model.eval()  # a throwaway copy; eval so that batch-norm statistics stay put
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure means the inputs do not fit
        return error
    return None


def _inputs_and_model(model: torch.nn.Module, args: tuple, kwargs: dict) -> str:
    """'Example inputs: x: float32[4, 31] on cpu; model parameters: float32 on cpu'."""
    dtype, device = model_dtype_device(model)
    text = f"Example inputs: {describe_call(model, args, kwargs) or 'none'}"
    if dtype is not None:
        text += f"; model parameters: {str(dtype).removeprefix('torch.')} on {device}"
    devices = {leaf.device for leaf in pytree.tree_leaves((args, kwargs))
               if isinstance(leaf, torch.Tensor)}
    if device is not None and devices - {device}:
        text += f" (put the example tensors on {device}, the model's device)"
    return text


def _where(error: BaseException) -> str:
    """' at file:line in function: `code`' for the innermost frame in the user's code."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = os.path.abspath(frame.filename)
        if os.path.isfile(path) and not path.startswith(_LIBRARY_DIRS):
            code = f": `{frame.line.strip()}`" if frame.line else ""
            return f" at {frame.filename}:{frame.lineno} in {frame.name}{code}"
    return ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
        weight = _dtype_name(dtypes[1])
        culprits = [p for p in _placeholders(operands[0]) if _val_dtype(p) not in (dtypes[1], None)]
        named = ", ".join(f"{p.target!r} ({_dtype_name(_val_dtype(p))})" for p in culprits)
        return (
            f"the model cannot run on the example inputs: site {site.name} ({site.kind.value}) "
            f"multiplies a {_dtype_name(dtypes[0])} input by a {weight} operand"
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
