r"""Finish with constraints: ``bake`` them into plain weights, ``check`` them, sum their ``penalty``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchconstrain._distributed import is_sharded, unsharded, whole
from torchconstrain._tensors import SOFT_ATTRIBUTE, Slot, constrained_groups, describe, parameter_slots
from torchconstrain.checkpoint import unwatch
from torchconstrain.constraints.base import Constraint
from torchconstrain.errors import ConstraintViolation
from torchconstrain.keys import match, no_match_message, origin_named, same_kind
from torchconstrain.registration import drop_entries, drop_soft, owners
from torchconstrain.report import Report

__all__ = ["bake", "check", "penalty"]


@torch.inference_mode(False)  # a baked Parameter must stay an ordinary tensor, trainable after
def bake(model: nn.Module, key=None) -> Report:
    r"""Replace torchconstrain's constraints by their effective values. Modifies ``model`` in place.

    Each constrained tensor becomes a plain parameter holding its constrained value;
    learnable masks are binarized first (see :class:`~torchconstrain.LearnableMask`).
    The ``Parameter`` objects are kept, so an optimizer built earlier still works, and
    once no parametrization is left the modules get their own classes back, so the
    ``state_dict`` keys are those of the unconstrained model. Parametrizations that are
    not torchconstrain's (a user's ``spectral_norm``) stay where they are.
    Once nothing is constrained, the checkpoint checks :func:`~torchconstrain.constrain`
    added are removed too: the model pickles and loads like a plain one. A tied tensor
    (one ``Parameter`` under several names) is baked under all its names at once, even
    when ``key`` picks one of them, and every owner gets the same ``Parameter`` back.

    Args:
        model: the constrained model.
        key: a rule key (see :func:`torchconstrain.constrain`) to bake only the tensors
            it picks; by default every constrained tensor.

    Returns:
        A :class:`~torchconstrain.report.Report` with each baked tensor's constraints and
        the sparsity of its baked value.

    Raises:
        ValueError: ``key`` matches no parameter (the message names the closest), a
            torchconstrain constraint comes after another library's parametrization on the
            same tensor, so it cannot be removed on its own, the model is sharded with FSDP2,
            its weights are on the meta device, ``model`` is a submodule holding only some
            names of a tied tensor, or a learnable mask's scores hold NaN (baking would close
            those gates: a silent zero). Nothing is changed in that case.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import Clamp, bake, constrain
        >>> layer = nn.Linear(3, 3)
        >>> _ = constrain(layer, {"weight": Clamp(-0.2, 0.2)})
        >>> report = bake(layer)
        >>> type(layer).__name__, list(layer.state_dict())
        ('Linear', ['weight', 'bias'])
    """
    groups = constrained_groups(model)
    if key is not None:
        picked = set(match(model, key, caller="bake"))
        if not picked:
            raise ValueError(no_match_message(key, None, parameter_slots(model), caller="bake", model=model, strict_hint=False))
        groups = [group for group in groups if any(slot.fqn in picked for slot in group)]
    for group in groups:
        _refuse_buried_constraints(group[0])
        _refuse_shards(group[0])
        _refuse_meta(group[0], "bake")
        _refuse_partial_ties(group)
    baked = [(group, _baked_value(group[0])) for group in groups]
    rows = []
    for (slot, *aliases), value in baked:
        rows += [_bake_row(name.fqn, slot, value) for name in (slot, *aliases)]
        _store(slot.stored(), value)
        if slot.constraints():
            drop_entries(slot, list(range(len(slot.constraints()))), tuple(aliases))
        drop_soft(slot)
    if not constrained_groups(model):
        unwatch(model)
    return Report("baked tensors", rows)


def _store(stored: torch.Tensor, value: torch.Tensor) -> None:
    """Write the baked ``value`` into the ``Parameter`` ``stored``, with ``value``'s strides
    where they differ (a channels-last 1x1 conv's size-1 dims): kernels choose by strides,
    so the plain model then computes what the constrained one did, bitwise."""
    with torch.no_grad():
        if stored.stride() == value.stride():
            stored.copy_(value)
        else:
            stored.data = torch.empty_strided(value.shape, value.stride(), dtype=stored.dtype,
                                              device=stored.device).copy_(value)


def check(model: nn.Module) -> Report:
    r"""Verify every constrained tensor's effective value against each of its constraints.

    NaN or infinite entries count as a violation. On a model sharded with FSDP2
    (``fully_shard``) the parameters are gathered for the check, so every rank must call it.

    Returns:
        A :class:`~torchconstrain.report.Report` per constrained tensor: its constraints,
        min, max and sparsity of the effective value. A tied tensor is checked once and
        has a row under each of its names.

    Raises:
        ConstraintViolation: naming every tensor and constraint that does not hold.
        ValueError: the model's weights are on the meta device (no values to check).

    Example:
        >>> from torch import nn
        >>> from torchconstrain import Clamp, check, constrain
        >>> model = nn.Linear(3, 3)
        >>> _ = constrain(model, {"weight": Clamp(0, 1)})
        >>> check(model)["weight"]["min"] >= 0
        True
    """
    violations, rows = [], []
    with unsharded(model):
        for slot, *aliases in constrained_groups(model):
            _refuse_meta(slot, "check")
            with origin_named(f"check: {slot.fqn}: its effective value"):  # a custom constraint's forward
                value = slot.value()
            fqn = " = ".join(s.fqn for s in (slot, *aliases))
            violations += [(fqn, reason) for reason in _violations(slot, value)]
            rows += [_check_row(name.fqn, slot, value) for name in (slot, *aliases)]
    if violations:
        raise ConstraintViolation(violations)
    return Report("checked tensors", rows)


def penalty(model: nn.Module) -> Tensor:
    r"""Return the sum of every constraint's penalty term: a differentiable scalar.

    The terms are the learnable masks' sparsity penalties and the soft constraints
    (:class:`~torchconstrain.L1`, :class:`~torchconstrain.L2`) on effective values.
    Zero when there are none (plain clamps and fixed masks). On an FSDP2-sharded model the
    terms of sharded scores are reduced over the ranks, so every rank must call it.

    Example:
        >>> from torch import nn
        >>> from torchconstrain import penalty
        >>> penalty(nn.Linear(2, 2)).item()
        0.0
    """
    terms = [term for m in model.modules() if isinstance(m, Constraint) for term in [m.penalty()] if term is not None]
    terms = [whole(term) for term in terms + _soft_terms(model)]
    if terms:
        return sum(terms[1:], terms[0]).reshape(())
    device = next(model.parameters(), torch.empty(0)).device
    return torch.zeros((), device=device)


def _soft_terms(model: nn.Module) -> list[Tensor]:
    terms = []
    for module in model.modules():
        for tensor_name, softs in module.__dict__.get(SOFT_ATTRIBUTE, {}).items():
            value = getattr(module, tensor_name)
            terms += [soft.penalty_of(value) for soft in softs]
    return terms


def _refuse_buried_constraints(slot: Slot) -> None:
    chain = slot.chain()
    first_foreign = next((i for i, p in enumerate(chain) if not isinstance(p, Constraint)), len(chain))
    buried = [p for p in chain[first_foreign:] if isinstance(p, Constraint)]
    if buried:
        raise ValueError(
            f"{slot.fqn}: {describe(buried[0])} comes after {type(chain[first_foreign]).__name__}, "
            "which is not a torchconstrain parametrization, so it cannot be baked on its own. "
            "Register the other parametrization after constrain(), or remove it first."
        )


def _refuse_partial_ties(group: tuple[Slot, ...]) -> None:
    chain = group[0].module.parametrizations[group[0].tensor_name] if group[0].chain() else None
    outside = owners(chain) - len(group) if chain is not None else 0
    if outside > 0:
        raise ValueError(
            f"{group[0].fqn}: this tied Parameter has {outside} more name(s) outside the module being "
            "baked, which read the same constraints. Bake the model that holds all its names."
        )


def _refuse_shards(slot: Slot) -> None:
    if is_sharded(slot.stored()):
        raise ValueError(
            f"{slot.fqn}: the model is sharded (FSDP2), and bake needs whole tensors. Gather a "
            "full state_dict (torch.distributed.checkpoint.state_dict.get_model_state_dict with "
            "StateDictOptions(full_state_dict=True)), load it into an unsharded model constrained "
            "with the same rules, and bake that one."
        )


def _refuse_meta(slot: Slot, caller: str) -> None:
    if slot.stored().is_meta:
        raise ValueError(
            f"{caller}: {slot.fqn} is on the meta device: it has no values yet. Give the model memory "
            "and weights first: model.to_empty(device=...), then load_state_dict(...)."
        )


def _baked_value(slot: Slot) -> Tensor:
    with torch.no_grad():
        value = slot.stored().detach()
        for constraint in slot.constraints():
            try:
                value = constraint.bake(value)
            except ValueError as error:
                raise ValueError(f"bake: {slot.fqn}: {error} Nothing was baked.") from None
            except Exception as error:  # a custom constraint's bake
                raise same_kind(error, f"bake: {slot.fqn}: {describe(constraint)}.bake raised "
                                       f"{type(error).__name__}: {error} Nothing was baked.") from error
    return value


def _violations(slot: Slot, value: Tensor) -> list[str]:
    reasons = []
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        reasons.append(f"{bad} entries are NaN or infinite")
    with torch.no_grad():
        for constraint in slot.constraints():
            with origin_named(f"check: {slot.fqn}: {describe(constraint)}.violation"):
                reason = constraint.violation(value)
            if reason is not None:
                reasons.append(f"{describe(constraint)}: {reason}")
    return reasons


def _sparsity(value: Tensor) -> float:
    return (value == 0).float().mean().item() if value.numel() else 0.0


def _check_row(fqn: str, slot: Slot, value: Tensor) -> dict:
    return {
        "tensor": fqn,
        "constraints": [describe(c) for c in slot.everything()],
        "min": value.min().item() if value.numel() else None,
        "max": value.max().item() if value.numel() else None,
        "sparsity": _sparsity(value),
    }


def _bake_row(fqn: str, slot: Slot, value: Tensor) -> dict:
    return {
        "tensor": fqn,
        "constraints": [describe(c) for c in slot.everything()],
        "sparsity": _sparsity(value),
    }
