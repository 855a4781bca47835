"""The `qcompile` command line: `demo`, `inspect`, `build`, `export-checkpoint`, `formats`.

Each subcommand parses its arguments and calls the public API; no logic lives here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _formats(args: argparse.Namespace) -> int:
    from qcompile.core.formats import FORMATS

    print(f"{'format':8} {'element':14} {'scale':16} {'block':>5}")
    for fmt in FORMATS.values():
        print(f"{fmt.name:8} {fmt.element.name:14} {fmt.scale.value:16} {fmt.block_size or '-':>5}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from qcompile.backends.onnx.rules import inspect_onnx

    report = inspect_onnx(args.model)
    print(report.render())
    return 1 if args.strict and report.warnings else 0


def parse_shape(text: str) -> tuple[str, tuple[tuple[int, ...], ...]]:
    """`name:1x64,8x64,64x64` -> ("name", ((1, 64), (8, 64), (64, 64)))."""
    name, sep, spec = text.rpartition(":")
    shapes = spec.split(",")
    try:
        if not sep or not name or len(shapes) != 3:
            raise ValueError
        return name, tuple(tuple(int(d) for d in shape.split("x")) for shape in shapes)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shape {text!r}: expected name:min,opt,max with dims joined by x, "
            "e.g. input:1x64,8x64,64x64"
        ) from None


def _build(args: argparse.Namespace) -> int:
    import onnx

    from qcompile.backends.onnx.rules import inspect_onnx
    from qcompile.backends.tensorrt.engine import (
        EngineBuildError,
        TensorRTNotInstalledError,
        build_engine,
        trtexec_command,
    )
    from qcompile.backends.tensorrt.formats import UnsupportedGPUError

    engine = args.output or str(Path(args.model).with_suffix(".engine"))
    shapes = dict(args.shape or [])
    try:
        onnx.checker.check_model(args.model)
    except (onnx.checker.ValidationError, OSError) as error:
        print(f"onnx.checker: {args.model} is not a valid ONNX model: {error}", file=sys.stderr)
        return 1
    print("onnx.checker: ok")
    report = inspect_onnx(args.model)
    print(report.render())
    if args.strict and report.warnings:
        print("error: --strict and inspect found TensorRT fusion warnings", file=sys.stderr)
        return 1
    try:
        path = build_engine(args.model, engine, precision=args.precision,
                            workspace_gb=args.workspace_gb, shapes=shapes,
                            timing_cache=args.timing_cache, log_level=args.log_level,
                            progress=not args.no_progress)
    except TensorRTNotInstalledError as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"equivalent: {trtexec_command(args.model, engine, shapes)}", file=sys.stderr)
        return 1
    except (EngineBuildError, UnsupportedGPUError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


def _export_checkpoint(args: argparse.Namespace) -> int:
    from qcompile import hf

    tokenizer = None
    if args.tokenizer:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    qmodel = hf.load_quantized(args.source)
    try:
        path = hf.export_checkpoint(qmodel, args.output, args.format, overwrite=args.overwrite,
                                    tokenizer=tokenizer, max_shard_size=args.max_shard_size)
    except (ValueError, TypeError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.format}); serve it with: vllm serve {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from qcompile.demo.run import run_demo

    run_demo(
        recipe=args.recipe,
        calibration_texts=args.calibration_texts,
        qad_steps=args.qad_steps,
        gptq=args.gptq,
        eval_texts=args.eval_texts,
        output_dir=args.output_dir,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="quantize the embedded all-MiniLM-L6-v2 and measure its fidelity"
    )
    demo.add_argument("--recipe", default="nvfp4", help="named recipe (default: nvfp4)")
    demo.add_argument("--calibration-texts", type=int, default=256)
    demo.add_argument("--qad-steps", type=int, default=40, help="QAD optimizer steps (0: skip)")
    demo.add_argument("--no-gptq", dest="gptq", action="store_false",
                      help="keep the weights rounded to nearest (skip GPTQ after calibration)")
    demo.add_argument("--eval-texts", type=int, default=256)
    demo.add_argument("--output-dir", default="qcompile-demo", help="where results are written")
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser(
        "inspect", help="Q/DQ counts, weight compression and TensorRT fusion warnings of an ONNX file"
    )
    inspect.add_argument("model", help="path of the .onnx file")
    inspect.add_argument("--strict", action="store_true", help="exit 1 if any rule warns")
    inspect.set_defaults(run=_inspect)

    build = commands.add_parser(
        "build", help="check an ONNX file, then build a TensorRT engine from it (needs tensorrt)"
    )
    build.add_argument("model", help="path of the .onnx file")
    build.add_argument("-o", "--output", help="engine path (default: the model path with .engine)")
    build.add_argument("--shape", action="append", type=parse_shape, metavar="NAME:MIN,OPT,MAX",
                       help="shapes of a dynamic input, dims joined by x, e.g. "
                            "input:1x64,8x64,64x64 (repeat per input)")
    build.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace (GiB)")
    build.add_argument("--timing-cache", help="timing cache file, read if present and saved")
    build.add_argument("--precision", choices=["fp16", "bf16"],
                       help="weakly typed float baseline (unquantized graphs, TensorRT 10 only)")
    build.add_argument("--log-level", default="warning", choices=["verbose", "info", "warning", "error"])
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.add_argument("--strict", action="store_true", help="refuse to build if inspect warns")
    build.set_defaults(run=_build)

    export = commands.add_parser(
        "export-checkpoint",
        help="write a saved quantized model (hf.save_quantized) as a checkpoint that vLLM, "
             "SGLang and TensorRT-LLM serve",
    )
    export.add_argument("source", help="directory written by qcompile.hf.save_quantized")
    export.add_argument("output", help="the checkpoint directory to write")
    export.add_argument("--format", default="modelopt", choices=["modelopt", "compressed-tensors"])
    export.add_argument("--tokenizer", help="tokenizer to save alongside (path or hub name)")
    export.add_argument("--max-shard-size", default="5GB", help="shard size (default: 5GB)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output")
    export.set_defaults(run=_export_checkpoint)

    formats = commands.add_parser("formats", help="list the quantization formats")
    formats.set_defaults(run=_formats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
