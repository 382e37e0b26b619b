r"""How the numbers are measured: warm-up, then interleaved rounds of ``Timer.blocked_autorange``.

:func:`measure_group` times the variants of one case and task together:

1. Each function is called for ``budget.warmup`` seconds (and at least
   ``budget.warmup_calls`` times), so that lazy initialisation and oneDNN primitive
   caches are done before timing.
2. ``budget.rounds`` rounds follow; in each, every function in turn gets
   ``Timer.blocked_autorange(min_run_time=budget.min_run_time / budget.rounds)``: blocks
   of ``number`` calls, ``number`` chosen so that a block takes at least ~10 ms (timer
   overhead below 0.01 %). Interleaving the variants spreads slow drifts of the machine
   (other processes, frequency) over all of them, so ratios to plain stay fair.
3. The median and inter-quartile range (IQR) are taken over the per-call times of all
   blocks of all rounds (``Measurement.merge``).

A budget with ``min_run_time=0`` (``--quick``, a smoke test) times a single call per round.

With ``budget.copies`` above 1, each variant is ``copies`` separately built modules that
split its warm-up and measured time; their blocks are merged. Two identical copies of a
whole MobileNet can differ by a few percent on a CPU (where their tensors land in memory),
more than the overheads being measured: one copy per variant would let that decide the
ratios. The copies' own medians are kept (``copy_medians``) to show that spread.

On CUDA the Timer synchronizes the device before reading the clock, and the warm-up ends
with a synchronize, so queued kernels are never attributed to the wrong block.

:func:`steady_allocator` puts glibc's ``malloc`` in the state a long-running training
process reaches anyway; without it, the first cases of a run pay page faults on every
large allocation and time several times slower than the same code later in the run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.utils.benchmark import Measurement, Timer

#: Just below glibc's largest dynamic mmap threshold (32 MiB on 64-bit).
ALLOCATOR_PRIMING_BYTES = 30 * 2**20


@dataclass(frozen=True)
class Budget:
    r"""Time spent per measurement: warm-up seconds and calls, measured seconds, rounds, how
    many separately built copies of each variant share them (see :func:`measure_group`), and
    the fewest blocks a variant gets however slow its calls (single-call blocks are added)."""

    warmup: float
    warmup_calls: int
    min_run_time: float
    rounds: int = 1
    copies: int = 1
    min_blocks: int = 0


@dataclass
class Result:
    r"""One measurement: which case, task and variant, and its per-call times in seconds."""

    section: str
    case: str
    task: str
    variant: str
    median: float
    iqr: float
    mean: float
    calls_per_block: list[int]
    block_times: list[float] = field(repr=False)
    copy_medians: list[float] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.section, self.case, self.task

    def to_dict(self) -> dict:
        return asdict(self)


def steady_allocator() -> None:
    r"""Allocate and free one ~30 MiB buffer so glibc raises its mmap threshold.

    glibc serves large blocks with ``mmap`` (fresh pages, page faults on first touch) until
    it has freed one, after which its threshold follows the largest freed size. A training
    process reaches that state after its first steps; priming it here makes the first
    cases of the run time the same as they would later. A no-op for other allocators.
    """
    buffer = torch.empty(ALLOCATOR_PRIMING_BYTES, dtype=torch.uint8)
    del buffer


def warm_up(fn: Callable[[], object], budget: Budget, device: torch.device, share: int = 1) -> None:
    r"""Call ``fn`` for ``budget.warmup / share`` seconds and at least ``budget.warmup_calls`` times."""
    start, calls = time.perf_counter(), 0
    while calls < budget.warmup_calls or time.perf_counter() - start < budget.warmup / share:
        fn()
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_group(
    fns: dict[str, list[Callable[[], object]]], budget: Budget, threads: int, device: torch.device
) -> dict[str, dict]:
    r"""Warm up and time every function of ``fns`` in interleaved rounds; statistics in seconds.

    Each name maps to one or more copies of a variant (the same computation on separately
    built modules): they share the name's warm-up and measured time, and their blocks are
    merged, so that where one copy's tensors happen to land in memory does not decide
    the name's time.
    """
    timers = {}
    for name, copies in fns.items():
        for fn in copies:
            warm_up(fn, budget, device, share=len(copies))
        timers[name] = [Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, description=name) for fn in copies]
    rounds: dict[str, list[list[Measurement]]] = {name: [[] for _ in copies] for name, copies in timers.items()}
    for _ in range(budget.rounds):
        for name, copies in timers.items():
            share = budget.rounds * len(copies)
            for timer, measured in zip(copies, rounds[name]):
                measured += _blocks(timer, budget.min_run_time / share, -(-budget.min_blocks // share))
    return {name: _statistics(per_copy) for name, per_copy in rounds.items()}


def _blocks(timer: Timer, min_run_time: float, at_least: int) -> list[Measurement]:
    """``blocked_autorange`` for ``min_run_time`` seconds, then single calls until there are
    ``at_least`` blocks (calls slower than the time share give few); one call if no time."""
    if not min_run_time:
        return [timer.timeit(1)]
    measured = [timer.blocked_autorange(min_run_time=min_run_time)]
    while sum(len(m.raw_times) for m in measured) < at_least:
        measured.append(timer.timeit(1))
    return measured


def _statistics(per_copy: list[list[Measurement]]) -> dict:
    (merged,) = Measurement.merge([m for measurements in per_copy for m in measurements])
    return {
        "median": merged.median,
        "iqr": merged.iqr,
        "mean": merged.mean,
        "calls_per_block": [m.number_per_run for measurements in per_copy for m in measurements],
        "block_times": list(merged.times),
        "copy_medians": [Measurement.merge(measurements)[0].median for measurements in per_copy],
    }
