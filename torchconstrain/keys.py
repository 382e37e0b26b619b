r"""Rule keys: how a key picks tensors of a model, shared by every function that takes rules.

A key is an exact parameter name (or a module name, meaning that module's ``weight``), a
glob with ``* ? [ ]``, ``"re:<regex>"`` (full-matched), an ``nn.Module`` subclass (the
``weight`` of every module of that type) or a callable ``(fqn, module) -> bool``. Keys
are matched against :func:`~torchconstrain._tensors.parameter_slots`: plain parameter
names, never the state inside constraints.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable

from torch import nn
from torch.nn.utils import parametrize

from torchconstrain._tensors import Slot, parameter_slots

__all__ = ["match"]


def match(model: nn.Module, key) -> list[str]:
    r"""Return the names of the parameters that rule ``key`` picks in ``model``.

    Example:
        >>> from torch import nn
        >>> from torchconstrain import match
        >>> match(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "*.bias")
        ['0.bias', '1.bias']
    """
    matches = matcher(key, 0)
    return [fqn for fqn, slot in parameter_slots(model).items() if matches(slot)]


def matcher(key, index: int, *, caller: str = "constrain") -> Callable[[Slot], bool]:
    r"""Return the predicate on slots that ``key``, rule ``index`` of ``caller``, stands for.

    Raises:
        TypeError: a key of an unsupported type, or a class that is not an ``nn.Module``.
        ValueError: a ``"re:"`` key that is not a valid regex.
    """
    if isinstance(key, str):
        return _name_matcher(key, index, caller)
    if isinstance(key, type):
        if not issubclass(key, nn.Module):
            raise TypeError(f"{caller}: rule {index} key {key.__name__} is a class but not an nn.Module subclass.")
        return lambda slot: slot.tensor_name == "weight" and isinstance(slot.module, key)
    if callable(key):
        return lambda slot: bool(key(slot.fqn, slot.module))
    raise TypeError(
        f"{caller}: rule {index} key must be a name, glob, 're:' regex, nn.Module subclass "
        f"or callable (fqn, module) -> bool. Got {type(key).__name__}: {key!r}."
    )


def _name_matcher(key: str, index: int, caller: str) -> Callable[[Slot], bool]:
    if key.startswith("re:"):
        try:
            pattern = re.compile(key[3:])
        except re.error as error:
            raise ValueError(f"{caller}: rule {index} ({key}) is not a valid regex: {error}.") from None
        return lambda slot: pattern.fullmatch(slot.fqn) is not None
    if any(char in key for char in "*?["):
        return lambda slot: fnmatch.fnmatchcase(slot.fqn, key)
    return lambda slot: slot.fqn == key or (slot.module_name == key and slot.tensor_name == "weight")


def label(key) -> str:
    r"""How messages name ``key``: the string itself, else the class's or callable's ``__name__``."""
    return key if isinstance(key, str) else getattr(key, "__name__", repr(key))


def no_match_message(key, index: int, slots: dict[str, Slot], *, caller: str = "constrain") -> str:
    r"""The error for rule ``index`` whose ``key`` matches none of ``slots``, with the closest names."""
    message = f"{caller}: rule {index} ({label(key)}) matches no parameter."
    if isinstance(key, str):
        candidates = list(slots) + sorted({s.module_name for s in slots.values() if s.module_name})
        close = difflib.get_close_matches(key.removeprefix("re:"), candidates, n=3, cutoff=0.5)
        if close:
            message += f" Closest names: {', '.join(close)}."
    elif isinstance(key, type):
        kinds = sorted({parametrize.type_before_parametrizations(s.module).__name__ for s in slots.values()})
        message += f" Module types with parameters: {', '.join(kinds)}."
    return message + " Pass strict=False to allow rules that match nothing."
