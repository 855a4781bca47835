"""Throughput of `qcompile.fake_quantize` on CPU beside a plain copy and PyTorch's built-ins.

For one fp32 tensor (default 4096 x 4096) it times, for each format, the forward pass and
the forward + backward pass, next to `clone()`, `torch.fake_quantize_per_tensor_affine`,
`torch.fake_quantize_per_channel_affine` and a cast to float8_e4m3fn and back. Every figure
is the median of `--repeat` timed runs after `--warmup` untimed ones (the untimed runs include
inductor's compile), and every ratio is taken between figures of this one run. Because the
machine is shared, each timed run of an op is paired with a timed `clone()` right before it;
the "/ clone" column divides the op's median by the median of its own paired clones, which
cancels most of the drift in the machine's load.

GB/s counts the bytes a fused kernel must move at least: forward reads x and writes y
(8 bytes per fp32 element); forward + backward also reads the upstream gradient and x again
and writes the input gradient (20 bytes per element).

    python bench/fake_quant.py [--size 4096] [--repeat 10] [--threads 2] [--device cuda]

On a GPU (`--device cuda`) every timed call is followed by `torch.cuda.synchronize()`, the
qcompile rows run the Triton kernels, and the targets are bandwidth fractions of clone():
per-tensor formats >= 80%, block formats >= 65%.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from results import cpu_model

import qcompile


def synchronize() -> None:
    """Wait for queued GPU work (a no-op on CPU) so that wall-clock timings are honest."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def paired_median_seconds(
    fn: Callable[[], object], reference: Callable[[], object], warmup: int, repeat: int
) -> tuple[float, float]:
    """Medians of fn and of reference, timed alternately (reference first) after warm-up."""
    for _ in range(warmup):
        fn()
    synchronize()
    times, reference_times = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        reference()
        synchronize()
        middle = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - middle)
        reference_times.append(middle - start)
    return statistics.median(times), statistics.median(reference_times)


# (row label, format, keyword arguments)
QCOMPILE_ROWS = [
    ("int8 per-tensor, static amax", "int8", {"amax": "static"}),
    ("int8 per-tensor, dynamic", "int8", {}),
    ("int8 per-channel (axis 0), static", "int8", {"amax": "channel", "axis": 0}),
    ("fp8 per-tensor, static amax", "fp8", {"amax": "static"}),
    ("fp8 per-tensor, dynamic", "fp8", {}),
    ("int4 blocks of 128, dynamic", "int4", {}),
    ("nvfp4 (16), dynamic", "nvfp4", {}),
    ("nvfp4 (16), static global amax", "nvfp4", {"amax": "static"}),
    ("mxfp4 (32)", "mxfp4", {}),
    ("mxfp8 (32)", "mxfp8", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", nargs="*", default=None, help="only these formats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    n = args.size
    x = torch.randn(n, n, device=device)
    grad = torch.randn(n, n, device=device)
    amax = x.abs().amax()
    channel_amax = x.abs().amax(dim=1)
    numel = x.numel()
    fwd_bytes, fwdbwd_bytes = 8 * numel, 20 * numel

    scale = (amax / 127).item()
    channel_scale = channel_amax / 127
    zero_points = torch.zeros(n, dtype=torch.int32, device=device)

    def fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        leaf = x.clone().requires_grad_(True)

        def step():
            leaf.grad = None
            forward(leaf).backward(grad)
            return leaf.grad

        return step

    builtins = {
        "clone()": (lambda t: t.clone(), False),
        "torch.fake_quantize_per_tensor_affine (int8)": (
            lambda t: torch.fake_quantize_per_tensor_affine(t, scale, 0, -128, 127), True),
        "torch.fake_quantize_per_channel_affine (int8, axis 0)": (
            lambda t: torch.fake_quantize_per_channel_affine(
                t, channel_scale, zero_points, 0, -128, 127), True),
        "cast to float8_e4m3fn and back": (
            lambda t: t.to(torch.float8_e4m3fn).to(torch.float32), False),
    }

    def copy():
        return x.clone()

    # (label, forward s, paired clone s, forward+backward s or None)
    results: list[tuple[str, float, float, float | None]] = []
    for label, (forward, has_backward) in builtins.items():
        t_fwd, t_clone = paired_median_seconds(lambda: forward(x), copy, args.warmup, args.repeat)
        t_bwd = (
            paired_median_seconds(fwd_bwd(forward), copy, args.warmup, args.repeat)[0]
            if has_backward else None
        )
        results.append((label, t_fwd, t_clone, t_bwd))
        print(f"measured {label}", flush=True)

    for label, fmt, kwargs in QCOMPILE_ROWS:
        if args.formats and fmt not in args.formats:
            continue
        kwargs = dict(kwargs)
        if kwargs.get("amax") == "static":
            kwargs["amax"] = amax
        elif kwargs.get("amax") == "channel":
            kwargs["amax"] = channel_amax

        def forward(t, fmt=fmt, kwargs=kwargs):
            return qcompile.fake_quantize(t, fmt, **kwargs)

        with torch.no_grad():
            t_fwd, t_clone = paired_median_seconds(
                lambda: forward(x), copy, args.warmup, args.repeat
            )
        t_bwd = paired_median_seconds(fwd_bwd(forward), copy, args.warmup, args.repeat)[0]
        results.append((f"qcompile {label}", t_fwd, t_clone, t_bwd))
        print(f"measured {label}", flush=True)

    header = (
        "| op | fwd ms | fwd GB/s | fwd / clone (paired) | fwd+bwd ms | fwd+bwd GB/s |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    print()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_model()}"
    print(f"{n}x{n} fp32, {args.threads} threads, torch {torch.__version__}, "
          f"{where}, median of {args.repeat} after {args.warmup} warm-up runs")
    print()
    print(header)
    for label, t_fwd, t_clone, t_bwd in results:
        bwd = f"{t_bwd * 1e3:.1f} | {fwdbwd_bytes / t_bwd / 1e9:.2f}" if t_bwd else "- | -"
        print(
            f"| {label} | {t_fwd * 1e3:.1f} | {fwd_bytes / t_fwd / 1e9:.2f} | "
            f"{t_fwd / t_clone:.2f}x | {bwd} |"
        )
    print()
    print("Targets (ratios of this run; relative to clone() to cancel the machine's drift):")
    relative = {label: t_fwd / t_clone for label, t_fwd, t_clone, _ in results}
    builtin = relative["torch.fake_quantize_per_tensor_affine (int8)"]
    for label in ("int8 per-tensor, static amax", "fp8 per-tensor, static amax"):
        key = f"qcompile {label}"
        if key in relative:
            speedup = builtin / relative[key]
            verdict = "met" if speedup >= 1 else "MISSED"
            print(f"- {label}: {speedup:.2f}x the throughput of "
                  f"torch.fake_quantize_per_tensor_affine (target >= 1.00x): {verdict}")
    if device.type == "cuda":
        for label, fmt, _ in QCOMPILE_ROWS:
            key = f"qcompile {label}"
            if key in relative:
                share = 1 / relative[key]
                target = 0.65 if fmt in ("int4", "nvfp4", "mxfp4", "mxfp8") else 0.80
                verdict = "met" if share >= target else "MISSED"
                print(f"- {label}: {share:.0%} of clone bandwidth (target >= {target:.0%}): {verdict}")
        return
    for label, fmt, _ in QCOMPILE_ROWS:
        key = f"qcompile {label}"
        if fmt in ("int4", "nvfp4", "mxfp4", "mxfp8") and key in relative:
            ratio = relative[key]
            verdict = "met" if ratio <= 3 else "MISSED"
            print(f"- {label}: forward {ratio:.2f}x clone time (target <= 3x): {verdict}")


if __name__ == "__main__":
    main()
