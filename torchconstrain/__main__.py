r"""The command line: ``torchconstrain demo``, ``inspect`` and ``export`` (or ``python -m torchconstrain``)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchconstrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)
    _add_inspect(commands)
    _add_export(commands)
    return parser


def _add_inspect(commands) -> None:
    inspect = commands.add_parser(
        "inspect", help="dry run: which tensors each rule of a rules file matches, and the constraints",
        description="Print which tensors each rule matches and the resulting constraint table. Changes "
        "nothing; exits with 1 when a rule matches nothing, or only tensors a null rule excludes.")
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
        print("torchconstrain inspect: a rule matches nothing, or only tensors a null rule excludes (see above).",
              file=sys.stderr)
    return 0 if ok else 1


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export", help="bake a model and write it as an ExecuTorch program (.pte) for XNNPACK, fp32 or int8",
        description="Bake MODEL (a saved whole model or a torchvision name, built with weights=None), optionally "
        "shrink it and fold its BatchNorms, and write an ExecuTorch program for the XNNPACK backend, after running "
        "it once in ExecuTorch's runtime and comparing every output with the model as saved: an fp32 program that "
        "differs by more than 1e-4 of the largest output is not written (exit 1). Needs the deploy extra.")
    export.add_argument("model", metavar="MODEL",
                        help="a torchvision model name (built with weights=None) or a path to a saved model")
    export.add_argument("--to", choices=("executorch",), required=True, help="the target (executorch)")
    export.add_argument("--out", required=True, metavar="FILE", help="the program file to write (.pte)")
    export.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224), metavar="N,C,H,W",
                        help="the input shape the program takes, batch included (default 1,3,224,224)")
    export.add_argument("--int8", action="store_true", help="quantize weights and activations to int8 (PT2E)")
    export.add_argument("--calibrate", type=_at_least_one, metavar="N",
                        help="with --int8: calibrate activations on N inputs (default 32)")
    export.add_argument("--data", metavar="FILE",
                        help="with --int8: a tensor of inputs saved with torch.save, shape (samples, ...); the first "
                        "N calibrate. Without it, N random normal inputs (ranges unlike real data: pass real data)")
    export.add_argument("--shrink", action="store_true", help="surgery.shrink first (MobileNetV3)")
    export.add_argument("--fold-batchnorm", action="store_true", help="surgery.fold_batchnorm first")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected sizes >= 1 separated by commas, like 1,3,224,224. Got {text!r}.")
    return shape


def _run_export(args) -> int:
    from torchconstrain.dryrun import load_model
    from torchconstrain.deploy import prepare, to_executorch

    try:
        if not args.int8 and (args.data is not None or args.calibrate is not None):
            raise ValueError("--data and --calibrate set the int8 program's calibration: pass --int8 with them.")
        folder = os.path.dirname(os.path.abspath(args.out))  # checked before the lowering, which takes a while
        if os.path.isdir(args.out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            why = "is a folder" if os.path.isdir(args.out) else f"cannot be written: {folder} " + (
                "is not writable" if os.path.isdir(folder) else "does not exist")
            raise ValueError(f"--out {args.out}: {why}.")
        example = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0))
        calibration = _calibration_batches(args, example) if args.int8 else None
        loaded = load_model(args.model).eval()
        with torch.no_grad():
            expected = _outputs(loaded(example))  # what the program must compute: the model as saved
        model = prepare(loaded, example, inplace=True, shrink=args.shrink, fold_batchnorm=args.fold_batchnorm)
        program = to_executorch(model, example, int8=args.int8, calibration=calibration, inplace=True)
        with torch.no_grad():
            difference, allowed = _difference(_outputs(program(example)), expected)
        if not program.int8 and not difference <= allowed:
            print(f"torchconstrain export: the fp32 program's outputs differ from the saved model's by {difference:.3g} "
                  f"(more than {allowed:.3g}, 1e-4 of the largest output): nothing was written.", file=sys.stderr)
            return 1
        program.save(args.out)
    except (TypeError, ValueError, OSError, ModuleNotFoundError) as error:
        print(f"torchconstrain export: {error}", file=sys.stderr)
        return 2
    kind = "int8" if program.int8 else "fp32"
    print(f"wrote {args.out}: {kind} ExecuTorch program (XNNPACK), {program.size / 1e6:.2f} MB, input {list(args.input_shape)}")
    if program.int8:
        moved, total = sum(program.moved.values()), len(program.moved)
        print(f"int8 weights: {total} tensors quantized, {moved:,} entries moved off their float values")
    print(f"ExecuTorch vs the saved model's outputs on a random input: max |difference| {difference:.2g} "
          f"(largest output {_scale(expected):.2g})")
    return 0


def _outputs(output) -> list:
    """Every tensor of a model's output (a tensor, or a tuple, list or dict of them), in order."""
    from torch.utils._pytree import tree_flatten

    return [t.detach() for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]


def _scale(outputs: list) -> float:
    """The largest magnitude of any output."""
    return max((t.abs().max().item() for t in outputs if t.numel()), default=0.0)


def _difference(got: list, expected: list) -> tuple[float, float]:
    """The largest difference between two models' outputs (inf where their structure or
    shapes differ), and what an fp32 program may differ by: 1e-4 of the largest output."""
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected)):
        return float("inf"), 0.0
    difference = max(((a.float() - b.float()).abs().max().item() for a, b in zip(got, expected) if a.numel()), default=0.0)
    return difference, 1e-4 * _scale(expected)


def _calibration_batches(args, example) -> list:
    count = 32 if args.calibrate is None else args.calibrate
    if args.data is None:
        inputs = torch.randn((count, *example.shape[1:]), generator=torch.Generator().manual_seed(1))
    else:
        inputs = torch.load(args.data, map_location="cpu")
        if not isinstance(inputs, torch.Tensor) or tuple(inputs.shape[1:]) != tuple(example.shape[1:]):
            raise ValueError(f"--data {args.data}: expected a tensor of shape (samples, {', '.join(map(str, example.shape[1:]))}). "
                             f"Got {tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}.")
        inputs = inputs[:count].float()
    return list(inputs.split(32))


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo", help="train MobileNetV3-Small on digits, plain and constrained; bake, shrink, export, report",
        description="Train torchvision's MobileNetV3-Small on scikit-learn's 8x8 digits, plain and under a "
        "rules file (check after every epoch), bake, shrink and fold it, export it to ExecuTorch programs "
        "(fp32 and int8), and write report.md, metrics.json, plots and the programs. Exits with 1 if a check "
        "fails, the shrunk model's outputs differ from the baked model's or the fp32 program's from the shrunk "
        "model's.")
    demo.add_argument("--epochs", type=_at_least_one, default=15, help="epochs of each training (default 15)")
    demo.add_argument("--batch-size", type=_at_least_one, default=64, help="training batch size (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="seeds the split, the weights and the batches (default 0)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="training device (default cpu)")
    demo.add_argument("--rules", metavar="FILE", help="a YAML or JSON rules file (default: the packaged demo_rules.yaml)")
    demo.add_argument("--out", metavar="DIR", default="torchconstrain-demo",
                      help="the report folder (default ./torchconstrain-demo)")
    demo.add_argument("--threads", type=_at_least_one, default=1,
                      help="torch CPU threads (default 1: the same numbers on every machine, steady on a busy one)")
    demo.add_argument("--calibrate", type=_at_least_one, default=256, metavar="N",
                      help="training images that calibrate the int8 program (default 256; at most all 1,437)")
    demo.add_argument("--no-deploy", action="store_true",
                      help="skip the last stage, the ExecuTorch programs (fp32 and int8)")
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
    r"""Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Exit codes: 0 done; 1 a result the command refuses (a rule matching nothing, a failed
    check, a program that differs from the model); 2 bad input; 3 an unexpected error, printed
    with its traceback (so that a crash is never read as one of the others).
    """
    args = _parser().parse_args(argv)
    run = {"inspect": _run_inspect, "export": _run_export, "demo": _run_demo}[args.command]
    try:
        return run(args)
    except Exception:
        traceback.print_exc()
        print(f"torchconstrain {args.command}: unexpected error (traceback above).", file=sys.stderr)
        return 3


def _run_demo(args) -> int:
    from torchconstrain.demo import DemoConfig, run_demo
    from torchconstrain.errors import ConstraintViolation

    config = DemoConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device,
                        threads=args.threads, rules=args.rules, out=args.out, deploy=not args.no_deploy,
                        calibration_images=args.calibrate)
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
        print("torchconstrain demo: the shrunk model's outputs differ from the baked model's, or the fp32 "
              "program's from the shrunk model's (see above).", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
