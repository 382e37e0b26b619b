r"""Surgery of the inverted residual family: batch-1 inference of shrunk models against the dense model.

Each model is ``torchvision.models.<arch>(weights=None)`` seeded with 0, in eval mode; a
shrunk variant gets :func:`torchconstrain.surgery.mask_blocks` with fixed masks at the
given share of the channels of the given groups (importance ``"l1"``), then
:func:`torchconstrain.surgery.shrink`. ``N% shrunk`` masks the blocks' expanded channels
only; ``N% all groups`` masks every channel group (streams, stem, SE squeeze, last conv,
classifier hidden units too). ``plain`` is the dense model. All variants of an
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
ARCHS = ("mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2", "efficientnet_b0", "mnasnet1_0")
VARIANTS = {  # name -> (groups, sparsity)
    "plain": ("expanded", 0.0),
    "25% shrunk": ("expanded", 0.25),
    "50% shrunk": ("expanded", 0.5),
    "75% shrunk": ("expanded", 0.75),
    "25% all groups": ("all", 0.25),
    "50% all groups": ("all", 0.5),
}
FAMILY_VARIANTS = ("plain", "50% shrunk", "25% all groups", "50% all groups")


def variants(arch: str) -> tuple[str, ...]:
    r"""The variants timed for ``arch``: every one for MobileNetV3, fewer for the rest of the family."""
    return tuple(VARIANTS) if arch.startswith("mobilenet_v3") else FAMILY_VARIANTS


@functools.lru_cache(maxsize=None)
def build(arch: str, variant: str, device: torch.device, copy: int = 0) -> nn.Module:
    r"""The dense model, or the model shrunk as ``variant`` says (built once per ``copy``
    number: copies are separately built, identical models)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    groups, sparsity = VARIANTS[variant]
    if sparsity:
        surgery.mask_blocks(model, groups=groups, sparsity=sparsity)
        surgery.shrink(model, measure=False)
    return model.to(device)


def run(device: torch.device, threads: int, budget: Budget, progress: Callable[[Result], None],
        archs: tuple[str, ...] = ARCHS) -> list[Result]:
    r"""Time the dense and shrunk variants of every architecture of ``archs``, interleaved."""
    results = []
    for arch in archs:
        x = torch.randn(1, 3, 224, 224, device=device)
        calls = {name: [steps.forward(build(arch, name, device, k), x) for k in range(budget.copies)]
                 for name in variants(arch)}
        stats = measure_group(calls, budget, threads, device)
        for name in calls:
            results.append(Result(SECTION, f"{arch} b1", "inference", name, **stats[name]))
            progress(results[-1])
    return results


def legend(archs: tuple[str, ...] = ARCHS) -> str:
    r"""Markdown: parameters and MACs of every variant, with the shrunk/dense ratios."""
    lines = ["| model | variant | params | MACs |", "| --- | --- | ---: | ---: |"]
    example = torch.zeros(1, 3, 224, 224)
    for arch in archs:
        dense = build(arch, "plain", torch.device("cpu"))
        params, macs = surgery.count_params(dense), surgery.count_macs(dense, example)
        for name in variants(arch):
            model = build(arch, name, torch.device("cpu"))
            p, m = surgery.count_params(model), surgery.count_macs(model, example)
            lines.append(f"| {arch} | {name} | {p / 1e6:.2f} M ({p / params:.2f}x) "
                         f"| {m / 1e6:.0f} M ({m / macs:.2f}x) |")
    note = ("Variants: `plain` is the dense model; `N% shrunk` masked N% of every block's expanded "
            "channels with `surgery.mask_blocks` and removed them with `surgery.shrink`; `N% all groups` "
            "did the same with `groups=\"all\"`: also the streams between blocks, the stem, the SE squeeze "
            "channels, the last conv and the classifier's hidden units.")
    return note + "\n\n" + "\n".join(lines)
