"""Quantization-aware distillation: a frozen float teacher teaches the quantized student.

`Distiller` runs teacher and student on the same inputs and returns a loss: KL(teacher ||
student) on temperature-scaled logits (or MSE / cosine on outputs that are not logits, such as
sentence embeddings), plus optional feature losses between the activations that enter named
sites. It needs no labels. It knows nothing of formats or graphs beyond finding a site's
input quantizer in a prepared model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qcompile.passes.sites import model_sites

OUTPUT_LOSSES = ("kl", "mse", "cosine")
FEATURE_LOSSES = ("mse", "cosine")

LogitsSelector = str | int | Callable[[Any], torch.Tensor] | None


def select_logits(output: Any, selector: LogitsSelector = None) -> torch.Tensor:
    """The tensor to distil from a model output: a tensor, tuple, dict or HF ModelOutput.

    `selector` picks it: a key or attribute name, a tuple index, or a callable. By default a
    tensor is itself, a mapping/ModelOutput gives its `logits` (else its first value), and a
    tuple or list gives its first element.
    """
    if callable(selector):
        return selector(output)
    if isinstance(output, torch.Tensor) and selector is None:
        return output
    if isinstance(output, Mapping):  # dicts and HF ModelOutput
        key = selector if selector is not None else ("logits" if "logits" in output else None)
        if key is None:
            key = next(iter(output))
        if key not in output:
            raise KeyError(f"model output has no {key!r}; keys: {list(output)}. Pass logits=...")
        return output[key]
    if isinstance(output, Sequence) and not isinstance(output, str):
        return output[selector if isinstance(selector, int) else 0]
    if isinstance(selector, str) and hasattr(output, selector):
        return getattr(output, selector)
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; "
        "pass logits=<key, index or callable>"
    )


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float):
    """KL(teacher || student) over the last axis, averaged over positions, times T**2."""
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    teacher_log_probs = F.log_softmax(t, dim=-1)
    kl = F.kl_div(F.log_softmax(s, dim=-1), teacher_log_probs, log_target=True, reduction="none")
    return kl.sum(-1).mean() * temperature**2


def _feature_loss(kind: str, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    teacher, student = teacher.float(), student.float()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


#: How to name a feature of a prepared model, for the errors that say a name cannot be used.
_NAMING_HINT = (
    "In a prepared model the original modules are inlined into the graph and their hooks never "
    "run; a feature must name a site whose input activation is quantized (its input quantizer "
    "sees that activation). qc.report(student) lists the sites and their quantizers."
)


def _input_capture_point(model: nn.Module, name: str) -> nn.Module:
    """The module whose input is the activation entering site or module `name`."""
    for site in model_sites(model) or ():
        if site.name == name:
            if "input" not in site.quantizers:
                raise ValueError(
                    f"feature {name!r}: this site quantizes no input activation (a weight-only "
                    f"recipe such as int4, or an excluded input), so nothing in the prepared "
                    f"model sees its input. {_NAMING_HINT}"
                )
            return model.get_submodule(site.quantizers["input"])
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"feature {name!r} names no module or quantized site of {type(model).__name__}"
        ) from None


class _InputRecorder:
    """Forward pre-hooks that keep the first input of each named module (one forward)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self._handles = [
            _input_capture_point(model, name).register_forward_pre_hook(self._hook(name))
            for name in names
        ]

    def _hook(self, name: str):
        def hook(module, args):
            self.values[name] = args[0]

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        values, self.values = self.values, {}
        return values

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class Distiller(nn.Module):
    """Distil a frozen teacher into a (quantized) student; `distiller(*inputs)` is the loss.

    Args:
        teacher: the float model; put in eval mode, frozen, and never updated.
        student: the prepared (quantized) model being trained.
        temperature: softmax temperature of the KL loss (the loss is scaled by T**2).
        loss: "kl" on logits (default), "mse" or "cosine" for outputs that are not logits.
        features: names of sites/modules whose *input* activations should also match.
        feature_loss: "mse" or "cosine" for the feature terms.
        feature_weight: weight of the summed feature terms.
        logits: selector of the tensor to distil (see `select_logits`).
        teacher_dtype: run the teacher in this dtype (e.g. torch.bfloat16) to save time.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        temperature: float = 1.0,
        loss: str = "kl",
        features: Sequence[str] | None = None,
        feature_loss: str = "mse",
        feature_weight: float = 1.0,
        logits: LogitsSelector = None,
        teacher_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if loss not in OUTPUT_LOSSES:
            raise ValueError(f"loss must be one of {OUTPUT_LOSSES}, got {loss!r}")
        if feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"feature_loss must be one of {FEATURE_LOSSES}, got {feature_loss!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if teacher is student:
            raise ValueError("teacher and student are the same module; prepare a copy")
        teacher.eval().requires_grad_(False)
        if teacher_dtype is not None:
            teacher.to(teacher_dtype)
        # Kept out of `self._modules`, so the teacher never reaches the student's optimizer,
        # state_dict or .train() calls.
        self.__dict__["teacher"] = teacher
        self.student = student
        self.temperature = temperature
        self.loss = loss
        self.feature_loss = feature_loss
        self.feature_weight = feature_weight
        self.logits = logits
        self.teacher_dtype = teacher_dtype
        self.features = list(features or [])
        self._teacher_features = _InputRecorder(teacher, self.features)
        self._student_features = _InputRecorder(student, self.features)

    def _teacher_inputs(self, args, kwargs):
        if self.teacher_dtype is None:
            return args, kwargs

        def cast(value):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(self.teacher_dtype)
            return value

        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def output_loss(self, teacher_output: Any, student_output: Any) -> torch.Tensor:
        teacher = select_logits(teacher_output, self.logits)
        student = select_logits(student_output, self.logits)
        if self.loss == "kl":
            return kl_divergence(teacher, student, self.temperature)
        return _feature_loss(self.loss, teacher, student)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.compute_loss(self.student, *args, **kwargs)

    def compute_loss(self, student: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The loss with the student called through `student` (e.g. a DDP-wrapped copy)."""
        with torch.no_grad():
            t_args, t_kwargs = self._teacher_inputs(args, kwargs)
            teacher_output = self.teacher(*t_args, **t_kwargs)
        student_output = student(*args, **kwargs)
        loss = self.output_loss(teacher_output, student_output)
        teacher_features = self._teacher_features.pop()
        student_features = self._student_features.pop()
        for role, captured in (("teacher", teacher_features), ("student", student_features)):
            missing = [name for name in self.features if name not in captured]
            if missing:
                raise RuntimeError(
                    f"features {missing} were never reached in the {role}'s forward, so their "
                    f"loss cannot be computed. {_NAMING_HINT}"
                )
        for name in self.features:
            loss = loss + self.feature_weight * _feature_loss(
                self.feature_loss, teacher_features[name], student_features[name]
            )
        return loss

    def remove_hooks(self) -> None:
        """Detach the feature hooks from teacher and student."""
        self._teacher_features.remove()
        self._student_features.remove()
