r"""Constrained and compiled against plain and compiled: ``torch.compile`` (inductor).

Cases (the models, inputs, losses and optimizer of :mod:`benchmarks.models`):

- ``compiled mobilenet_v3_small b8``: the training step of
  ``torchvision.models.mobilenet_v3_small(weights=None)``, train mode, a batch of 8 of
  3x224x224, cross-entropy on fixed random labels, SGD (momentum 0.9).
- ``compiled 40 x Linear(64,64) b8``: the stack of 40 ``Linear(64, 64)`` + ReLU, batch 8:
  a training step (mean squared error, SGD with momentum) and inference (eval mode,
  under ``torch.inference_mode()``).

Variants, built as :mod:`benchmarks.models` builds them (every Conv2d weight of the
MobileNet, every Linear weight of the stack), each then wrapped as ``torch.compile(model)``
(default inductor backend, default options): ``plain``, ``Clamp``, ``FixedMask``, ``mix``
(MobileNet ``{nn.Conv2d: [Clamp(-1, 1), FixedMask.magnitude(sparsity=0.5)], nn.Linear:
LearnableMask()}``, stack ``{nn.Linear: [Clamp(-1, 1), FixedMask.magnitude(sparsity=0.5)]}``)
and ``baked`` (``mix``, then ``bake``); and ``plain, not compiled``, the eager plain
module, to show what compiling gains on this machine. Only the module is compiled: the
loss, ``backward()`` and ``optimizer.step()`` run eagerly around it, as they do for the
eager modules.

Compiling is not timed: before :func:`benchmarks.timing.measure_group` warms up and times
the variants (interleaved, as everywhere), each one is called :data:`COMPILE_CALLS` times,
which compiles its forward and backward graphs. Dynamo's compile counters are read then
and again after timing; :func:`run` raises if any variant compiled anything while it was
being timed (a recompilation would be timed as a step). Dynamo is reset before each case,
its recompile limit raised for the case (each constrained model is a new graph: its
parametrized modules have classes of their own), and the thread count set to the timed one
while compiling (Dynamo guards on it: a different count would recompile).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch._dynamo
from torch import nn

from benchmarks import models, steps, variants
from benchmarks.timing import Budget, Result, measure_group

SECTION = "compiled"

#: Calls made before timing: the first compiles the forward (and, in training, the
#: backward on its ``backward()``); the others show whether anything compiles again.
COMPILE_CALLS = 3

#: Dynamo's recompile limit while a case runs (every variant and copy is its own graph).
RECOMPILE_LIMIT = 64

EAGER = "plain, not compiled"


def _variants(types: tuple, mix: Callable[[], dict]) -> tuple[variants.Variant, ...]:
    chosen = ("plain", "Clamp", "FixedMask", "mix", "baked")
    table = {v.name: v for v in models._model_variants(types, mix)}
    return tuple(table[name] for name in chosen) + (variants.Variant(EAGER, lambda module: None),)


MOBILENET = _variants((nn.Conv2d,), models._mobilenet_mix)
STACK = _variants((nn.Linear,), models._stack_mix)

CASES = (
    models.ModelCase("compiled mobilenet_v3_small b8", "train step", models._mobilenet_v3_small,
                     (8, 3, 224, 224), models._labels, MOBILENET),
    models.ModelCase("compiled 40 x Linear(64,64) b8", "train step", models._linear_stack, (8, 64),
                     models._regression, STACK),
    models.ModelCase("compiled 40 x Linear(64,64) b8", "inference", models._linear_stack, (8, 64),
                     models._regression, STACK),
)

LEGEND = (
    "Every variant but the last is the eager module of the models section wrapped as "
    "`torch.compile(model)` (inductor, default options; the loss, `backward()` and "
    "`optimizer.step()` stay eager), timed after it has compiled, with no recompilation while "
    "timed (checked). Ratios divide by `plain` compiled. `Clamp`, `FixedMask`, `mix` and `baked` "
    "as in the models section; `plain, not compiled` = the eager plain module. Under compile "
    "the graph computes every effective weight from its parameters on every call, inference "
    "included (the eager fast path's reuse under no-grad does not apply): `baked` is the "
    "deployment form."
)


def compile_count() -> int:
    r"""How many frames Dynamo has compiled and graphs AOTAutograd has built, all told."""
    counters = torch._dynamo.utils.counters
    return sum(counters["frames"].values()) + sum(counters["aot_autograd"].values())


def run(device: torch.device, threads: int, budget: Budget, progress: Callable[[Result], None],
        cases: tuple[models.ModelCase, ...] = CASES, log: Callable[[str], None] = lambda text: None,
        ) -> list[Result]:
    r"""Compile and time every case of ``cases``, its variants interleaved; results in table order."""
    results = []
    previous_limit, previous_threads = torch._dynamo.config.recompile_limit, torch.get_num_threads()
    for case in cases:
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        torch.set_num_threads(threads)  # as Timer sets it: graphs are specialized on the thread count
        try:
            calls = {v.name: [_compiled_call(case, v, device, log) for _ in range(budget.copies)]
                     for v in case.variants}
            before = compile_count()
            stats = measure_group(calls, budget, threads, device)
            if compile_count() != before:
                raise RuntimeError(f"{case.name} ({case.task}): torch.compile recompiled while timed.")
        finally:
            torch._dynamo.config.recompile_limit = previous_limit
            torch.set_num_threads(previous_threads)
        for name in calls:
            results.append(Result(SECTION, case.name, case.task, name, **stats[name]))
            progress(results[-1])
    torch._dynamo.reset()
    return results


def _compiled_call(case: models.ModelCase, variant: variants.Variant, device: torch.device,
                   log: Callable[[str], None]) -> Callable[[], None]:
    r"""The timed call of ``case`` under ``variant``, compiled and called :data:`COMPILE_CALLS` times."""
    torch.manual_seed(0)
    model = case.make().to(device)
    x = torch.randn(case.input_shape, device=device)
    with torch.no_grad():
        backward = case.backward(model.eval()(x))
    variant.prepare(model)
    module = model if variant.name == EAGER else torch.compile(model)
    if case.task == "inference":
        call = steps.forward(module.eval(), x)
    else:
        model.train()
        call = steps.train_step(module, x, backward, steps.sgd(model))
    start, count = time.perf_counter(), compile_count()
    call()
    first = time.perf_counter() - start
    for _ in range(COMPILE_CALLS - 1):
        call()
    log(f"  compiled | {case.name:30} | {case.task:10} | {variant.name:19} | first call {first:6.1f} s, "
        f"{compile_count() - count} compile events")
    return call
