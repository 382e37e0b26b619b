r"""Box constraints: every entry of the effective tensor lies in ``[min, max]``."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from torchconstrain._distributed import buffers_written_unseen
from torchconstrain.constraints.arguments import beyond_float64, choice
from torchconstrain.constraints.base import Constraint, tracing, transformed, writable
from torchconstrain.constraints.stacking import (
    CLAMPS,
    KEEPS_SIGNS,
    MOVES_TO_ZERO,
    WITHIN_LARGEST,
    Stacking,
    declare,
    keeps_nonzero_slices,
)

__all__ = ["Clamp"]

GRADIENTS = ("pull_back", "straight_through", "clamp")
# What an absent bound stands for. Absent bounds are ``None`` buffers, so that they are
# not in ``state_dict`` or ``buffers()``: averages over a model's buffers (EMA models)
# would turn an infinite bound into NaN (inf - inf). Checkpoints that hold these values
# for an absent bound load (see ``Constraint.absent_state``).
OPEN = {"min": -math.inf, "max": math.inf}


class _PullBackClamp(torch.autograd.Function):
    """Clamp forward; backward keeps an outside entry's gradient only if it points back in.

    On the CPU the forward tests whether every entry is inside the box (:func:`_inside`):
    then the gradient passes as it is, which is what :func:`_pull_back` would give it, and
    nothing is saved. Otherwise (and on other devices, where the test would
    wait for the device, and in traced or transformed code, which cannot branch on data)
    it saves its input and its output: the stored original, which exists anyway, and the
    clamped tensor, which is the effective weight itself unless another constraint follows.
    The test changes no bit of the result.

    This is the eager form (``forward(ctx, ...)``); :class:`_PullBackClampFunc` is the same
    function in the form ``torch.func`` transforms need (``setup_context``), which costs
    about 15 µs more per call on the CPU, as ``apply`` binds its arguments through
    ``inspect.signature``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, lower, upper) -> Tensor:
        clamped = torch.clamp(x, lower, upper)
        _save_for_pull_back(ctx, x, clamped, lower, upper)
        return clamped

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _pull_back_backward(ctx, grad)


class _ClampFunc(torch.autograd.Function):
    """The ``torch.func`` form of the clamps: ``forward`` without ``ctx``, ``setup_context``
    (each subclass's) and a generated vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, lower, upper) -> Tensor:
        return torch.clamp(x, lower, upper)


class _PullBackClampFunc(_ClampFunc):
    """:class:`_PullBackClamp` for ``torch.func`` transforms."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, lower, upper = inputs
        _save_for_pull_back(ctx, x, output, lower, upper)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _pull_back_backward(ctx, grad)


def _save_for_pull_back(ctx, x: Tensor, clamped: Tensor, lower, upper) -> None:
    """Save what the pull-back gradient needs: nothing for a tensor found inside its box."""
    ctx.inside = _inside(x, clamped, lower, upper)
    if not ctx.inside:
        ctx.save_for_backward(x, clamped)


def _pull_back_backward(ctx, grad: Tensor):
    if ctx.inside:
        return grad, None, None
    x, clamped = ctx.saved_tensors
    return _pull_back(x, clamped, grad), None, None


def _inside(x: Tensor, clamped: Tensor, lower, upper) -> bool:
    """Whether ``x`` is inside its box (its clamp equals it; NaN counts as outside), where
    that is tested (see :class:`_PullBackClamp`); ``False`` elsewhere.

    Between bounds that are numbers, ``x``'s extremes tell (``aminmax`` propagates NaN), in
    a third of the time of comparing every entry: rounding to nearest is monotone, so an
    entry at most ``upper`` is at most ``upper`` rounded to any precision that holds the
    entry, which is what the clamp compares it with.
    """
    if x.device.type != "cpu" or tracing() or transformed():
        return False
    if isinstance(lower, Tensor) or isinstance(upper, Tensor) or not x.numel() or not x.is_floating_point():
        return torch.equal(x, clamped)
    smallest, largest = (t.item() for t in torch.aminmax(x))
    return (lower is None or smallest >= lower) and (upper is None or largest <= upper)


def _pull_back(x: Tensor, clamped: Tensor, grad: Tensor) -> Tensor:
    r"""``grad`` where it points back into the box or the entry is inside it, else 0.

    Gradient descent moves x by -grad, so an entry above the box (``x > clamped``) keeps a
    gradient >= 0 and one below a gradient <= 0; inside, every finite or infinite gradient
    passes. The 0/1 factor is ``(x - clamped) * sign(grad) >= 0``, in float operations
    (on the CPU, comparisons into bool tensors cost several times more), computed in the
    sign of ``grad``: under ``vmap`` (per-sample gradients) that is the batched tensor.
    """
    if grad.is_sparse:  # an embedding's sparse=True gradient: kept sparse, for sparse optimizers
        return _pull_back(x, clamped, grad.to_dense()).sparse_mask(grad.coalesce())
    factor = torch.sign(grad).mul_(torch.sub(x, clamped))
    factor = factor.ge(0).to(grad.dtype) if transformed() else factor.ge_(0)  # (vmap has no ge_ rule)
    return factor.mul_(grad)


def _pass_through(ctx, grad: Tensor):
    return grad, None, None


class _StraightThroughClamp(torch.autograd.Function):
    """Clamp forward; identity backward (eager form, see :class:`_PullBackClamp`)."""

    @staticmethod
    def forward(ctx, x: Tensor, lower, upper) -> Tensor:
        return torch.clamp(x, lower, upper)

    backward = staticmethod(_pass_through)


class _StraightThroughClampFunc(_ClampFunc):
    """:class:`_StraightThroughClamp` for ``torch.func`` transforms."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    backward = staticmethod(_pass_through)


def _as_bound(value, name: str) -> Tensor | None:
    """The bound as a tensor (a float tensor as given, anything else in float64, exact for
    every Python float; :meth:`Clamp._bind` rounds it once, to the weight's dtype), or
    ``None`` for no bound: ``None`` itself, or a number at the open side's infinity."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(
            f"Clamp: expected {name} to be a number, a tensor or None. "
            f"Got {type(value).__name__}."
        )
    if isinstance(value, Tensor) and (value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"Clamp: expected {name} to be a real tensor. Got a {value.dtype} tensor.")
    dtype = value.dtype if isinstance(value, Tensor) and value.is_floating_point() else torch.float64
    try:
        bound = torch.as_tensor(value, dtype=dtype).detach().clone()
    except (OverflowError, RuntimeError):  # an int beyond float64
        raise ValueError(f"Clamp: expected {name} to be a number float64 holds. Got {beyond_float64(value)}.") from None
    problem = _bound_problem(bound, name)
    if problem:
        raise ValueError(f"Clamp: {problem}")
    return _open_as_none(bound, name)


def _open_as_none(bound: Tensor, name: str) -> Tensor | None:
    """``None`` for a scalar bound at the open side's infinity (no bound), else ``bound``."""
    if bound.dim() == 0 and not bound.is_meta and bound.item() == OPEN[name]:
        return None
    return bound


def _bound_problem(bound: Tensor, name: str) -> str | None:
    """Why ``bound`` (``"min"`` or ``"max"``) cannot bound a tensor, or ``None``: NaN, or an
    infinite bound on the wrong side, which would make every entry infinite."""
    if bound.is_meta:
        return None
    wrong = math.inf if name == "min" else -math.inf
    if bound.numel() == 1:  # the usual case, in one call
        value = bound.item()
        nan, count = math.isnan(value), int(value == wrong)
    else:
        nan, count = bool(bound.isnan().any()), int((bound == wrong).sum())
    if nan:
        return f"{name} contains NaN."
    if count:
        where = f" at {count} entries" if bound.numel() > 1 else ""
        return (
            f"{name} is {wrong}{where}, which would make every entry {wrong}. "
            f"Expected a finite {name}, or None for no bound."
        )
    return None


class Clamp(Constraint):
    r"""Keep every entry of the effective tensor inside ``[min, max]``.

    Bounds are numbers (one box for the whole tensor) or tensors. A 1-D bound tensor must
    have the length of the tensor's first dimension and gives one box per output channel;
    any other bound tensor must have the tensor's number of dimensions and broadcast to it.
    Bounds live in buffers named ``min`` and ``max``, so ``.to()`` and ``state_dict`` carry
    them; an absent bound (``None``, or a number at the open side's infinity) is a ``None``
    buffer, so that ``state_dict`` leaves it out and averages over the model's buffers
    (EMA models) cannot turn it into NaN. A bound is rounded once, when the
    constraint is bound to its tensor, to the nearest value of the tensor's dtype (as torch
    compares a tensor with a Python number): ``Clamp(-0.1, 0.1)`` on a float64 weight is
    exactly ``[-0.1, 0.1]`` in float64.

    A plain clamp has zero gradient outside the box, so a stored weight that ends up
    outside (after loading a checkpoint, or momentum overshooting) would stay stuck.
    ``gradient`` chooses what the stored original receives:

    - ``"pull_back"`` (default): inside the box the gradient passes unchanged; outside it
      passes only when it points back into the box, so the loss can pull a weight back
      but never pushes it further out.
    - ``"straight_through"``: the gradient passes everywhere, as if there were no clamp.
    - ``"clamp"``: the gradient of :func:`torch.clamp` (zero outside the box).

    The forward value is :func:`torch.clamp` in every mode, and assigning to the
    parametrized tensor stores the clamped value (``right_inverse``).

    Args:
        min: lower bound, ``None`` for no lower bound.
        max: upper bound, ``None`` for no upper bound.
        gradient: one of ``"pull_back"``, ``"straight_through"``, ``"clamp"``.

    Raises:
        TypeError: a bound is not a number, a real tensor or ``None``; ``gradient`` is not a string.
        ValueError: no finite bound (``Clamp()`` would change nothing), ``min > max``
            somewhere, a bound is NaN, ``min`` is ``+inf`` or ``max`` is ``-inf`` somewhere
            (every entry would be infinite), or ``gradient`` is unknown.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import Clamp, constrain
        >>> layer = nn.Linear(4, 3)
        >>> _ = constrain(layer, {"weight": Clamp(-0.1, 0.1)})
        >>> bool(layer.weight.abs().max() <= 0.1)
        True
    """

    cacheable = True  # see Constraint
    returns_new = True  # torch.clamp and the clamp Functions make a new tensor
    absent_state = OPEN  # see Constraint

    def __init__(self, min=None, max=None, *, gradient: str = "pull_back") -> None:
        super().__init__()
        choice("Clamp", "gradient", gradient, GRADIENTS)
        lower, upper = _as_bound(min, "min"), _as_bound(max, "max")
        if lower is None and upper is None:
            raise ValueError(
                f"Clamp: expected a finite bound. Got min={min!r}, max={max!r}, which would leave every "
                "entry as it is."
            )
        if not _one_per_channel_and_one_per_entry(lower, upper):  # (their shapes meet at bind)
            _check_order(_or_open(lower, "min"), _or_open(upper, "max"), where="Clamp")
        self.gradient = gradient
        self.register_buffer("min", lower)
        self.register_buffer("max", upper)

    def _bind(self, fqn: str, tensor: Tensor) -> None:
        if not tensor.is_floating_point():
            raise ValueError(f"{fqn}: Clamp needs a floating-point tensor. Got {tensor.dtype}.")
        bounds = {}
        for name in ("min", "max"):
            given = self._buffers[name]
            if given is None:
                bounds[name] = None
                continue
            given = _broadcast_bound(given, tensor, fqn, name)
            rounded = given.to(tensor.dtype)  # rounded once, to the nearest value
            if _bound_problem(rounded, name):  # a finite bound beyond the dtype's range
                raise ValueError(
                    f"{fqn}: Clamp {name}={describe_bound(given)} is beyond the range of {tensor.dtype}: it "
                    f"rounds to {-OPEN[name]} there, which would make every entry infinite. "
                    f"Expected a {name} within the range of {tensor.dtype}."
                )
            bounds[name] = _open_as_none(rounded, name)  # above every value of the dtype: no bound
        self.min, self.max = bounds["min"], bounds["max"]
        _check_order(self.bound("min"), self.bound("max"), where=f"{fqn}: Clamp")

    def forward(self, x: Tensor) -> Tensor:
        lower, upper = self._bounds(x)
        return self._clamp(x, lower, upper)

    def forward_in_place(self, x: Tensor) -> Tensor:
        lower, upper = self._bounds(x)
        if lower is None and upper is None:
            return x
        return x.clamp_(lower, upper) if writable(x, lower, upper) else self._clamp(x, lower, upper)

    def _clamp(self, x: Tensor, lower, upper) -> Tensor:
        if lower is None and upper is None:  # no bound at all: a copy, with the gradient of one
            return x.clone()
        if self.gradient == "clamp" or not (x.requires_grad and torch.is_grad_enabled()):
            return torch.clamp(x, lower, upper)
        if self.gradient == "pull_back":
            function = _PullBackClampFunc if transformed() else _PullBackClamp
        else:
            function = _StraightThroughClampFunc if transformed() else _StraightThroughClamp
        return function.apply(x, lower, upper)

    def _bounds(self, x: Tensor):
        """The bounds as Python floats when they are scalars (a much faster clamp), else
        tensors (the same bits: a bound is in the tensor's dtype); ``None`` where there is none."""
        lower, upper = self._buffers["min"], self._buffers["max"]
        if _tensor_bound(lower) or _tensor_bound(upper) or tracing() or transformed() or buffers_written_unseen():
            return lower, upper
        return self._float_bound("min", lower), self._float_bound("max", upper)

    def _float_bound(self, name: str, bound: Tensor | None) -> float | None:
        if bound is None:
            return None
        value = self._derived(name, bound, bound.item)
        return None if value == OPEN[name] else value  # edited in place to no bound

    def bound(self, name: str) -> Tensor:
        r"""The bound ``"min"`` or ``"max"`` as a tensor: an absent one as its infinity."""
        return _or_open(self._buffers[name], name)

    def right_inverse(self, value: Tensor) -> Tensor:
        lower, upper = self.min, self.max
        return value.clone() if lower is None and upper is None else torch.clamp(value, lower, upper)

    def violation(self, value: Tensor) -> str | None:
        lower, upper = self.bound("min"), self.bound("max")
        problem = _bound_problem(lower, "min") or _bound_problem(upper, "max")
        if problem:  # a bound edited in place, or averaged from an infinite entry
            return problem
        outside = (value < lower) | (value > upper)
        count = int(outside.sum())
        if count == 0:
            return None
        return (
            f"{count} entries outside [{describe_bound(lower)}, {describe_bound(upper)}] "
            f"(values from {value.min().item():.6g} to {value.max().item():.6g})"
        )

    def state_problem(self, state: dict) -> str | None:
        lower, upper = state.get("min", self.bound("min")), state.get("max", self.bound("max"))
        if lower.is_meta or upper.is_meta:
            return None
        problem = _bound_problem(lower, "min") or _bound_problem(upper, "max")
        if problem:
            return problem
        crossed = int((lower.to(upper.device) > upper).sum())
        return f"min > max at {crossed} entries." if crossed else None

    def stacking(self) -> Stacking:
        # A box that contains zero is kept by any map that moves entries towards zero, a box
        # whose only finite bounds are 0 (NonNeg) by any that keeps signs, any box by a clamp
        # into a box that intersects it (see Stacking.box).
        lower, upper = self.bound("min"), self.bound("max")
        contains_zero = bool(((lower <= 0) & (upper >= 0)).all())
        finite = torch.cat([lower[lower.isfinite()], upper[upper.isfinite()]])
        zero_bound = bool((finite == 0).any())
        does = [CLAMPS] + ([MOVES_TO_ZERO, KEEPS_SIGNS] if contains_zero else [])
        if not zero_bound:  # clamp(x) == 0 only where x == 0 or a bound is 0
            does.append(keeps_nonzero_slices(None))
        if finite.numel() == 0:
            return declare(does, box=(lower, upper))
        kept_by = [CLAMPS] + ([MOVES_TO_ZERO] if contains_zero else [])
        if bool((finite == 0).all()):
            kept_by.append(KEEPS_SIGNS)
        if lower.dim() == upper.dim() == 0 and contains_zero and _symmetric_or_one_sided(lower, upper):
            kept_by.append(WITHIN_LARGEST)
        return declare(does, f"every entry in [{_end(lower, '-inf')}, {_end(upper, 'inf')}]", kept_by, box=(lower, upper))

    def extra_repr(self) -> str:
        text = f"min={describe_bound(self.bound('min'))}, max={describe_bound(self.bound('max'))}"
        if self.gradient != "pull_back":
            text += f", gradient={self.gradient!r}"
        return text


def _tensor_bound(bound: Tensor | None) -> bool:
    """Whether ``bound`` must be passed to the clamp as a tensor (not a scalar, or on the meta device)."""
    return bound is not None and bool(bound.dim() or bound.is_meta)


def _or_open(bound: Tensor | None, name: str) -> Tensor:
    return torch.tensor(OPEN[name]) if bound is None else bound


def _one_per_channel_and_one_per_entry(lower: Tensor | None, upper: Tensor | None) -> bool:
    """Whether one bound is 1-D (a bound per output channel, laid along dim 0 at bind) and
    the other has more dims: they broadcast along different dims until then."""
    dims = sorted(bound.dim() for bound in (lower, upper) if bound is not None)
    return len(dims) == 2 and dims[0] == 1 and dims[1] > 1


def _check_order(lower: Tensor, upper: Tensor, *, where: str) -> None:
    try:
        crossed = lower > upper
    except RuntimeError as error:
        raise ValueError(
            f"{where}: min of shape {tuple(lower.shape)} and max of shape "
            f"{tuple(upper.shape)} do not broadcast."
        ) from error
    if crossed.any():
        raise ValueError(
            f"{where}: expected min <= max. Got min={describe_bound(lower)}, max={describe_bound(upper)}."
        )


def _broadcast_bound(bound: Tensor, tensor: Tensor, fqn: str, name: str) -> Tensor:
    """Return ``bound`` reshaped so that it broadcasts against ``tensor``.

    A 1-D bound is one value per output channel (dim 0), never a trailing-dim broadcast;
    any other bound must have the tensor's number of dims and broadcast to its shape.
    """
    if bound.dim() == 0:
        return bound
    if bound.dim() == 1 and tensor.dim() >= 1 and bound.numel() == tensor.shape[0]:
        return bound.reshape(-1, *([1] * (tensor.dim() - 1)))
    fits = bound.dim() == tensor.dim() and all(b in (1, t) for b, t in zip(bound.shape, tensor.shape))
    if not fits and tensor.dim() == 0:
        raise ValueError(
            f"{fqn}: Clamp {name} of shape {tuple(bound.shape)} does not fit a 0-D tensor (no "
            "channels). Expected a number or a 0-D tensor."
        )
    if not fits:
        raise ValueError(
            f"{fqn}: Clamp {name} of shape {tuple(bound.shape)} does not fit a tensor of shape "
            f"{tuple(tensor.shape)}. Expected a number, a 1-D tensor of length {tensor.shape[0]} "
            f"(one bound per output channel), or a {tensor.dim()}-D tensor that broadcasts to "
            f"{tuple(tensor.shape)}."
        )
    return bound


def _symmetric_or_one_sided(lower: Tensor, upper: Tensor) -> bool:
    """Whether the scalar box ``[lower, upper]`` is ``[-a, a]``, ``[0, a]`` or ``[-a, 0]``."""
    return bool(lower == -upper or lower == 0 or upper == 0)


def _end(bound: Tensor, infinite: str) -> str:
    """One end of the box in words (``infinite`` where there is none)."""
    return infinite if bound.numel() == 1 and math.isinf(bound.item()) else describe_bound(bound)


def describe_bound(bound: Tensor) -> str:
    """A bound for messages and ``repr``: an infinite scalar bound reads ``None`` (no bound)."""
    if bound.is_meta:
        return f"tensor{tuple(bound.shape)}"
    if bound.numel() == 1:
        value = bound.item()
        return "None" if math.isinf(value) else f"{value:g}"
    if bound.numel() == 0:  # a bound per channel of a tensor without channels
        return f"tensor{tuple(bound.shape)}[]"
    return f"tensor{tuple(bound.shape)}[{bound.min().item():g}..{bound.max().item():g}]"
