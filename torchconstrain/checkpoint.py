r"""Checking checkpoints before they load into constrained models.

A parametrized module's class (see :mod:`torchconstrain.registration`) loads a plain key
(``weight``) for a parametrized tensor: :func:`load_plain_keys` sends the value through the
first parametrization's ``right_inverse`` into the stored original, exactly what
:func:`torchconstrain.constrain` does to the weight it finds, and the constraints' own state
(masks, bounds, scores) stays as it is in the model.

The model passed to :func:`torchconstrain.constrain`, and every module in it that holds a
constraint (down to the constraints themselves), also gets a ``load_state_dict`` pre-hook
that checks the whole checkpoint of the module it is loaded into before anything is
copied: shapes, mask values, bounds, temperatures, constraint state that the model's
constraints do not have or that makes a stack :func:`torchconstrain.constrain` refuses,
and different values for names that are one tensor in the model (tied weights). So
``model.load_state_dict``, ``model[0].load_state_dict`` and
``load_state_dict(..., assign=True)`` check the same things. A checkpoint that does not fit
raises :class:`~torchconstrain.CheckpointMismatch` naming every tensor, and the model is
left unchanged. With ``assign=True`` the constraints' state is assigned in the dtypes the
constraints hold it in (a mask of 0s and 1s becomes a bool mask), as a copying load stores it,
and a parameter that several constraints share (learnable gates' ``scores``) is one
parameter again after the load (a ``load_state_dict`` post-hook).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torchconstrain import CheckpointMismatch, Clamp, constrain
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> _ = constrain(model, {"0": Clamp(-0.1, 0.1)})
    >>> pretrained = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict()
    >>> model.load_state_dict(pretrained, strict=True)
    <All keys matched successfully>
    >>> torch.equal(model[0].weight, pretrained["0.weight"].clamp(-0.1, 0.1))
    True
    >>> pretrained["2.weight"] = torch.zeros(3, 4)
    >>> try:
    ...     model.load_state_dict(pretrained)
    ... except CheckpointMismatch as error:
    ...     print(error)
    load_state_dict: 1 tensor(s) of the checkpoint do not fit the model. Nothing was loaded.
      2.weight: shape (3, 4) in the checkpoint, (2, 4) in the model.
"""

from __future__ import annotations

import copy
import threading
import weakref

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import torchconstrain._tracked as _tracked
from torchconstrain._tensors import describe, foreign_buffers_kept
from torchconstrain.constraints.base import Constraint
from torchconstrain.constraints.stacking import first_conflict
from torchconstrain.errors import CheckpointMismatch
from torchconstrain.keys import origin_named

__all__ = []  # used through load_state_dict, constrain and bake

_INNER = "parametrizations."


def watch(model: nn.Module) -> None:
    r"""Check checkpoints loaded into ``model``, or into any module of it that holds a
    constraint, before anything is copied (once per module)."""
    for module in _holders(model):
        if not _watched(module):
            module.register_load_state_dict_pre_hook(_check_checkpoint)
            module.register_load_state_dict_post_hook(_share_again)


def _holders(model: nn.Module) -> list[nn.Module]:
    """``model`` and every module of it with a :class:`Constraint` in its subtree."""
    modules = dict(model.named_modules(remove_duplicate=False))
    names = {""}
    for name, module in modules.items():
        if isinstance(module, Constraint):
            parts = name.split(".")
            names.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return [modules[name] for name in sorted(names, key=len)]


def unwatch(model: nn.Module) -> None:
    r"""Remove the checkpoint checks from ``model`` and every module in it."""
    for module in model.modules():
        hooks = module._load_state_dict_pre_hooks
        for handle_id in [i for i, hook in hooks.items() if getattr(hook, "hook", None) is _check_checkpoint]:
            del hooks[handle_id]
        post = module._load_state_dict_post_hooks
        for handle_id in [i for i, hook in post.items() if hook is _share_again]:
            del post[handle_id]


def _watched(module: nn.Module) -> bool:
    return any(getattr(hook, "hook", None) is _check_checkpoint for hook in module._load_state_dict_pre_hooks.values())


# --- loading ----------------------------------------------------------------------------


def load_plain_keys(module: nn.Module, state_dict: dict, prefix: str) -> None:
    r"""Turn the plain keys of ``module``'s parametrized tensors in ``state_dict`` into stored originals.

    Raises:
        CheckpointMismatch: a plain value does not fit its tensor.
    """
    problems = _adapt(module, state_dict, prefix)
    if problems:
        raise CheckpointMismatch(problems)


def _adapt(module: nn.Module, state_dict: dict, prefix: str) -> list[str]:
    """Turn the plain keys of ``module``'s parametrized tensors into stored originals."""
    problems = []
    for tensor_name, plist in module.parametrizations.items():
        plain, inner = prefix + tensor_name, f"{prefix}{_INNER}{tensor_name}."
        if plist.is_tensor and plain in state_dict and inner + "original" in state_dict:
            problems.append(f"{plain}: the checkpoint holds it twice, as {plain!r} (a plain tensor) and as "
                            f"{inner + 'original'!r} (a constrained one's stored original). Expected one of them.")
            continue
        if not plist.is_tensor or plain not in state_dict or inner + "original" in state_dict:
            continue
        problem = _tensor_problem(state_dict[plain], plist.original)
        if problem:
            problems.append(f"{plain}: {problem}")
            continue
        with origin_named(f"load_state_dict: {plain}: its constraints"):  # a custom one's right_inverse, forward
            stored = _stored_value(plist, state_dict[plain])
            problem = _broken_by(plist, stored)
        if problem:
            problems.append(f"{plain}: {problem}")
            continue
        del state_dict[plain]
        state_dict[inner + "original"] = stored
        for key, tensor in _constraint_state(plist).items():
            state_dict.setdefault(inner + key, tensor)
    return problems


def _broken_by(plist: nn.Module, stored: Tensor) -> str | None:
    """Why the chain cannot hold on the effective tensor of ``stored`` (a plain value sent
    through ``right_inverse``), which :func:`torchconstrain.constrain` refuses for the same
    weights (a zero slice under ``UnitNorm``); ``None`` when it holds."""
    if stored.is_meta:
        return None
    chain = [p.with_values() if isinstance(p, Constraint) else p for p in plist]
    # Another library's parametrization (spectral_norm's power iteration, in training mode)
    # updates its buffers when it runs: they are put back, whether the load goes on or not.
    with torch.no_grad(), foreign_buffers_kept(chain):
        value = stored
        for parametrization in chain:
            value = parametrization(value)
    with torch.no_grad():
        for constraint in (p for p in chain if isinstance(p, Constraint)):
            reason = constraint.violation(value)
            if reason:
                return f"with the checkpoint's values {describe(constraint)} cannot hold: {reason}."
    return None


def _constraint_state(plist: nn.Module) -> dict[str, Tensor]:
    """The chain's own state, which a plain checkpoint keeps as it is in the model. On the
    meta device (a model built there, loaded with ``assign=True``): the values each constraint
    was bound with (see :meth:`~torchconstrain.Constraint.with_values`)."""
    state = {}
    for index, parametrization in enumerate(plist):
        shown = parametrization.with_values() if isinstance(parametrization, Constraint) else parametrization
        state.update((f"{index}.{key}", tensor) for key, tensor in shown.state_dict(keep_vars=True).items())
    return state


def _stored_value(plist: nn.Module, value: Tensor) -> Tensor:
    """What ``constrain`` stores for a plain ``value``: the first right_inverse of it (on the
    checkpoint's device when the model's is the meta device, which has no values)."""
    original = plist.original
    device = value.device if original.is_meta else original.device
    first = plist[0].with_values() if isinstance(plist[0], Constraint) else plist[0]
    with torch.no_grad():
        value = value.detach().to(device=device, dtype=original.dtype)
        if hasattr(first, "right_inverse"):
            value = first.right_inverse(value)
    return value


def _check_checkpoint(root, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """``load_state_dict`` pre-hook of a module holding constraints: check everything, copy nothing.

    Modules are taken under every name, as ``load_state_dict`` visits them: a tied tensor's
    constraint modules are checked under each name the checkpoint uses."""
    lists = (missing, unexpected, errors)
    if _checked_already(root, prefix, lists):
        return
    modules = {_prefix(prefix, name): m for name, m in root.named_modules(remove_duplicate=False)}
    problems = []
    for module_prefix, module in modules.items():
        if parametrize.is_parametrized(module):
            problems += _adapt(module, state_dict, module_prefix)
    _drop_absent_state(modules, state_dict)
    problems += _foreign_state(modules, state_dict)
    problems += _tie_problems(modules, state_dict)
    for module_prefix, module in modules.items():
        problems += _local_problems(module, state_dict, module_prefix)
    problems = problems or _stack_problems(modules, state_dict)
    if problems:
        raise CheckpointMismatch(problems, loaded=False)
    if local_metadata.get("assign_to_params_buffers", False):
        _assign_in_constraint_dtypes(modules, state_dict)
        _checked.shared = (weakref.ref(root), _shared_parameters(modules))
    _checked.last = (lists, weakref.WeakValueDictionary(modules))


def _shared_parameters(modules: dict[str, nn.Module]) -> list[list[tuple[nn.Module, str]]]:
    """The constraints' parameters held by several constraints (learnable gates that share
    ``scores``), each as the places that hold it."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in dict.fromkeys(modules.values()):
        if isinstance(module, Constraint):
            for name, parameter in module._parameters.items():
                if parameter is not None:
                    places.setdefault(id(parameter), []).append((module, name))
    return [group for group in places.values() if len(group) > 1]


def _share_again(module: nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: after ``assign=True`` put one Parameter back in every
    place that shared one before (assigning gives each place a Parameter of its own)."""
    shared = getattr(_checked, "shared", None)
    if shared is None or shared[0]() is not module:
        return
    del _checked.shared
    for (first, first_name), *others in shared[1]:
        for holder, name in others:
            setattr(holder, name, first._parameters[first_name])


# The modules the last check covered, by prefix, and the lists of the load call that ran
# it. A load into an outer module visits the inner watched modules after it: their hooks
# find themselves covered by the same call (``load_state_dict`` makes the lists afresh
# for every call and passes the same ones to every module) and skip checking again.
_checked = threading.local()


def _checked_already(module: nn.Module, prefix: str, lists: tuple) -> bool:
    last = getattr(_checked, "last", None)
    if last is None or any(mine is not theirs for mine, theirs in zip(lists, last[0])):
        return False
    return last[1].get(prefix) is module


def _assign_in_constraint_dtypes(modules: dict[str, nn.Module], state_dict: dict) -> None:
    """Convert the constraint state that ``assign=True`` will assign to the dtypes the
    constraints hold it in (what a copying load stores), keeping the checkpoint's device."""
    for module_prefix, module in modules.items():
        if not isinstance(module, Constraint):
            continue
        for name, tensor in _local_tensors(module).items():
            value = state_dict.get(module_prefix + name)
            if torch.overrides.is_tensor_like(value) and value.dtype != tensor.dtype:
                state_dict[module_prefix + name] = value.to(tensor.dtype)


def _prefix(prefix: str, name: str) -> str:
    return f"{prefix}{name}." if name else prefix


def _drop_absent_state(modules: dict[str, nn.Module], state_dict: dict) -> None:
    """Drop keys that hold, for a tensor a constraint leaves out as ``None``, the value that
    stands for its absence (``Constraint.absent_state``: checkpoints of earlier versions)."""
    for module_prefix, module in modules.items():
        for name, fill in getattr(module, "absent_state", {}).items():
            value = state_dict.get(module_prefix + name)
            if module._buffers.get(name) is not None or not isinstance(value, Tensor) or value.is_meta:
                continue
            if bool((value == fill).all()):
                del state_dict[module_prefix + name]


def _foreign_state(modules: dict[str, nn.Module], state_dict: dict) -> list[str]:
    """Constraint state in the checkpoint for tensors whose constraints in the model lack it."""
    problems, seen = [], set()
    for key in state_dict:
        module_prefix, found, rest = key.rpartition(_INNER)
        module = modules.get(module_prefix) if found else None
        if module is None or "." not in rest:
            continue
        tensor_name, name = rest.split(".", 1)
        fqn = module_prefix + tensor_name
        ours = _constraint_keys(module, tensor_name)
        if fqn in seen or name in ours:
            continue
        seen.add(fqn)
        inner = f"{module_prefix}{_INNER}{tensor_name}."
        theirs = sorted(k[len(inner):] for k in state_dict if k.startswith(inner))
        problems.append(
            f"{fqn}: the checkpoint has constraint state {theirs}, the model's constraints have "
            f"{sorted(ours) or 'none'}. Constrain the model with the checkpoint's rules first, "
            "or load a baked (plain) state_dict."
        )
    return problems


def _tie_problems(modules: dict[str, nn.Module], state_dict: dict) -> list[str]:
    """Keys that name one tensor of the model but hold different values in the checkpoint:
    loading them one after the other would keep the last, silently."""
    names: dict[int, list[str]] = {}
    for module_prefix, module in modules.items():
        for name, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None and module_prefix + name in state_dict:
                names.setdefault(id(tensor), []).append(module_prefix + name)
    problems = []
    for first, *others in (keys for keys in names.values() if len(keys) > 1):
        value = state_dict[first]
        differ = [key for key in others if not _same_value(state_dict[key], value)]
        if differ:
            problems.append(
                f"{first}: one tensor in the model with {', '.join(differ)} (tied weights), but the "
                "checkpoint holds different values for them."
            )
    return problems


def _same_value(a, b) -> bool:
    if a is b:
        return True
    plain = (Tensor, nn.Parameter, _tracked.Tracked)
    if type(a) not in plain or type(b) not in plain or a.shape != b.shape or torch.strided not in (a.layout, b.layout):
        return True  # reported as a shape or type problem, or not comparable here (shards)
    if a.is_meta or b.is_meta:
        return True  # no values to compare
    if (a.device, a.dtype, a.stride(), a.data_ptr()) == (b.device, b.dtype, b.stride(), b.data_ptr()):
        return True  # one storage: the model's own state_dict
    return torch.equal(a.detach(), b.detach().to(a.device, a.dtype))


def _constraint_keys(module: nn.Module, tensor_name: str) -> set[str]:
    if not parametrize.is_parametrized(module, tensor_name):
        return set()
    return set(module.parametrizations[tensor_name].state_dict(keep_vars=True))


def _local_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The module's own parameters and persistent buffers, by name."""
    local = {name: t for name, t in module._parameters.items() if t is not None}
    local.update((n, b) for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set)
    return local


def _local_problems(module: nn.Module, state_dict: dict, prefix: str) -> list[str]:
    """Shapes of the module's own tensors, and constraint state that breaks its constraint."""
    local = _local_tensors(module)
    problems = []
    for name, tensor in local.items():
        if prefix + name in state_dict:
            problem = _tensor_problem(state_dict[prefix + name], tensor)
            problems += [f"{prefix}{name}: {problem}"] if problem else []
    if isinstance(module, Constraint) and not problems:
        loaded = {name: state_dict[prefix + name] for name in local if prefix + name in state_dict}
        problem = module.state_problem(loaded) if loaded else None
        if problem:
            problems.append(f"{_label(module, prefix)}: {problem}")
    return problems


def _stack_problems(modules: dict[str, nn.Module], state_dict: dict) -> list[str]:
    """Stacks that the checkpoint's constraint state would make ones :func:`torchconstrain.constrain`
    refuses, since they cannot always hold (a ``Clamp`` after a ``FixedMask`` loading a box
    without 0): each stack of two constraints or more whose state the checkpoint holds,
    checked as ``constrain`` checks it, on its constraints holding the checkpoint's tensors
    where it has them. (A load into one constraint checks that constraint alone.)"""
    owners = {key.rpartition(".")[0] + "." for key in state_dict}  # the prefixes of the modules holding them
    problems, seen = [], set()
    for chain_prefix, plist in modules.items():
        if not isinstance(plist, parametrize.ParametrizationList) or id(plist) in seen:
            continue
        stack = [(f"{chain_prefix}{index}.", c) for index, c in enumerate(plist) if isinstance(c, Constraint)]
        if len(stack) < 2 or not any(prefix in owners for prefix, _ in stack):
            continue
        seen.add(id(plist))  # a tied chain, under its first name
        fqn = (chain_prefix[:-1].replace(_INNER, "") if _INNER in chain_prefix else chain_prefix[:-1]) or "the tensor"
        with origin_named(f"load_state_dict: {fqn}: stacking()"):
            problem = _stack_problem([_staged(c, state_dict, prefix) for prefix, c in stack], plist.original.dim())
        if problem:
            problems.append(f"{fqn}: with the checkpoint's state, {problem}, so the stack cannot always hold.")
    return problems


def _stack_problem(stack: list[Constraint], ndim: int) -> str | None:
    """Why ``stack`` is one :func:`torchconstrain.constrain` refuses, or ``None``."""
    declared = [constraint.stacking() for constraint in stack]
    found = first_conflict(declared, ndim, [type(c).__name__ for c in stack])
    if found is None:
        return None
    i, j, reason = found
    return f"{describe(stack[j])} cannot follow {describe(stack[i])}: {reason}"


def _staged(constraint: Constraint, state_dict: dict, prefix: str) -> Constraint:
    """A shallow copy of ``constraint`` (of its values, on a meta model) holding the
    checkpoint's tensors under ``prefix`` in place of its own, in their dtypes and devices."""
    shown = constraint.with_values()
    staged = copy.copy(shown)
    for kind in ("_parameters", "_buffers"):
        tensors = dict(shown.__dict__[kind])
        for name, tensor in tensors.items():
            value = state_dict.get(prefix + name)
            if tensor is not None and torch.overrides.is_tensor_like(value) and not value.is_meta:
                tensors[name] = value.detach().to(tensor.device, tensor.dtype).reshape(tensor.shape)
        staged.__dict__[kind] = tensors
    return staged


def _label(constraint: Constraint, prefix: str) -> str:
    """``"0.weight: Clamp (0.parametrizations.weight.0)"``: the tensor a constraint at
    ``prefix`` constrains and the constraint, as far as the module loaded into shows them."""
    kind = type(constraint).__name__
    owner, found, rest = prefix.rpartition(_INNER)
    if found:
        return f"{owner}{rest.split('.')[0]}: {kind} ({prefix[:-1]})"
    return f"{prefix[:-1]}: {kind}" if prefix else kind


def _tensor_problem(value, tensor: Tensor) -> str | None:
    if not torch.overrides.is_tensor_like(value):
        return f"expected a tensor in the checkpoint. Got {type(value).__name__}."
    if torch.nn.parameter.is_lazy(tensor) or value.shape == tensor.shape:
        return None
    if tensor.dim() == 0 and tuple(value.shape) == (1,):
        return None  # torch loads a 1-element tensor into a 0-dim one
    return f"shape {tuple(value.shape)} in the checkpoint, {tuple(tensor.shape)} in the model."
