r"""The base class every torchconstrain constraint derives from."""

from __future__ import annotations

import copy
import functools
import itertools
import math
import weakref
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from torchconstrain._distributed import buffer_writes_seen
from torchconstrain.constraints.stacking import Stacking

__all__ = ["Constraint"]


# Whether torch.compile or torch.export is tracing the calling code. Traced code takes the
# plain tensor path: the eager caches (``Constraint._derived``) read version counters and
# call ``.item()``, which a graph cannot capture, and a graph reads buffers as inputs
# anyway, so in-place edits of masks and bounds reach compiled code without them. (An
# alias rather than a wrapper: it runs on every constrained forward.)
tracing = torch.compiler.is_compiling

_interpreters = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)


_REVISIONS = itertools.count(1)  # each change of a constraint takes the next number: none is written twice


@functools.lru_cache(maxsize=256)
def largest_at_most(number: float, dtype: torch.dtype) -> float | int:
    r"""The largest value of ``dtype`` at most ``number``, as a Python number: an entry is at
    most it exactly when it is at most ``number``, and above it exactly when above
    ``number``. (Compared with ``number`` itself, torch rounds it to the tensor's dtype
    first, to the nearest: ``0.100037 <= 0.10002`` in float16.)

    Example:
        >>> largest_at_most(0.10002, torch.float16), largest_at_most(2.5, torch.int64)
        (0.0999755859375, 2)
    """
    if not dtype.is_floating_point:
        return min(math.floor(number), torch.iinfo(dtype).max)
    bound = torch.tensor(number, dtype=dtype)
    if bound.item() > number:
        bound = torch.nextafter(bound, torch.tensor(-math.inf, dtype=dtype))
    return bound.item()


def at_least_float32(x: Tensor) -> Tensor:
    r"""``x`` in float32 when its dtype is narrower (float16, bfloat16), else ``x`` itself."""
    return x.float() if torch.finfo(x.dtype).bits < 32 else x


def writable(x: Tensor, *others) -> bool:
    r"""Whether an elementwise operation of ``x`` with ``others`` (tensors, numbers or
    ``None``) may be written into ``x`` with the bits and layout of the operation's new
    tensor: no gradient is recorded, ``x`` is contiguous, and every other tensor is
    contiguous, of ``x``'s dtype (no type promotion) and broadcasts to ``x``'s shape."""
    if x.requires_grad and torch.is_grad_enabled() or not x.is_contiguous():
        return False
    return all(
        not isinstance(other, Tensor)
        or other.dtype == x.dtype and other.is_contiguous() and torch.broadcast_shapes(other.shape, x.shape) == x.shape
        for other in others
    )


def transformed() -> bool:
    r"""Whether a :mod:`torch.func` transform (``grad``, ``vmap``, ...) is running: its
    tensors may be batched, so forwards take their plain tensor path there too."""
    return _interpreters() is not None


class Constraint(nn.Module):
    r"""A parametrization that keeps a tensor inside a feasible set.

    A constraint is registered with :func:`torch.nn.utils.parametrize.register_parametrization`,
    so ``forward`` maps the stored original to the effective tensor on every access.
    An instance passed to :func:`torchconstrain.constrain` is a *template*: each matched
    tensor gets its own copy made by :meth:`for_tensor`, so learnable state is never shared.

    Subclasses implement ``forward`` and may override:

    - :meth:`_bind`: adapt the fresh copy to the tensor it will constrain;
    - :meth:`for_tensors`: bind one template to all the tensors a rule matched at once;
    - :meth:`violation`: describe how an effective tensor breaks the constraint (``check``);
    - :meth:`penalty`: a differentiable term added by :func:`torchconstrain.penalty`;
    - :meth:`bake`: the value written into the plain weight by :func:`torchconstrain.bake`;
    - :meth:`state_problem`: refuse checkpoint state that would break the constraint;
    - :meth:`stacking`: what it does to its input and promises about its output, with
      which :func:`torchconstrain.constrain` refuses stacks that cannot always hold;
    - :meth:`forward_in_place`: ``forward``, computed in its input where that gives the
      same bits (see ``returns_new`` below).

    ``cacheable = True`` on a class lets :mod:`torchconstrain.fastpath` evaluate it without
    ``parametrize``'s per-access call chain and, with gradients off, reuse its value until
    one of its inputs changes: its forward must depend on nothing but its input and the
    constraint's own tensors and attributes. Subclasses inherit the flag, except those that
    define ``forward`` themselves: they are evaluated the plain way unless their own class
    body sets ``cacheable = True`` again.

    ``returns_new = True`` declares that ``forward``, with gradients off, returns a tensor
    nothing else holds (never its input, a view of it or a tensor it keeps). The fast path
    then hands that tensor to the next constraint of the chain through
    :meth:`forward_in_place`, which may overwrite it. A subclass that defines ``forward``
    gets neither the flag nor its parent's :meth:`forward_in_place` unless its own class
    body defines them again.

    ``absent_state`` maps the names of tensors that a constraint may hold as ``None`` (an
    absent ``Clamp`` bound) to the value that checkpoints of earlier versions held for them:
    such a key loads when every entry equals it.

    ``sparse_gradients = False`` declares that the constraint's backward needs a dense
    gradient: :func:`torchconstrain.constrain` then refuses it on the weight of an
    ``nn.Embedding`` or ``nn.EmbeddingBag`` with ``sparse=True`` (whose gradient is sparse),
    which would otherwise fail at the first ``backward``.
    """

    cacheable = False
    returns_new = False
    sparse_gradients = True
    absent_state: Mapping[str, float] = {}
    _revision = 0  # see _changed

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" not in vars(cls):
            return
        for name, default in (("cacheable", False), ("returns_new", False), ("forward_in_place", Constraint.forward_in_place)):
            if name not in vars(cls):
                setattr(cls, name, default)

    def forward_in_place(self, x: Tensor) -> Tensor:
        r"""Return ``forward(x)``, overwriting ``x`` where that gives the same bits.

        The fast path calls it with gradients off, on a tensor that the previous constraint
        of the chain made and nothing else holds (see ``returns_new``), so that a chain
        keeps one weight-sized temporary instead of one per constraint. The default calls
        ``forward``; an override computes in ``x`` only where :func:`writable` allows it.
        """
        return self.forward(x)

    # Every change that its tensors' version counters do not show (an attribute, a new or
    # replaced tensor, ``.to()``, a submodule or forward hook added) sets the
    # constraint's ``_revision`` anew (a number no other change writes, so two threads' changes
    # cannot leave the one a reader saw): the values the fast path reuses are keyed on it.

    def _changed(self) -> None:
        self.__dict__["_revision"] = next(_REVISIONS)

    def __setattr__(self, name: str, value) -> None:
        self._changed()
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self._changed()
        super().__delattr__(name)

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        self._changed()
        super().register_buffer(name, tensor, persistent)

    def register_parameter(self, name: str, param) -> None:
        self._changed()
        super().register_parameter(name, param)

    def add_module(self, name: str, module) -> None:
        self._changed()  # a constraint with submodules is evaluated the plain way
        super().add_module(name, module)

    def register_forward_pre_hook(self, *args, **kwargs):
        self._changed()  # a hook must run: the value reused with gradients off is dropped
        return super().register_forward_pre_hook(*args, **kwargs)

    def register_forward_hook(self, *args, **kwargs):
        self._changed()
        return super().register_forward_hook(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        if self._applied_already(fn):
            return self
        self._changed()
        was_meta = {name for name, t in {**self._parameters, **self._buffers}.items() if t is not None and t.is_meta}
        result = super()._apply(fn, *args, **kwargs)
        self._restore_bound_values(was_meta)
        return result

    def _applied_already(self, fn) -> bool:
        """Whether this ``_apply`` call reaches the constraint a second time with the same
        ``fn``: a tied tensor's one chain sits under each of its names, and ``to_empty``
        applied again would empty the values it has just restored."""
        last = self.__dict__.get("_last_apply")
        if last is not None and last() is fn:
            return True
        try:
            self.__dict__["_last_apply"] = weakref.ref(fn)
        except TypeError:  # not weakly referable (a bound method is a new object anyway)
            self.__dict__.pop("_last_apply", None)
        return False

    def for_tensor(self, fqn: str, tensor: Tensor) -> "Constraint":
        r"""Return a fresh copy of this template bound to ``tensor``.

        A tensor on the meta device has no values: a template that reads them refuses it
        in :meth:`_bind`. The others bind from its shape and dtype; the copy then keeps its
        own tensors' values on the CPU until ``to_empty`` gives it real memory, and writes
        them there (see :meth:`with_values`).

        Args:
            fqn: the tensor's dotted name in the model, used in error messages.
            tensor: the current effective value of the tensor.

        Raises:
            ValueError: the template does not fit the tensor (shape, dtype).
        """
        bound = copy.deepcopy(self)
        with torch.no_grad():
            bound._bind(fqn, tensor.detach())
        if tensor.is_meta:
            bound._remember_bound_values(fqn)
        return bound.to(device=tensor.device)

    def with_values(self) -> "Constraint":
        r"""This constraint, or, while it is bound to a meta tensor, a CPU copy holding the
        values it was bound with (for messages and validation)."""
        self._restore_bound_values(was_meta=set())  # forget tensors that hold values now (assign=True)
        if not self.__dict__.get("_bound_values"):
            return self
        return copy.deepcopy(self).to_empty(device="cpu")

    def _remember_bound_values(self, fqn: str) -> None:
        """Keep CPU copies of this constraint's own tensors: ``to_empty`` gives a meta model
        uninitialized memory, which :meth:`_restore_bound_values` then fills with them."""
        own = {**self._parameters, **self._buffers}
        values = {name: t.detach().clone() for name, t in own.items() if t is not None}
        if any(value.is_meta for value in values.values()):
            raise ValueError(
                f"{fqn}: {type(self).__name__} holds tensors on the meta device. Build constraints "
                "and call constrain() outside a torch.device('meta') context."
            )
        self.__dict__["_bound_values"] = values

    def _restore_bound_values(self, was_meta: set[str]) -> None:
        """Write the remembered values into the tensors in ``was_meta`` that have memory now
        (``to_empty``); forget every tensor that has memory, whatever it holds (a tensor
        that ``load_state_dict(assign=True)`` put there holds the checkpoint's values)."""
        remembered = self.__dict__.get("_bound_values")
        if not remembered:
            return
        with torch.no_grad():
            for name in list(remembered):
                tensor = getattr(self, name, None)
                if isinstance(tensor, Tensor) and not tensor.is_meta:
                    value = remembered.pop(name)
                    if name in was_meta:
                        tensor.copy_(value)
        if not remembered:
            del self.__dict__["_bound_values"]

    def __repr__(self) -> str:
        shown = self.with_values()
        return super().__repr__() if shown is self else repr(shown)

    def for_tensors(self, tensors: Mapping[str, Tensor]) -> dict[str, "Constraint"]:
        r"""Bind this template to every tensor one rule matched.

        The default binds each tensor on its own; templates that look at all matched
        tensors at once (a global magnitude mask) override this.
        """
        return {fqn: self.for_tensor(fqn, tensor) for fqn, tensor in tensors.items()}

    def _derived(self, name: str, source: Tensor, build):
        """Return ``build()``, cached until ``source`` changes.

        ``source`` is a tensor of this constraint the derived value comes from (a bound, a
        temperature). An in-place edit or ``load_state_dict`` bumps its version counter;
        ``.to()`` or an assignment replaces it; a DDP buffer sync moves
        :func:`buffer_writes_seen`. Each rebuilds the value. The cache holds ``source``
        itself, so its identity cannot be reused by another tensor while cached.
        """
        cache = self.__dict__.get("_derived_cache")
        if cache is None:
            cache = self.__dict__["_derived_cache"] = {}
        hit, writes = cache.get(name), buffer_writes_seen()
        if hit is None or hit[0] is not source or hit[1] != source._version or hit[2] != writes:
            hit = cache[name] = (source, source._version, writes, build())
        return hit[3]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_derived_cache", None)  # rebuilt on the next forward
        state.pop("_last_apply", None)
        return state

    def _bind(self, fqn: str, tensor: Tensor) -> None:
        """Adapt this (already copied) constraint to ``tensor``; raise ValueError if it can't."""

    def violation(self, value: Tensor) -> str | None:
        r"""Return why ``value`` breaks this constraint, or ``None`` when it satisfies it."""
        return None

    def penalty(self) -> Tensor | None:
        r"""Return this constraint's differentiable penalty term, or ``None`` if it has none."""
        return None

    def bake(self, value: Tensor) -> Tensor:
        r"""Return the value :func:`torchconstrain.bake` leaves in the plain tensor."""
        return self(value)

    def state_problem(self, state: Mapping[str, Tensor]) -> str | None:
        r"""Return why loading ``state`` (some of this constraint's parameters and buffers from
        a checkpoint, by name) would leave a broken constraint, or ``None`` when it fits.
        Shapes are checked before this is called."""
        return None

    def stacking(self) -> Stacking:
        r"""Return what this (bound) constraint does to its input, what it promises about its
        output and what it needs from the constraints before it in a stack (see
        :mod:`torchconstrain.constraints.stacking`). The default declares nothing: stacks
        are then checked only on the current weights."""
        return Stacking()
