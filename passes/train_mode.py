"""Training mode: make a captured graph follow `.train()` / `.eval()` again.

`torch.export` records the training flag of dropout, batch-norm and attention dropout as a
constant (the model is captured in training mode), and its `.module()` refuses `.train()` and
`.eval()`. This pass routes each such op through a `TrainingSwitch` submodule that passes the
train-time value in training mode and the eval-time value otherwise, and lifts the refusal.
It knows nothing of quantization.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function

aten = torch.ops.aten

#: Container submodule that holds the switches.
SWITCHES = "qcompile_train_mode"


class TrainingSwitch(nn.Module):
    """Calls `op(**kwargs)` with `kwargs[flag]` set to `train_value` or `eval_value`."""

    def __init__(self, op: Callable, flag: str, train_value: Any, eval_value: Any) -> None:
        super().__init__()
        self.op = op
        self.flag = flag
        self.train_value = train_value
        self.eval_value = eval_value

    def forward(self, **kwargs: Any) -> Any:
        kwargs[self.flag] = self.train_value if self.training else self.eval_value
        return self.op(**kwargs)

    def extra_repr(self) -> str:
        return f"{getattr(self.op, '__name__', self.op)}, {self.flag}={self.train_value}/{self.eval_value}"


_SWITCHABLE = frozenset({
    aten.dropout.default, aten.feature_dropout.default, F.dropout, aten.batch_norm.default,
    aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention, aten.add_.Tensor,
})


def _may_switch(target: Any) -> bool:
    try:
        return target in _SWITCHABLE
    except TypeError:  # unhashable targets
        return False


def _switch_for(node: fx.Node, kwargs: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """(flag, train value, eval value) for a node whose behaviour depends on training mode."""
    target = node.target
    if target in (aten.dropout.default, aten.feature_dropout.default):
        return ("train", True, False) if kwargs["train"] and kwargs["p"] > 0 else None
    if target is F.dropout:
        return ("training", True, False) if kwargs["training"] and kwargs["p"] > 0 else None
    if target is aten.batch_norm.default:
        has_stats = kwargs["running_mean"] is not None
        return ("training", True, False) if kwargs["training"] and has_stats else None
    if target in (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention):
        p = kwargs.get("dropout_p", 0.0)
        return ("dropout_p", p, 0.0) if p > 0 else None
    if target is aten.add_.Tensor:
        buffer = kwargs["self"]
        counts_batches = (
            isinstance(buffer, fx.Node) and buffer.op == "get_attr"
            and str(buffer.target).endswith("num_batches_tracked")
        )
        return ("other", kwargs["other"], 0) if counts_batches else None
    return None


def bind_training_mode(gm: fx.GraphModule) -> fx.GraphModule:
    """Route mode-dependent ops of `gm` through `TrainingSwitch`es; returns `gm`."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not _may_switch(node.target):
            continue
        normalized = normalize_function(
            node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
        )
        if normalized is None:  # a builtin without a signature to bind
            continue
        kwargs = dict(normalized.kwargs)
        switch = _switch_for(node, kwargs)
        if switch is None:
            continue
        path = f"{SWITCHES}.{node.name}"
        gm.add_submodule(path, TrainingSwitch(node.target, *switch))
        # rewritten in place, so that the node keeps its name (sites refer to nodes by name)
        node.op, node.target, node.args, node.kwargs = "call_module", path, (), kwargs
    for blocked in ("train", "eval"):  # set by ExportedProgram.module() to refuse mode changes
        gm.__dict__.pop(blocked, None)
    gm.recompile()
    return gm
