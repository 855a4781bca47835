"""Hugging Face causal LMs: a prepared model that `generate()` can drive.

`prepare_causal_lm` prepares a causal LM (any `AutoModelForCausalLM`) with token ids,
attention mask and position ids of dynamic batch and sequence length and *no KV cache*
(`use_cache=False`: a cache is state that a captured graph does not carry), and wraps the
prepared graph in `QuantizedCausalLM`, a `PreTrainedModel` with the original config and
generation config. Each generation step therefore runs the whole sequence again: correct,
and fine for evaluation and tests, but O(length^2); deployment runs the exported model with
its own cache. Calibrate, train (QAT/QAD) and report it like any prepared model; its graph
is `.prepared`. Import only where transformers is installed.
"""

from __future__ import annotations

import copy
import inspect
import os
from typing import Any

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from qcompile.hf.checkpoint import save_quantized
from qcompile.prepare import PreparedModel, prepare
from qcompile.recipe import Recipe

#: The inputs a causal LM is prepared with, in this order, when its forward takes them.


class QuantizedCausalLM(transformers.PreTrainedModel, transformers.GenerationMixin):
    """A prepared causal LM that HF `generate()`, `Trainer` and `save_pretrained` accept.

    `forward` takes `input_ids`, `attention_mask`, `position_ids` (derived from the mask when
    absent, as generate does) and `labels` (next-token cross-entropy), and returns
    `CausalLMOutputWithPast(loss, logits)` without a cache. `use_cache=True` and
    `past_key_values` are refused. `save_pretrained(directory)` is
    `qcompile.hf.save_quantized`; `qcompile.hf.load_quantized(directory)` reads it back.
    """

    config_class = transformers.PretrainedConfig
    base_model_prefix = "prepared"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(
        self,
        prepared: PreparedModel,
        config: transformers.PretrainedConfig,
        generation_config: transformers.GenerationConfig | None = None,
    ) -> None:
        super().__init__(copy.deepcopy(config))  # PreTrainedModel adjusts its config ...
        self.config._attn_implementation = config._attn_implementation  # ... the graph's stays
        self.post_init()  # before the graph is attached: it would re-initialize its weights
        self.prepared = prepared
        if generation_config is not None:
            self.generation_config = copy.deepcopy(generation_config)
        self.generation_config.use_cache = False

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if use_cache or past_key_values is not None:
            raise ValueError(
                "QuantizedCausalLM runs without a KV cache (its graph was captured with "
                "use_cache=False); call generate(..., use_cache=False), its default"
            )
        if input_ids is None:
            raise ValueError("QuantizedCausalLM needs input_ids (inputs_embeds are not supported)")
        expected = self.prepared.qcompile_inputs.arguments
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)  # generate drops an all-ones mask
        elif "attention_mask" not in expected and not bool(attention_mask.all()):
            raise ValueError(
                "the model was prepared without attention_mask, so it cannot take padding; "
                "prepare it with attention_mask in example_kwargs"
            )
        if position_ids is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids = position_ids.masked_fill(attention_mask == 0, 0)
        given = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "position_ids": position_ids, "use_cache": False, **kwargs}
        output = self.prepared(**{k: v for k, v in given.items() if k in expected})
        logits = output["logits"] if isinstance(output, dict) else output[0]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> None:
        """`qcompile.hf.save_quantized(self, save_directory)` on the main process.

        Takes `save_pretrained`'s `is_main_process` and `safe_serialization=True` (the
        weights are written as safetensors where the package is installed); other options
        (`state_dict`, `push_to_hub`, `max_shard_size`, `variant`, ...) are refused rather
        than ignored: the directory holds the quantizer state too.
        """
        if not safe_serialization:
            raise ValueError(
                "QuantizedCausalLM.save_pretrained writes safetensors (or model.pt where "
                "safetensors is missing); drop safe_serialization=False"
            )
        given = sorted(k for k, v in kwargs.items() if v not in (None, False))
        if given:
            raise TypeError(
                f"QuantizedCausalLM.save_pretrained does not take {', '.join(given)}; it "
                "writes one directory with qcompile.hf.save_quantized (weights, quantizer "
                "state, config): save it, then upload or shard that directory yourself"
            )
        if is_main_process:
            save_quantized(self, save_directory)


def example_kwargs_for(
    model: nn.Module, batch: int = 2, length: int = 16
) -> dict[str, Any]:
    """An example call for `model`: random token ids, an all-ones mask, positions, no cache."""
    parameter = next(model.parameters())
    accepted = inspect.signature(model.forward).parameters
    vocab = getattr(model.config, "vocab_size", 2)
    ids = torch.randint(0, vocab, (batch, length), device=parameter.device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "position_ids": torch.arange(length, device=ids.device).expand(batch, length)}
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    return {**kwargs, "use_cache": False} if "use_cache" in accepted else kwargs


def prepare_causal_lm(
    model: transformers.PreTrainedModel,
    recipe: str | Recipe = "int8",
    example_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> QuantizedCausalLM:
    """`qcompile.prepare` a causal LM for `generate()`; `model` itself is not modified.

    Args:
        model: an `AutoModelForCausalLM` (GPT-2, Llama, ...).
        recipe: as for `qcompile.prepare`.
        example_kwargs: the example call; default `example_kwargs_for(model)` (token ids,
            mask and position ids of batch 2 and length 16). `use_cache=False` is added.
        options: passed to `qcompile.prepare` (`dynamic`).
    """
    if not hasattr(model, "config") or not callable(getattr(model, "generate", None)):
        raise TypeError(
            f"prepare_causal_lm takes a Hugging Face causal LM (AutoModelForCausalLM), got "
            f"{type(model).__name__}; use qcompile.prepare for other models"
        )
    kwargs = dict(example_kwargs) if example_kwargs is not None else example_kwargs_for(model)
    kwargs["use_cache"] = False
    if "input_ids" not in kwargs:
        raise ValueError("example_kwargs needs input_ids: prepare_causal_lm runs on token ids")
    prepared = prepare(model, recipe, example_kwargs=kwargs, **options)
    return QuantizedCausalLM(prepared, model.config, getattr(model, "generation_config", None))
