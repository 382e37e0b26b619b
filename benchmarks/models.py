r"""Whole-model cost of each constraint variant: MobileNetV3 and a stack of 40 small Linears.

Cases:

- ``mobilenet_v3_small`` and ``mobilenet_v3_large`` training steps
  (``torchvision.models.mobilenet_v3_*(weights=None)``) in train mode, batches of 8 and
  32 of 3x224x224, cross-entropy on fixed random labels, SGD (momentum 0.9):
  ``zero_grad``, forward, backward, ``step``.
- ``mobilenet_v3_small`` and ``mobilenet_v3_large`` inference: eval mode, batch 1 of
  3x224x224, under ``torch.inference_mode()``.
- ``40 x Linear(64, 64)``: ``Sequential`` of 40 ``Linear(64, 64)`` each followed by ReLU,
  batch 8; a training step (mean squared error to a fixed random target, SGD with
  momentum) and inference. Little arithmetic per parameter, so per-tensor overheads dominate.

Variants (per :mod:`benchmarks.variants`), on every Conv2d weight of the MobileNets (52
in small, 62 in large, SE fcs included) and every Linear weight of the stack (40 tensors):

- ``plain``;
- ``Clamp``: ``{nn.Conv2d: Clamp(-1, 1)}`` (``{nn.Linear: ...}`` for the stack);
- ``FixedMask``: ``FixedMask.magnitude(sparsity=0.5)`` on the same weights, what the
  ``prune hooks`` variant computes;
- ``mix``: MobileNets ``{nn.Conv2d: [Clamp(-1, 1), FixedMask.magnitude(sparsity=0.5)],
  nn.Linear: LearnableMask()}``; the stack ``{nn.Linear: [Clamp(-1, 1),
  FixedMask.magnitude(sparsity=0.5)]}``;
- ``mix, fast path off``: ``mix`` timed under ``torchconstrain.set_fast_path(False)``: plain
  ``parametrize`` evaluation;
- ``prune hooks``: ``prune.l1_unstructured(amount=0.5)`` on the same weights as ``Clamp``;
- ``clamp_ after step``: plain, plus ``weight.data.clamp_(-1, 1)`` on those weights after
  each ``optimizer.step()`` (training only);
- ``baked``: ``mix``, then ``bake``.

Every variant gets freshly built models (seed 0; ``budget.copies`` of them, whose
measurements are merged) with the same inputs; the variants of a case are timed in
interleaved rounds (:func:`benchmarks.timing.measure_group`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn

from benchmarks import steps, variants
from benchmarks.timing import Budget, Result, measure_group
from torchconstrain import Clamp, FixedMask, LearnableMask

SECTION = "models"


@dataclass(frozen=True)
class ModelCase:
    r"""A model, its task (``"train step"`` or ``"inference"``) and the variants to compare."""

    name: str
    task: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    backward: Callable[[torch.Tensor], steps.Backward]
    variants: tuple[variants.Variant, ...]


def _model_variants(types: tuple, mix: Callable[[], dict]) -> tuple[variants.Variant, ...]:
    return (
        variants.plain(),
        variants.constrained("Clamp", lambda: {t: Clamp(-1, 1) for t in types}),
        variants.constrained("FixedMask", lambda: {t: FixedMask.magnitude(sparsity=0.5) for t in types}),
        variants.constrained("mix", mix),
        variants.constrained("mix, fast path off", mix, fast_path=False),
        variants.pruned("prune hooks", types, amount=0.5),
        variants.clamp_after_step("clamp_ after step", types, -1.0, 1.0),
        variants.baked("baked", mix),
    )


def _mobilenet_mix() -> dict:
    return {
        nn.Conv2d: [Clamp(-1, 1), FixedMask.magnitude(sparsity=0.5)],
        nn.Linear: LearnableMask(),
    }


def _stack_mix() -> dict:
    return {nn.Linear: [Clamp(-1, 1), FixedMask.magnitude(sparsity=0.5)]}


def _linear_stack() -> nn.Module:
    return nn.Sequential(*[layer for _ in range(40) for layer in (nn.Linear(64, 64), nn.ReLU())])


def _labels(out: torch.Tensor) -> steps.Backward:
    target = torch.randint(0, out.shape[1], (out.shape[0],), device=out.device)
    return steps.cross_entropy_backward(target)


def _regression(out: torch.Tensor) -> steps.Backward:
    return steps.mse_backward(torch.randn_like(out))


LEGEND = (
    "Variants on every Conv2d weight of the MobileNets (SE fcs included) and every Linear weight "
    "of the stack: `Clamp(-1, 1)`; `FixedMask` = `FixedMask.magnitude(sparsity=0.5)`; `mix` = "
    "MobileNets `{nn.Conv2d: [Clamp(-1, 1), "
    "FixedMask.magnitude(sparsity=0.5)], nn.Linear: LearnableMask()}`, stack `{nn.Linear: "
    "[Clamp(-1, 1), FixedMask.magnitude(sparsity=0.5)]}`; `mix, fast path off` = mix timed under "
    "`set_fast_path(False)` (plain parametrize); `prune hooks` = "
    "`l1_unstructured(amount=0.5)` on the Clamp weights; `clamp_ after step` = plain model plus "
    "`weight.data.clamp_(-1, 1)` on those weights after `optimizer.step()`; `baked` = mix, then "
    "`bake()` (plain modules again: its distance from 1.00x is the noise floor). Training steps: "
    "train mode, SGD (momentum 0.9), MobileNet with cross-entropy; inference: eval mode under "
    "`torch.inference_mode()`."
)

MOBILENET = _model_variants((nn.Conv2d,), _mobilenet_mix)
STACK = _model_variants((nn.Linear,), _stack_mix)

def _mobilenet_v3_small() -> nn.Module:
    return torchvision.models.mobilenet_v3_small(weights=None)


def _mobilenet_v3_large() -> nn.Module:
    return torchvision.models.mobilenet_v3_large(weights=None)


CASES = (
    *(
        ModelCase(f"{name} b{batch}", "train step", make, (batch, 3, 224, 224), _labels, MOBILENET)
        for name, make in (("mobilenet_v3_small", _mobilenet_v3_small), ("mobilenet_v3_large", _mobilenet_v3_large))
        for batch in (8, 32)
    ),
    ModelCase("mobilenet_v3_small b1", "inference", _mobilenet_v3_small, (1, 3, 224, 224), _labels,
              MOBILENET),
    ModelCase("mobilenet_v3_large b1", "inference", _mobilenet_v3_large, (1, 3, 224, 224), _labels,
              MOBILENET),
    ModelCase("40 x Linear(64,64) b8", "train step", _linear_stack, (8, 64), _regression, STACK),
    ModelCase("40 x Linear(64,64) b8", "inference", _linear_stack, (8, 64), _regression, STACK),
)


# What ``--quick`` runs: the batch-32 training steps run the code of batch 8 at four times the cost.
QUICK_CASES = tuple(case for case in CASES if case.input_shape[0] <= 8)


def run(device: torch.device, threads: int, budget: Budget, progress: Callable[[Result], None],
        cases: tuple[ModelCase, ...] = CASES) -> list[Result]:
    r"""Time every case of ``cases``, its variants interleaved; return the results in table order."""
    results = []
    for case in cases:
        chosen = [v for v in case.variants if not (v.training_only and case.task != "train step")]
        calls = {v.name: [_call(case, v, device) for _ in range(budget.copies)] for v in chosen}
        stats = measure_group(calls, budget, threads, device)
        for name in calls:
            results.append(Result(SECTION, case.name, case.task, name, **stats[name]))
            progress(results[-1])
    return results


def _call(case: ModelCase, variant: variants.Variant, device: torch.device) -> Callable[[], None]:
    torch.manual_seed(0)
    model = case.make().to(device)
    x = torch.randn(case.input_shape, device=device)
    with torch.no_grad():
        backward = case.backward(model.eval()(x))
    variant.prepare(model)
    if case.task == "inference":
        return variant.timed(steps.forward(model.eval(), x))
    model.train()
    return variant.timed(steps.train_step(model, x, backward, steps.sgd(model), variant.hook(model)))
