r"""What a constraint declares about stacking, and the pairwise check ``constrain`` runs on a stack.

A stack ``[c1, c2, ...]`` computes ``c2(c1(w))``: the last constraint's output is the
effective tensor, and every constraint must still hold on it. Each constraint declares
(:meth:`Constraint.stacking`) a :class:`Stacking`:

- ``does``: facts about its map, from a small vocabulary (:data:`MOVES_TO_ZERO`,
  :func:`scales_slices`, ...): what it does to any input, such as "moves every entry
  towards zero" or "scales each slice along dim 0 by one factor";
- ``promise``: what its own output always satisfies, in words, and ``kept_by``: the facts
  of which any one, in a constraint after it, keeps that promise;
- ``needs``: facts every constraint before it must have for it to keep its promise (a
  ``UnitNorm`` needs every slice to stay nonzero).

:func:`conflict` checks every pair in stack order: a later constraint must keep what each
earlier one promises, and an earlier one must do what a later one needs. A stack that
passes holds after every optimizer step, whatever the weights are; one that fails is
refused by :func:`torchconstrain.constrain`. A constraint that declares nothing (``does``
is ``None``, the default for constraints defined outside the library) is not checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Fact", "Stacking", "conflict", "declare", "first_conflict"]


@dataclass(frozen=True)
class Fact:
    r"""A fact about what a constraint's map does: ``name``, and the slices it concerns
    (``dim``; ``None``: along every dim)."""

    name: str
    dim: int | None = None

    def along(self, ndim: int) -> "Fact":
        """This fact with a negative ``dim`` counted from the end of an ``ndim``-D tensor."""
        return self if self.dim is None or ndim == 0 else Fact(self.name, self.dim % ndim)

    def covers(self, wanted: "Fact") -> bool:
        """Whether this fact (a map's) gives ``wanted``: the same name, and the same dim or every dim."""
        return self.name == wanted.name and self.dim in (None, wanted.dim)

    def __str__(self) -> str:
        return self.name if self.dim is None else f"{self.name} along dim {self.dim}"


#: It clamps every entry into a box: that keeps any box it intersects.
CLAMPS = Fact("clamps every entry into a box")
#: ``|f(x)| <= |x|`` entrywise, sign kept: keeps every box that contains zero.
MOVES_TO_ZERO = Fact("moves every entry towards zero or leaves it")
#: Keeps every entry's sign, and every magnitude at most the largest one of the input:
#: keeps the boxes ``[-a, a]``, ``[0, a]`` and ``[-a, 0]``.
WITHIN_LARGEST = Fact("keeps every entry's sign and its magnitude within the largest one")
#: ``f(x) >= 0`` where ``x >= 0`` and ``f(x) <= 0`` where ``x <= 0`` (so zeros stay zero).
KEEPS_SIGNS = Fact("keeps every entry's sign and every zero")


def scales_slices(dim: int | None) -> Fact:
    r"""``f(x) = c * x`` on each slice along ``dim``, one factor ``c >= 0`` per slice."""
    return Fact("scales each slice by one factor", dim)


def keeps_nonzero_slices(dim: int | None) -> Fact:
    r"""A slice along ``dim`` (``None``: along every dim) that is not all zero stays so."""
    return Fact("keeps every nonzero slice nonzero", dim)


def keeps_unit_slices(dim: int | None) -> Fact:
    r"""A slice along ``dim`` of unit L2 norm keeps it."""
    return Fact("keeps unit-norm slices at unit norm", dim)


@dataclass(frozen=True)
class Stacking:
    r"""What a constraint declares for stacks (see the module docstring).

    Args:
        does: facts about its map; ``None``: undeclared (the stack is not checked against it).
        promise: what its output satisfies, in words; ``None``: nothing a later one can break.
        kept_by: facts of which any one keeps ``promise``; empty: none does.
        needs: facts every constraint before it must have.
        box: for a map that :data:`CLAMPS`, the ``(lower, upper)`` bounds it clamps into
            (tensors that broadcast against each other): a clamp keeps another's box only
            where the two intersect.
    """

    does: frozenset[Fact] | None = None
    promise: str | None = None
    kept_by: frozenset[Fact] = frozenset()
    needs: frozenset[Fact] = frozenset()
    box: tuple[Tensor, Tensor] | None = None


def declare(
    does: Iterable[Fact],
    promise: str | None = None,
    kept_by: Iterable[Fact] = (),
    needs: Iterable[Fact] = (),
    box: tuple[Tensor, Tensor] | None = None,
) -> Stacking:
    r"""A :class:`Stacking` from any iterables of facts."""
    return Stacking(frozenset(does), promise, frozenset(kept_by), frozenset(needs), box)


def conflict(earlier: Stacking, later: Stacking, ndim: int, names: tuple[str, str]) -> str | None:
    r"""Why ``later``, applied after ``earlier`` (directly or with others between them) on an
    ``ndim``-D tensor, can break the stack, or ``None`` when the two always hold together.
    ``names`` are the two constraints' descriptions, for the message."""
    if earlier.does is None or later.does is None:
        return None
    first, second = names
    if earlier.box is not None and later.box is not None and not _intersect(earlier.box, later.box):
        return f"the boxes {first} and {second} clamp into do not intersect"
    if earlier.promise is not None:
        kept_by = sorted((fact.along(ndim) for fact in earlier.kept_by), key=str)
        if not _gives(later.does, kept_by, ndim):
            keepers = " or ".join(map(str, kept_by))
            keeps = f"only a later constraint that {keepers} keeps" if keepers else "no later constraint keeps"
            return f"{first} promises {earlier.promise}, which {keeps}; {second} does not"
    for wanted in sorted((fact.along(ndim) for fact in later.needs), key=str):
        if not _gives(earlier.does, [wanted], ndim):
            return f"{second} needs each constraint before it to guarantee that it {wanted}; {first} does not"
    return None


def first_conflict(declared: list[Stacking], ndim: int, kinds: list[str]) -> tuple[int, int, str] | None:
    r"""The first pair of a stack that :func:`conflict` refuses, as ``(i, j, reason)`` with
    ``i < j`` (indices into ``declared``, the stack's declarations in order), or ``None``.
    ``kinds`` are the constraints' class names, for the reason."""
    for j in range(len(declared)):
        for i in range(j):
            reason = conflict(declared[i], declared[j], ndim, (kinds[i], kinds[j]))
            if reason is not None:
                return i, j, reason
    return None


def _gives(does: frozenset[Fact], wanted: list[Fact], ndim: int) -> bool:
    """Whether the facts ``does`` give one of ``wanted``."""
    return any(fact.along(ndim).covers(one) for fact in does for one in wanted)


def _intersect(box: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor]) -> bool:
    """Whether two boxes intersect at every entry."""
    return bool((torch.maximum(box[0], other[0]) <= torch.minimum(box[1], other[1])).all())
