"""Serving checkpoint size (#21): bytes of the quantized Linear layers in the checkpoints that
`qcompile.hf.export_checkpoint` writes, against the same layers in bf16.

Run: python bench/serving_size.py   (a random Llama of hidden 1024, 2 layers; CPU)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

import qcompile as qc
from qcompile import hf
from qcompile.passes.sites import SiteKind, SiteStatus, model_sites

CONFIG = dict(vocab_size=1000, hidden_size=1024, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=2816, num_hidden_layers=2)
RECIPES = {
    "nvfp4": qc.RECIPES["nvfp4"].with_(kv_cache="fp8"),
    "fp8": qc.RECIPES["fp8"].with_(quantize_matmul=False, kv_cache="fp8"),
    "mxfp8": qc.RECIPES["mxfp8"],
    "int4": qc.RECIPES["int4"],
}


def main() -> None:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**CONFIG)).eval()
    ids = torch.randint(0, 1000, (2, 32))
    print(f"{'recipe':6} {'format':18} {'quantized / bf16':>16}")
    for name, recipe in RECIPES.items():
        qlm = hf.prepare_causal_lm(model, recipe)
        if recipe.needs_calibration:
            qc.calibrate(qlm, [{"input_ids": ids}], progress=False)
        layers = [s.name for s in model_sites(qlm.prepared)
                  if s.kind is SiteKind.LINEAR and s.status is SiteStatus.QUANTIZED]
        bf16 = sum(qlm.prepared.get_parameter(n + ".weight").numel() * 2 for n in layers)
        for format in ("modelopt", "compressed-tensors"):
            if (name, format) == ("int4", "modelopt"):
                continue
            with tempfile.TemporaryDirectory() as directory:
                hf.export_checkpoint(qlm, directory, format, overwrite=True)
                tensors = load_file(Path(directory) / "model.safetensors")
            stored = sum(t.numel() * t.element_size() for k, t in tensors.items()
                         if k.rpartition(".")[0] in layers)
            print(f"{name:6} {format:18} {stored / bf16:16.4f}")


if __name__ == "__main__":
    main()
