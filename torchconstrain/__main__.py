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
    demo = commands.add_parser(
        "demo", help="train MobileNetV3-Small on digits, plain and constrained; bake, shrink, report",
        description="Train torchvision's MobileNetV3-Small on scikit-learn's 8x8 digits, plain and under a "
        "rules file (check after every epoch), bake, shrink and fold it, and write report.md, metrics.json "
        "and plots. Exits with 1 if a check fails or the shrunk model's outputs differ from the baked model's.")
    demo.add_argument("--epochs", type=_at_least_one, default=15, help="epochs of each training (default 15)")
    demo.add_argument("--batch-size", type=_at_least_one, default=64, help="training batch size (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="seeds the split, the weights and the batches (default 0)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="training device (default cpu)")
    demo.add_argument("--rules", metavar="FILE", help="a YAML or JSON rules file (default: the packaged demo_rules.yaml)")
    demo.add_argument("--out", metavar="DIR", default="torchconstrain-demo",
                      help="the report folder (default ./torchconstrain-demo)")
    demo.add_argument("--threads", type=_at_least_one, default=1,
                      help="torch CPU threads (default 1: the same numbers on every machine, steady on a busy one)")
    demo.add_argument("--show-rules", action="store_true", help="print the rules file and exit")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1. Got {text!r}.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1. Got {value}.")
    return value


def main(argv: list[str] | None = None) -> int:
    r"""Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "inspect":
        return _run_inspect(args)
    return _run_demo(args)


def _run_demo(args) -> int:
    from torchconstrain.demo import DemoConfig, run_demo
    from torchconstrain.errors import ConstraintViolation

    config = DemoConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device,
                        threads=args.threads, rules=args.rules, out=args.out)
    try:
        config.validate()
        if args.show_rules:
            print(config.rules_path.read_text(), end="")
            return 0
        result = run_demo(config)
    except ConstraintViolation as error:
        print(f"torchconstrain demo: check failed: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ModuleNotFoundError) as error:
        print(f"torchconstrain demo: {error}", file=sys.stderr)
        return 2
    print(result.summary)
    if not result.ok:
        print("torchconstrain demo: the shrunk model's outputs differ from the baked model's (see above).",
              file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
