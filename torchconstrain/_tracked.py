r"""Parameters and kept values whose ``.data`` writes show in their version counter.

A write through ``.data`` (``p.data.copy_(...)``, as Lightning's weight averaging swaps
weights, and as much code written for plain parameters does) bypasses a plain tensor's
version counter, which is what the fast path (:mod:`torchconstrain.fastpath`) reads to
know that a value it keeps is stale. The stored originals and the parameters of the
constraints (a ``LearnableMask``'s ``scores``) are therefore made :class:`Tracked` while
they are parametrized: their ``.data`` is ``detach()``, which shares the version counter.
The effective tensors the fast path keeps for reuse with gradients off are
:class:`TrackedValue`, for the same reason (``layer.weight.data.mul_(2)``, a habit from
plain layers, writes into the kept value).

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

import copy

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version

from torchconstrain.constraints.base import Constraint

__all__ = ["Tracked", "TrackedValue", "track", "track_chain", "track_value", "untrack"]

_DATA = torch._C.TensorBase.data


def _set_data(tensor: Tensor, value: Tensor) -> None:
    _DATA.__set__(tensor, value)
    increment_version(tensor)  # the new storage may sit where the old one was


#: ``.data`` as ``detach()``, which shares the version counter; assigning it moves the counter.
_TRACKED_DATA = property(Tensor.detach, _set_data)


class Tracked(nn.Parameter):
    r"""A ``Parameter`` whose ``.data`` is ``detach()``: it shares the version counter, so
    that an in-place write through ``.data`` shows there as any other in-place write does.
    Assigning ``.data`` replaces the storage and moves the counter too. It is a
    ``Parameter`` in every other respect (a deep copy is ``Tracked``, a pickle loads as a
    plain ``Parameter``)."""

    data = _TRACKED_DATA


class TrackedValue(Tensor):
    r"""A tensor whose writes that bypass a plain tensor's version counter move it: its
    ``.data`` is ``detach()``, and assigning ``.data`` or taking a NumPy view (which may be
    written) moves the counter. Operations on it return plain tensors, and copies, pickles
    and its printed form are those of a plain tensor."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    data = _TRACKED_DATA

    def numpy(self, *, force: bool = False):
        increment_version(self)
        return self.detach().numpy(force=force)

    def __deepcopy__(self, memo) -> Tensor:
        return copy.deepcopy(self.detach(), memo)

    def __reduce_ex__(self, protocol):
        return self.detach().__reduce_ex__(protocol)

    def __repr__(self, *, tensor_contents=None) -> str:
        return self.detach().__repr__(tensor_contents=tensor_contents)


def track_value(tensor: Tensor) -> None:
    r"""Make ``tensor``, when it is a plain tensor, a :class:`TrackedValue` (in place)."""
    if type(tensor) is Tensor:
        tensor.__class__ = TrackedValue


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
