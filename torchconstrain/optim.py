r"""Optimizer param groups for constrained models, and what an optimizer is missing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchconstrain._tensors import Slot, parameter_slots, tied_slots
from torchconstrain.constraints.base import Constraint
from torchconstrain.errors import warn_at_caller
from torchconstrain.keys import matcher, no_match_message

__all__ = ["param_groups", "unoptimized"]

SCORES = {"weight_decay": 0.0}


def param_groups(model: nn.Module, rules: Mapping | Sequence = (), *, scores: Mapping | None = None,
                 strict: bool = True) -> list[dict]:
    r"""Build optimizer param groups: options by rule, learnable-mask scores on their own.

    ``rules`` maps rule keys (as in :func:`~torchconstrain.constrain`: names, globs,
    ``"re:"`` regexes, module types, callables, matched against plain parameter names) to
    dicts of optimizer options such as ``{"weight_decay": 1e-2}``. Every matching rule
    applies, in rule order, later ones overriding earlier ones. Parameters that constraints
    own (a :class:`~torchconstrain.LearnableMask`'s ``scores``) are never matched by rules:
    they go into one group with the ``scores`` options, which default to
    ``{"weight_decay": 0.0}`` (decay would pull every gate towards 0.5, fighting the
    sparsity penalty). The parameters inside another library's parametrization (``weight_norm``'s
    ``original0`` and ``original1``) take the rules for the tensor it computes (``"0.weight"``).
    Parameters with the same matching rules share a group; groups come
    in model order and options not given fall back to the optimizer's defaults. A tied
    ``Parameter`` (several names, one tensor) appears once, with the rules that match any
    of its names.

    Args:
        model: the model, constrained or not.
        rules: ``{key: options}`` or a sequence of ``(key, options)`` pairs.
        scores: options for the constraints' own parameters, merged over
            ``{"weight_decay": 0.0}``.
        strict: raise when a rule matches nothing.

    Returns:
        A list of ``{"params": [...], **options}`` dicts for a ``torch.optim`` optimizer.

    Raises:
        TypeError: options that are not a dict, or that contain ``"params"``.
        ValueError: a rule matches nothing (with ``strict``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import LearnableMask, constrain, param_groups
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = constrain(model, {"2": LearnableMask()})
        >>> groups = param_groups(model, {"*": {"weight_decay": 0.0}, "0.weight": {"weight_decay": 0.1}},
        ...                       scores={"lr": 0.1})
        >>> [(len(g["params"]), g["weight_decay"], g.get("lr")) for g in groups]
        [(1, 0.1, None), (3, 0.0, None), (1, 0.0, 0.1)]
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-3)
    """
    parsed = _parse(rules)
    by_id = {id(group[0].stored()): group for group in tied_slots(parameter_slots(model).values()).values()}
    by_id = {**_computed_from(model), **by_id}
    owned = {id(p) for m in model.modules() if isinstance(m, Constraint) for p in m.parameters(recurse=False)}
    groups: dict[tuple, dict] = {}
    used = set()
    for param in model.parameters():
        if id(param) in owned:
            key, options = ("scores",), {**SCORES, **(scores or {})}
        else:
            key, options = _rule_options(parsed, by_id.get(id(param), ()))
            used.update(key)
        groups.setdefault(key, {"params": [], **options})["params"].append(param)
    if strict:
        _refuse_unused(parsed, used, model)
    return list(groups.values())


def _computed_from(model: nn.Module) -> dict[int, tuple[Slot, ...]]:
    """The parameters inside parametrizations, by id, each with the tensor it computes: the
    rules for that tensor reach them (``weight_norm``'s two originals, or a parametrization's
    own parameters, which have no name of their own that a rule could use)."""
    found: dict[int, tuple[Slot, ...]] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in module.parametrizations.items():
            fqn = f"{module_name}.{tensor_name}" if module_name else tensor_name
            for param in chain.parameters():
                found.setdefault(id(param), (Slot(fqn, module_name, module, tensor_name),))
    return found


def unoptimized(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    r"""Return the names of ``model``'s trainable parameters that ``optimizer`` does not update.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import LearnableMask, constrain, unoptimized
        >>> model = nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> _ = constrain(model, {"weight": LearnableMask()})
        >>> unoptimized(model, optimizer)
        ['parametrizations.weight.0.scores']
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]


def warn_unoptimized(model: nn.Module, optimizer: torch.optim.Optimizer, before: set[int]) -> None:
    r"""Warn about parameters created since ``before`` (ids) that ``optimizer`` lacks."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in model.named_parameters() if id(p) not in before | held and p.requires_grad]
    if missing:
        warn_at_caller(
            f"constrain: {len(missing)} parameter(s) it created are not in the optimizer, so they "
            f"will not train: {', '.join(missing)}. Add them with optimizer.add_param_group("
            "{'params': [...], 'weight_decay': 0.0}), or build the optimizer after constrain "
            "(torchconstrain.param_groups puts them in a group of their own)."
        )


def _parse(rules) -> list[tuple[int, object, dict, object]]:
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    parsed = []
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2):
            raise TypeError(f"param_groups: rule {index} must be a (key, options) pair. Got {pair!r}.")
        key, options = pair
        if not isinstance(options, Mapping) or "params" in options:
            raise TypeError(
                f"param_groups: rule {index} ({key}) options must be a dict of optimizer settings "
                f"without 'params', such as {{'weight_decay': 0.01}}. Got {options!r}."
            )
        parsed.append((index, key, dict(options), matcher(key, index, caller="param_groups")))
    return parsed


def _rule_options(parsed, names: tuple[Slot, ...]) -> tuple[tuple, dict]:
    matched = [rule for rule in parsed if any(rule[3](slot) for slot in names)]
    options = {}
    for rule in matched:
        options.update(rule[2])
    return tuple(rule[0] for rule in matched), options


def _refuse_unused(parsed, used: set, model: nn.Module) -> None:
    slots = parameter_slots(model)
    for index, key, _, _ in parsed:
        if index not in used:
            raise ValueError(no_match_message(key, index, slots, caller="param_groups", model=model))
