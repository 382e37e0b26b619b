r"""Helpers for evaluating many tensors at once (the fast path's fused constraints)."""

from __future__ import annotations

import torch
from torch import Tensor

from torchconstrain.constraints.base import tracing


def loops(xs: list[Tensor]) -> bool:
    """Whether to work tensor by tensor (on the CPU, and in traced graphs) rather than with
    multi-tensor kernels and without data-dependent tests (on GPUs)."""
    return xs[0].device.type == "cpu" or tracing()


def times(xs: list[Tensor], factors: list) -> list[Tensor]:
    """``x * factor`` for each entry with a factor; entries without one (``None``) stay as
    they are, and may be ``None``. Multi-tensor kernels off the CPU. Bitwise the value of
    ``x * factor`` and, applied to gradients, the gradient ``x * factor`` passes back."""
    picked = [i for i, factor in enumerate(factors) if factor is not None]
    ys = list(xs)
    if not picked:
        return ys
    if loops([xs[picked[0]]]):
        for i in picked:
            ys[i] = xs[i] * factors[i]
        return ys
    for i, y in zip(picked, torch._foreach_mul([xs[i] for i in picked], [factors[i] for i in picked])):
        ys[i] = y
    return ys
