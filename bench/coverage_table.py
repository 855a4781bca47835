"""Per-family weight coverage (#24): prepare each 2-layer random-weight family of
tests/hf/test_hf_models.py at int8 (calibrated on one batch) and nvfp4, and print one Markdown
row per family: sites, quantized sites, matmul weight elements quantized outside output heads
and routers, the same over all matmul weights, int8 output cosine to float, nvfp4 finite,
whether every multiplied weight is listed, prepare time and total time.

Run from the repository root: python bench/coverage_table.py [family ...]
"""

import sys
import time
import warnings

import torch

sys.path.insert(0, "tests/hf")
import test_hf_models as families  # noqa: E402

from qcompile.passes.sites import weight_coverage  # noqa: E402


def row(name: str) -> str:
    start = time.perf_counter()
    model, prepared, kind = families._prepare_family(name)
    prepared_s = time.perf_counter() - start
    sites = prepared.qcompile_sites
    try:
        families._check_family_sites(model, prepared)
        listed = "yes"
    except AssertionError as error:
        listed = str(error)[:120]
    families.calibrate_max(prepared, families._family_inputs(kind))
    other = families._family_inputs(kind, batch=3, seed=2)
    with torch.no_grad():
        reference = families._output(model(**other))
        out = families._output(prepared(**other))
    cosine = torch.nn.functional.cosine_similarity(
        out.flatten().double(), reference.flatten().double(), dim=0).item()
    _, nvfp4, _ = families._prepare_family(name, "nvfp4")
    families.calibrate_max(nvfp4, families._family_inputs(kind))
    with torch.no_grad():
        finite = bool(families._output(nvfp4(**other)).isfinite().all())
    quantized = sum(s.status.value == "quantized" for s in sites)
    return (f"| {name} | {len(sites)} | {quantized} | "
            f"{100 * families._coverage_without_heads(sites):.2f}% | "
            f"{100 * weight_coverage(sites).fraction:.1f}% | {cosine:.4f} | {finite} | {listed} | "
            f"{prepared_s:.1f}s | {time.perf_counter() - start:.1f}s |")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    print("| family | sites | quantized | weights quantized (heads, routers aside) | all weights "
          "| int8 cosine | nvfp4 finite | all listed | prepare | total |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in sys.argv[1:] or list(families.FAMILIES):
        print(row(family), flush=True)
