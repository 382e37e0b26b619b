r"""The fast path: constrained tensors at close to plain speed, with parametrize's results.

``parametrize`` evaluates a tensor's chain through the property, the
``ParametrizationList`` module and each constraint's ``__call__`` on every access. The
property installed here calls the constraints' ``forward`` methods in order on the stored
original instead: the same operations without the module calls, so values and gradients
are bitwise the plain path's.

- **With gradients on** the effective tensor is computed on every access: nothing is kept,
  nothing goes stale, and ``torch.utils.checkpoint`` recomputes what the forward computed.
- **With gradients off** it is computed once, each constraint after the first computing in
  the tensor the one before made (``Constraint.returns_new``), and returned again until
  something it is computed from changes (see :class:`_Kept`). That value is the one
  weight-sized tensor kept per constrained tensor, dropped at the next access with
  gradients on.

The plain ``parametrize`` property runs instead under ``torch.compile``/``torch.export``
tracing, ``torch.jit.trace``, ``parametrize.cached()`` and ``torch.func`` transforms, for
stored originals that are not plain tensors (FSDP2 shards), for chains with a
parametrization that is not a cacheable torchconstrain constraint (see
:class:`~torchconstrain.Constraint`) or with hooks, while global module hooks are
registered, and where :func:`set_fast_path` turned it off for the calling thread. Under
autocast, for stored originals in shared memory, and in a ``DistributedDataParallel``
forward that syncs buffers (which it writes without moving their version counters), the
value is computed on every access. Writes through a parameter's or a kept value's
``.data`` are seen (:mod:`torchconstrain._tracked`); writes through a buffer's are not. Fused optimizer steps,
which write parameters without moving their version counters, move them (a global
optimizer step post-hook); collectives such as ``dist.broadcast`` into parameters do not.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torchconstrain import Clamp, constrain, set_fast_path
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> _ = constrain(model, {nn.Linear: Clamp(-0.1, 0.1)})
    >>> x = torch.randn(3, 4)
    >>> fast = model(x)
    >>> with set_fast_path(False):
    ...     plain = model(x)
    >>> torch.equal(fast, plain)
    True
"""

from __future__ import annotations

import itertools
import operator
import threading

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from torchconstrain._distributed import buffer_writes_seen, buffers_written_unseen
from torchconstrain._tensors import module_hooks
from torchconstrain._tracked import Tracked, track_chain, track_value
from torchconstrain.constraints.base import Constraint, tracing

__all__ = ["fast_path_enabled", "set_fast_path"]

_KEY = "_torchconstrain_kept"  # a ParametrizationList's _Kept, while it holds one


# Stored originals of other types (DTensor shards under FSDP2, functorch wrappers) take the
# plain path.
_PLAIN_TYPES = (nn.Parameter, Tracked, Tensor)


class _Switch(threading.local):
    enabled = True  # every thread starts with the fast path on, as with grad mode


_SWITCH = _Switch()


class set_fast_path:
    r"""Turn the fast path on or off for this thread; as a context manager, restore the
    setting on exit.

    Args:
        enabled: ``True`` (the default setting) or ``False``.

    Example:
        >>> from torchconstrain import fast_path_enabled, set_fast_path
        >>> with set_fast_path(False):
        ...     fast_path_enabled()
        False
        >>> fast_path_enabled()
        True
    """

    def __init__(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"set_fast_path: expected True or False. Got {enabled!r}.")
        self.previous = _SWITCH.enabled
        _SWITCH.enabled = enabled

    def __enter__(self) -> "set_fast_path":
        return self

    def __exit__(self, *exc) -> None:
        _SWITCH.enabled = self.previous


def fast_path_enabled() -> bool:
    r"""Whether constrained tensors use the fast path in this thread (see :func:`set_fast_path`)."""
    return _SWITCH.enabled


_tracing_state = torch._C._get_tracing_state
_transforms = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)
_autocast = getattr(torch._C, "_is_any_autocast_enabled", torch.is_autocast_enabled)
_GLOBAL_HOOKS = (
    _module._global_forward_hooks,
    _module._global_forward_pre_hooks,
    _module._global_backward_hooks,
    _module._global_backward_pre_hooks,
)


def _usable() -> bool:
    """Whether this access may take the fast path (checked on every access)."""
    return (
        _SWITCH.enabled
        and not parametrize._cache_enabled
        and not tracing()
        and _tracing_state() is None
        and _transforms() is None
        and not any(_GLOBAL_HOOKS)
    )


def _fused_steps_seen(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """A fused optimizer step (``fused=True``) writes its parameters without moving their
    version counters: move them, so that a value kept from before the step is not reused
    after it (a global step post-hook, registered once when this module is imported)."""
    written = [p for group in optimizer.param_groups if group.get("fused") for p in group["params"]]
    if written:
        torch.autograd.graph.increment_version(written)


register_optimizer_step_post_hook(_fused_steps_seen)


# --- the property -----------------------------------------------------------------------


def install(module: nn.Module, tensor_name: str) -> None:
    r"""Put the fast property for ``tensor_name`` on ``module``'s own parametrized class,
    drop any value kept while the chain was being built (``parametrize`` reads the tensor
    when it stacks a parametrization) and track the chain's parameters (:mod:`._tracked`)."""
    setattr(type(module), tensor_name, property(_getter(tensor_name), _setter(tensor_name)))
    plist = module._modules["parametrizations"]._modules[tensor_name]
    plist.__dict__.pop(_KEY, None)
    track_chain(plist)  # now, so that compiled code sees the same types from the start


def _getter(tensor_name: str):
    def get(module: nn.Module) -> Tensor:
        plist = module._modules["parametrizations"]._modules[tensor_name]
        if not _usable():
            if buffers_written_unseen() or torch.is_grad_enabled() and not tracing():
                plist.__dict__.pop(_KEY, None)  # training on the plain path holds no kept value either
            return _plain(module, tensor_name, plist)
        kept = plist.__dict__.get(_KEY)
        if kept is not None:
            if not torch.is_grad_enabled() and kept.holds():  # the common no-grad access
                return kept.value
            del kept  # training holds no copy; a stale one is freed before its replacement
            plist.__dict__.pop(_KEY, None)  # (another thread may have dropped it already)
        value = _value(plist)
        return _plain(module, tensor_name, plist) if value is None else value

    return get


def _setter(tensor_name: str):
    def set_original(module: nn.Module, value: Tensor) -> None:
        module._modules["parametrizations"]._modules[tensor_name].right_inverse(value)

    return set_original


def _plain(module: nn.Module, tensor_name: str, plist: nn.Module) -> Tensor:
    """What ``parametrize``'s own property returns, except that ``parametrize.cached()``
    keys the module it is called on, not the one its property was made for: replicas that
    share the class (``nn.DataParallel``'s) each get their own value."""
    if torch.jit.is_scripting():
        raise RuntimeError("Parametrization is not working with scripting.")
    if not parametrize._cache_enabled:
        return plist()
    if _tracing_state() is not None:
        raise RuntimeError("Cannot trace a model while caching parametrizations.")
    key = (id(module), tensor_name)
    tensor = parametrize._cache.get(key)
    if tensor is None:
        tensor = parametrize._cache[key] = plist()
    return tensor


# --- one tensor ---------------------------------------------------------------------------


def _value(plist: nn.Module) -> Tensor | None:
    """The effective tensor, kept in ``plist`` for reuse when computed with gradients off;
    ``None`` when the plain evaluation must run. It reads the chain and the stored original
    from ``plist`` on every call, so it never holds on to a replaced one."""
    original = plist._parameters.get("original")
    chain = plist._modules.values()
    if type(original) not in _PLAIN_TYPES or not plist.is_tensor or _hooked(plist) or not all(map(_cacheable, chain)):
        return None
    if buffers_written_unseen() or torch.is_grad_enabled() or _autocast() or original.is_inference() or _shared(original):
        return _evaluate(original, chain)
    track_chain(plist)  # tensors put in since install: .data writes show in their versions
    kept = _Kept(plist)  # what the value is computed from, read before it is
    with torch.inference_mode(False), torch.no_grad():  # a tensor with a version counter
        value = _evaluate_in_place(original, chain)
    plist.__dict__[_KEY] = kept.keep(value)
    return value


_VERSION = operator.attrgetter("_version")
_REVISION = operator.attrgetter("_revision")
_is = operator.is_
_END = object()
_chained = itertools.chain.from_iterable


class _Kept:
    """A value kept for reuse with gradients off, and everything it is computed from as
    it was then: the chain, the stored original and every constraint's tensors (their
    identities in the dicts that hold them and their version counters: ``optimizer.step()``,
    ``load_state_dict``, in-place edits, tensors swapped in by ``functional_call``), the
    original's storage (``.data`` assigned), each constraint's revision number (attributes
    set, tensors replaced, hooks added, ``.to()``), the value's own version (edited in
    place), and the DDP buffer syncs seen (``buffer_writes_seen``: they move no counter; see
    ``buffers_written_unseen`` for the ones not seen). It holds the objects it names, so
    that their identities cannot be taken by others while it is kept. Deep copies and
    pickles of a model carry ``None`` instead.

    :meth:`holds` checks all of it in a few calls that each walk a whole tuple in C: between
    accesses the model's kernels have pushed these objects out of the CPU caches.
    """

    __slots__ = ("chain", "revisions", "views", "held", "tensors", "versions", "original", "pointer", "writes_seen",
                 "value")

    def __init__(self, plist: nn.Module) -> None:
        chain = self.chain = tuple(plist._modules.values())
        self.revisions = tuple(map(_REVISION, chain))
        holding_tensors = (plist._parameters,) + tuple(d for c in chain for d in (c._buffers, c._parameters))
        dicts = (plist._modules, *holding_tensors, *module_hooks(plist))  # a hook on the list: the plain path runs
        # Live views of the dicts, then an end mark: walking them beside ``held`` in step
        # finds a value replaced, added or removed (the end marks no longer meet).
        self.views = tuple(d.values() for d in dicts) + ((_END,),)
        self.held = tuple(_chained(self.views))
        self.tensors = tuple(t for d in holding_tensors for t in d.values() if t is not None)
        self.versions = tuple(map(_VERSION, self.tensors))
        self.original = plist._parameters["original"]
        self.pointer = self.original.data_ptr()
        self.writes_seen = buffer_writes_seen()
        self.value = None

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return type(None), ()  # unpickles as None

    def keep(self, value: Tensor) -> "_Kept":
        track_value(value)  # a write through its .data shows in its version too
        self.value = value
        self.tensors += (value,)  # an in-place edit of the value itself makes it stale too
        self.versions += (value._version,)
        return self

    def holds(self) -> bool:
        """Whether the value is still the effective tensor: neither it (an in-place edit)
        nor anything it is computed from has changed."""
        return (
            not _autocast()
            and not buffers_written_unseen()
            and buffer_writes_seen() == self.writes_seen
            and tuple(map(_REVISION, self.chain)) == self.revisions
            and all(map(_is, _chained(self.views), self.held))
            and tuple(map(_VERSION, self.tensors)) == self.versions
            and self.original.data_ptr() == self.pointer
        )


def _evaluate(x: Tensor, chain) -> Tensor:
    """What ``ParametrizationList.forward`` computes, without the module calls."""
    for constraint in chain:
        x = constraint.forward(x)
    return x


def _evaluate_in_place(x: Tensor, chain) -> Tensor:
    """:func:`_evaluate` with gradients off, where each constraint whose input the previous
    one made (``returns_new``) may overwrite it (``forward_in_place``): the stored original
    is never written, and a chain holds one temporary at a time."""
    made = False  # whether x is a tensor the previous constraint made, which nothing else holds
    for constraint in chain:
        given = x
        x = constraint.forward_in_place(x) if made and isinstance(constraint, Constraint) else constraint.forward(x)
        made = getattr(constraint, "returns_new", False) and (made or not _shares_memory(x, given))
    return x


def _shared(tensor: Tensor) -> bool:
    """Whether ``tensor`` is in the CPU's shared memory (``share_memory()``), which other
    processes write without moving this process's version counters (Hogwild training)."""
    return tensor.device.type == "cpu" and tensor.untyped_storage().is_shared()


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory (the same storage, or either has none)."""
    pointer = a.untyped_storage().data_ptr()
    return not pointer or pointer == b.untyped_storage().data_ptr()


def _cacheable(constraint: nn.Module) -> bool:
    """A constraint class that declares it, without submodules or hooks of its own."""
    return (
        getattr(type(constraint), "cacheable", False)
        and constraint.__dict__.get("cacheable", True)  # an instance may opt out
        and not constraint._modules
        and not _hooked(constraint)
    )


def _hooked(module: nn.Module) -> bool:
    return any(module_hooks(module))
