r"""MobileNetV3 surgery: batch-1 inference of shrunk models against the dense model.

Each model is ``torchvision.models.<arch>(weights=None)`` seeded with 0, in eval mode; a
shrunk variant gets :func:`torchconstrain.surgery.mask_blocks` with fixed masks at the
given share of expanded channels (importance ``"l1"``), then
:func:`torchconstrain.surgery.shrink`. ``plain`` is the dense model. All variants of an
architecture are timed side by side, interleaved, on one 224x224 image; :func:`legend`
gives their parameter and MAC counts.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torchvision
from torch import nn

from benchmarks import steps
from benchmarks.timing import Budget, Result, measure_group
from torchconstrain import surgery

SECTION = "surgery"
ARCHS = ("mobilenet_v3_small", "mobilenet_v3_large")
SPARSITIES = (0.0, 0.25, 0.5, 0.75)


def variant_name(sparsity: float) -> str:
    return "plain" if sparsity == 0 else f"{sparsity:.0%} shrunk"


@functools.lru_cache(maxsize=None)
def build(arch: str, sparsity: float, device: torch.device, copy: int = 0) -> nn.Module:
    r"""The dense model, or the model shrunk at ``sparsity`` of its expanded channels (built
    once per ``copy`` number: copies are separately built, identical models)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    if sparsity:
        surgery.mask_blocks(model, sparsity=sparsity)
        surgery.shrink(model, measure=False)
    return model.to(device)


def run(device: torch.device, threads: int, budget: Budget, progress: Callable[[Result], None],
        archs: tuple[str, ...] = ARCHS) -> list[Result]:
    r"""Time the dense and shrunk variants of every architecture of ``archs``, interleaved."""
    results = []
    for arch in archs:
        x = torch.randn(1, 3, 224, 224, device=device)
        calls = {variant_name(s): [steps.forward(build(arch, s, device, k), x) for k in range(budget.copies)]
                 for s in SPARSITIES}
        stats = measure_group(calls, budget, threads, device)
        for name in calls:
            results.append(Result(SECTION, f"{arch} b1", "inference", name, **stats[name]))
            progress(results[-1])
    return results


def legend() -> str:
    r"""Markdown: parameters and MACs of every variant, with the shrunk/dense ratios."""
    lines = ["| model | variant | params | MACs |", "| --- | --- | ---: | ---: |"]
    example = torch.zeros(1, 3, 224, 224)
    for arch in ARCHS:
        dense = build(arch, 0.0, torch.device("cpu"))
        params, macs = surgery.count_params(dense), surgery.count_macs(dense, example)
        for sparsity in SPARSITIES:
            model = build(arch, sparsity, torch.device("cpu"))
            p, m = surgery.count_params(model), surgery.count_macs(model, example)
            lines.append(f"| {arch} | {variant_name(sparsity)} | {p / 1e6:.2f} M ({p / params:.2f}x) "
                         f"| {m / 1e6:.0f} M ({m / macs:.2f}x) |")
    note = ("Variants: `plain` is the dense model; `N% shrunk` masked N% of every block's expanded "
            "channels with `surgery.mask_blocks` and removed them with `surgery.shrink`.")
    return note + "\n\n" + "\n".join(lines)
