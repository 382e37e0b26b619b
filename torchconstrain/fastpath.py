r"""The fast path: constrained tensors at close to plain speed, with parametrize's results.

``torch.nn.utils.parametrize`` evaluates a tensor's parametrizations through a chain of
Python calls on every access. For the tensors torchconstrain constrains, the property
that ``parametrize`` installs is replaced by one that computes the same thing with less
work, and with bitwise the same values and gradients:

- **Plans.** Each constrained tensor keeps a *plan*: the constraints' forward functions
  with what they derive from their state prepared once (scalar bounds as Python floats,
  a mask in the weight's dtype). The plan is rebuilt whenever anything it depends on
  changes: a constraint's buffer (in-place edit, ``load_state_dict``, assignment), an
  attribute of a constraint, ``.to()``, the stored original being replaced, or the
  chain of parametrizations.
- **No-grad reuse.** With gradients off (``torch.no_grad()``, ``torch.inference_mode()``)
  the effective tensor is computed once and returned again until a stored original, a
  learnable parameter of a constraint (a mask's scores) or the plan changes, which tensor
  version counters show; an in-place edit of the returned tensor also recomputes it. The
  kept copy costs the memory of the tensor, until the next access with gradients on.
- **One pass per forward.** When gradients are on, calling the model that
  :func:`~torchconstrain.constrain` was given (with two or more constrained tensors)
  evaluates the constraints of every tensor its previous forward used in one pass
  (forward hooks on that model learn which tensors from the previous call). Constraints that declare a fusion
  (:meth:`~torchconstrain.Constraint._fusion`: ``Clamp`` with scalar bounds, ``FixedMask``)
  are evaluated for all tensors at once, one autograd node each, with multi-tensor
  (``torch._foreach_*``) kernels on the GPU, so their Python and kernel-launch costs do
  not grow with the number of layers; the others run one tensor at a time. A constant
  factor right after a fused constraint (:meth:`~torchconstrain.Constraint._factor`: a
  ``FixedMask`` after a ``Clamp``) is applied inside that constraint's node. Each tensor's
  first access in the forward takes its value from that pass; any other access computes
  it anew, as ``parametrize`` does. Only the thread that ran the pass takes its values.
  Such a value may share its storage with others (``Clamp`` returns small tensors inside
  their box as rows of one stacked copy), so it must not be edited in place.

The fast path steps aside (the plain ``parametrize`` evaluation runs) under
``torch.compile``/``torch.export`` tracing, ``torch.jit.trace``, ``parametrize.cached()``,
``torch.func`` transforms and autocast (for reuse), for stored originals that are not plain
tensors (FSDP2 shards), for chains holding a parametrization that is not a torchconstrain
constraint, and for constraint classes that do not declare
``cacheable = True`` in their own body (a subclass that overrides ``forward`` must declare
it itself, and only if its forward depends on nothing but the stored original and the
constraint's own tensors and attributes).

What it cannot see: writing through ``.data`` (``weight.data.copy_(...)``) bypasses
version counters, so a value reused under ``no_grad`` would be stale; edit stored tensors
in place under ``torch.no_grad()`` instead, or turn the fast path off.

Switch: :func:`set_fast_path` works like :func:`torch.set_grad_enabled`, as a call or as
a context manager.

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

import weakref
from threading import get_ident

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torchconstrain.constraints.base import REVISION, Constraint, tracing

__all__ = ["fast_path_enabled", "set_fast_path"]

_ENABLED = [True]
_KEY = "_torchconstrain_fast"
# (thread, access log) of each batched forward now running: a forward logs the tensors it
# uses, and only the thread that evaluated a batch takes its values.
_ACTIVE: list[tuple[int, list]] = []
# Stored originals of other types (DTensor shards under FSDP2, functorch wrappers) take the
# plain path.
_PLAIN_TYPES = (nn.Parameter, Tensor)


class set_fast_path:
    r"""Turn the fast path on or off; as a context manager, restore the setting on exit.

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
        self.previous = _ENABLED[0]
        _ENABLED[0] = enabled

    def __enter__(self) -> "set_fast_path":
        return self

    def __exit__(self, *exc) -> None:
        _ENABLED[0] = self.previous


def fast_path_enabled() -> bool:
    r"""Whether constrained tensors use the fast path (see :func:`set_fast_path`)."""
    return _ENABLED[0]


_tracing_state = torch._C._get_tracing_state
_transforms = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)
_autocast = getattr(torch._C, "_is_any_autocast_enabled", torch.is_autocast_enabled)


def _usable() -> bool:
    """Whether this access may take the fast path (checked on every access: cheap first)."""
    return (
        _ENABLED[0]
        and not parametrize._cache_enabled
        and not tracing()
        and _tracing_state() is None
        and _transforms() is None
    )


# --- the property -----------------------------------------------------------------------


def install(module: nn.Module, tensor_name: str) -> None:
    r"""Put the fast property for ``tensor_name`` on ``module``'s own parametrized class."""
    setattr(type(module), tensor_name, property(_getter(module, tensor_name), _setter(tensor_name)))


def _getter(owner: nn.Module, tensor_name: str):
    # The property keeps its owner's evaluator: no attribute lookups on the module, whose
    # class differs from module to module (each gets its own), on the hot path. Other
    # modules that share the class (``nn.DataParallel`` replicas) find theirs each time.
    owner = weakref.ref(owner)
    kept: list[_Evaluator] = []

    def get(module: nn.Module) -> Tensor:
        if kept and module is owner():
            evaluator = kept[0]
        else:
            evaluator = _evaluator(module, tensor_name)
            if not kept and module is owner():
                kept.append(evaluator)
        value = evaluator.value() if _usable() else None
        return _plain(module, tensor_name, evaluator.plist) if value is None else value

    return get


def _evaluator(module: nn.Module, tensor_name: str) -> "_Evaluator":
    plist = module._modules["parametrizations"]._modules[tensor_name]
    evaluator = plist.__dict__.get(_KEY)
    if evaluator is None or evaluator.plist is not plist:
        evaluator = plist.__dict__[_KEY] = _Evaluator(plist)
    return evaluator


def _setter(tensor_name: str):
    def set_original(module: nn.Module, value: Tensor) -> None:
        module._modules["parametrizations"]._modules[tensor_name].right_inverse(value)

    return set_original


def _plain(module: nn.Module, tensor_name: str, plist: nn.Module) -> Tensor:
    """What ``parametrize``'s own property returns."""
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


def _none():
    return None


# --- one tensor ---------------------------------------------------------------------------


class _Evaluator:
    """The plan of one parametrized tensor, its reusable value and its value from a batch.

    Deep copies and pickles of a model carry ``None`` instead: the copy builds its own.
    """

    __slots__ = (
        "plist", "params", "modules", "original", "data_ptr", "count", "revision", "ok", "chain",
        "buffers", "learnables", "plan", "factors", "fusion", "reused", "pending", "__weakref__",
    )

    def __init__(self, plist: nn.Module) -> None:
        self.plist = plist
        self.params, self.modules = plist._parameters, plist._modules
        self.reused = self.pending = None
        self._build()

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return _none, ()

    def _build(self) -> None:
        self.revision = REVISION[0]
        self.chain = tuple(self.modules.values())
        self.count = len(self.chain)
        self.original = original = self.params.get("original")
        self.reused = self.pending = None
        self.data_ptr = None if original is None else original.data_ptr()
        self.ok = type(original) in _PLAIN_TYPES and all(_cacheable(c) for c in self.chain)
        if not self.ok:
            return
        # The plan depends on the buffers (identity and version); the value also on the
        # versions of the original and of learnable parameters (a mask's scores).
        self.buffers = [(c._buffers, n, t, t._version) for c in self.chain for n, t in c._buffers.items() if t is not None]
        self.learnables = [(c._parameters, n, t) for c in self.chain for n, t in c._parameters.items() if t is not None]
        self.plan = tuple(c._plan(original) if _fits(c, "_plan") else c.forward for c in self.chain)
        self.factors = tuple(
            c._factor(plan) if _fits(c, "_factor") else None for c, plan in zip(self.chain, self.plan)
        )
        where = (original.device, original.dtype)
        keys = (c._fusion() if _fits(c, "_fusion") else None for c in self.chain)
        self.fusion = tuple(None if key is None else (key, where) for key in keys)

    def state(self):
        """The versions of the tensors the value is computed from, or ``None`` (after
        rebuilding the plan) when the plan no longer fits: a structural change, a replaced
        tensor, or an edited buffer."""
        if self.revision != REVISION[0] or len(self.modules) != self.count:
            self._build()
        if not self.ok:
            return None
        original = self.original
        try:
            for container, name, tensor, version in self.buffers:
                if container[name] is not tensor or tensor._version != version:
                    return self._rebuilt_state()
            if self.params["original"] is not original or original.data_ptr() != self.data_ptr:
                return self._rebuilt_state()
            if not self.learnables:
                return original._version
            versions = [original._version]
            for container, name, tensor in self.learnables:
                if container[name] is not tensor:
                    return self._rebuilt_state()
                versions.append(tensor._version)
        except KeyError:
            return self._rebuilt_state()
        return tuple(versions)

    def _rebuilt_state(self) -> tuple | None:
        self._build()
        return self.state() if self.ok else None

    def factor_after(self, step: int) -> Tensor | None:
        """The constant factor of the constraint after number ``step``, if any."""
        return self.factors[step + 1] if step + 1 < self.count else None

    def evaluate(self, x: Tensor) -> Tensor:
        for step in self.plan:
            x = step(x)
        return x

    def value(self) -> Tensor | None:
        """The effective tensor, or ``None`` when the plain evaluation must run."""
        state = self.state()
        if state is None:
            return None
        if torch.is_grad_enabled():
            if self.reused is not None:
                self.reused = None  # training again: do not hold a copy of the weight meanwhile
            pending = self.pending
            if pending is not None and pending[2] == get_ident():  # this thread's batch
                self.pending = None
                pending[3].append(self)
                if pending[1] == state:
                    return pending[0]
            elif _ACTIVE:
                _log_access(self, get_ident())
            return self.evaluate(self.original)
        hit = self.reused
        if hit is not None and hit[1] == state and hit[0]._version == hit[2]:
            return hit[0]
        if _autocast() or self.original.is_inference():
            return None
        with torch.inference_mode(False), torch.no_grad():  # a tensor with a version counter
            value = self.evaluate(self.original)
        self.reused = (value, state, value._version)
        return value


def _log_access(evaluator: _Evaluator, thread: int) -> None:
    for owner, log in reversed(_ACTIVE):
        if owner == thread:
            log.append(evaluator)
            return


def _fits(constraint: Constraint, hook: str) -> bool:
    """Whether the constraint's ``hook`` (``_plan``, ``_fusion``, ``_factor``) was written for
    its ``forward``: not inherited from above a subclass that overrides ``forward`` (that
    subclass then gets the defaults: its own forward, no fusion, no factor)."""
    cls = type(constraint)
    hook_owner = next(k for k in cls.__mro__ if hook in vars(k))
    forward_owner = next(k for k in cls.__mro__ if "forward" in vars(k))
    return hook_owner is Constraint or issubclass(hook_owner, forward_owner)


def _cacheable(constraint: nn.Module) -> bool:
    """Declared in the constraint's own class body, and no hooks on the module."""
    return (
        type(constraint).__dict__.get("cacheable", False)
        and not constraint._forward_hooks
        and not constraint._forward_pre_hooks
    )


# --- one pass per forward -----------------------------------------------------------------


class _Batcher:
    r"""Forward hooks of a constrained model: evaluate the tensors its forward uses in one pass.

    The tensors are those the previous forward accessed (learned from an access log), so
    that a model whose forward skips some layers does not pay for them.
    """

    def __init__(self, root: nn.Module | None = None) -> None:
        self.root = None if root is None else weakref.ref(root)
        self.used: list[_Evaluator] = []
        self.running: list[tuple[list, list]] = []

    def __reduce__(self):
        return _Batcher, ()

    def __deepcopy__(self, memo):
        return _Batcher()

    def before(self, module: nn.Module, args) -> None:
        if self.root is None:
            self.root = weakref.ref(module)
        if self.root() is not module or not (torch.is_grad_enabled() and _usable()):
            self.running.append(None)
            return
        log = []
        evaluators = [e for e in self.used if e.plist.__dict__.get(_KEY) is e]
        if evaluators:
            evaluators = _evaluate_batch(evaluators, log)
        _ACTIVE.append((get_ident(), log))
        self.running.append((log, evaluators))

    def after(self, module: nn.Module, args, output) -> None:
        if not self.running:
            return
        run = self.running.pop()
        if run is None:
            return
        log, evaluators = run
        _ACTIVE[:] = [active for active in _ACTIVE if active[1] is not log]
        for evaluator in evaluators:
            evaluator.pending = None
        self.used = list(dict.fromkeys(log))


def attach(model: nn.Module) -> None:
    r"""Give ``model`` the one-pass forward hooks (once)."""
    if _batcher(model) is None:
        batcher = _Batcher(model)
        model.register_forward_pre_hook(batcher.before)
        model.register_forward_hook(batcher.after, always_call=True)


def detach(model: nn.Module) -> None:
    r"""Remove the one-pass forward hooks from ``model``."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for handle_id in [i for i, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), _Batcher)]:
            del hooks[handle_id]
            model._forward_hooks_always_called.pop(handle_id, None)


def attached(model: nn.Module) -> bool:
    r"""Whether ``model`` has the one-pass forward hooks."""
    return _batcher(model) is not None


def _batcher(model: nn.Module) -> _Batcher | None:
    for hook in model._forward_pre_hooks.values():
        if isinstance(getattr(hook, "__self__", None), _Batcher):
            return hook.__self__
    return None


def _evaluate_batch(evaluators: list[_Evaluator], log: list) -> list[_Evaluator]:
    """Evaluate every chain, fusing the constraints that share a fusion key; leave each
    value in its evaluator's ``pending``, for this thread, with the forward's access
    ``log``. Return the evaluators it served."""
    states = [e.state() for e in evaluators]
    evaluators = [e for e, state in zip(evaluators, states) if state is not None]
    states = [state for state in states if state is not None]
    xs = [e.original for e in evaluators]
    steps = [0] * len(evaluators)  # constraints of each chain applied so far
    todo = list(range(len(evaluators)))
    while todo:
        _evaluate_step(evaluators, xs, steps, todo)
        todo = [i for i in todo if evaluators[i].count > steps[i]]
    thread = get_ident()
    for evaluator, x, state in zip(evaluators, xs, states):
        evaluator.pending = (x, state, thread, log)
    return evaluators


def _evaluate_step(evaluators: list[_Evaluator], xs: list[Tensor], steps: list[int], todo: list[int]) -> None:
    """Apply the next constraint of each chain in ``todo`` to its ``xs`` entry, all
    constraints with one fusion key in one call, which also applies the constant factor
    of the constraint after it (a ``FixedMask`` after a ``Clamp``), if any."""
    groups: dict = {}
    for i in todo:
        key = evaluators[i].fusion[steps[i]]
        groups.setdefault(("alone", i) if key is None else key, []).append(i)
    for key, members in groups.items():
        if key[0] == "alone":
            i = members[0]
            xs[i] = evaluators[i].plan[steps[i]](xs[i])
            steps[i] += 1
            continue
        factors = [evaluators[i].factor_after(steps[i]) for i in members]
        fused = key[0][0]
        outputs = fused([evaluators[i].plan[steps[i]] for i in members], [xs[i] for i in members], factors)
        for i, y, factor in zip(members, outputs, factors):
            xs[i] = y
            steps[i] += 1 if factor is None else 2
