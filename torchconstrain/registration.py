r"""Registering and removing torchconstrain's parametrizations, and the class each module gets.

Every module torchconstrain parametrizes gets a class of its own (``Parametrized<Cls>``,
built from the one :mod:`torch.nn.utils.parametrize` makes) with three additions:

- ``_load_from_state_dict`` accepts a plain key (``weight``) for a parametrized tensor: the
  value goes through the first parametrization's ``right_inverse`` into the stored
  original, and the constraints' own state (masks, bounds, scores) stays as it is in the
  model (see :mod:`torchconstrain.checkpoint`);
- ``__reduce_ex__`` / ``__setstate__``, so that ``torch.save(model)`` and pickling work
  (plain ``parametrize`` refuses them), rebuilding the class on load;
- ``__deepcopy__``, which gives the copy a class of its own.

Each parametrized tensor's property comes from :func:`torchconstrain.fastpath.install`.

A tied tensor (one ``Parameter`` under several names) is constrained once: its
parametrizations are registered under its first name, and :func:`share` puts that very
``ParametrizationList`` under each other name too. So every name has one stored original
and one set of constraint modules, and reads exactly what ``parametrize`` computes for the
first name: the same module called on the same original. The ``state_dict`` shows the
chain under every name, as it shows a plain tied ``Parameter`` under every name, and
removing the last constraint gives every owner the original ``Parameter`` object back.
"""

from __future__ import annotations

import copy
import sys

from torch import nn
from torch.nn.utils import _named_member_accessor, parametrize

import torchconstrain._tracked as _tracked
import torchconstrain.fastpath as fastpath
from torchconstrain._tensors import SOFT_ATTRIBUTE, Slot
from torchconstrain.checkpoint import load_plain_keys
from torchconstrain.constraints.base import Constraint

__all__ = []  # used by constrain and bake

_OWNERS = "_torchconstrain_owners"  # on a ParametrizationList that several names share


def register(slot: Slot, constraint: Constraint) -> None:
    r"""Append ``constraint`` to the tensor's chain, or a soft one to its module's record.

    The module's first parametrization records its plain parameter order, so that
    removing parametrizations restores the ``state_dict`` key order."""
    if getattr(constraint, "soft", False):
        record = slot.module.__dict__.setdefault(SOFT_ATTRIBUTE, {})
        record.setdefault(slot.tensor_name, []).append(constraint)
        return
    order = None if parametrize.is_parametrized(slot.module) else list(slot.module._parameters)
    _own_class(slot.module)
    with slot.foreign_buffers_kept():  # registering evaluates the chain there is
        parametrize.register_parametrization(slot.module, slot.tensor_name, constraint)
    fastpath.install(slot.module, slot.tensor_name)
    if order is not None:
        slot.module.parametrizations.plain_order = order
        _own_class(slot.module)


def share(slot: Slot, alias: Slot) -> None:
    r"""Make ``alias``, another name of ``slot``'s stored ``Parameter``, read through
    ``slot``'s chain: the same ``ParametrizationList`` object, registered under ``alias``."""
    plist = slot.module.parametrizations[slot.tensor_name]
    module, name = alias.module, alias.tensor_name
    if module._parameters.get(name) is not plist.original:
        raise AssertionError(f"{alias.fqn} is not the Parameter stored for {slot.fqn}")
    order = None if parametrize.is_parametrized(module) else list(module._parameters)
    _own_class(module)
    del module._parameters[name]
    if order is not None:
        parametrize._inject_new_class(module)
        module.parametrizations = nn.ModuleDict()
    module.parametrizations[name] = plist
    plist.__dict__[_OWNERS] = owners(plist) + 1
    if not isinstance(plist._parameters, _TiedOriginal):
        plist.__dict__["_parameters"] = _TiedOriginal(plist._parameters)
    fastpath.install(module, name)
    if order is not None:
        module.parametrizations.plain_order = order
        _own_class(module)


class _TiedOriginal(dict):
    """The ``_parameters`` of a ``ParametrizationList`` several names share, so that torch's
    swaps of the stored original (``torch.func.functional_call``, ``torch.export``) put back
    what they found.

    With ``tie_weights=True`` (functional_call's default) torch swaps the given tensor in
    under every tied name in turn, reading what each name holds and writing the tensor.
    Through one shared dict the second name would read the tensor the first has just
    written, and put that back last: the model would keep it for good (and the optimizer's
    ``Parameter`` would be out of the model). So a read by the same swap call
    (``swap_tensors_dict``) that wrote a tensor not in the model gives the tensor that write
    replaced; any other read (a later swap putting things back, the forward) sees what is
    there. The same swap call writing a different tensor under another of the names
    (``tie_weights=False`` with a value per name) is refused: one constrained tensor cannot
    hold two values."""

    def __init__(self, parameters: dict) -> None:
        super().__init__(parameters)
        self.settled = parameters.get("original")  # the last value not written by a swap
        self.replaced = None  # (swap call, written, replaced) by the last swap of a tensor not in the model

    def __getitem__(self, name: str):
        value = super().__getitem__(name)
        if self.replaced is not None and value is self.replaced[1] and self.replaced[0] is _swap_call():
            return self.replaced[2]  # (the frame is looked up only then: torch.compile cannot trace it)
        return value

    def __setitem__(self, name: str, value) -> None:
        call, current = _swap_call(), self.get(name)
        if call is None:
            self.settled, self.replaced = value, None
        elif name == "original" and value is not current and value is not self.settled:
            if self.replaced is not None and self.replaced[0] is call:
                raise ValueError(
                    "swapping tensors into the model (torch.func.functional_call): two different tensors for one "
                    "constrained tensor that several names share (tied weights). Expected one value for all its "
                    "names: pass it under one name, or the same tensor under each, or tie_weights=True."
                )
            self.replaced = (call, value, current)
        elif value is self.settled:
            self.replaced = None  # put back
        super().__setitem__(name, value)


def _swap_call():
    """The frame of torch's ``swap_tensors_dict`` call that reaches a ``_TiedOriginal`` method
    through ``swap_tensor`` (``None`` for any other access)."""
    frame = sys._getframe(2)
    if frame.f_code is not _named_member_accessor.swap_tensor.__code__:
        return None
    caller = frame.f_back.f_back  # NamedMemberAccessor.swap_tensor, then its caller
    return caller if caller is not None else frame


def owners(plist: nn.Module) -> int:
    r"""How many names read through ``plist``: 1, or more for a tied tensor (see :func:`share`)."""
    return plist.__dict__.get(_OWNERS, 1)


def shares(slot: Slot, alias: Slot) -> bool:
    r"""Whether ``alias`` reads through ``slot``'s chain (see :func:`share`)."""
    return (
        parametrize.is_parametrized(slot.module, slot.tensor_name)
        and parametrize.is_parametrized(alias.module, alias.tensor_name)
        and alias.module.parametrizations[alias.tensor_name] is slot.module.parametrizations[slot.tensor_name]
    )


def drop_entries(slot: Slot, indices: list[int], aliases: tuple[Slot, ...] = ()) -> None:
    r"""Remove the parametrizations at ``indices`` from the tensor's chain, keeping the
    stored original as it is. The last removal turns the tensor back into a plain one,
    keeping the ``Parameter`` object, under its own name and each of ``aliases`` that
    shares the chain."""
    plist = slot.module.parametrizations[slot.tensor_name]
    for index in sorted(indices, reverse=True):
        del plist[index]
    if len(plist) == 0:
        for alias in aliases:
            if shares(slot, alias):
                _unparametrize(alias)
        _unparametrize(slot)


def _unparametrize(slot: Slot) -> None:
    """Put the stored original back as the module's plain parameter, in its old place."""
    _own_class(slot.module)
    order = getattr(slot.module.parametrizations, "plain_order", None)
    parametrize.remove_parametrizations(slot.module, slot.tensor_name, leave_parametrized=False)
    _tracked.untrack(slot.module._parameters.get(slot.tensor_name))
    if order is not None:
        _restore_order(slot.module._parameters, order)


def drop_soft(slot: Slot, keep: int = 0) -> None:
    r"""Forget the tensor's soft constraints after the first ``keep``."""
    record = slot.module.__dict__.get(SOFT_ATTRIBUTE, {})
    if slot.tensor_name not in record:
        return
    del record[slot.tensor_name][keep:]
    if not record[slot.tensor_name]:
        del record[slot.tensor_name]
    if not record:
        del slot.module.__dict__[SOFT_ATTRIBUTE]


def _restore_order(parameters: dict, order: list[str]) -> None:
    rank = {name: i for i, name in enumerate(order)}
    items = sorted(parameters.items(), key=lambda item: rank.get(item[0], len(order)))
    parameters.clear()
    parameters.update(items)


# --- the class of a parametrized module -------------------------------------------------


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its properties change.

    ``parametrize`` generates one ``Parametrized<Cls>`` class per module, but its
    ``copy.deepcopy`` shares it between a module and its copy: removing a property from the
    copy's class would remove it from the original's too. The new class also loads plain
    checkpoints, pickles and deep-copies into a class of its own.
    """
    cls = type(module)
    if parametrize.is_parametrized(module):
        module.__class__ = type(cls.__name__, cls.__bases__, _class_dict(cls))


def _class_dict(cls: type) -> dict:
    """The namespace of torchconstrain's class for a module whose parametrized class is ``cls``."""
    return {**cls.__dict__, **_methods(cls.__bases__[0])}


def _methods(base: type) -> dict:
    methods = {
        "__getstate__": _getstate,
        "__reduce_ex__": _reduce_ex,
        "__setstate__": _setstate,
        "_load_from_state_dict": _load_from_state_dict,
    }
    if not hasattr(base, "__deepcopy__"):
        methods["__deepcopy__"] = _deepcopy
    return methods


def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
    load_plain_keys(self, state_dict, prefix)
    super(type(self), self)._load_from_state_dict(state_dict, prefix, *args)


def _getstate(self) -> dict:
    return type(self).__bases__[0].__getstate__(self)


def _reduce_ex(self, protocol):
    return _rebuild, (type(self).__bases__[0],), self.__getstate__()


def _setstate(self, state: dict) -> None:
    type(self).__bases__[0].__setstate__(self, state)
    for tensor_name in self.parametrizations:
        if tensor_name not in type(self).__dict__:
            fastpath.install(self, tensor_name)


def _deepcopy(self, memo: dict):
    replica = _rebuild(type(self).__bases__[0])
    memo[id(self)] = replica
    _setstate(replica, copy.deepcopy(self.__dict__, memo))
    return replica


def _rebuild(base: type) -> nn.Module:
    """A bare instance of a fresh ``Parametrized<base>`` class; ``_setstate`` completes it."""
    cls = type(f"Parametrized{base.__name__}", (base,), _methods(base))
    return cls.__new__(cls)
