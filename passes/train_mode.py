"""Training mode: make a captured graph follow `.train()` / `.eval()` again.

`torch.export` records the training flag of dropout, batch-norm and attention dropout as a
constant (the model is captured in training mode), and its `.module()` refuses `.train()` and
`.eval()`. This pass routes each such op through a `TrainingSwitch` submodule that passes the
train-time value in training mode and the eval-time value otherwise, and lifts the refusal.
It knows nothing of quantization.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

#: Container submodule that holds the switches.
SWITCHES = "qcompile_train_mode"


class TrainingSwitch(nn.Module):
    """Calls `op(*args, **kwargs)` with `args[index]` set to `train_value` or `eval_value`."""

    def __init__(self, op: Callable, index: int, train_value: Any, eval_value: Any) -> None:
        super().__init__()
        self.op = op
        self.index = index
        self.train_value = train_value
        self.eval_value = eval_value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = list(args)
        args[self.index] = self.train_value if self.training else self.eval_value
        return self.op(*args, **kwargs)

    def extra_repr(self) -> str:
        name = getattr(self.op, "__name__", self.op)
        return f"{name}, args[{self.index}]={self.train_value} / {self.eval_value} in eval"


_SWITCHABLE = frozenset({
    aten.dropout.default, aten.feature_dropout.default, F.dropout, aten.batch_norm.default,
    aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention, aten.add_.Tensor,
})


def _may_switch(target: Any) -> bool:
    try:
        return target in _SWITCHABLE
    except TypeError:  # unhashable targets
        return False


def _bind(node: fx.Node) -> tuple[list[str], list[Any], dict[str, Any]] | None:
    """Names of the positional arguments of `node`, their values (defaults filled in) and the
    keyword-only arguments; None for a builtin without a signature."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return None
        bound.apply_defaults()
        return list(bound.arguments), list(bound.args), dict(bound.kwargs)
    names, args, kwargs = [], [], {}
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            value = node.args[index]
        elif argument.name in node.kwargs:
            value = node.kwargs[argument.name]
        elif argument.has_default_value():
            value = argument.default_value
        else:
            continue
        if argument.kwarg_only:
            kwargs[argument.name] = value
        else:
            names.append(argument.name)
            args.append(value)
    return names, args, kwargs


def _switch_for(node: fx.Node, named: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """(flag, train value, eval value) for a node whose behaviour depends on training mode."""
    target = node.target
    if target in (aten.dropout.default, aten.feature_dropout.default):
        return ("train", True, False) if named["train"] and named["p"] > 0 else None
    if target is F.dropout:
        return ("training", True, False) if named["training"] and named["p"] > 0 else None
    if target is aten.batch_norm.default:
        has_stats = named["running_mean"] is not None
        return ("training", True, False) if named["training"] and has_stats else None
    if target in (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention):
        p = named.get("dropout_p", 0.0)
        return ("dropout_p", p, 0.0) if p > 0 else None
    if target is aten.add_.Tensor:
        buffer = named["self"]
        counts_batches = (
            isinstance(buffer, fx.Node) and buffer.op == "get_attr"
            and str(buffer.target).endswith("num_batches_tracked")
        )
        return ("other", named["other"], 0) if counts_batches else None
    return None


def bind_training_mode(gm: fx.GraphModule) -> fx.GraphModule:
    """Route mode-dependent ops of `gm` through `TrainingSwitch`es; returns `gm`."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not _may_switch(node.target):
            continue
        bound = _bind(node)
        if bound is None:
            continue
        names, args, kwargs = bound
        switch = _switch_for(node, dict(zip(names, args)))
        if switch is None:
            continue
        flag, train_value, eval_value = switch
        path = f"{SWITCHES}.{node.name}"
        gm.add_submodule(
            path, TrainingSwitch(node.target, names.index(flag), train_value, eval_value)
        )
        # rewritten in place, so that the node keeps its name (sites refer to nodes by name)
        node.op, node.target, node.args, node.kwargs = "call_module", path, tuple(args), kwargs
    for blocked in ("train", "eval"):  # set by ExportedProgram.module() to refuse mode changes
        gm.__dict__.pop(blocked, None)
    gm.recompile()
    return gm
