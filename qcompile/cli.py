"""The `qcompile` command line: `demo`, `inspect`, `formats`.

Each subcommand parses its arguments and calls the public API; no logic lives here.
"""

from __future__ import annotations

import argparse
import sys


def _formats(args: argparse.Namespace) -> int:
    from qcompile.formats import FORMATS

    print(f"{'format':8} {'element':14} {'scale':16} {'block':>5}")
    for fmt in FORMATS.values():
        print(f"{fmt.name:8} {fmt.element.name:14} {fmt.scale.value:16} {fmt.block_size or '-':>5}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from qcompile.backends.onnx_rules import inspect_onnx

    report = inspect_onnx(args.model)
    print(report.render())
    return 1 if args.strict and report.warnings else 0


def _demo(args: argparse.Namespace) -> int:
    from qcompile.demo import run_demo

    run_demo(
        recipe=args.recipe,
        calibration_texts=args.calibration_texts,
        qad_steps=args.qad_steps,
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
    demo.add_argument("--eval-texts", type=int, default=256)
    demo.add_argument("--output-dir", default="qcompile-demo", help="where results are written")
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser(
        "inspect", help="Q/DQ counts, weight compression and TensorRT fusion warnings of an ONNX file"
    )
    inspect.add_argument("model", help="path of the .onnx file")
    inspect.add_argument("--strict", action="store_true", help="exit 1 if any rule warns")
    inspect.set_defaults(run=_inspect)

    formats = commands.add_parser("formats", help="list the quantization formats")
    formats.set_defaults(run=_formats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
