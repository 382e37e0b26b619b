r"""The command line: ``python -m torchconstrain demo`` (or ``torchconstrain demo``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchconstrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="constrain MobileNetV3-Small, train, check and bake")
    demo.add_argument("--steps", type=int, default=30, help="SGD steps (default 30)")
    demo.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    r"""Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        _parser().error(f"--steps and --batch must be at least 1. Got {args.steps} and {args.batch}.")
    from torchconstrain.demo import run_demo

    result = run_demo(steps=args.steps, batch=args.batch, seed=args.seed)
    return 0 if result["stock_difference"] == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
