r"""The public :func:`constrain`: rules given in Python, or the path of a rules file.

Rules in Python go to :func:`torchconstrain.rules.constrain`; a path is read with
:mod:`torchconstrain.rulesfile` first, which is the only part that needs the surgery (for
role keys and block masks), so ``import torchconstrain`` loads neither.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

import torchconstrain.rules as _rules
from torchconstrain.optim import warn_unoptimized
from torchconstrain.report import Report

__all__ = ["constrain"]


def constrain(
    model: nn.Module,
    rules: Mapping | Sequence | str | os.PathLike,
    *,
    strict: bool = True,
    existing: str = "error",
    optimizer: torch.optim.Optimizer | None = None,
) -> Report:
    r"""Put constraints on the tensors of ``model`` that ``rules`` pick. Modifies ``model`` in place.

    ``rules`` is a dict, a sequence of ``(key, value)`` pairs, or the path of a YAML or
    JSON rules file (see :mod:`torchconstrain.rulesfile`). A **key** picks tensors
    (see :mod:`torchconstrain.keys`):

    - an exact parameter name (``"features.0.0.weight"``), or a module name, meaning that
      module's ``weight``;
    - a glob with ``* ? [ ]``, matched against parameter names (``"features.*.weight"``);
    - ``"re:<regex>"``, full-matched against parameter names;
    - an ``nn.Module`` subclass: the ``weight`` of every module of that type;
    - a callable ``(fqn, module) -> bool``, called for every parameter with the module
      that owns it.

    A **value** says what to do with them:

    - a :class:`~torchconstrain.Constraint`: a template, each matched tensor gets its own fresh copy;
    - a list of constraints, stacked in order;
    - a callable ``(fqn, tensor) -> constraint, list or None`` (``None``: nothing);
    - ``None``: exclude the matched tensors from every other rule.

    Every matching rule applies, in rule order (constraints are a conjunction), and
    ``None`` wins over all. Parameter names are the plain ones even on a parametrized
    model, and state inside constraints (a mask's scores) is never matched.

    A tied ``Parameter`` (one tensor under several names, such as GPT-2's ``lm_head.weight``
    and ``transformer.wte.weight``) is one tensor to the rules: a rule matching any of its
    names constrains it under all of them, with one stored original and one set of
    constraint state; a rule matching several of its names applies once, several rules
    stack, and ``None`` on any name excludes it.

    Everything is validated before the model is touched: when this raises, the model is
    exactly as it was.

    Afterwards ``model.load_state_dict`` takes constrained checkpoints and plain ones (plain
    values go through the constraints' ``right_inverse``; masks, bounds and scores stay),
    and refuses a checkpoint that does not fit before copying anything; ``torch.save(model)``
    works. See :mod:`torchconstrain.checkpoint` and :mod:`torchconstrain.registration`.

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
            constrained (with ``existing="error"``), or a rules file cannot be read
            (:class:`~torchconstrain.rulesfile.RulesFileError`).

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
    _rules.check_arguments(model, existing, strict)
    before = {id(p) for p in model.parameters()} if optimizer is not None else set()
    if isinstance(rules, (str, os.PathLike)):
        report = _constrain_from_file(model, rules, strict=strict, existing=existing)
    else:
        report = _rules.constrain(model, rules, strict=strict, existing=existing)
    if optimizer is not None:
        warn_unoptimized(model, optimizer, before)
    return report


def _constrain_from_file(model: nn.Module, path: str | os.PathLike, *, strict: bool, existing: str) -> Report:
    from torchconstrain.rulesfile import read_rules  # yaml and the surgery (torchvision): loaded on first use

    parsed = read_rules(path)
    rules, finish = parsed.to_rules(model)
    return _rules.constrain_and_finish(model, rules, finish, strict=strict, existing=existing,
                                       rule_names=parsed.rule_name)
