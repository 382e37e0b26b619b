r"""The variants compared against a plain module: how each one is set up on a fresh copy.

A :class:`Variant` modifies a module in place (``prepare``) and may add work after each
optimizer step (``after_step``). The builders:

- :func:`plain`: the module untouched (the baseline every ratio is taken against).
- :func:`constrained`: ``torchconstrain.constrain(module, rules)``: parametrizations
  (optionally timed with the fast path off, :func:`torchconstrain.set_fast_path`).
- :func:`pruned`: ``torch.nn.utils.prune.l1_unstructured(m, "weight", amount)`` on every
  module of the given types: the peer tool, a forward pre-hook computing
  ``weight_orig * weight_mask``.
- :func:`clamp_after_step`: a plain module, plus the common recipe
  ``weight.data.clamp_(lo, hi)`` on every weight of the given types after
  ``optimizer.step()`` (weights collected once, so the walk over modules is not timed).
  Training steps only: its forward is the plain one.
- :func:`baked`: ``constrain(module, rules)`` then ``torchconstrain.bake(module)``: plain
  modules again, holding the constrained values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from torch.nn.utils import parametrize, prune

from torchconstrain import bake, constrain, set_fast_path

Types = tuple[type[nn.Module], ...]


@dataclass(frozen=True)
class Variant:
    r"""A named way to modify a module; ``training_only`` variants skip inference tasks."""

    name: str
    prepare: Callable[[nn.Module], None]
    after_step: Callable[[nn.Module], Callable[[], None]] | None = None
    training_only: bool = False
    fast_path: bool = True

    def timed(self, call: Callable[[], None]) -> Callable[[], None]:
        r"""``call``, run with torchconstrain's fast path off when this variant asks for it."""
        if self.fast_path:
            return call

        def without_fast_path() -> None:
            with set_fast_path(False):
                call()

        return without_fast_path

    def hook(self, module: nn.Module) -> Callable[[], None] | None:
        r"""The callable to run after each optimizer step, bound to ``module``."""
        return None if self.after_step is None else self.after_step(module)


def plain() -> Variant:
    return Variant("plain", lambda module: None)


def constrained(name: str, rules: Callable[[], dict], *, fast_path: bool = True) -> Variant:
    r"""``constrain(module, rules())``; ``rules`` is a factory so every copy gets fresh templates.
    With ``fast_path=False`` the timed calls run under ``set_fast_path(False)``."""

    def prepare(module: nn.Module) -> None:
        report = constrain(module, rules())
        assert len(report) > 0, f"{name}: the rules constrained nothing"

    return Variant(name, prepare, fast_path=fast_path)


def pruned(name: str, types: Types, amount: float) -> Variant:
    def prepare(module: nn.Module) -> None:
        targets = _modules_of(module, types)
        assert targets, f"{name}: no module of types {types}"
        for m in targets:
            prune.l1_unstructured(m, "weight", amount=amount)

    return Variant(name, prepare)


def clamp_after_step(name: str, types: Types, lo: float, hi: float) -> Variant:
    def after_step(module: nn.Module) -> Callable[[], None]:
        weights = [m.weight for m in _modules_of(module, types)]
        assert weights, f"{name}: no module of types {types}"

        def clamp() -> None:
            for weight in weights:
                weight.data.clamp_(lo, hi)

        return clamp

    return Variant(name, lambda module: None, after_step, training_only=True)


def baked(name: str, rules: Callable[[], dict]) -> Variant:
    def prepare(module: nn.Module) -> None:
        constrain(module, rules())
        bake(module)
        assert not any(parametrize.is_parametrized(m) for m in module.modules()), f"{name}: not baked"

    return Variant(name, prepare)


def _modules_of(module: nn.Module, types: Types) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, types)]
