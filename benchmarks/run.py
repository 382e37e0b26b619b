r"""Entry point: time every layer and model case, measure peak memory, print a markdown report,
optionally save JSON.

Usage::

    python benchmarks/run.py [--device cpu|cuda] [--threads N] [--quick] [--case TEXT]... [--skip TEXT]... [--json PATH]

Measures the cases of :mod:`benchmarks.layers` (one MobileNetV3 layer at a time: forward,
forward+backward, training step), :mod:`benchmarks.models` (MobileNetV3 training step
and inference, a stack of 40 small Linears), each under every variant,
:mod:`benchmarks.surgery` (shrunk MobileNetV2/V3s, EfficientNet-B0 and MNASNet against the dense ones),
:mod:`benchmarks.peers` (the demo's MobileNetV3-Small on the digits, dense, under a learnable
MAC budget and pruned by Torch-Pruning to the same MACs, each fine-tuned alike: trains
before it times; its sizes and test accuracies go under ``"peers"`` in the JSON) and
:mod:`benchmarks.compiled` (the MobileNetV3-Small training step and the Linear stack
under ``torch.compile``, constrained and compiled against plain and compiled), with
:func:`benchmarks.timing.measure_group` (warm-up, then interleaved rounds of
``Timer.blocked_autorange``); then the case ``peak memory`` of :mod:`benchmarks.memory`
(peak resident memory of no-grad inference and Adam training of 8 ``Linear(2048, 2048)``
under every constraint, one fresh process per variant and task, over plain in units of
the constrained weights' bytes; CPU and 1 thread whatever ``--device`` and
``--threads`` say). Prints the
report of :mod:`benchmarks.report` to stdout; progress goes to stderr. With ``--json PATH``
also writes every measurement (per-block times included; the memory result under
``"memory"``), the machine description and the settings to ``PATH``, the same markdown
to ``table.md`` next to it, and a bar chart of the timings to ``plot.png``.

``--threads`` defaults to 1, like ``Timer``'s ``num_threads``. ``--quick`` runs every case
but the batch-32 training steps and the compiled cases (compiling takes minutes), one
call each, and measures memory on 2 ``Linear(256,
256)`` with one forward or step (a smoke test: under a minute on two CPU cores; its
numbers are not meant to be read). ``--case TEXT`` runs only the cases whose
name contains ``TEXT`` (``--case "40 x Linear"``: the cases of the Linear stack, eager
and, outside ``--quick``, compiled; ``--case compiled``: the compiled cases alone, five
to fifteen minutes, most of it compiling; ``--case "peak memory"``: the memory table alone, a minute or two), to
measure one row again without the whole run. Import and call :func:`main` to run it from
a test: ``main(["--quick", "--json", path])`` returns 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import compiled, layers, machine, memory, models, peers, plot, report, surgery
from benchmarks.timing import Budget, Result, steady_allocator

BUDGETS = {
    # (layers, models)
    "quick": (Budget(warmup=0.0, warmup_calls=1, min_run_time=0.0),
              Budget(warmup=0.0, warmup_calls=0, min_run_time=0.0)),
    "full": (Budget(warmup=0.3, warmup_calls=3, min_run_time=1.2, rounds=6),
             Budget(warmup=1.0, warmup_calls=2, min_run_time=3.0, rounds=3, copies=3, min_blocks=27)),
}

# The compiled cases (full runs only): each copy of a variant is compiled on its own, so two
# copies instead of the models' three.
COMPILED_BUDGET = Budget(warmup=1.0, warmup_calls=2, min_run_time=3.0, rounds=3, copies=2, min_blocks=27)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while timing (default 1, as Timer's)")
    parser.add_argument("--quick", action="store_true",
                        help="minimal budget: a smoke test, not numbers to read")
    parser.add_argument("--case", action="append", default=None, metavar="TEXT",
                        help="run only the cases whose name contains TEXT ('peak memory': the memory "
                             "table); may be given more than once")
    parser.add_argument("--skip", action="append", default=[], metavar="TEXT",
                        help="leave out the cases whose name contains TEXT; may be given more than once")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write every measurement here, and table.md beside it")
    args = parser.parse_args(argv)
    for text in args.case or []:
        if not any(text in name for name in case_names()):
            parser.error(f"--case {text!r} matches no case. Cases: {', '.join(case_names())}")
        if args.quick and not any(text in name for name in case_names(quick=True)):
            parser.error(f"--case {text!r} matches only compiled cases, which --quick leaves out")
    args.picked = _picker(args.case, args.skip)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def settings_line(mode: str, threads: int) -> str:
    layer_budget, model_budget = BUDGETS[mode]
    compiled_text = "" if mode == "quick" else f", compiled {_budget_text(COMPILED_BUDGET)}"
    return (
        f"Run: `{mode}`, {threads} thread(s). Each number is the median per-call time of "
        f"`torch.utils.benchmark.Timer.blocked_autorange` after a warm-up, the variants of a case "
        f"timed in interleaved rounds: layers {_budget_text(layer_budget)}, models "
        f"{_budget_text(model_budget)}{compiled_text}. Ratios divide by `plain` of the same case "
        f"and task, measured in the same run."
    )


def _budget_text(budget: Budget) -> str:
    copies = f" shared by {budget.copies} separately built copies" if budget.copies > 1 else ""
    blocks = f" and ≥{budget.min_blocks} blocks" if budget.min_blocks else ""
    return (
        f"warm-up ≥{budget.warmup:g} s and ≥{budget.warmup_calls} calls, "
        f"{budget.rounds} x {budget.min_run_time / budget.rounds:g} s{blocks} per variant{copies}"
    )


def _load_average() -> float | None:
    r"""The 1-minute load average (other processes competing for the cores), where known."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def progress(result: Result) -> None:
    print(
        f"  {result.section:8} | {result.case:30} | {result.task:10} | {result.variant:17} | "
        f"{report.format_time(result.median):>9} ± {report.format_time(result.iqr)}",
        file=sys.stderr,
        flush=True,
    )


def case_names(quick: bool = False) -> list[str]:
    r"""The names of every case, in the order they run (``--case`` picks among them); with
    ``quick``, of those ``--quick`` runs (not the compiled ones)."""
    names = [case.name for case in (*layers.CASES, *models.CASES)] + [f"{arch} b1" for arch in surgery.ARCHS]
    names.append(peers.CASE)
    if not quick:
        names += [case.name for case in compiled.CASES]
    return list(dict.fromkeys(names + [memory.NAME]))


def _picker(cases: list[str] | None, skips: list[str]):
    r"""Whether a case name is run: it contains one of ``cases`` (all do when ``None``) and
    none of ``skips``."""
    return lambda name: (cases is None or any(text in name for text in cases)) and not any(
        text in name for text in skips)


def run_all(device: torch.device, threads: int, mode: str, picked=_picker(None, [])) -> list[Result]:
    r"""Time the cases ``mode`` runs, those ``picked(name)`` accepts."""
    layer_budget, model_budget = BUDGETS[mode]
    steady_allocator()
    results = layers.run(device, threads, layer_budget, progress, tuple(c for c in layers.CASES if picked(c.name)))
    model_cases = models.QUICK_CASES if mode == "quick" else models.CASES
    results += models.run(device, threads, model_budget, progress, tuple(c for c in model_cases if picked(c.name)))
    archs = tuple(arch for arch in surgery.ARCHS if picked(f"{arch} b1"))
    results += surgery.run(device, threads, model_budget, progress, archs)
    if picked(peers.CASE):
        results += peers.run(device, threads, model_budget, progress, peer_setup(mode))
    if mode == "quick":  # compiling takes minutes: not part of the smoke test
        return results
    compiled_cases = tuple(c for c in compiled.CASES if picked(c.name))
    return results + compiled.run(device, threads, COMPILED_BUDGET, progress, compiled_cases, log)


def peer_setup(mode: str) -> peers.Setup:
    r"""The trainings of the comparison with Torch-Pruning: a few batches under ``--quick``."""
    return peers.QUICK if mode == "quick" else peers.FULL


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_memory(mode: str, picked=_picker(None, [])) -> dict | None:
    r"""The peak-memory table (:func:`benchmarks.memory.run`), unless ``picked`` leaves it
    out; ``--quick`` measures a small model."""
    if not picked(memory.NAME):
        return None
    setup = memory.QUICK if mode == "quick" else memory.FULL
    return memory.run(setup, lambda row: print(memory.progress_line(row), file=sys.stderr, flush=True))


def run_settings(argv: list[str] | None, mode: str, elapsed: float, load_start: float | None) -> dict:
    r"""What the JSON records about this run: arguments, budgets, wall time, machine load."""
    return {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "mode": mode,
        "wall_time_s": round(elapsed, 1),
        "load_average_1min": {"start": load_start, "end": _load_average()},
        "budgets": {"layers": asdict(BUDGETS[mode][0]), "models": asdict(BUDGETS[mode][1]),
                    **({} if mode == "quick" else {"compiled": asdict(COMPILED_BUDGET)})},
    }


def write_json(path: Path, results: list[Result], info: dict, settings: dict, markdown: str,
               memory_result: dict | None = None, peer_rows: list[dict] | None = None) -> None:
    r"""Write the JSON to ``path``, and ``table.md`` and (if anything was timed) ``plot.png`` beside it."""
    ratio = report.ratios(results)
    measurements = [dict(r.to_dict(), ratio_to_plain=ratio[id(r)]) for r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"machine": info, "settings": settings, "measurements": measurements}
    if memory_result is not None:
        document["memory"] = memory_result
    if peer_rows is not None:
        document["peers"] = peer_rows
    path.write_text(json.dumps(document, indent=1))
    (path.parent / "table.md").write_text(markdown)
    if results:
        plot.plot(results, path.parent / "plot.png", machine.summary(info))


def main(argv: list[str] | None = None) -> int:
    r"""Run the suite as the command line ``argv`` says; return the exit status (0)."""
    args = parse_args(argv)
    device, mode = torch.device(args.device), "quick" if args.quick else "full"
    previous_threads = torch.get_num_threads()
    info = machine.info(device, args.threads)  # before timing: the commit of the code imported
    start, load_start = time.perf_counter(), _load_average()
    torch.set_num_threads(args.threads)
    try:
        results = run_all(device, args.threads, mode, args.picked)
    finally:
        torch.set_num_threads(previous_threads)
    memory_result = run_memory(mode, args.picked)
    elapsed = time.perf_counter() - start
    notes = {"layers": layers.LEGEND, "models": models.LEGEND, "compiled": compiled.LEGEND}
    if any(r.section == surgery.SECTION for r in results):  # its legend builds every shrunk model
        timed = {r.case for r in results if r.section == surgery.SECTION}
        notes["surgery"] = surgery.legend(tuple(arch for arch in surgery.ARCHS if f"{arch} b1" in timed))
    peer_rows = None
    if any(r.section == peers.SECTION for r in results):
        notes[peers.SECTION] = peers.legend(peer_setup(mode))
        peer_rows = [asdict(row) for row in peers.rows(peer_setup(mode))]
    appendix = memory.markdown(memory_result) if memory_result is not None else []
    settings = settings_line(mode, args.threads) if results else f"Run: `{mode}`, no timings."
    markdown = report.markdown(results, machine.summary(info), settings, notes, appendix)
    print(markdown, end="")
    if args.json is not None:
        write_json(args.json, results, info, run_settings(argv, mode, elapsed, load_start), markdown,
                   memory_result, peer_rows)
    print(f"done in {elapsed:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
