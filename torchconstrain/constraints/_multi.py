r"""Helpers for evaluating many tensors at once (the fast path's fused constraints)."""

from __future__ import annotations

import torch
from torch import Tensor

from torchconstrain.constraints.base import tracing


def loops(xs: list[Tensor]) -> bool:
    """Whether to work tensor by tensor (on the CPU, and in traced graphs) rather than with
    multi-tensor kernels and without data-dependent tests (on GPUs)."""
    return xs[0].device.type == "cpu" or tracing()


def times(xs: list, factors: list) -> list:
    """``x * factor`` for each entry with a factor, in one multi-tensor multiplication;
    entries without one (``None``) stay as they are, and may be ``None``. Bitwise the value
    of ``x * factor`` and, applied to gradients, the gradient ``x * factor`` passes back."""
    picked = [i for i, factor in enumerate(factors) if factor is not None]
    ys = list(xs)
    if picked:
        for i, y in zip(picked, torch._foreach_mul([xs[i] for i in picked], [factors[i] for i in picked])):
            ys[i] = y
    return ys


class _Scale(torch.autograd.Function):
    """Each tensor times its constant factors in one autograd node; see :func:`scale`."""

    @staticmethod
    def forward(ctx, columns, *xs: Tensor):
        ctx.set_materialize_grads(False)
        ctx.columns = columns
        ys = list(xs)
        for column in columns:
            ys = times(ys, column)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        grads = [g if ctx.needs_input_grad[1 + i] else None for i, g in enumerate(grads)]
        for column in reversed(ctx.columns):
            grads = times(grads, [None if g is None else f for f, g in zip(column, grads)])
        return (None, *grads)


def scale(xs: list[Tensor], factors: list[list]) -> list[Tensor]:
    """Each tensor times its constant factors (``factors[i]``: tensors that need no gradient,
    or ``None`` to skip, the same count for every tensor), in order, with multi-tensor
    kernels: bitwise the values and gradients of ``x * f1 * f2 ...``.

    Off the CPU one autograd node serves all tensors, so that the backward too launches
    multi-tensor kernels. On the CPU autograd's own nodes for ``torch._foreach_mul`` cost
    less (their backward runs tensor by tensor, in C++).
    """
    columns = [list(column) for column in zip(*factors)]
    if not loops(xs):
        return list(_Scale.apply(columns, *xs))
    for column in columns:
        xs = times(xs, column)
    return xs
