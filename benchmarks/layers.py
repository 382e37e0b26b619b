r"""Per-layer cost of each constraint variant, on layers shaped like MobileNetV3-Small's.

Cases (batch 8, shapes as in ``torchvision.models.mobilenet_v3_small`` at 224x224 input):

=====================  ===================================  ==============  ======================
case                   layer                                input           torchvision module
=====================  ===================================  ==============  ======================
stem 3x3 3→16 s2       Conv2d(3, 16, 3, stride 2)           8x3x224x224     features.0.0
dw 3x3 72ch s2         Conv2d(72, 72, 3, s2, groups=72)     8x72x56x56      features.2.block.1.0
dw 5x5 96ch s2         Conv2d(96, 96, 5, s2, groups=96)     8x96x28x28      features.4.block.1.0
expand 1x1 24→96       Conv2d(24, 96, 1)                    8x24x28x28      features.4.block.0.0
project 1x1 96→40      Conv2d(96, 40, 1)                    8x96x14x14      features.4.block.3.0
SE fc 1x1 576→144      Conv2d(576, 144, 1) with bias        8x576x1x1       features.10.block.2.fc1
classifier 576→1024    Linear(576, 1024) with bias          8x576           classifier.0
=====================  ===================================  ==============  ======================

Tasks, per :mod:`benchmarks.steps`: ``forward`` (inference mode), ``fwd+bwd`` (upstream
gradient fixed and random; the input requires grad except for the stem, whose input is
the image) and ``train step`` (the same plus SGD with momentum).

Variants, all on the layer's ``weight`` (bias untouched), per :mod:`benchmarks.variants`:
plain; ``Clamp(-1, 1)``; ``FixedMask.magnitude(sparsity=0.5)``; ``LearnableMask()``;
``[Clamp(-1, 1), FixedMask.magnitude(sparsity=0.5)]``; ``prune.l1_unstructured(amount=0.5)``;
plain plus ``weight.data.clamp_(-1, 1)`` after each step (train step only); and baked
(the Clamp+FixedMask stack, constrained then baked). Every variant works on a fresh copy
of the same initial layer; within a case and task the variants are timed in interleaved
rounds (:func:`benchmarks.timing.measure_group`), so each ratio to plain compares
measurements taken over the same seconds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from benchmarks import steps, variants
from benchmarks.timing import Budget, Result, measure_group
from torchconstrain import Clamp, FixedMask, LearnableMask

SECTION = "layers"
BATCH = 8
TASKS = ("forward", "fwd+bwd", "train step")


@dataclass(frozen=True)
class LayerCase:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    input_grad: bool = True


CASES = (
    LayerCase("stem 3x3 3→16 s2 @224", lambda: nn.Conv2d(3, 16, 3, 2, 1, bias=False), (3, 224, 224),
              input_grad=False),
    LayerCase("dw 3x3 72ch s2 @56", lambda: nn.Conv2d(72, 72, 3, 2, 1, groups=72, bias=False), (72, 56, 56)),
    LayerCase("dw 5x5 96ch s2 @28", lambda: nn.Conv2d(96, 96, 5, 2, 2, groups=96, bias=False), (96, 28, 28)),
    LayerCase("expand 1x1 24→96 @28", lambda: nn.Conv2d(24, 96, 1, bias=False), (24, 28, 28)),
    LayerCase("project 1x1 96→40 @14", lambda: nn.Conv2d(96, 40, 1, bias=False), (96, 14, 14)),
    LayerCase("SE fc 1x1 576→144 @1", lambda: nn.Conv2d(576, 144, 1), (576, 1, 1)),
    LayerCase("classifier Linear 576→1024", lambda: nn.Linear(576, 1024), (576,)),
)

WEIGHT = (nn.Conv2d, nn.Linear)

LEGEND = (
    "Variants, on the layer's weight: `Clamp(-1, 1)`; `FixedMask.magnitude(sparsity=0.5)`; "
    "`LearnableMask()`; `Clamp+FixedMask` = both, stacked; `prune hooks` = "
    "`torch.nn.utils.prune.l1_unstructured(amount=0.5)`; `clamp_ after step` = plain layer plus "
    "`weight.data.clamp_(-1, 1)` after `optimizer.step()`; `baked` = Clamp+FixedMask, then "
    "`bake()` (a plain layer again: its distance from 1.00x is the noise floor). forward runs "
    "under `torch.inference_mode()`; fwd+bwd and train step (SGD, momentum 0.9) include "
    "`zero_grad(set_to_none=True)`."
)


def _stack() -> list:
    return [Clamp(-1, 1), FixedMask.magnitude(sparsity=0.5)]


VARIANTS = (
    variants.plain(),
    variants.constrained("Clamp", lambda: {"weight": Clamp(-1, 1)}),
    variants.constrained("FixedMask", lambda: {"weight": FixedMask.magnitude(sparsity=0.5)}),
    variants.constrained("LearnableMask", lambda: {"weight": LearnableMask()}),
    variants.constrained("Clamp+FixedMask", lambda: {"weight": _stack()}),
    variants.pruned("prune hooks", WEIGHT, amount=0.5),
    variants.clamp_after_step("clamp_ after step", WEIGHT, -1.0, 1.0),
    variants.baked("baked", lambda: {"weight": _stack()}),
)


def run(device: torch.device, threads: int, budget: Budget, progress: Callable[[Result], None],
        cases: tuple[LayerCase, ...] = CASES) -> list[Result]:
    r"""Time every task and variant of ``cases``; return the results in table order."""
    results = []
    for case in cases:
        for task in TASKS:
            results += _run_task(case, task, device, threads, budget, progress)
    return results


def _run_task(case: LayerCase, task: str, device, threads, budget, progress) -> list[Result]:
    layer, x, grad = _prototype(case, device)
    calls = {}
    for variant in VARIANTS:
        if variant.training_only and task != "train step":
            continue
        module = copy.deepcopy(layer)
        variant.prepare(module)
        calls[variant.name] = [_call(task, module, x, grad, variant)]
    stats = measure_group(calls, budget, threads, device)
    results = [Result(SECTION, case.name, task, name, **stats[name]) for name in calls]
    for result in results:
        progress(result)
    return results


def _prototype(case: LayerCase, device: torch.device):
    r"""The layer, its input and upstream gradient, identical for every variant (seed 0)."""
    torch.manual_seed(0)
    layer = case.make().to(device)
    x = torch.randn(BATCH, *case.input_shape, device=device, requires_grad=case.input_grad)
    with torch.no_grad():
        grad = torch.randn_like(layer(x))
    return layer, x, grad


def _call(task: str, module: nn.Module, x, grad, variant: variants.Variant) -> Callable[[], None]:
    backward = steps.grad_backward(grad)
    if task == "forward":
        return steps.forward(module, x)
    if task == "fwd+bwd":
        return steps.forward_backward(module, x, backward)
    return steps.train_step(module, x, backward, steps.sgd(module), variant.hook(module))
