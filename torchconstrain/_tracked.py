r"""Parameters whose ``.data`` writes show in their version counter.

A write through ``.data`` (``p.data.copy_(...)``, as Lightning's weight averaging swaps
weights, and as much code written for plain parameters does) bypasses a plain tensor's
version counter, which is what the fast path (:mod:`torchconstrain.fastpath`) reads to
know that a value it keeps is stale. The stored originals and the parameters of the
constraints (a ``LearnableMask``'s ``scores``) are therefore made :class:`Tracked` while
they are parametrized: their ``.data`` is ``detach()``, which shares the version counter.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torchconstrain._tracked import track
    >>> p = nn.Parameter(torch.zeros(3))
    >>> track(p)
    >>> before = p._version
    >>> p.data.add_(1.0)  # seen: a plain Parameter's version would not move
    tensor([1., 1., 1.])
    >>> p._version > before, isinstance(p, nn.Parameter)
    (True, True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchconstrain.constraints.base import Constraint

__all__ = ["Tracked", "track", "track_chain", "untrack"]

_DATA = torch._C.TensorBase.data


class Tracked(nn.Parameter):
    r"""A ``Parameter`` whose ``.data`` is ``detach()``: it shares the version counter, so
    that an in-place write through ``.data`` shows there as any other in-place write does.
    Assigning ``.data`` replaces the storage, which the fast path sees too. It is a
    ``Parameter`` in every other respect (a deep copy is ``Tracked``, a pickle loads as a
    plain ``Parameter``)."""

    @property
    def data(self) -> Tensor:
        return self.detach()

    @data.setter
    def data(self, value: Tensor) -> None:
        _DATA.__set__(self, value)


def track(tensor) -> None:
    r"""Make ``tensor``, when it is a plain ``Parameter``, a :class:`Tracked` one (in place:
    the same object, so optimizers and tied names keep it)."""
    if type(tensor) is nn.Parameter:
        tensor.__class__ = Tracked


def untrack(tensor) -> None:
    r"""Make a :class:`Tracked` parameter a plain ``Parameter`` again (its parametrizations
    are gone)."""
    if type(tensor) is Tracked:
        tensor.__class__ = nn.Parameter


def track_chain(plist: nn.Module) -> None:
    r"""Track the stored original of a ``ParametrizationList`` and the parameters of each of
    its torchconstrain constraints."""
    track(plist._parameters.get("original"))
    for constraint in plist._modules.values():
        if isinstance(constraint, Constraint):
            for parameter in constraint._parameters.values():
                track(parameter)
