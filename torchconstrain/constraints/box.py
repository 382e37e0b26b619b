r"""Box constraints: every entry of the effective tensor lies in ``[min, max]``."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from torchconstrain.constraints import _multi
from torchconstrain.constraints.base import Constraint, tracing

__all__ = ["Clamp"]

GRADIENTS = ("pull_back", "straight_through", "clamp")


class _PullBackClamp(torch.autograd.Function):
    """Clamp forward; backward keeps an outside entry's gradient only if it points back in."""

    @staticmethod
    def forward(ctx, x: Tensor, lower, upper, owner: "Clamp") -> Tensor:
        (clamped,), _, (outside,) = _clamp_for_pull_back([x], [lower], [upper], [owner], [None])
        ctx.outside = outside
        if outside:
            ctx.save_for_backward(x, clamped)
        return clamped

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.outside:
            return grad, None, None, None
        x, clamped = ctx.saved_tensors
        return _pull_back([x], [clamped], [grad])[0], None, None, None


def _clamp_all(xs: list[Tensor], lowers: list, uppers: list) -> list[Tensor]:
    """``torch.clamp`` of each tensor: a loop on the CPU (one pass each beats two foreach
    passes) or with tensor bounds, multi-tensor kernels elsewhere (the same values:
    ``min(max(x, lo), hi)``)."""
    if _multi.loops(xs) or any(isinstance(b, Tensor) for b in (*lowers, *uppers)):
        return [torch.clamp(x, lo, hi) for x, lo, hi in zip(xs, lowers, uppers)]
    lows = [-math.inf if lo is None else lo for lo in lowers]
    highs = [math.inf if hi is None else hi for hi in uppers]
    return torch._foreach_clamp_max(torch._foreach_clamp_min(xs, lows), highs)


# While a tensor has entries outside its box, the inside test is skipped for this many
# evaluations (it would only cost a pass); then it is made again.
RETEST_EVERY = 8


def _clamp_for_pull_back(xs: list[Tensor], lowers: list, uppers: list, owners: list["Clamp"], factors: list):
    """The clamped tensors times their ``factors`` (``None``: as they are), the clamped
    tensors themselves where an entry may be outside the box (else ``None``), and for
    each whether an entry may be outside.

    On the CPU a tensor with every entry inside gets ``False``: its gradient passes as it
    is, which is what :func:`_pull_back` gives it, and nothing is saved for backward. Such
    a tensor is copied (its clamp is itself), or multiplied by its factor. The test
    (:func:`_test_scalar_boxes`) covers tensors with scalar bounds; with tensor bounds it
    is ``torch.equal``; a tensor found outside skips it for the next ``RETEST_EVERY - 1``
    evaluations. Whether a tensor is tested changes no bit: for one inside its box, the
    copy is its clamp and the pull-back factor is 1. On a GPU the test would synchronize
    with the device, and a traced graph cannot branch on data: there every tensor counts
    as outside.
    """
    if tracing() or not _multi.loops(xs):
        clamped = _clamp_all(xs, lowers, uppers)
        return _multi.times(clamped, factors), clamped, [True] * len(xs)
    tested = [_due_for_test(owner) for owner in owners]
    holds, copies = _test_scalar_boxes(xs, lowers, uppers, tested, [factor is None for factor in factors])
    ys, kept, outside = [], [], []
    for x, lo, hi, owner, factor, test, inside, copy in zip(xs, lowers, uppers, owners, factors, tested, holds, copies):
        if inside:
            if factor is not None:
                ys.append(x * factor)
            else:
                ys.append(x.clone() if copy is None else copy)
            kept.append(None)
            outside.append(False)
            continue
        clamped = torch.clamp(x, lo, hi)
        ys.append(clamped if factor is None else clamped * factor)
        kept.append(clamped)
        tensor_bounds = isinstance(lo, Tensor) or isinstance(hi, Tensor)
        out = x.numel() > 0 and not (test and tensor_bounds and torch.equal(x, clamped))
        if test and out:
            owner.__dict__["_untested"] = RETEST_EVERY - 1  # not an attribute change: no plan rebuild
        outside.append(out)
    return ys, kept, outside


def _due_for_test(owner: "Clamp") -> bool:
    left = owner.__dict__.get("_untested", 0)
    if left:
        owner.__dict__["_untested"] = left - 1
    return not left


# Tensors of at most STACK_AT_MOST entries are tested in stacks of tensors of one shape
# (at least STACK_AT_LEAST of them, at most STACK_ENTRIES entries in all): for them the
# per-tensor cost of an operator outweighs copying them.
STACK_AT_MOST = 1 << 14
STACK_AT_LEAST = 3
STACK_ENTRIES = 1 << 18


def _test_scalar_boxes(xs: list[Tensor], lowers: list, uppers: list, tested: list[bool], copied: list[bool]):
    """For each tensor to test: whether its bounds are numbers and no entry is outside (NaN
    is outside); and a copy of it where the test made one (else ``None``).

    Small tensors of one shape that would be ``copied`` when inside (not multiplied by a
    factor) are copied into one ``torch.stack`` and tested with one ``amin`` and one
    ``amax`` over its rows; the rows are their copies (where the strides match), which a
    tensor found inside returns. Other tensors get one ``aminmax`` each. The ranges are
    read back to Python in one transfer.
    """
    picked = [i for i, (x, lo, hi, test) in enumerate(zip(xs, lowers, uppers, tested))
              if test and x.numel() and not isinstance(lo, Tensor) and not isinstance(hi, Tensor)]
    holds, copies = [False] * len(xs), [None] * len(xs)
    if not picked:
        return holds, copies
    stacks = _stacks(xs, [i for i in picked if copied[i] and xs[i].numel() <= STACK_AT_MOST])
    stacked = [i for members in stacks for i in members]
    in_stacks = set(stacked)
    alone = [i for i in picked if i not in in_stacks]
    ranges = []
    for members in stacks:
        low, high, rows = _stacked_range([xs[i] for i in members])
        ranges.append((low, high))
        for i, row in zip(members, rows):
            copies[i] = row if row.stride() == xs[i].stride() else None
    if alone:
        ranges.append(_range([xs[i] for i in alone]))
    order = stacked + alone
    lows = torch.cat([low for low, _ in ranges])
    highs = torch.cat([high for _, high in ranges])
    for i, low, high in zip(order, *torch.stack([lows, highs]).tolist()):
        holds[i] = (lowers[i] is None or low >= lowers[i]) and (uppers[i] is None or high <= uppers[i])
    return holds, copies


def _stacked_range(xs: list[Tensor]) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """The least and greatest entry of each tensor of one shape, and a copy of each: the
    rows of the one stack they are computed from."""
    stacked = torch.stack(xs)
    flat = stacked.view(len(xs), -1)
    return flat.amin(1), flat.amax(1), stacked.unbind(0)  # aminmax(dim=1) is many times slower


def _range(xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The least and greatest entry of each tensor, one ``aminmax`` each."""
    ends = [torch.aminmax(x) for x in xs]
    return torch.stack([low for low, _ in ends]), torch.stack([high for _, high in ends])


def _stacks(xs: list[Tensor], indices: list[int]) -> list[list[int]]:
    """``indices`` grouped by the shape of their tensors, at most ``STACK_ENTRIES`` entries
    a group; groups of fewer than ``STACK_AT_LEAST`` are left out."""
    shapes: dict = {}
    for i in indices:
        shapes.setdefault(xs[i].shape, []).append(i)
    groups = []
    for members in shapes.values():
        size = max(1, STACK_ENTRIES // xs[members[0]].numel())
        groups += [members[k:k + size] for k in range(0, len(members), size)]
    return [group for group in groups if len(group) >= STACK_AT_LEAST]


def _pull_back(xs: list[Tensor], clamped: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    r"""Each ``grad`` where it points back into the box or the entry is inside it, else 0.

    Gradient descent moves x by -grad, so an entry above the box (``x > clamped``) keeps a
    gradient >= 0 and one below a gradient <= 0; inside, every gradient passes, infinite
    ones included. The 0/1 factor is ``(x - clamped) * sign(grad) >= 0``; multi-tensor
    kernels have no comparison, so off the CPU it is ``min(sign(...) + 1, 1)`` (equal but
    for NaN). The plain and the fused path of one device use the same formula, so they
    give the same bits.
    """
    if _multi.loops(xs):
        return [torch.sub(x, c).mul_(torch.sign(g)).ge_(0).mul_(g) for x, c, g in zip(xs, clamped, grads)]
    factors = torch._foreach_sub(xs, clamped)
    torch._foreach_mul_(factors, torch._foreach_sign(grads))
    torch._foreach_sign_(factors)
    torch._foreach_add_(factors, 1)
    torch._foreach_clamp_max_(factors, 1)
    torch._foreach_mul_(factors, grads)
    return factors


class _FusedClamp(torch.autograd.Function):
    """Clamp many tensors with scalar bounds in one autograd node, each output multiplied by
    its factor (if any): the values and gradients of each tensor's own ``Clamp.forward``
    followed by ``x * factor``, with multi-tensor kernels off the CPU."""

    @staticmethod
    def forward(ctx, lowers, uppers, owners, factors, *xs: Tensor):
        ctx.set_materialize_grads(False)
        ctx.factors = factors
        if owners is None:  # straight-through
            ctx.outside = []
            return tuple(_multi.times(_clamp_all(list(xs), lowers, uppers), factors))
        ys, clamped, outside = _clamp_for_pull_back(list(xs), lowers, uppers, owners, factors)
        ctx.outside = [i for i, out in enumerate(outside) if out]
        ctx.save_for_backward(*(xs[i] for i in ctx.outside), *(clamped[i] for i in ctx.outside))
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        wanted = [g is not None and ctx.needs_input_grad[4 + i] for i, g in enumerate(grads)]
        factors = [f if w else None for f, w in zip(ctx.factors, wanted)]
        result = [g if w else None for g, w in zip(_multi.times(list(grads), factors), wanted)]
        if ctx.outside:
            saved, n = ctx.saved_tensors, len(ctx.outside)
            pulled = [(i, saved[k], saved[n + k]) for k, i in enumerate(ctx.outside) if result[i] is not None]
            if pulled:
                passed = _pull_back([x for _, x, _ in pulled], [c for _, _, c in pulled], [result[i] for i, _, _ in pulled])
                for (i, _, _), g in zip(pulled, passed):
                    result[i] = g
        return (None, None, None, None, *result)


class _StraightThroughClamp(torch.autograd.Function):
    """Clamp forward; identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, lower, upper) -> Tensor:
        return _clamp_all([x], [lower], [upper])[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def _as_bound(value, default: float, name: str) -> Tensor:
    if value is None:
        return torch.tensor(default)
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(
            f"Clamp: expected {name} to be a number, a tensor or None. "
            f"Got {type(value).__name__}."
        )
    bound = torch.as_tensor(value, dtype=torch.get_default_dtype()).detach().clone()
    if torch.isnan(bound).any():
        raise ValueError(f"Clamp: {name} contains NaN.")
    return bound


class Clamp(Constraint):
    r"""Keep every entry of the effective tensor inside ``[min, max]``.

    Bounds are numbers (one box for the whole tensor) or tensors. A 1-D bound tensor must
    have the length of the tensor's first dimension and gives one box per output channel;
    any other bound tensor must have the tensor's number of dimensions and broadcast to it. Bounds live in buffers named ``min``
    and ``max`` (``None`` is stored as an infinite bound), so ``.to()`` and
    ``state_dict`` carry them.

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
        ValueError: ``min > max`` somewhere, a bound is NaN, or ``gradient`` is unknown.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import Clamp, constrain
        >>> layer = nn.Linear(4, 3)
        >>> _ = constrain(layer, {"weight": Clamp(-0.1, 0.1)})
        >>> bool(layer.weight.abs().max() <= 0.1)
        True
    """

    cacheable = True  # see Constraint: forward depends on its input and own state only

    def __init__(self, min=None, max=None, *, gradient: str = "pull_back") -> None:
        super().__init__()
        if gradient not in GRADIENTS:
            raise ValueError(
                f"Clamp: unknown gradient {gradient!r}. Expected one of {', '.join(GRADIENTS)}."
            )
        lower = _as_bound(min, -math.inf, "min")
        upper = _as_bound(max, math.inf, "max")
        _check_order(lower, upper, where="Clamp")
        self.gradient = gradient
        self.register_buffer("min", lower)
        self.register_buffer("max", upper)

    def _bind(self, fqn: str, tensor: Tensor) -> None:
        if not tensor.is_floating_point():
            raise ValueError(f"{fqn}: Clamp needs a floating-point tensor. Got {tensor.dtype}.")
        self.min = _broadcast_bound(self.min, tensor, fqn, "min").to(tensor.dtype)
        self.max = _broadcast_bound(self.max, tensor, fqn, "max").to(tensor.dtype)
        _check_order(self.min, self.max, where=f"{fqn}: Clamp")

    def forward(self, x: Tensor) -> Tensor:
        lower, upper = self._bounds(x)
        return self._clamp(x, lower, upper)

    def _clamp(self, x: Tensor, lower, upper) -> Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return torch.clamp(x, lower, upper)
        if self.gradient == "pull_back":
            return _PullBackClamp.apply(x, lower, upper, self)
        if self.gradient == "straight_through":
            return _StraightThroughClamp.apply(x, lower, upper)
        return torch.clamp(x, lower, upper)

    def _plan(self, like: Tensor):
        lower, upper = self._bounds(like)
        return functools.partial(self._clamp, lower=lower, upper=upper)

    def _fusion(self):
        if self.min.dim() or self.max.dim() or self.gradient == "clamp":
            return None
        if _finite_or_none(self.min) is None and _finite_or_none(self.max) is None:
            return None  # no bound at all: forward passes x through torch.clamp's tensor form
        return (Clamp._fused, self.gradient)

    @staticmethod
    def _fused(plans: list[functools.partial], xs: list[Tensor], factors: list) -> list[Tensor]:
        """Scalar-bound clamps of one gradient mode (plans from :meth:`_plan`), all at once,
        each times its factor (see :meth:`Constraint._fusion`)."""
        lowers = [p.keywords["lower"] for p in plans]
        uppers = [p.keywords["upper"] for p in plans]
        owners = [p.func.__self__ for p in plans]
        if not (torch.is_grad_enabled() and any(x.requires_grad for x in xs)):
            return _multi.times([p(x) for p, x in zip(plans, xs)], factors)
        pull_back = owners[0].gradient == "pull_back"
        return list(_FusedClamp.apply(lowers, uppers, owners if pull_back else None, factors, *xs))

    def _bounds(self, x: Tensor):
        """The bounds as Python floats when they are scalars (a much faster clamp), else tensors."""
        if self.min.dim() or self.max.dim() or tracing():
            return self.min, self.max
        lower = self._derived("min", self.min, x, lambda: _finite_or_none(self.min))
        upper = self._derived("max", self.max, x, lambda: _finite_or_none(self.max))
        if lower is None and upper is None:
            return self.min, self.max
        return lower, upper

    def right_inverse(self, value: Tensor) -> Tensor:
        return torch.clamp(value, self.min, self.max)

    def violation(self, value: Tensor) -> str | None:
        outside = (value < self.min) | (value > self.max)
        count = int(outside.sum())
        if count == 0:
            return None
        return (
            f"{count} entries outside [{_describe(self.min)}, {_describe(self.max)}] "
            f"(values from {value.min().item():.6g} to {value.max().item():.6g})"
        )

    def state_problem(self, state: dict) -> str | None:
        lower, upper = state.get("min", self.min), state.get("max", self.max)
        if lower.isnan().any() or upper.isnan().any():
            return "a bound is NaN."
        crossed = int((lower.to(upper.device) > upper).sum())
        return f"min > max at {crossed} entries." if crossed else None

    def admits_zero(self) -> Tensor:
        return (self.min <= 0) & (self.max >= 0)

    def extra_repr(self) -> str:
        text = f"min={_describe(self.min)}, max={_describe(self.max)}"
        if self.gradient != "pull_back":
            text += f", gradient={self.gradient!r}"
        return text


def _finite_or_none(bound: Tensor) -> float | None:
    value = bound.item()
    return None if math.isinf(value) else value


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
            f"{where}: expected min <= max. Got min={_describe(lower)}, max={_describe(upper)}."
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
    if not fits:
        raise ValueError(
            f"{fqn}: Clamp {name} of shape {tuple(bound.shape)} does not fit a tensor of shape "
            f"{tuple(tensor.shape)}. Expected a number, a 1-D tensor of length "
            f"{tensor.shape[0] if tensor.dim() else 1} (one bound per output channel), "
            f"or a {tensor.dim()}-D tensor that broadcasts to {tuple(tensor.shape)}."
        )
    return bound


def _describe(bound: Tensor) -> str:
    if bound.numel() == 1:
        value = bound.item()
        return "None" if math.isinf(value) else f"{value:g}"
    return f"tensor{tuple(bound.shape)}[{bound.min().item():g}..{bound.max().item():g}]"
