r"""Rules given in Python pick tensors of a model; ``constrain`` puts constraints on them.

Rules are planned and validated whole before anything is registered. The public
:func:`torchconstrain.constrain` (:mod:`torchconstrain.api`) also reads rules files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

from torchconstrain._tensors import Slot, describe, parameter_slots, tied_slots
from torchconstrain.checkpoint import watch
from torchconstrain.constraints.arguments import flag
from torchconstrain.constraints.base import Constraint
from torchconstrain.constraints.stacking import first_conflict
from torchconstrain.keys import (
    check_arity,
    label,
    match,
    matcher,
    no_match_message,
    origin_named,
    renamed_errors,
    same_kind,
)
from torchconstrain.optim import warn_unoptimized
from torchconstrain.registration import drop_entries, drop_soft, register, share, shares
from torchconstrain.report import Report

__all__ = ["constrain", "match"]

EXISTING = ("error", "stack")


@dataclass
class _Rule:
    index: int
    key: object
    value: object
    matches: Callable[[Slot], bool] = field(repr=False)
    name: str = ""  # "rule 2", or where a rules file writes it

    def __str__(self) -> str:
        return f"{self.name} ({label(self.key)})"


@dataclass
class _Planned:
    slot: Slot
    aliases: tuple[Slot, ...] = ()  # the stored Parameter's other names (tied weights)
    constraints: list[Constraint] = field(default_factory=list)
    rules: list[_Rule] = field(default_factory=list)

    def with_more(self, constraints: list[Constraint], rule: _Rule) -> _Planned:
        """A copy with ``constraints`` from ``rule`` planned after these."""
        return _Planned(self.slot, self.aliases, self.constraints + constraints, self.rules + [rule] * len(constraints))

    @property
    def name(self) -> str:
        """How messages name the tensor: its first name, and its other names if tied."""
        if not self.aliases:
            return self.slot.fqn
        return f"{self.slot.fqn} (one Parameter with {', '.join(a.fqn for a in self.aliases)})"


def constrain(
    model: nn.Module,
    rules: Mapping | Sequence,
    *,
    strict: bool = True,
    existing: str = "error",
    optimizer: torch.optim.Optimizer | None = None,
    rule_names: Callable[[int], str] | None = None,
) -> Report:
    r"""Put constraints on the tensors of ``model`` that ``rules`` pick. Modifies ``model`` in place.

    :func:`torchconstrain.constrain` for rules given in Python, a dict or a sequence of
    ``(key, value)`` pairs: see it for keys, values and what the model does afterwards.
    That one also reads rules files; this one is what the library's own modules call.

    Args:
        model: the model to constrain.
        rules: ``{key: value}`` or a sequence of ``(key, value)`` pairs.
        strict: raise when a rule matches nothing.
        existing: ``"error"`` (default) refuses a tensor that already has torchconstrain
            constraints, ``"stack"`` adds the new ones on top.
        optimizer: an optimizer built before this call; a ``UserWarning`` names the new
            parameters it does not hold.
        rule_names: how messages name rule ``i`` (default ``"rule i"``; a rules file gives
            its file and line).

    Returns:
        A :class:`~torchconstrain.report.Report` with one row per newly constrained tensor.

    Raises:
        TypeError: a key or value of an unsupported type, or the path of a rules file.
        ValueError: as :func:`torchconstrain.constrain`; the model is then unchanged.
    """
    check_arguments(model, existing, strict)
    if isinstance(rules, (str, os.PathLike)):
        raise TypeError(
            "torchconstrain.rules.constrain: expected rules as a dict or a sequence of (key, value) pairs. "
            f"Got the path {str(rules)!r}: torchconstrain.constrain(model, path) reads rules files "
            "(see also torchconstrain.rulesfile.read_rules)."
        )
    before = {id(p) for p in model.parameters()} if optimizer is not None else set()
    slots = parameter_slots(model)
    with torch.inference_mode(False):  # masks and buffers made here must be ordinary tensors, editable later
        plan = _plan(slots, _parse_rules(rules, rule_names), strict=strict, existing=existing, model=model)
        _register(plan)
    if plan:
        watch(model)
    if optimizer is not None:
        warn_unoptimized(model, optimizer, before)
    return _report(plan)


def check_arguments(model: nn.Module, existing: str, strict: bool = True) -> None:
    r"""Refuse a ``model`` that is not a module, an unknown ``existing`` and a ``strict`` that
    is not a bool (``"no"`` would count as true), before any work.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``strict`` not a bool.
        ValueError: ``existing`` is not one of :data:`EXISTING`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"constrain: expected an nn.Module. Got {type(model).__name__}.")
    scripted = next((name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        raise TypeError(f"constrain: expected an eager nn.Module. Got {'a' if scripted == '' else scripted + ', a'} "
                        "TorchScript module (torch.jit.script or trace), which parametrizations cannot change: "
                        "constrain the eager model, then bake it and script the baked one.")
    wrapper = next((name for name, m in model.named_modules() if isinstance(m, DistributedDataParallel)), None)
    if wrapper is not None:
        raise ValueError(
            f"constrain: {'the model' if wrapper == '' else wrapper} is a DistributedDataParallel wrapper. DDP set "
            "up its gradient sync for the parameters it found when it wrapped them, and parametrizing a tensor "
            "puts its stored original behind a path DDP does not see: the ranks would drift apart. Constrain the "
            "model, then wrap it (see 'Distributed training' in the README)."
        )
    flag("constrain", "strict", strict)
    if existing not in EXISTING:
        raise ValueError(f"constrain: existing must be one of {', '.join(EXISTING)}. Got {existing!r}.")


def _parse_rules(rules, rule_names: Callable[[int], str] | None = None) -> list[_Rule]:
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
    parsed = []
    for index, (key, value) in enumerate(pairs):
        name = rule_names(index) if rule_names else f"rule {index}"
        parsed.append(_Rule(index, key, value, matcher(key, name), name))
    for rule in parsed:
        _check_value(rule)
    return parsed


def _check_value(rule: _Rule) -> None:
    if rule.value is None or _is_constraint_list(rule.value):
        return
    if callable(rule.value) and not isinstance(rule.value, (nn.Module, type)):
        check_arity(rule.value, ("fqn", "tensor"), f"constrain: {rule} value")
        return
    raise TypeError(
        f"constrain: {rule} value must be a Constraint, a list of them, a callable "
        f"(fqn, tensor) -> constraint, or None. Got {type(rule.value).__name__}: {rule.value!r}."
    )


def _plan(
    slots: dict[str, Slot], rules: list[_Rule], *, strict: bool, existing: str, model: nn.Module | None = None
) -> list[_Planned]:
    """What each rule puts on which stored tensor: a tied tensor is planned once, under its
    first name, with every rule that matched any of its names (each rule once)."""
    matched = {id(rule): [s for s in slots.values() if rule.matches(s)] for rule in rules}
    if strict:
        for rule in rules:
            if not matched[id(rule)]:
                raise ValueError(no_match_message(rule.key, rule.name, slots, model=model))
    tied = tied_slots(slots.values())
    excluded = {tied[s.fqn][0].fqn for rule in rules if rule.value is None for s in matched[id(rule)]}
    plan: dict[str, _Planned] = {}
    for rule in rules:
        group = _distinct(matched[id(rule)], tied, excluded)
        if rule.value is None:
            continue
        if not group:
            if strict:
                raise ValueError(_all_excluded_message(rule, matched[id(rule)], rules))
            continue
        planned = lambda fqn: plan.get(tied[fqn][0].fqn) or _Planned(tied[fqn][0])  # noqa: E731
        for fqn, constraints in _bind(rule, group, planned).items():
            if not constraints:
                continue
            first, *aliases = tied[fqn]
            entry = plan.setdefault(first.fqn, _Planned(first, tuple(aliases)))
            entry.constraints += constraints
            entry.rules += [rule] * len(constraints)
    ordered = [plan[fqn] for fqn in slots if fqn in plan]
    for entry in ordered:
        _validate(entry, existing)
    return ordered


def _distinct(matched: list[Slot], tied: dict[str, tuple[Slot, ...]], excluded: set[str]) -> dict[str, Slot]:
    """The slots one rule matched, one per stored tensor (the first name it matched),
    without the tensors a ``None`` rule excludes under any of their names."""
    group, seen = {}, set()
    for slot in matched:
        first = tied[slot.fqn][0].fqn
        if first not in excluded and first not in seen:
            seen.add(first)
            group[slot.fqn] = slot
    return group


def _all_excluded_message(rule: _Rule, matched: list[Slot], rules: list[_Rule]) -> str:
    names = [slot.fqn for slot in matched]
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    excluding = ", ".join(str(other) for other in rules if other.value is None and any(map(other.matches, matched)))
    excluding = excluding or "a None rule, under another name of the same Parameter"
    return (
        f"{rule} matches only tensors that a None rule excludes ({shown}; excluded by {excluding}), so it "
        "would constrain nothing. Expected a rule that leaves a tensor to constrain: narrow the None "
        "rule, or pass strict=False."
    )


def _bind(rule: _Rule, group: dict[str, Slot], planned: Callable[[str], _Planned]) -> dict[str, list[Constraint]]:
    """Bind ``rule``'s constraints to each tensor of ``group``; each template (or the rule's
    callable) chooses from the value it will transform: the tensor's value through the
    constraints ``planned`` on it before, by earlier rules and earlier templates of this one."""
    for fqn, slot in group.items():
        if not slot.stored().is_floating_point():
            raise ValueError(f"{fqn}: {rule} can only constrain floating-point tensors. Got {slot.stored().dtype}.")
    bound = {fqn: [] for fqn in group}
    seen = _Seen(group, lambda fqn: planned(fqn).with_more(bound[fqn], rule))
    if not _is_constraint_list(rule.value):
        return {fqn: _call_factory(rule, fqn, seen, bound[fqn]) for fqn in group}
    for template in _as_list(rule.value):
        with _rule_named(rule, template):
            for fqn, constraint in template.for_tensors(seen).items():
                bound[fqn].append(constraint)
    return bound


class _Seen(Mapping):
    """The value the next constraint bound to each tensor of a group transforms, computed
    when it is read (:func:`_seen_by_next`), so that binding one tensor at a time keeps
    one value at a time."""

    def __init__(self, group: dict[str, Slot], planned: Callable[[str], _Planned]) -> None:
        self.group, self.planned = group, planned

    def __getitem__(self, fqn: str) -> Tensor:
        return _seen_by_next(self.planned(fqn))

    def __iter__(self):
        return iter(self.group)

    def __len__(self) -> int:
        return len(self.group)


def _seen_by_next(entry: _Planned) -> Tensor:
    """The tensor's current value as stored by registering ``entry``, through its constraints."""
    return _through(entry)[-1] if entry.constraints else entry.slot.value()


def _through(entry: _Planned) -> list[Tensor]:
    """The tensor's current value as registering ``entry`` stores it, then after each of its
    constraints, which must keep its shape and dtype. It runs on a copy, so that a forward
    that writes its input in place leaves the model as it was."""
    with torch.no_grad():
        value = _as_registration_stores(entry, entry.slot.value().clone())
        values = [value]
        for constraint, rule in zip(entry.constraints, entry.rules):
            with origin_named(f"{entry.name}: {describe(constraint)} from {rule}"):
                result = constraint(value)
            if result.shape != value.shape or result.dtype != value.dtype:
                raise ValueError(
                    f"{entry.name}: {describe(constraint)} from {rule} turns a {value.dtype} tensor of shape "
                    f"{tuple(value.shape)} into a {result.dtype} tensor of shape {tuple(result.shape)}."
                )
            value = result
            values.append(value)
    return values


def _rule_named(rule: _Rule, template: Constraint | None = None) -> renamed_errors:
    """Name ``rule`` in a ValueError raised by binding its constraints (a mask that does not
    fit), and ``rule`` and ``template`` in any other exception (a custom constraint's)."""

    def rename(error: Exception) -> Exception:
        if isinstance(error, ValueError):
            renamed = ValueError(f"{rule}: {error}")
            renamed.__suppress_context__ = True
            return renamed
        what = "binding" if template is None else f"binding {describe(template)}"
        return same_kind(error, f"{rule}: {what} raised {type(error).__name__}: {error}")

    return renamed_errors(rename)


def _is_constraint_list(value) -> bool:
    if isinstance(value, Constraint):
        return True
    if isinstance(value, (list, tuple)) and value:
        return all(isinstance(item, Constraint) for item in value)
    return False


def _as_list(value) -> list[Constraint]:
    return [value] if isinstance(value, Constraint) else list(value)


def _call_factory(rule: _Rule, fqn: str, seen: _Seen, bound: list[Constraint]) -> list[Constraint]:
    """Bind what the rule's callable makes for ``fqn`` into ``bound``, each template to the
    value it transforms (``seen``, which follows ``bound``)."""
    value = seen[fqn]
    with origin_named(f"{fqn}: {rule} value (a callable)"):
        made = rule.value(fqn, value)
    if made is None:
        return bound
    if not _is_constraint_list(made):
        raise TypeError(
            f"{fqn}: {rule} callable must return a Constraint, a list of them or None. "
            f"Got {type(made).__name__}: {made!r}."
        )
    with _rule_named(rule):
        for index, template in enumerate(_as_list(made)):
            bound.append(template.for_tensor(fqn, value if index == 0 else seen[fqn]))
    return bound


def _validate(entry: _Planned, existing: str) -> None:
    slot = entry.slot
    _refuse_split_ties(entry)
    earlier = slot.everything()
    if earlier and existing == "error":
        raise ValueError(
            f"{entry.name} is already constrained by {', '.join(map(describe, earlier))}. "
            "Pass existing='stack' to add the new constraints on top, or bake(model) first."
        )
    _refuse_after_foreign(entry)
    _refuse_dense_backward_on_sparse_gradients(entry)
    labels = ["already there"] * len(earlier) + [str(rule) for rule in entry.rules]
    refuse_contradictions(entry.name, earlier + entry.constraints, labels, slot.value().shape)
    _dry_run(entry, earlier, labels)


def _refuse_dense_backward_on_sparse_gradients(entry: _Planned) -> None:
    """Refuse a constraint whose backward needs a dense gradient on the weight of an
    embedding with ``sparse=True``: it would fail at the first ``backward``."""
    module = entry.slot.module
    embedding = isinstance(module, (nn.Embedding, nn.EmbeddingBag))
    if not (embedding and module.sparse and entry.slot.tensor_name == "weight"):
        return
    for constraint, rule in zip(entry.constraints, entry.rules):
        if not constraint.sparse_gradients:
            raise ValueError(
                f"{entry.name}: {describe(constraint)} from {rule} needs a dense gradient, but "
                f"{type(module).__name__}(sparse=True) gives its weight a sparse one. Expected "
                "sparse=False, or constraints whose backward takes sparse gradients (FixedMask, "
                "Clamp, NonNeg, FakeQuant)."
            )


def _refuse_after_foreign(entry: _Planned) -> None:
    """Refuse constraints that would follow another library's parametrization: ``bake``
    removes torchconstrain's alone, so they could never be baked."""
    foreign = [type(p).__name__ for p in entry.slot.chain() if not isinstance(p, Constraint)]
    if foreign:
        raise ValueError(
            f"{entry.name} carries {', '.join(foreign)}, which is not a torchconstrain parametrization: "
            f"constraints registered after it could never be baked (bake removes torchconstrain's "
            f"alone). Constrain first and register {foreign[0]} after, or remove it first."
        )


def _refuse_split_ties(entry: _Planned) -> None:
    """A tied tensor is constrained under all its names at once: refuse one whose names do
    not all read the same chain (another library's parametrization under one name only)."""
    for alias in entry.aliases:
        plain = not entry.slot.chain() and not alias.chain()
        if not (plain or shares(entry.slot, alias)):
            parametrized = alias if alias.chain() else entry.slot
            kinds = ", ".join(type(p).__name__ for p in parametrized.chain())
            raise ValueError(
                f"{entry.name}: {parametrized.fqn} has parametrizations of its own ({kinds}), so the names "
                "of this one Parameter do not compute the same tensor and it cannot be constrained for "
                "all of them. Remove that parametrization, or untie the weights, first."
            )


def refuse_contradictions(fqn: str, stack: list[Constraint], labels: list[str], shape, declared=None) -> None:
    r"""Refuse a stack that cannot always hold: each pair in order, by what each constraint
    declares (:mod:`torchconstrain.constraints.stacking`; ``declared``, when given, in
    place of their own declarations). ``labels`` name where each constraint comes from."""
    names = [f"{describe(constraint)} from {label}" for constraint, label in zip(stack, labels)]
    if declared is None:
        declared = []
        for constraint, name in zip(stack, names):
            with origin_named(f"{fqn}: {name}: stacking()"):
                declared.append(constraint.with_values().stacking())  # CPU copies on a meta model
    found = first_conflict(declared, len(shape), [type(constraint).__name__ for constraint in stack])
    if found is not None:
        i, j, reason = found
        raise ValueError(
            f"{fqn}: {names[j]} cannot follow {names[i]}: {reason}. "
            "The stack cannot always hold, whatever the weights; "
            "see 'Stacking constraints' in the README for the stacks that do."
        )


def _dry_run(entry: _Planned, earlier: list[Constraint], labels: list[str]) -> None:
    """Run the new constraints on the current value and check every constraint holds after.

    On the meta device there are no values: only shapes and dtypes are checked (see
    :func:`_through`, which runs on a copy)."""
    values = _through(entry)  # after the earlier constraints, then after each new one
    value = values[-1]
    with torch.no_grad():
        if value.is_meta:
            return
        stack = earlier + entry.constraints
        for position, (constraint, origin) in enumerate(zip(stack, labels)):
            with origin_named(f"{entry.name}: {describe(constraint)}.violation from {origin}"):
                reason = constraint.violation(value)
            if reason is not None:
                culprit = _first_breaking(constraint, position - len(earlier), values)
                by = "" if culprit is None else (
                    f" by {describe(entry.constraints[culprit])} from {entry.rules[culprit]}, applied after it"
                )
                raise ValueError(
                    f"{entry.name}: the constraints contradict each other: after applying them "
                    f"all, {describe(constraint)} from {origin} is broken{by}: {reason}."
                )


def _as_registration_stores(entry: _Planned, value: Tensor) -> Tensor:
    """``value`` as registering ``entry`` stores it: through the first parametrization's
    ``right_inverse`` on a tensor without one yet (a ``FixedMask`` stores masked entries as
    0, so a masked ``inf`` is not multiplied by 0 into NaN), else as it is."""
    index = next((i for i, c in enumerate(entry.constraints) if not getattr(c, "soft", False)), None)
    slot = entry.slot
    if index is None or parametrize.is_parametrized(slot.module, slot.tensor_name):
        return value
    first = entry.constraints[index]
    if not hasattr(first, "right_inverse"):
        return value
    with origin_named(f"{entry.name}: {describe(first)}.right_inverse from {entry.rules[index]}"):
        return first.right_inverse(value)


def _first_breaking(constraint: Constraint, position: int, values: list[Tensor]) -> int | None:
    """The first new constraint after ``position`` (an index into the new ones, negative for
    an earlier one) whose result breaks ``constraint``; None when its own result does."""
    for index in range(max(position + 1, 0), len(values) - 1):
        if constraint.violation(values[index + 1]) is not None:
            return index
    return None


def _register(plan: list[_Planned]) -> None:
    """Register every planned constraint; on any failure undo everything done so far."""
    saved = [
        (entry, len(entry.slot.chain()), len(entry.slot.soft()), entry.slot.stored().detach(),
         entry.slot.stored().detach().clone())
        for entry in plan
    ]
    classes = _classes([module for entry in plan for module in (entry.slot.module, *(a.module for a in entry.aliases))])
    try:
        for entry in plan:
            for constraint, rule in zip(entry.constraints, entry.rules):
                with origin_named(f"{entry.name}: registering {describe(constraint)} from {rule}"):
                    register(entry.slot, constraint)
            for alias in entry.aliases:
                if entry.slot.chain() and not shares(entry.slot, alias):
                    share(entry.slot, alias)
    except Exception:
        for entry, chain_before, soft_before, storage, values in saved:
            added = len(entry.slot.chain()) - chain_before
            if added > 0:
                drop_entries(entry.slot, list(range(chain_before, chain_before + added)), entry.aliases)
            drop_soft(entry.slot, keep=soft_before)
            with torch.no_grad():
                stored = entry.slot.stored()
                if stored.data_ptr() != storage.data_ptr():  # registering swapped in its own storage
                    stored.data = storage  # the one views of the weight still share
                stored.copy_(values)
        _restore_classes(classes)
        raise


def _classes(modules: list[nn.Module]) -> list[tuple[nn.Module, type, frozenset]]:
    """Each module once, with its class and the names of its parametrized tensors."""
    seen = {}
    for module in modules:
        seen.setdefault(id(module), (module, type(module), _parametrized_names(module)))
    return list(seen.values())


def _restore_classes(classes: list[tuple[nn.Module, type, frozenset]]) -> None:
    """Give each module its class back where it has the parametrized tensors it had."""
    for module, cls, names in classes:
        if type(module) is not cls and _parametrized_names(module) == names:
            module.__class__ = cls


def _parametrized_names(module: nn.Module) -> frozenset:
    return frozenset(module.parametrizations) if parametrize.is_parametrized(module) else frozenset()


def constrain_and_finish(model: nn.Module, rules, finish: Callable[[], None], **options) -> Report:
    r""":func:`constrain`, then ``finish()`` (the step that makes learnable gates share scores
    or a budget, see :func:`~torchconstrain.surgery.block_rules`), returning the report
    with the constraints as they are then."""
    report = constrain(model, rules, **options)
    with torch.inference_mode(False):
        finish()
    return described_again(model, report)


def described_again(model: nn.Module, report: Report) -> Report:
    r"""``report`` (of :func:`constrain` on ``model``) with each tensor's constraints
    described as they are now: after a step that finishes the rules (learnable gates
    sharing scores or a budget) changed them."""
    slots = parameter_slots(model)
    for row in report.rows:
        row["constraints"] = [describe(c) for c in slots[row["tensor"]].everything()]
    return report


def _report(plan: list[_Planned]) -> Report:
    """One row per name: a tied tensor's names each get its row."""
    rows = [
        {
            "tensor": slot.fqn,
            "shape": tuple(entry.slot.stored().shape),  # constraints keep it (the dry run checked): nothing runs
            "constraints": [describe(c) for c in entry.slot.everything()],
            "rules": ", ".join(dict.fromkeys(f"rule {rule.index} ({label(rule.key)})" for rule in entry.rules)),
        }
        for entry in plan
        for slot in (entry.slot, *entry.aliases)
    ]
    return Report("constrained tensors", rows)
