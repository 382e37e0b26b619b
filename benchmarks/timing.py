r"""How one number is measured: a warm-up, then ``torch.utils.benchmark.Timer.blocked_autorange``.

:func:`measure` calls the function repeatedly for ``budget.warmup`` seconds (and at least
``budget.warmup_calls`` times) so that lazy initialisation, allocator growth and oneDNN
primitive caches are done before timing. ``blocked_autorange`` then runs the function in
blocks of ``number`` calls, ``number`` chosen so that a block takes at least ~10 ms (timer
overhead below 0.01 %), until ``budget.min_run_time`` seconds are spent. The median and the
inter-quartile range (IQR) are taken over the per-call times of those blocks. On CUDA the
Timer synchronizes the device before reading the clock, and the warm-up ends with a
synchronize, so queued kernels are never attributed to the wrong block.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.utils.benchmark import Timer


@dataclass(frozen=True)
class Budget:
    r"""Time spent on one measurement: warm-up seconds and calls, then measured seconds."""

    warmup: float
    warmup_calls: int
    min_run_time: float


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
    number_per_block: int
    block_times: list[float] = field(repr=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.section, self.case, self.task

    def to_dict(self) -> dict:
        return asdict(self)


def warm_up(fn: Callable[[], object], budget: Budget, device: torch.device) -> None:
    r"""Call ``fn`` for ``budget.warmup`` seconds and at least ``budget.warmup_calls`` times."""
    start, calls = time.perf_counter(), 0
    while calls < budget.warmup_calls or time.perf_counter() - start < budget.warmup:
        fn()
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], budget: Budget, threads: int, device: torch.device) -> dict:
    r"""Warm ``fn`` up, time it with ``blocked_autorange`` and return its statistics (seconds)."""
    warm_up(fn, budget, device)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=budget.min_run_time)
    return {
        "median": m.median,
        "iqr": m.iqr,
        "mean": m.mean,
        "number_per_block": m.number_per_run,
        "block_times": list(m.times),
    }
