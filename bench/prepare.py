"""Prepare time and peak memory for a BERT-large-sized model (24 layers, hidden 1024).

Run: python bench/prepare.py [--layers 24] [--recipe int8] [--static]
Prints the seconds `qcompile.prepare` takes (capture, match, insert) and the growth of the
process's peak resident memory during it; random weights, nothing downloaded.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from qcompile.passes.sites import SiteStatus  # noqa: E402
from qcompile.prepare import prepare  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--recipe", default="int8")
    parser.add_argument("--static", action="store_true", help="capture with fixed shapes")
    options = parser.parse_args()

    config = BertConfig(hidden_size=1024, num_hidden_layers=options.layers,
                        num_attention_heads=16, intermediate_size=4096, attn_implementation="sdpa")
    model = BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (2, 128)),
              "attention_mask": torch.ones(2, 128, dtype=torch.long)}
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    before = _peak_rss_mib()
    start = time.perf_counter()
    prepared = prepare(model, options.recipe, example_kwargs=inputs, dynamic=not options.static)
    seconds = time.perf_counter() - start
    peak_growth = _peak_rss_mib() - before

    quantized = sum(s.status is SiteStatus.QUANTIZED for s in prepared.qcompile_sites)
    print(f"BERT-large-sized ({options.layers} layers, {weights_mib:.0f} MiB of fp32 weights), "
          f"recipe {options.recipe}, {'static' if options.static else 'dynamic'} shapes: {len(prepared.qcompile_sites)} sites, {quantized} quantized")
    print(f"prepare: {seconds:.2f} s, peak RSS grew by {peak_growth:.0f} MiB "
          f"({peak_growth / weights_mib:.2f}x the weights)")


if __name__ == "__main__":
    main()
