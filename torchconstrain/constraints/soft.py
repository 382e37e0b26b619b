r"""Soft constraints: penalties on chosen tensors that leave the forward pass alone."""

from __future__ import annotations

from torch import Tensor

from torchconstrain.constraints.arguments import number
from torchconstrain.constraints.base import Constraint, at_least_float32

__all__ = ["SoftConstraint", "L1", "L2"]


class SoftConstraint(Constraint):
    r"""A penalty on a tensor's effective value, added by :func:`torchconstrain.penalty`.

    Soft constraints are not parametrizations: :func:`torchconstrain.constrain` records
    them on the module that owns the tensor, so the forward pass, the parameter and the
    ``state_dict`` stay exactly as they were. :func:`torchconstrain.check` has nothing to
    verify for them; :func:`torchconstrain.bake` drops them.
    """

    soft = True

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = number(type(self).__name__, "weight", weight, low=0)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def penalty_of(self, value: Tensor) -> Tensor:
        r"""Return the penalty for the tensor's effective ``value``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"


class L1(SoftConstraint):
    r"""Penalty ``weight * sum(|w|)`` on the matched tensors: pushes entries to exactly zero.

    Summed in float32 for float16 and bfloat16 tensors (their own sums overflow or round).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import L1, constrain, penalty
        >>> layer = nn.Linear(2, 2)
        >>> _ = constrain(layer, {"weight": L1(0.1)})
        >>> torch.allclose(penalty(layer), 0.1 * layer.weight.abs().sum())
        True
    """

    def penalty_of(self, value: Tensor) -> Tensor:
        return self.weight * at_least_float32(value).abs().sum()


class L2(SoftConstraint):
    r"""Penalty ``weight / 2 * sum(w ** 2)`` on the matched tensors (in float32 for float16
    and bfloat16 tensors, like :class:`L1`).

    Its gradient is ``weight * w``, so with plain SGD, ``L2(wd)`` on some tensors is exactly
    ``weight_decay=wd`` in a param group holding those tensors (see the README section on
    weight decay; with Adam-style optimizers the two differ, and decoupled decay belongs
    in ``AdamW`` param groups).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import L2, constrain, penalty
        >>> layer = nn.Linear(2, 2)
        >>> _ = constrain(layer, {"weight": L2(0.1)})
        >>> torch.allclose(penalty(layer), 0.05 * layer.weight.square().sum())
        True
    """

    def penalty_of(self, value: Tensor) -> Tensor:
        return self.weight / 2 * at_least_float32(value).square().sum()
