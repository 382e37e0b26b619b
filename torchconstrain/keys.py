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
import inspect
import re
from collections.abc import Callable

from torch import Tensor, nn
from torch.nn.utils import parametrize

from torchconstrain._tensors import Slot, parameter_slots

__all__ = ["match"]


def match(model: nn.Module, key, *, caller: str = "match") -> list[str]:
    r"""Return the names of the parameters that rule ``key`` picks in ``model``.

    ``caller`` names the function in error messages (a bad key, a callable key that raises).

    Example:
        >>> from torch import nn
        >>> from torchconstrain import match
        >>> match(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "*.bias")
        ['0.bias', '1.bias']
    """
    matches = matcher(key, None, caller=caller)
    return [fqn for fqn, slot in parameter_slots(model).items() if matches(slot)]


def matcher(key, index: int | str | None, *, caller: str = "constrain") -> Callable[[Slot], bool]:
    r"""Return the predicate on slots that ``key``, rule ``index`` of ``caller``, stands for
    (``index`` may be the rule's name in messages, or ``None`` for a lone key).

    Raises:
        TypeError: a key of an unsupported type, or a class that is not an ``nn.Module``.
        ValueError: a ``"re:"`` key that is not a valid regex.
    """
    if isinstance(key, str):
        return _name_matcher(key, index, caller)
    if isinstance(key, type):
        if not issubclass(key, nn.Module):
            raise TypeError(f"{caller}: {_key_of(index)} {key.__name__} is a class but not an nn.Module subclass.")
        return lambda slot: slot.tensor_name == "weight" and isinstance(slot.module, key)
    if isinstance(key, nn.Module):
        kind = type(key).__name__
        raise TypeError(
            f"{caller}: {_key_of(index)} is a module instance ({kind}), not a key. Use its name in "
            f"the model (such as 'features.0'), or the class {kind} for every module of that type."
        )
    if callable(key):
        where = f"{caller}: {_rule(index)} ({label(key)})" + (" key" if index is not None else "")
        check_arity(key, ("fqn", "module"), where)
        return lambda slot: _picks(key, slot, where)
    raise TypeError(
        f"{caller}: {_key_of(index)} must be a name, glob, 're:' regex, nn.Module subclass "
        f"or callable (fqn, module) -> bool. Got {type(key).__name__}: {key!r}."
    )


def _rule(index: int | str | None) -> str:
    """How messages name rule ``index``: ``"rule 2"``; a string names it itself (a rules
    file's ``"rules.yaml, rule 2 (line 7)"``); ``None`` is a lone key."""
    if index is None:
        return "key"
    return index if isinstance(index, str) else f"rule {index}"


def _key_of(index: int | str | None) -> str:
    return "key" if index is None else f"{_rule(index)} key"


def _name_matcher(key: str, index: int | str | None, caller: str) -> Callable[[Slot], bool]:
    if key.startswith("re:"):
        try:
            pattern = re.compile(key[3:])
        except re.error as error:
            raise ValueError(f"{caller}: {_rule(index)} ({key}) is not a valid regex: {error}.") from None
        return lambda slot: pattern.fullmatch(slot.fqn) is not None
    if any(char in key for char in "*?["):
        return lambda slot: fnmatch.fnmatchcase(slot.fqn, key)
    return lambda slot: slot.fqn == key or (slot.module_name == key and slot.tensor_name == "weight")


def _picks(key: Callable, slot: Slot, where: str) -> bool:
    with origin_named(f"{where}, called on {slot.fqn!r}"):
        picked = key(slot.fqn, slot.module)
    if isinstance(picked, Tensor):
        raise TypeError(
            f"{where} must return True or False for each tensor. Got a tensor of shape "
            f"{tuple(picked.shape)} for {slot.fqn!r}."
        )
    with origin_named(f"{where}, the truth of its result for {slot.fqn!r}"):
        return bool(picked)


def check_arity(function: Callable, arguments: tuple[str, ...], where: str) -> None:
    r"""Refuse a callable that cannot be called with ``arguments`` (their names, for the message).

    Raises:
        TypeError: naming ``where`` and the expected call.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin without a signature: calling it will tell
    try:
        signature.bind(*arguments)
    except TypeError as error:
        raise TypeError(
            f"{where} must be callable as ({', '.join(arguments)}). Got "
            f"{getattr(function, '__name__', type(function).__name__)}{signature}: {error}."
        ) from None


class renamed_errors:
    r"""Context manager: an exception raised in the block is raised again as ``rename(error)``,
    chained from it (unless the new one suppresses its context: ``raise ... from None``).

    A class, not a ``contextlib.contextmanager`` generator: that one lets an exception
    chained from a ``StopIteration`` (a user's ``next()`` on an empty iterator) escape as
    the bare ``StopIteration``, its message lost."""

    def __init__(self, rename: Callable[[Exception], Exception]) -> None:
        self.rename = rename

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if not isinstance(error, Exception):
            return False
        renamed = self.rename(error)
        if renamed.__suppress_context__:
            raise renamed
        raise renamed from error


def origin_named(where: str) -> renamed_errors:
    r"""Re-raise an exception raised in the block (a user's callable) as one of the same type
    whose message starts with ``where``, the original as its ``__cause__``."""
    return renamed_errors(lambda error: same_kind(error, f"{where} raised {type(error).__name__}: {error}"))


def same_kind(error: Exception, message: str) -> Exception:
    r"""An exception of ``error``'s type with ``message``, or a RuntimeError where that type
    does not take a message (or shows it otherwise, as KeyError quotes it), or is a
    ``StopIteration``, which Python turns into "generator raised StopIteration" when it
    leaves a generator (the context managers that call this are ones)."""
    if isinstance(error, (StopIteration, StopAsyncIteration)):
        return RuntimeError(message)
    try:
        made = type(error)(message)
    except Exception:
        return RuntimeError(message)
    return made if str(made) == message else RuntimeError(message)


def label(key) -> str:
    r"""How messages name ``key``: the string itself, else the class's or callable's ``__name__``."""
    return key if isinstance(key, str) else getattr(key, "__name__", repr(key))


def no_match_message(
    key,
    index: int | str | None,
    slots: dict[str, Slot],
    *,
    caller: str = "constrain",
    model: nn.Module | None = None,
    strict_hint: bool = True,
) -> str:
    r"""The error for rule ``index`` (``None``: a lone key) whose ``key`` matches none of ``slots``, with the closest
    names, or, for modules of ``model`` the key names that have no plain ``weight``, what
    their tensors are (an LSTM's ``weight_ih_l0``, another library's parametrization)."""
    message = f"{caller}: {_rule(index)} ({label(key)}) matches no parameter."
    reused = _first_name_of_a_reused_module(model, key)
    named = _named_modules(model, key)
    if reused:
        message += (f" {key!r} names a module used twice in the model: its tensors go by its first "
                    f"name. Use {reused!r}.")
    elif named:
        message += " " + _weight_hint(*named[0])
    elif isinstance(key, str) and _names_a_buffer(model, key):
        buffer = _names_a_buffer(model, key)
        message += (f" {key!r} names a buffer{'' if buffer == key else f' ({buffer})'}: constraints apply to "
                    "parameters, which the optimizer trains.")
    elif isinstance(key, str) and _wrapped_name(model, key):
        wrapper, prefix = _wrapped_name(model, key)
        message += (f" The model wraps another ({wrapper}), and its names start with {prefix!r}: constrain the "
                    f"model it wraps before wrapping it (or start the key's names with {prefix!r}).")
    elif isinstance(key, str):
        candidates = list(slots) + sorted({s.module_name for s in slots.values() if s.module_name})
        close = difflib.get_close_matches(key.removeprefix("re:"), candidates, n=3, cutoff=0.5)
        if close:
            message += f" Closest names: {', '.join(close)}."
    elif isinstance(key, type):
        kinds = sorted({parametrize.type_before_parametrizations(s.module).__name__ for s in slots.values()})
        message += f" Module types with parameters: {', '.join(kinds)}."
    return message + (" Pass strict=False to allow rules that match nothing." if strict_hint else "")


def _names_a_buffer(model: nn.Module | None, key: str) -> str | None:
    """The first buffer of ``model`` a plain or glob ``key`` names (``"1.running_mean"``), or None."""
    if model is None or key.startswith("re:"):
        return None
    return next((name for name, _ in model.named_buffers() if fnmatch.fnmatchcase(name, key)), None)


def _wrapped_name(model: nn.Module | None, key: str) -> tuple[str, str] | None:
    """``(wrapper, prefix)`` when ``model`` is an ``nn.DataParallel`` or ``torch.compile``
    wrapper and ``key`` names one of the wrapped model's tensors or modules, else None."""
    if isinstance(model, nn.DataParallel):
        wrapper, prefix = "nn.DataParallel", "module."
    elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        wrapper, prefix = "torch.compile", "_orig_mod."
    else:
        return None
    inner = model.module if prefix == "module." else model._orig_mod
    names = [name for name, _ in inner.named_parameters()] + [name for name, _ in inner.named_modules()]
    if key.startswith("re:"):
        found = any(re.fullmatch(key[3:], name) for name in names)
    else:
        found = any(fnmatch.fnmatchcase(name, key) for name in names)
    return (wrapper, prefix) if found else None


def _first_name_of_a_reused_module(model: nn.Module | None, key) -> str | None:
    """The first name of the module ``key`` names under a later one (a module used twice,
    ``Sequential(layer, act, layer)``, whose parameters go by their first name), or None."""
    if model is None or not isinstance(key, str):
        return None
    first = {}
    for name, module in model.named_modules(remove_duplicate=False):
        first.setdefault(id(module), name)
        if name in (key, key.rpartition(".")[0]) and first[id(module)] != name:
            return first[id(module)] + key[len(name):]
    return None


def _named_modules(model: nn.Module | None, key) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that ``key`` names for their ``weight``: those of a type key,
    or the module a name key (``"lstm"`` or ``"lstm.weight"``) stands for."""
    if model is None:
        return []
    if isinstance(key, type):
        return [(name, m) for name, m in model.named_modules() if isinstance(m, key)]
    if isinstance(key, str):
        modules = dict(model.named_modules())
        return [(name, modules[name]) for name in dict.fromkeys((key, key.removesuffix(".weight"))) if name in modules]
    return []


def _weight_hint(name: str, module: nn.Module) -> str:
    """Why ``module`` (named ``name``) has no ``weight`` that a key can pick."""
    kind = parametrize.type_before_parametrizations(module).__name__
    where = f"{name} ({kind})" if name else f"The model ({kind})"
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        originals = sorted(n for n, _ in plist.named_parameters(recurse=False))
        return (
            f"{where}: weight is under {', '.join(type(p).__name__ for p in plist)}, another library's "
            f"parametrization with {len(originals)} stored originals ({', '.join(originals)}); "
            "torchconstrain constrains tensors stored as one. Remove it first "
            "(torch.nn.utils.parametrize.remove_parametrizations) or register it after constrain()."
        )
    hooks = [type(h).__name__ for h in module._forward_pre_hooks.values() if getattr(h, "name", None) == "weight"]
    tensors = [n for n, p in module.named_parameters(recurse=False)]
    if hooks:
        sources = [n for n in tensors if n.startswith("weight")]
        return (
            f"{where}: weight is computed before each forward by the {hooks[0]} hook "
            f"(torch.nn.utils.{_hook_function(hooks[0])}) from {', '.join(sources)}. Constrain those by name, "
            "or use the parametrization form (torch.nn.utils.parametrizations) registered after constrain()."
        )
    prefix = f"{name}." if name else ""
    if not tensors:
        return f"{where} has no parameters of its own."
    return (
        f"{where} has no tensor named 'weight' (a type or module key picks a module's weight); its tensors "
        f"are {', '.join(tensors)}. Pick them by name: '{prefix}{tensors[0]}', or a glob such as '{prefix}*weight*'."
    )


def _hook_function(hook: str) -> str:
    return {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm"}.get(hook, hook)
