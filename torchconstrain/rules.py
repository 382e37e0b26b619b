r"""Rules pick tensors of a model; ``constrain`` puts constraints on them."""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torchconstrain._tensors import (
    Slot,
    describe,
    drop_entries,
    drop_soft,
    parameter_slots,
    register,
)
from torchconstrain.checkpoint import watch
from torchconstrain.constraints.base import Constraint
from torchconstrain.optim import warn_unoptimized
from torchconstrain.report import Report

__all__ = ["constrain", "match"]

EXISTING = ("error", "stack")


@dataclass
class _Rule:
    index: int
    key: object
    value: object
    matches: Callable[[Slot], bool] = field(repr=False)

    def __str__(self) -> str:
        key = self.key if isinstance(self.key, str) else getattr(self.key, "__name__", repr(self.key))
        return f"rule {self.index} ({key})"


@dataclass
class _Planned:
    slot: Slot
    constraints: list[Constraint] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)


def constrain(
    model: nn.Module,
    rules: Mapping | Sequence,
    *,
    strict: bool = True,
    existing: str = "error",
    optimizer: torch.optim.Optimizer | None = None,
) -> Report:
    r"""Put constraints on the tensors of ``model`` that ``rules`` pick. Modifies ``model`` in place.

    ``rules`` is a dict, a sequence of ``(key, value)`` pairs, or the path of a YAML or
    JSON rules file (see :mod:`torchconstrain.rulesfile`). A **key** picks tensors:

    - an exact parameter name (``"features.0.0.weight"``), or a module name, meaning that
      module's ``weight``;
    - a glob with ``* ? [ ]``, matched against parameter names (``"features.*.weight"``);
    - ``"re:<regex>"``, full-matched against parameter names;
    - an ``nn.Module`` subclass: the ``weight`` of every module of that type;
    - a callable ``(fqn, module) -> bool``, called for every parameter with the module
      that owns it.

    A **value** says what to do with them:

    - a :class:`Constraint`: a template, each matched tensor gets its own fresh copy;
    - a list of constraints, stacked in order;
    - a callable ``(fqn, tensor) -> constraint, list or None`` (``None``: nothing);
    - ``None``: exclude the matched tensors from every other rule.

    Every matching rule applies, in rule order (constraints are a conjunction), and
    ``None`` wins over all. Parameter names are the plain ones even on a parametrized
    model, and state inside constraints (a mask's scores) is never matched.

    Everything is validated before the model is touched: when this raises, the model is
    exactly as it was.

    Afterwards ``model.load_state_dict`` takes constrained checkpoints and plain ones (plain
    values go through the constraints' ``right_inverse``; masks, bounds and scores stay),
    and refuses a checkpoint that does not fit before copying anything; ``torch.save(model)``
    works. See :mod:`torchconstrain.checkpoint`.

    Args:
        model: the model to constrain.
        rules: the rules, as above.
        strict: raise when a rule matches nothing.
        existing: what to do with a tensor that already has torchconstrain constraints:
            ``"error"`` (default) refuses, ``"stack"`` adds the new ones on top.
        optimizer: an optimizer built before this call. Constraints with learnable state
            (a :class:`~torchconstrain.LearnableMask`'s ``scores``) create new parameters
            that it does not hold; a ``UserWarning`` names them.

    Returns:
        A :class:`~torchconstrain.report.Report` with one row per newly constrained tensor.

    Raises:
        TypeError: a key or value of an unsupported type.
        ValueError: a rule matches nothing (with ``strict``), a constraint does not fit
            its tensor, constraints contradict each other, or a tensor is already
            constrained (with ``existing="error"``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import Clamp, FixedMask, constrain
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> report = constrain(model, {
        ...     "0": Clamp(-0.5, 0.5),
        ...     nn.Conv2d: FixedMask.magnitude(sparsity=0.25),
        ... })
        >>> report.names()
        ['0.weight', '2.weight']
        >>> report["0.weight"]["constraints"]
        ['Clamp(min=-0.5, max=0.5)', 'FixedMask(shape=(8, 3, 3, 3), sparsity=0.250)']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"constrain: expected an nn.Module. Got {type(model).__name__}.")
    if existing not in EXISTING:
        raise ValueError(f"constrain: existing must be one of {', '.join(EXISTING)}. Got {existing!r}.")
    if optimizer is not None:
        before = {id(p) for p in model.parameters()}
        report = constrain(model, rules, strict=strict, existing=existing)
        warn_unoptimized(model, optimizer, before)
        return report
    if isinstance(rules, (str, os.PathLike)):
        return _constrain_from_file(model, rules, strict=strict, existing=existing)
    slots = parameter_slots(model)
    plan = _plan(slots, _parse_rules(rules), strict=strict, existing=existing)
    _register(plan)
    if plan:
        watch(model)
    return _report(plan)


def _constrain_from_file(model: nn.Module, path, *, strict: bool, existing: str) -> Report:
    from torchconstrain.rulesfile import read_rules  # rules files build constraints and roles

    rules, finish = read_rules(path).to_rules(model)
    report = constrain(model, rules, strict=strict, existing=existing)
    finish()
    return report


def match(model: nn.Module, key) -> list[str]:
    r"""Return the names of the parameters that rule ``key`` picks in ``model``.

    Example:
        >>> from torch import nn
        >>> from torchconstrain import match
        >>> match(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "*.bias")
        ['0.bias', '1.bias']
    """
    rule = _parse_rules([(key, None)])[0]
    return [fqn for fqn, slot in parameter_slots(model).items() if rule.matches(slot)]


def _parse_rules(rules) -> list[_Rule]:
    if isinstance(rules, Mapping):
        pairs = list(rules.items())
    elif isinstance(rules, Sequence) and not isinstance(rules, (str, bytes)):
        pairs = list(rules)
        for index, pair in enumerate(pairs):
            if not (isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2):
                raise TypeError(f"constrain: rule {index} must be a (key, value) pair. Got {pair!r}.")
    else:
        raise TypeError(
            f"constrain: expected rules as a dict or a sequence of (key, value) pairs. "
            f"Got {type(rules).__name__}."
        )
    parsed = [_Rule(index, key, value, _matcher(index, key)) for index, (key, value) in enumerate(pairs)]
    for rule in parsed:
        _check_value(rule)
    return parsed


def _check_value(rule: _Rule) -> None:
    if rule.value is None or _is_constraint_list(rule.value):
        return
    if callable(rule.value) and not isinstance(rule.value, (nn.Module, type)):
        return
    raise TypeError(
        f"constrain: {rule} value must be a Constraint, a list of them, a callable "
        f"(fqn, tensor) -> constraint, or None. Got {type(rule.value).__name__}: {rule.value!r}."
    )


def _matcher(index: int, key) -> Callable[[Slot], bool]:
    if isinstance(key, str):
        if key.startswith("re:"):
            try:
                pattern = re.compile(key[3:])
            except re.error as error:
                raise ValueError(f"constrain: rule {index} ({key}) is not a valid regex: {error}.") from None
            return lambda slot: pattern.fullmatch(slot.fqn) is not None
        if any(char in key for char in "*?["):
            return lambda slot: fnmatch.fnmatchcase(slot.fqn, key)
        return lambda slot: slot.fqn == key or (slot.module_name == key and slot.tensor_name == "weight")
    if isinstance(key, type):
        if not issubclass(key, nn.Module):
            raise TypeError(f"constrain: rule {index} key {key.__name__} is a class but not an nn.Module subclass.")
        return lambda slot: slot.tensor_name == "weight" and isinstance(slot.module, key)
    if callable(key):
        return lambda slot: bool(key(slot.fqn, slot.module))
    raise TypeError(
        f"constrain: rule {index} key must be a name, glob, 're:' regex, nn.Module subclass "
        f"or callable (fqn, module) -> bool. Got {type(key).__name__}: {key!r}."
    )


def _plan(slots: dict[str, Slot], rules: list[_Rule], *, strict: bool, existing: str) -> list[_Planned]:
    matched = {id(rule): [s for s in slots.values() if rule.matches(s)] for rule in rules}
    if strict:
        for rule in rules:
            if not matched[id(rule)]:
                raise ValueError(_no_match_message(rule, slots))
    excluded = {s.fqn for rule in rules if rule.value is None for s in matched[id(rule)]}
    plan: dict[str, _Planned] = {}
    for rule in rules:
        group = {s.fqn: s for s in matched[id(rule)] if s.fqn not in excluded}
        if rule.value is None or not group:
            continue
        for fqn, constraints in _bind(rule, group).items():
            if not constraints:
                continue
            entry = plan.setdefault(fqn, _Planned(group[fqn]))
            entry.constraints += constraints
            entry.rules += [str(rule)] * len(constraints)
    ordered = [plan[fqn] for fqn in slots if fqn in plan]
    for entry in ordered:
        _validate(entry, existing)
    return ordered


def _bind(rule: _Rule, group: dict[str, Slot]) -> dict[str, list[Constraint]]:
    values = {fqn: slot.value() for fqn, slot in group.items()}
    for fqn, value in values.items():
        if not value.is_floating_point():
            raise ValueError(f"{fqn}: {rule} can only constrain floating-point tensors. Got {value.dtype}.")
    if not _is_constraint_list(rule.value):
        return {fqn: _call_factory(rule, fqn, value) for fqn, value in values.items()}
    bound = {fqn: [] for fqn in group}
    for template in _as_list(rule.value):
        for fqn, constraint in template.for_tensors(values).items():
            bound[fqn].append(constraint)
    return bound


def _is_constraint_list(value) -> bool:
    if isinstance(value, Constraint):
        return True
    if isinstance(value, (list, tuple)) and value:
        return all(isinstance(item, Constraint) for item in value)
    return False


def _as_list(value) -> list[Constraint]:
    return [value] if isinstance(value, Constraint) else list(value)


def _call_factory(rule: _Rule, fqn: str, value: Tensor) -> list[Constraint]:
    made = rule.value(fqn, value)
    if made is None:
        return []
    if not _is_constraint_list(made):
        raise TypeError(
            f"{fqn}: {rule} callable must return a Constraint, a list of them or None. "
            f"Got {type(made).__name__}: {made!r}."
        )
    return [template.for_tensor(fqn, value) for template in _as_list(made)]


def _validate(entry: _Planned, existing: str) -> None:
    slot = entry.slot
    earlier = slot.everything()
    if earlier and existing == "error":
        raise ValueError(
            f"{slot.fqn} is already constrained by {', '.join(map(describe, earlier))}. "
            "Pass existing='stack' to add the new constraints on top, or bake(model) first."
        )
    labels = ["already there"] * len(earlier) + entry.rules
    _refuse_contradictions(slot.fqn, earlier + entry.constraints, labels, slot.value().shape)
    _dry_run(entry, earlier, labels)


def _refuse_contradictions(fqn: str, stack: list[Constraint], labels: list[str], shape) -> None:
    for i, zeroing in enumerate(stack):
        zeros = zeroing.forced_zeros()
        if zeros is None:
            continue
        for j, other in enumerate(stack):
            admits = other.admits_zero()
            if admits is None:
                continue
            clash = int((zeros.cpu() & ~admits.cpu()).expand(shape).sum())
            if clash:
                raise ValueError(
                    f"{fqn}: {describe(zeroing)} from {labels[i]} can set {clash} entries to zero, "
                    f"but {describe(other)} from {labels[j]} excludes zero there. "
                    "The two constraints cannot hold together."
                )


def _dry_run(entry: _Planned, earlier: list[Constraint], labels: list[str]) -> None:
    """Run the new constraints on the current value and check every constraint holds after."""
    value = entry.slot.value()
    with torch.no_grad():
        for constraint in entry.constraints:
            result = constraint(value)
            if result.shape != value.shape or result.dtype != value.dtype:
                raise ValueError(
                    f"{entry.slot.fqn}: {describe(constraint)} turns a {value.dtype} tensor of shape "
                    f"{tuple(value.shape)} into a {result.dtype} tensor of shape {tuple(result.shape)}."
                )
            value = result
        for constraint, label in zip(earlier + entry.constraints, labels):
            reason = constraint.violation(value)
            if reason is not None:
                raise ValueError(
                    f"{entry.slot.fqn}: the constraints contradict each other: after applying them "
                    f"all, {describe(constraint)} from {label} is broken: {reason}."
                )


def _register(plan: list[_Planned]) -> None:
    """Register every planned constraint; on any failure undo everything done so far."""
    saved = [
        (entry, len(entry.slot.chain()), len(entry.slot.soft()), entry.slot.stored().detach().clone())
        for entry in plan
    ]
    try:
        for entry in plan:
            for constraint in entry.constraints:
                register(entry.slot, constraint)
    except Exception:
        for entry, chain_before, soft_before, original in saved:
            added = len(entry.slot.chain()) - chain_before
            if added > 0:
                drop_entries(entry.slot, list(range(chain_before, chain_before + added)))
            drop_soft(entry.slot, keep=soft_before)
            with torch.no_grad():
                entry.slot.stored().copy_(original)
        raise


def _report(plan: list[_Planned]) -> Report:
    rows = [
        {
            "tensor": entry.slot.fqn,
            "shape": tuple(entry.slot.value().shape),
            "constraints": [describe(c) for c in entry.slot.everything()],
            "rules": ", ".join(dict.fromkeys(entry.rules)),
        }
        for entry in plan
    ]
    return Report("constrained tensors", rows)


def _no_match_message(rule: _Rule, slots: dict[str, Slot]) -> str:
    message = f"constrain: {rule} matches no parameter."
    if isinstance(rule.key, str):
        candidates = list(slots) + sorted({s.module_name for s in slots.values() if s.module_name})
        close = difflib.get_close_matches(rule.key.removeprefix("re:"), candidates, n=3, cutoff=0.5)
        if close:
            message += f" Closest names: {', '.join(close)}."
    elif isinstance(rule.key, type):
        kinds = sorted({parametrize.type_before_parametrizations(s.module).__name__ for s in slots.values()})
        message += f" Module types with parameters: {', '.join(kinds)}."
    return message + " Pass strict=False to allow rules that match nothing."
