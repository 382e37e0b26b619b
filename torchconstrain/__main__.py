r"""The command line: ``torchconstrain demo`` and ``torchconstrain inspect`` (or ``python -m torchconstrain``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchconstrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)
    _add_inspect(commands)
    return parser


def _add_inspect(commands) -> None:
    inspect = commands.add_parser(
        "inspect", help="dry run: which tensors each rule of a rules file matches, and the constraints",
        description="Print which tensors each rule matches and the resulting constraint table. Changes "
        "nothing; exits with 1 when a rule matches nothing.")
    inspect.add_argument("model", metavar="MODEL",
                         help="a torchvision model name (built with weights=None) or a path to a saved model")
    inspect.add_argument("--rules", required=True, metavar="FILE", help="a YAML or JSON rules file")


def _run_inspect(args) -> int:
    from torchconstrain.dryrun import dry_run, load_model

    try:
        text, ok = dry_run(load_model(args.model), args.rules)
    except ValueError as error:
        print(f"torchconstrain inspect: {error}", file=sys.stderr)
        return 2
    print(text)
    if not ok:
        print("torchconstrain inspect: a rule matches nothing (see above).", file=sys.stderr)
    return 0 if ok else 1


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="constrain MobileNetV3-Small, train, check and bake")
    demo.add_argument("--steps", type=int, default=30, help="SGD steps (default 30)")
    demo.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def main(argv: list[str] | None = None) -> int:
    r"""Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "inspect":
        return _run_inspect(args)
    return _run_demo(args)


def _run_demo(args) -> int:
    if args.steps < 1 or args.batch < 1:
        _parser().error(f"--steps and --batch must be at least 1. Got {args.steps} and {args.batch}.")
    from torchconstrain.demo import run_demo

    result = run_demo(steps=args.steps, batch=args.batch, seed=args.seed)
    return 0 if result["stock_difference"] == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
