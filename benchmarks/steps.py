r"""What one timed call does: an inference forward, a forward+backward, or a training step.

Each builder returns a zero-argument closure over a prepared module and fixed inputs;
:mod:`benchmarks.timing` calls it. The module's variant (plain, constrained, pruned...)
is set up beforehand, so the closure is the same code for every variant:

- ``forward``: ``module(x)`` under :func:`torch.inference_mode`.
- ``fwd+bwd``: gradients set to ``None``, ``module(x)``, then ``backward`` of the loss.
- ``train step``: ``optimizer.zero_grad(set_to_none=True)``, forward, ``backward``,
  ``optimizer.step()``, then ``after_step()`` when the variant has one (the
  ``weight.data.clamp_()`` recipe).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

Backward = Callable[[Tensor], None]


def forward(module: nn.Module, x: Tensor) -> Callable[[], None]:
    r"""Inference forward: ``module(x)`` under ``torch.inference_mode()``."""

    def call() -> None:
        with torch.inference_mode():
            module(x)

    return call


def forward_backward(module: nn.Module, x: Tensor, backward: Backward) -> Callable[[], None]:
    r"""Clear gradients, run ``module(x)`` and ``backward`` (gradients reach ``x`` if it asks)."""

    def call() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        backward(module(x))

    return call


def train_step(
    module: nn.Module,
    x: Tensor,
    backward: Backward,
    optimizer: torch.optim.Optimizer,
    after_step: Callable[[], None] | None = None,
) -> Callable[[], None]:
    r"""One optimizer step on a fixed batch, then ``after_step`` (if any)."""

    def call() -> None:
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        backward(module(x))
        optimizer.step()
        if after_step is not None:
            after_step()

    return call


def sgd(module: nn.Module) -> torch.optim.Optimizer:
    r"""The optimizer of every training step: SGD, momentum 0.9, over all parameters.

    ``module.parameters()`` includes the stored originals of parametrized tensors and a
    learnable mask's scores. The learning rate is small so that weights drift little over
    the tens of thousands of steps a measurement can take (no overflow, no subnormals);
    the arithmetic of a step does not depend on it.
    """
    return torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)


def grad_backward(grad: Tensor) -> Backward:
    r"""Backward with a fixed upstream gradient ``grad`` (the loss ``(out * grad).sum()``)."""
    return lambda out: out.backward(grad)


def mse_backward(target: Tensor) -> Backward:
    r"""Backward of ``mse_loss(out, target)``: a loss with a minimum, so that weights stay
    finite over a long measurement (a fixed upstream gradient drives them to infinity)."""
    return lambda out: nn.functional.mse_loss(out, target).backward()


def cross_entropy_backward(target: Tensor) -> Backward:
    r"""Backward of ``cross_entropy(out, target)``."""
    return lambda out: nn.functional.cross_entropy(out, target).backward()
