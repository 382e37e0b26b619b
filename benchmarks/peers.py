r"""torchconstrain's learnable MAC budget against Torch-Pruning's own uniform pruning, at the same MACs.

On the demo's data and model (scikit-learn's digits at 32x32, the demo's MobileNetV3-Small:
:mod:`torchconstrain.demo.data`), for every seed of the setup:

1. ``plain``: one dense model trained for ``setup.epochs`` epochs with the demo's training
   loop (:func:`torchconstrain.demo.train.train`: AdamW, one-cycle learning rates, the
   batch order seeded), the shared starting point; ``plain + F epochs`` is that model
   trained ``setup.finetune_epochs`` more, the control for the extra training the pruned
   models get.
2. ``torchconstrain``: a copy gets learnable channel gates under a MAC budget of
   ``setup.macs`` of the dense model's MACs (:func:`mask_torchconstrain`), is fine-tuned for
   ``setup.finetune_epochs`` epochs with ``penalty(model)`` in the loss (the demo's loop:
   gates annealed, hard for the last epochs), then shrunk (which bakes).
3. ``Torch-Pruning``: another copy is pruned by ``torch_pruning.pruner.MagnitudePruner``
   (L1 magnitude importance, ``global_pruning=False``: the same ratio in every group, the
   classifier's last layer ignored), the ratio found by bisection so that its MACs are as
   close as possible to the shrunk torchconstrain model's and not above them
   (:func:`torchconstrain.surgery.count_macs` counts both); then fine-tuned for the same
   epochs with the same optimizer and schedule.

:func:`run` times batch-1 CPU inference of the three seed-``setup.seeds[0]`` models side by
side (eval mode, BatchNorm not folded, interleaved rounds of
:func:`benchmarks.timing.measure_group`); :func:`legend` gives every seed's parameters,
MACs and test accuracy. Training runs on the CPU with the threads the run was given.
"""

from __future__ import annotations

import copy
import functools
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from benchmarks import steps
from benchmarks.timing import Budget, Result, measure_group
from torchconstrain import surgery
from torchconstrain.demo.config import DemoConfig
from torchconstrain.demo.data import Digits, load_digits, make_model
from torchconstrain.demo.train import evaluate, train

SECTION = "peers"
CASE = "digits mobilenet_v3_small 32x32 b1"
TIMED = ("plain", "torchconstrain", "Torch-Pruning")
#: How the torchconstrain variant masks the model (:func:`mask_torchconstrain`).
METHOD = ("`surgery.mask_blocks(model, groups=\"all\", macs=0.5, learnable=True, example=x)` then "
          "`surgery.shrink(model, example=x)`")


@dataclass(frozen=True)
class Setup:
    r"""Epochs of the dense training and of each fine-tuning, seeds, the MAC budget, bisection
    steps for Torch-Pruning's ratio, and batches per epoch (``None``: all)."""

    epochs: int
    finetune_epochs: int
    seeds: tuple[int, ...]
    macs: float = 0.5
    bisection_steps: int = 24
    limit_batches: int | None = None


FULL = Setup(epochs=15, finetune_epochs=10, seeds=(0, 1, 2))
QUICK = Setup(epochs=1, finetune_epochs=1, seeds=(0,), bisection_steps=6, limit_batches=2)


@dataclass
class Row:
    r"""One trained model of one seed: its size, test accuracy and, for the pruned ones, the
    MAC share kept (``target``: what was asked for)."""

    variant: str
    seed: int
    params: int
    macs: int
    accuracy: float
    macs_share: float
    target: float | None = None
    ratio: float | None = None


def mask_torchconstrain(model: nn.Module, example: Tensor, macs: float) -> Callable[[], object]:
    r"""Put learnable channel gates under a budget of ``macs`` of the MACs on ``model``; return
    the function that shrinks it after training (it bakes, and returns the shrink report)."""
    surgery.mask_blocks(model, groups="all", macs=macs, learnable=True, example=example)
    return lambda: surgery.shrink(model.eval(), example=example, measure=False)


def prune_torch_pruning(model: nn.Module, example: Tensor, ratio: float) -> nn.Module:
    r"""A copy of ``model`` with ``ratio`` of every group's channels pruned by Torch-Pruning
    (L1 magnitude, the same ratio everywhere, the classifier's last layer kept)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, global_pruning=False,
                                       ignored_layers=[pruned.classifier[-1]])
    pruner.step()
    return pruned


def match_macs(model: nn.Module, example: Tensor, limit: int, bisections: int) -> tuple[nn.Module, float]:
    r"""Torch-Pruning's pruned copy with the most MACs not above ``limit``, and its ratio, by
    bisection over the ratio (MACs fall as it grows)."""
    low, high, best = 0.0, 1.0, None
    for _ in range(bisections):
        ratio = (low + high) / 2
        pruned = prune_torch_pruning(model, example, ratio)
        macs = surgery.count_macs(pruned, example)
        if macs <= limit:
            high = ratio
            if best is None or macs > best[0]:
                best = (macs, ratio, pruned)
        else:
            low = ratio
    if best is None:
        raise ValueError(f"benchmarks.peers: no Torch-Pruning ratio reached {limit:,} MACs in {bisections} steps.")
    return best[2], best[1]


def _config(setup: Setup, seed: int, epochs: int) -> DemoConfig:
    return DemoConfig(epochs=epochs, seed=seed, limit_batches=setup.limit_batches, progress=False,
                      hard_epochs=min(3, epochs - 1))


def _row(variant: str, model: nn.Module, data: Digits, seed: int, dense_macs: int, **extra) -> Row:
    example = data.test_x[:1]
    macs = surgery.count_macs(model, example)
    accuracy = evaluate(model, data.test_x, data.test_y)[1]
    return Row(variant, seed, surgery.count_params(model), macs, accuracy, macs / dense_macs, **extra)


@functools.lru_cache(maxsize=None)
def compare(setup: Setup, seed: int) -> tuple[dict[str, nn.Module], list[Row]]:
    r"""Train and prune the models of one seed; return them by variant, and their rows."""
    data = load_digits(seed=seed)
    example = data.test_x[:1]
    dense = make_model(seed)
    train(dense, data, _config(setup, seed, setup.epochs), name="plain", constrained=False)
    dense_macs = surgery.count_macs(dense, example)
    finetune = _config(setup, seed, setup.finetune_epochs)
    control = copy.deepcopy(dense)
    train(control, data, finetune, name="plain+F", constrained=False)
    ours = copy.deepcopy(dense)
    shrink = mask_torchconstrain(ours, example, setup.macs)
    train(ours, data, finetune, name="tc", constrained=True)
    target, _ = shrink().targets["macs"]
    theirs, ratio = match_macs(dense, example, surgery.count_macs(ours, example), setup.bisection_steps)
    train(theirs, data, finetune, name="tp", constrained=False)
    models = {"plain": dense, "plain + F epochs": control, "torchconstrain": ours, "Torch-Pruning": theirs}
    rows = [_row("plain", dense, data, seed, dense_macs), _row("plain + F epochs", control, data, seed, dense_macs),
            _row("torchconstrain", ours, data, seed, dense_macs, target=target),
            _row("Torch-Pruning", theirs, data, seed, dense_macs, ratio=ratio)]
    return {name: model.eval() for name, model in models.items()}, rows


def run(device: torch.device, threads: int, budget: Budget, progress: Callable[[Result], None],
        setup: Setup = FULL) -> list[Result]:
    r"""Train every seed's models, then time batch-1 inference of the first seed's, interleaved."""
    for seed in setup.seeds:
        start = time.perf_counter()
        compare(setup, seed)
        print(f"  {SECTION:8} | seed {seed} trained and pruned in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    models, _ = compare(setup, setup.seeds[0])
    x = torch.randn(1, 3, 32, 32, device=device)
    calls = {name: [steps.forward(copy.deepcopy(models[name]).to(device), x) for _ in range(budget.copies)]
             for name in TIMED}
    stats = measure_group(calls, budget, threads, device)
    results = []
    for name in TIMED:
        results.append(Result(SECTION, CASE, "inference", name, **stats[name]))
        progress(results[-1])
    return results


def rows(setup: Setup = FULL) -> list[Row]:
    r"""Every seed's rows (training them if not done yet)."""
    return [row for seed in setup.seeds for row in compare(setup, seed)[1]]


def legend(setup: Setup = FULL) -> str:
    r"""Markdown: how the variants were made, then params, MACs and test accuracy per variant
    (each seed's accuracy, their mean)."""
    found = rows(setup)
    lines = ["| variant | params | MACs | MACs kept | test accuracy (per seed) | mean |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for variant in dict.fromkeys(row.variant for row in found):
        chosen = [row for row in found if row.variant == variant]
        accuracies = " / ".join(f"{row.accuracy:.1%}" for row in chosen)
        params = _span([row.params / 1e6 for row in chosen], "{:.3f}") + " M"
        macs = _span([row.macs / 1e6 for row in chosen], "{:.2f}") + " M"
        shares = _span([row.macs_share for row in chosen], "{:.3f}")
        lines.append(f"| {variant} | {params} | {macs} | {shares} | {accuracies} | "
                     f"{statistics.mean(row.accuracy for row in chosen):.1%} |")
    ratios = ", ".join(f"{row.ratio:.4f}" for row in found if row.ratio is not None)
    note = (
        f"Digits at 32x32 (1437 train / 360 test images, split by the seed), the demo's MobileNetV3-Small, seeds "
        f"{', '.join(map(str, setup.seeds))}; batches per epoch: {setup.limit_batches or 'all'}. `plain`: "
        f"{setup.epochs} epochs of the demo's training loop (AdamW, one-cycle). `torchconstrain`: {METHOD}, "
        f"budget {setup.macs} of the MACs, {setup.finetune_epochs} epochs of fine-tuning with `penalty(model)` "
        f"(gates hard for the last {min(3, setup.finetune_epochs - 1)}). `Torch-Pruning`: `MagnitudePruner` "
        f"(`MagnitudeImportance(p=1)`, `global_pruning=False`, the last Linear ignored), the ratio "
        f"bisected ({setup.bisection_steps} steps) to the most MACs not above torchconstrain's (ratios: "
        f"{ratios}), then the same fine-tuning. `plain + F epochs`: the plain model fine-tuned the same way "
        f"(the control). MACs (`surgery.count_macs`, convs and Linears, one 32x32 image), params and "
        f"`MACs kept` span the seeds. Timed: the seed-{setup.seeds[0]} models, "
        f"eval mode, BatchNorm not folded."
    )
    return note + "\n\n" + "\n".join(lines)


def _span(values: list[float], form: str) -> str:
    """``0.506-0.613`` over the seeds, or one value when they agree."""
    return "-".join(dict.fromkeys(form.format(value) for value in (min(values), max(values))))
