r"""A short end-to-end run: constrain MobileNetV3-Small, train, check, bake, compare.

The data are generated (one random template image per class plus noise), so nothing is
downloaded. Run it with ``python -m torchconstrain demo``.
"""

from __future__ import annotations

import time

import torch
import torchvision
from torch import nn

from torchconstrain.bake import bake, check, penalty
from torchconstrain.constraints import Clamp, FixedMask, LearnableMask
from torchconstrain.rules import constrain

__all__ = ["demo_rules", "run_demo"]

NUM_CLASSES = 10


def demo_rules() -> dict:
    r"""The rules the demo applies to ``mobilenet_v3_small``."""
    return {
        # The stem conv: a box on every weight.
        "features.0.0": Clamp(-1.0, 1.0),
        # The first conv of every inverted residual block (expand, or depthwise in block 1).
        r"re:features\.\d+\.block\.0\.0\.weight": Clamp(-0.5, 0.5),
        # The project convs of the last three blocks: half of each pruned by magnitude.
        r"re:features\.(9|10|11)\.block\.3\.0\.weight": FixedMask.magnitude(sparsity=0.5),
        # The first classifier layer: learn which output neurons to keep.
        "classifier.0": LearnableMask(per="channel", strength=0.05),
    }


def _batches(steps: int, batch: int, size: int, generator: torch.Generator):
    templates = torch.randn(NUM_CLASSES, 3, size, size, generator=generator)
    for _ in range(steps):
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        images = templates[labels] + 0.5 * torch.randn(batch, 3, size, size, generator=generator)
        yield images, labels


def run_demo(*, steps: int = 30, batch: int = 16, size: int = 64, seed: int = 0, echo=print) -> dict:
    r"""Constrain, train ``steps`` SGD steps with ``check`` after each, bake and compare.

    Returns:
        A dict with the final ``loss``; ``baked_difference``, the largest difference
        between the constrained and baked models' outputs (zero unless a learnable mask
        pruned entries whose gate was not yet zero); ``stock_difference``, the largest
        difference between the baked model and a stock torchvision model loaded with its
        ``state_dict`` (always zero); and the ``reports``.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    echo(constrain(model, demo_rules()))
    started = time.perf_counter()
    for step, (images, labels) in enumerate(_batches(steps, batch, size, generator), 1):
        loss = nn.functional.cross_entropy(model(images), labels) + penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        checked = check(model)
        if step % 10 == 0 or step == steps:
            echo(f"step {step:3d}  loss {loss.item():.4f}  check: {len(checked)} tensors hold")
    echo(f"trained {steps} steps in {time.perf_counter() - started:.1f}s")
    echo(checked)
    return _bake_and_compare(model, size, loss.item(), checked, echo)


def _bake_and_compare(model: nn.Module, size: int, loss: float, checked, echo) -> dict:
    probe = torch.randn(4, 3, size, size)
    model.eval()
    with torch.no_grad():
        before = model(probe)
        baked = bake(model)
        after = model(probe)
    echo(baked)
    stock = torchvision.models.mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        stock_difference = (stock(probe) - after).abs().max().item()
    difference = (after - before).abs().max().item()
    echo(f"baked vs constrained outputs: max |difference| = {difference:.3g}")
    echo(f"stock torchvision model loaded with the baked state_dict vs baked model: "
         f"max |difference| = {stock_difference:.3g}")
    return {"loss": loss, "baked_difference": difference, "stock_difference": stock_difference,
            "reports": {"check": checked, "bake": baked}}
