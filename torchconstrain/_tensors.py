r"""Where constrainable tensors live in a model, and what torchconstrain has on them.

A read-only view: :mod:`torchconstrain.registration` adds and removes the entries.

One ``Parameter`` can have several names (tied weights: GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``). :func:`tied_slots` groups the names of each stored tensor;
torchconstrain registers a tied tensor's constraints under its first name in model order
and makes the other names read through the same chain (see
:mod:`torchconstrain.registration`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torchconstrain.constraints.base import Constraint

SOFT_ATTRIBUTE = "_torchconstrain_soft"


@dataclass(frozen=True)
class Slot:
    r"""One tensor of a model: ``module_name.tensor_name`` is its ``fqn``."""

    fqn: str
    module_name: str
    module: nn.Module
    tensor_name: str

    def value(self) -> Tensor:
        r"""The effective value (through every parametrization), detached: computed the
        plain way, so that it leaves no value kept for reuse behind (see
        :mod:`torchconstrain.fastpath`). Reading it changes nothing: the buffers of other
        libraries' parametrizations (``spectral_norm``'s power iteration vectors, which
        its forward updates in training mode) are restored after."""
        with torch.no_grad():
            if parametrize.is_parametrized(self.module, self.tensor_name):
                with self.foreign_buffers_kept():
                    return self.module.parametrizations[self.tensor_name]().detach()
            return getattr(self.module, self.tensor_name).detach()

    def foreign_buffers_kept(self):
        r"""Restore the buffers of the parametrizations on the tensor that are not
        torchconstrain's when the block ends, whatever it did to them."""
        return foreign_buffers_kept(self.chain())

    def stored(self) -> Tensor:
        r"""The ``Parameter`` (or buffer) object that holds the tensor's stored original."""
        if parametrize.is_parametrized(self.module, self.tensor_name):
            return self.module.parametrizations[self.tensor_name].original
        return getattr(self.module, self.tensor_name)

    def chain(self) -> list[nn.Module]:
        r"""Every parametrization on the tensor, in application order."""
        if parametrize.is_parametrized(self.module, self.tensor_name):
            return list(self.module.parametrizations[self.tensor_name])
        return []

    def constraints(self) -> list[Constraint]:
        r"""torchconstrain's parametrizations on the tensor, in application order."""
        return [p for p in self.chain() if isinstance(p, Constraint)]

    def soft(self) -> list[Constraint]:
        r"""The soft constraints (penalties) recorded for the tensor on its module."""
        return self.module.__dict__.get(SOFT_ATTRIBUTE, {}).get(self.tensor_name, [])

    def everything(self) -> list[Constraint]:
        r"""Parametrizations then soft constraints: all torchconstrain has on the tensor."""
        return self.constraints() + self.soft()


@contextmanager
def foreign_buffers_kept(chain):
    r"""Restore the buffers of the parametrizations in ``chain`` that are not torchconstrain's
    (``spectral_norm``'s power-iteration vectors) when the block ends, whatever it did to them."""
    foreign = [p for p in chain if not isinstance(p, Constraint)]
    saved = [(buffer, buffer.detach().clone()) for p in foreign for buffer in p.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def parameter_slots(model: nn.Module) -> dict[str, Slot]:
    r"""Return every parameter of ``model`` by its user-facing name, in model order.

    A parametrized tensor appears under its plain name (``features.0.0.weight``), not as
    ``...parametrizations.weight.original``; state inside parametrizations (a learnable
    mask's scores) is not a candidate.
    """
    slots: dict[str, Slot] = {}
    hidden: set[int] = set()
    for module_name, module in model.named_modules():
        if id(module) in hidden:
            continue
        if parametrize.is_parametrized(module):
            hidden.update(id(m) for m in module.parametrizations.modules())
        for tensor_name in _tensor_names(module):
            fqn = f"{module_name}.{tensor_name}" if module_name else tensor_name
            slots[fqn] = Slot(fqn, module_name, module, tensor_name)
    return slots


def _tensor_names(module: nn.Module) -> list[str]:
    """The module's parameters and parametrized tensors, in the order they had when plain."""
    names = [name for name, p in module._parameters.items() if p is not None]
    if not parametrize.is_parametrized(module):
        return names
    plists = module.parametrizations
    names += [name for name in plists if plists[name].is_tensor]
    order = getattr(plists, "plain_order", [])
    rank = {name: i for i, name in enumerate(order)}
    return sorted(names, key=lambda name: rank.get(name, len(order)))


def tied_slots(slots) -> dict[str, tuple[Slot, ...]]:
    r"""Map each slot's name to every slot holding the same stored tensor, in model order.

    The first slot of a group is where a tied tensor's constraints are registered; a
    tensor with one name maps to a group of one.
    """
    groups: dict[int, list[Slot]] = {}
    for slot in slots:
        groups.setdefault(id(slot.stored()), []).append(slot)
    return {slot.fqn: tuple(group) for group in groups.values() for slot in group}


def constrained_groups(model: nn.Module) -> list[tuple[Slot, ...]]:
    r"""Return the stored tensors of ``model`` that carry torchconstrain constraints, one
    group of names per tensor (see :func:`tied_slots`), in model order."""
    groups = dict.fromkeys(tied_slots(parameter_slots(model).values()).values())
    constrained = [group for group in groups if any(slot.everything() for slot in group)]
    for group in constrained:
        _refuse_split_tie(group)
    return constrained


def _refuse_split_tie(group: tuple[Slot, ...]) -> None:
    """Raise where some names of one tied ``Parameter`` carry its constraints and others read
    it without them (``constrain`` was given a module that holds only some of its names)."""
    bare = [slot.fqn for slot in group if not slot.constraints()]
    held = [slot.fqn for slot in group if slot.constraints()]
    if bare and held:
        raise ValueError(
            f"{held[0]}: its Parameter is also {', '.join(bare)}, which reads it without the "
            f"constraints: constrain() was given a module that holds only some of its names. "
            f"Expected the constraints under every name: bake the module that was constrained, "
            f"then constrain the model that holds all of them."
        )


def constrained_slots(model: nn.Module) -> list[Slot]:
    r"""Return the tensors of ``model`` that carry at least one torchconstrain constraint,
    each tied tensor once, under its first name."""
    return [group[0] for group in constrained_groups(model)]


def describe(constraint: nn.Module) -> str:
    r"""``Clamp(min=-1, max=1)``: the constraint's class and its ``extra_repr`` (on a meta
    model, the values it was bound with)."""
    shown = constraint.with_values() if isinstance(constraint, Constraint) else constraint
    return f"{type(constraint).__name__}({shown.extra_repr()})"


def module_hooks(module: nn.Module) -> tuple[dict, ...]:
    r"""The dicts that hold ``module``'s own forward and backward hooks (an old-style
    ``weight_norm`` is a forward pre-hook)."""
    return (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
