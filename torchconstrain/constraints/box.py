r"""Box constraints: every entry of the effective tensor lies in ``[min, max]``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchconstrain.constraints.base import Constraint, tracing, transformed

__all__ = ["Clamp"]

GRADIENTS = ("pull_back", "straight_through", "clamp")


class _PullBackClamp(torch.autograd.Function):
    """Clamp forward; backward keeps an outside entry's gradient only if it points back in.

    On the CPU the forward tests whether every entry is inside the box (the clamp equals
    its input): then the gradient passes as it is, which is what :func:`_pull_back` would
    give it, and nothing is saved. Otherwise (and on other devices, where the test would
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
        _save_for_pull_back(ctx, x, clamped)
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
        _save_for_pull_back(ctx, inputs[0], output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _pull_back_backward(ctx, grad)


def _save_for_pull_back(ctx, x: Tensor, clamped: Tensor) -> None:
    """Save what the pull-back gradient needs: nothing for a tensor found inside its box."""
    ctx.inside = _inside(x, clamped)
    if not ctx.inside:
        ctx.save_for_backward(x, clamped)


def _pull_back_backward(ctx, grad: Tensor):
    if ctx.inside:
        return grad, None, None
    x, clamped = ctx.saved_tensors
    return _pull_back(x, clamped, grad), None, None


def _inside(x: Tensor, clamped: Tensor) -> bool:
    """Whether ``x`` is inside its box (its clamp equals it; NaN counts as outside), where
    that is tested (see :class:`_PullBackClamp`); ``False`` elsewhere."""
    if x.device.type != "cpu" or tracing() or transformed():
        return False
    return torch.equal(x, clamped)


def _pull_back(x: Tensor, clamped: Tensor, grad: Tensor) -> Tensor:
    r"""``grad`` where it points back into the box or the entry is inside it, else 0.

    Gradient descent moves x by -grad, so an entry above the box (``x > clamped``) keeps a
    gradient >= 0 and one below a gradient <= 0; inside, every finite or infinite gradient
    passes. The 0/1 factor is ``(x - clamped) * sign(grad) >= 0``, in float operations
    (on the CPU, comparisons into bool tensors cost several times more).
    """
    return torch.sub(x, clamped).mul_(torch.sign(grad)).ge_(0).mul_(grad)


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

    cacheable = True  # see Constraint

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
        if self.gradient == "clamp" or not (x.requires_grad and torch.is_grad_enabled()):
            return torch.clamp(x, lower, upper)
        if self.gradient == "pull_back":
            function = _PullBackClampFunc if transformed() else _PullBackClamp
        else:
            function = _StraightThroughClampFunc if transformed() else _StraightThroughClamp
        return function.apply(x, lower, upper)

    def _bounds(self, x: Tensor):
        """The bounds as Python floats when they are scalars (a much faster clamp), else tensors."""
        lower, upper = self._buffers["min"], self._buffers["max"]
        if lower.dim() or upper.dim() or lower.is_meta or tracing() or transformed():
            return lower, upper
        low = self._derived("min", lower, lower.item)
        high = self._derived("max", upper, upper.item)
        if math.isinf(low) and math.isinf(high):
            return lower, upper
        return (None if math.isinf(low) else low), (None if math.isinf(high) else high)

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
    if bound.is_meta:
        return f"tensor{tuple(bound.shape)}"
    if bound.numel() == 1:
        value = bound.item()
        return "None" if math.isinf(value) else f"{value:g}"
    return f"tensor{tuple(bound.shape)}[{bound.min().item():g}..{bound.max().item():g}]"
