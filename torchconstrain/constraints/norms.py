r"""Sign and norm constraints: ``NonNeg``, ``MaxNorm``, ``UnitNorm``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchconstrain.constraints.arguments import choice, integer, number
from torchconstrain.constraints.base import Constraint, at_least_float32, tracing, transformed, writable
from torchconstrain.constraints.box import Clamp, describe_bound
from torchconstrain.constraints.stacking import (
    KEEPS_SIGNS,
    MOVES_TO_ZERO,
    Stacking,
    declare,
    keeps_nonzero_slices,
    keeps_unit_slices,
    scales_slices,
)

__all__ = ["NonNeg", "MaxNorm", "UnitNorm"]


class NonNeg(Clamp):
    r"""Keep every entry of the effective tensor at or above zero.

    A :class:`~torchconstrain.Clamp` with ``min=0`` and no upper bound, with the same
    ``gradient`` choices (default ``"pull_back"``: a stored negative entry still learns
    its way back).

    Example:
        >>> from torch import nn
        >>> from torchconstrain import NonNeg, constrain
        >>> layer = nn.Linear(4, 4)
        >>> _ = constrain(layer, {"weight": NonNeg()})
        >>> bool(layer.weight.min() >= 0)
        True
    """

    def __init__(self, *, gradient: str = "pull_back") -> None:
        super().__init__(0.0, None, gradient=gradient)

    def state_problem(self, state: dict) -> str | None:
        lower = state.get("min")
        if lower is None or lower.is_meta or not bool((lower != 0).any()):
            return super().state_problem(state)
        return f"NonNeg's min is 0. Got min={describe_bound(lower)} (a Clamp's checkpoint?)."

    def extra_repr(self) -> str:
        return "" if self.gradient == "pull_back" else f"gradient={self.gradient!r}"


def _norm_range(norms: Tensor) -> str:
    """The norms for a message: the range of the numbers, and how many are NaN."""
    numbers = norms[~norms.isnan()]
    nan = norms.numel() - numbers.numel()
    shown = f"norms from {numbers.min().item():.6g} to {numbers.max().item():.6g}" if numbers.numel() else ""
    return ", ".join(filter(None, [shown, f"{nan} NaN" if nan else ""]))


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for a norm recomputed from a rescaled tensor of ``dtype``."""
    return max(1e-5, 8 * torch.finfo(dtype).eps)


def _smallest_plain_norm(dtype: torch.dtype) -> float:
    """The smallest norm that the plain ``vector_norm`` of a ``dtype`` tensor computes to
    full precision: its largest squares are normal numbers far above the smallest one (in
    float32 for the half types, which torch reduces in float32), and so is the norm."""
    reduced = torch.float32 if torch.finfo(dtype).bits < 32 else dtype
    finfo = torch.finfo(reduced)
    return max(finfo.tiny**0.5 / finfo.eps, torch.finfo(dtype).tiny)


#: :func:`_smallest_plain_norm` of each floating-point dtype, looked up on every forward.
_SMALLEST_PLAIN_NORM = {
    dtype: _smallest_plain_norm(dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


class _ChannelNorm(Constraint):
    """Shared by the norm constraints: the L2 norm of each slice along ``dim`` (of each
    entry, its magnitude, for a 1-D tensor such as a bias).

    The plain norm squares the entries, so in float32 a slice of entries around 1e-21
    underflows and one around 1e20 overflows. Such slices are divided by their largest
    magnitude first (:meth:`_scaled`); every other slice takes the plain computation,
    bitwise as before.
    """

    sparse_gradients = False  # divisions by per-slice norms: no sparse kernels

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = integer(type(self).__name__, "dim", dim)

    def _bind(self, fqn: str, tensor: Tensor) -> None:
        if not tensor.is_floating_point():
            raise ValueError(f"{fqn}: {type(self).__name__} needs a floating-point tensor. Got {tensor.dtype}.")
        if not -tensor.dim() <= self.dim < tensor.dim():
            raise ValueError(
                f"{fqn}: {type(self).__name__} dim={self.dim} is out of range for a tensor of "
                f"shape {tuple(tensor.shape)}."
            )

    def _others(self, x: Tensor) -> list[int]:
        return [d for d in range(x.dim()) if d != self.dim % x.dim()]

    def _plain(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The plain norms of the slices, and which of them are exact (``None``: all are,
        as tested on the CPU outside traced or transformed code; elsewhere never assumed)."""
        norms = _per_slice(torch.linalg.vector_norm, x, self._others(x), each=torch.abs)
        if x.numel() == 0:  # no entries, nothing to scale
            return norms, None
        smallest = _SMALLEST_PLAIN_NORM.get(x.dtype) or _smallest_plain_norm(x.dtype)
        exact = norms.isfinite() & (norms >= smallest)
        if x.device.type == "cpu" and not (tracing() or transformed()) and bool(exact.all()):
            return norms, None
        return norms, exact

    def _scaled(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(largest, scaled, norms)``: each slice's largest magnitude (1 for a zero slice; it
        may be subnormal), the slices divided by it, and their norms (from 1 to the square
        root of the slice's size, or 0 for a zero slice)."""
        largest = _per_slice(torch.amax, x.abs(), self._others(x))
        largest = torch.where(largest > 0, largest, torch.ones_like(largest))
        scaled = x / largest
        return largest, scaled, _per_slice(torch.linalg.vector_norm, scaled, self._others(x), each=torch.abs)

    def norms(self, x: Tensor) -> Tensor:
        r"""The L2 norm of every slice along ``dim``, kept broadcastable against ``x``
        (``inf`` only for a norm above the dtype's largest number)."""
        norms, exact = self._plain(x)
        if exact is None:
            return norms
        largest, _, scaled_norms = self._scaled(x)
        return torch.where(exact, norms, largest * scaled_norms)


def _per_slice(reduce, x: Tensor, dims: list[int], each=None) -> Tensor:
    """``reduce(x, dim=dims, keepdim=True)``; for a 1-D tensor, whose slices are single
    entries (no ``dims``, where torch would reduce over everything), ``each(x)`` (``x``
    itself by default)."""
    if dims:
        return reduce(x, dim=dims, keepdim=True)
    return x if each is None else each(x)


class MaxNorm(_ChannelNorm):
    r"""Keep the L2 norm of every slice along ``dim`` (every output channel) at most ``max_value``.

    Like Keras's ``MaxNorm``: a slice whose norm exceeds ``max_value`` is scaled back onto
    the sphere of radius ``max_value``; slices inside the ball are left exactly as they are.
    Zeros stay zeros, so it composes with masks. On a 1-D tensor (a bias) each entry is
    a slice: magnitudes above ``max_value`` are brought back to it. :func:`torchconstrain.check` allows a
    relative tolerance of ``max(1e-5, 8 * eps)`` of the dtype for the rescaled norms.

    The gradient of a stored slice outside the ball: the rescaling's own (``"scale"``) has
    no component along the slice, so once a slice has left the ball no loss can bring it
    back inside, whatever it asks of the norm. ``"pull_back"`` (the default) adds that
    component back where gradient descent moves the slice towards the ball: it is the
    rescaling's gradient plus ``factor * max(w . g, 0) / max_value**2 * w`` (``w`` the
    effective slice, ``g`` its gradient, ``factor`` the rescaling), so the stored slice
    can return, as a Keras projection after each step lets it. Slices inside the ball get
    their gradient unchanged either way. In float16 and bfloat16 the factor is computed in
    float32 (in float16 it could underflow to 0) and the product rounded once.

    Args:
        max_value: the largest allowed norm, > 0, and at least ``sqrt(n)`` times the smallest
            normal number of the tensor's dtype, for slices of ``n`` entries (refused when
            applied: below it, entries of a slice at the bound are subnormal; float16's
            smallest normal number is 6.1e-5).
        dim: the dimension that indexes the slices (0: output channels).
        gradient: ``"pull_back"`` or ``"scale"`` (see above).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import MaxNorm, constrain
        >>> layer = nn.Linear(16, 4)
        >>> _ = constrain(layer, {"weight": MaxNorm(0.5)})
        >>> bool((layer.weight.norm(dim=1) <= 0.5 + 1e-6).all())
        True
    """

    cacheable = True  # see Constraint
    returns_new = True  # a product

    def __init__(self, max_value: float, *, dim: int = 0, gradient: str = "pull_back") -> None:
        super().__init__(dim)
        self.max_value = number("MaxNorm", "max_value", max_value, low=0, low_open=True, finite=False)
        self.gradient = choice("MaxNorm", "gradient", gradient, ("pull_back", "scale"))

    def _bind(self, fqn: str, tensor: Tensor) -> None:
        super()._bind(fqn, tensor)
        smallest = torch.finfo(tensor.dtype).tiny
        entries = tensor.numel() // tensor.shape[self.dim % tensor.dim()] if tensor.dim() > 1 and tensor.numel() else 1
        if self.max_value / math.sqrt(entries) < smallest:
            per_slice = f"over slices of {entries} entries, " if entries > 1 else ""
            raise ValueError(
                f"{fqn}: MaxNorm max_value={self.max_value:g} {per_slice}leaves entries of about "
                f"{self.max_value / math.sqrt(entries):.3g}, below the smallest normal {tensor.dtype} number "
                f"({smallest:g}): slices rescaled to it would be subnormal, too imprecise to hold the bound. "
                f"Expected max_value >= {smallest * math.sqrt(entries):.3g}, or a wider dtype."
            )

    def forward(self, x: Tensor) -> Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return _rescaled(x, self._factor(x))
        with torch.no_grad():
            factor = self._factor(x)
        return _Rescale.apply(x, factor, self._others(x), self.max_value, self.gradient == "pull_back")

    def forward_in_place(self, x: Tensor) -> Tensor:
        factor = self._factor(x)
        return x.mul_(factor) if writable(x) else _rescaled(x, factor)  # mul_ rounds as _rescaled

    def _factor(self, x: Tensor) -> Tensor:
        """What each slice is multiplied by: 1 inside the ball, else ``max_value / norm``; in
        float32 for the half types, where a factor such as ``1e-3 / 6e4`` underflowed to 0
        and zeroed the slice."""
        norms, exact = self._plain(x)
        scale = self.max_value / at_least_float32(norms.clamp_min(torch.finfo(x.dtype).tiny))
        if exact is not None:
            largest, _, scaled_norms = self._scaled(x)
            safe = self.max_value / at_least_float32(largest) / at_least_float32(scaled_norms.clamp_min(1.0))
            scale = torch.where(exact, scale, safe)
        return scale.clamp_max(1.0)

    def right_inverse(self, value: Tensor) -> Tensor:
        return self(value)

    def stacking(self) -> Stacking:
        does = [MOVES_TO_ZERO, KEEPS_SIGNS, scales_slices(self.dim), keeps_nonzero_slices(None)]
        if self.max_value >= 1:
            does.append(keeps_unit_slices(self.dim))
        promise = f"every slice along dim {self.dim} of L2 norm at most {self.max_value:g}"
        return declare(does, promise, kept_by=[MOVES_TO_ZERO])

    def violation(self, value: Tensor) -> str | None:
        norms = self.norms(value).flatten()
        limit = self.max_value * (1 + _tolerance(value.dtype))
        count = int((norms > limit).sum())  # (NaN entries: check reports them itself)
        if count == 0:
            return None
        return f"{count} slices along dim {self.dim} have an L2 norm above {self.max_value:g} ({_norm_range(norms)})"

    def extra_repr(self) -> str:
        text = f"max_value={self.max_value:g}, dim={self.dim}"
        return text if self.gradient == "pull_back" else f"{text}, gradient={self.gradient!r}"


def _rescaled(x: Tensor, factor: Tensor) -> Tensor:
    """``x * factor`` in ``x``'s dtype: one rounding of the product, also for a float32 ``factor``."""
    return (x * factor).to(x.dtype)


class _Rescale(torch.autograd.Function):
    """``x * factor`` (each slice's rescaling, computed without gradient) with
    :class:`MaxNorm`'s gradient, the rescaling's own or the pull-back; ``setup_context``
    and a generated vmap rule, so that ``torch.func`` transforms take it too.

    Written out rather than left to autograd: differentiated through ``max_value / norm``,
    a slice of norm 1e-21 (or a ``max_value`` of 1e-30) overflows the intermediate
    derivatives in float32, and a slice inside the ball got ``0 * inf = NaN``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, factor: Tensor, dims: list[int], max_value: float, pull_back: bool) -> Tensor:
        return _rescaled(x, factor)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, factor, ctx.dims, ctx.max_value, ctx.pull_back = inputs
        ctx.save_for_backward(factor, output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        factor, rescaled = ctx.saved_tensors
        # factor * g, less its part along a rescaled slice (the rescaling's own gradient);
        # the pull-back drops it only where descent (-g) would move it outward (w . g < 0).
        # With u = w / max_value (norm at most 1) and the sum in float32 or wider, neither
        # a tiny max_value nor a float16 gradient overflows.
        unit = rescaled / ctx.max_value
        along = _per_slice(torch.sum, unit * grad, ctx.dims)
        along = along.to(torch.promote_types(along.dtype, torch.float32))
        dropped = torch.where(factor < 1, along.clamp_max(0) if ctx.pull_back else along, torch.zeros_like(along))
        return (factor * (grad - dropped * unit)).to(grad.dtype), None, None, None, None


class UnitNorm(_ChannelNorm):
    r"""Keep the L2 norm of every slice along ``dim`` (every output channel) equal to 1.

    The effective slice is the stored slice divided by its norm. A slice that is entirely
    zero cannot be normalized and stays zero, which :func:`torchconstrain.check` reports:
    so a mask that removes whole slices along ``dim`` contradicts ``UnitNorm`` and is
    refused by :func:`torchconstrain.constrain`; masks that leave every slice some entry
    compose with it. On a 1-D tensor each entry is a slice (its sign remains). ``check``
    allows a relative tolerance of ``max(1e-5, 8 * eps)``.

    Args:
        dim: the dimension that indexes the slices (0: output channels).

    Example:
        >>> from torch import nn
        >>> from torchconstrain import UnitNorm, constrain
        >>> layer = nn.Linear(16, 4)
        >>> _ = constrain(layer, {"weight": UnitNorm()})
        >>> [round(n, 4) for n in layer.weight.norm(dim=1).tolist()]
        [1.0, 1.0, 1.0, 1.0]
    """

    cacheable = True  # see Constraint
    returns_new = True  # a quotient, or a new tensor from torch.where

    def __init__(self, *, dim: int = 0) -> None:
        super().__init__(dim)

    def _bind(self, fqn: str, tensor: Tensor) -> None:
        super()._bind(fqn, tensor)
        if tensor.numel() == 0 and tensor.shape[self.dim] > 0:
            raise ValueError(
                f"{fqn}: UnitNorm(dim={self.dim}) cannot hold on a tensor of shape {tuple(tensor.shape)}: "
                f"its {tensor.shape[self.dim]} slices along dim {self.dim} have no entries, so no slice "
                "can have unit norm."
            )

    def forward(self, x: Tensor) -> Tensor:
        return self._normalized(x, in_place=False)

    def forward_in_place(self, x: Tensor) -> Tensor:
        return self._normalized(x, in_place=True)

    def _normalized(self, x: Tensor, *, in_place: bool) -> Tensor:
        """Each slice divided by its norm (in ``x`` itself where allowed and every norm is exact)."""
        norms, exact = self._plain(x)
        divisor = norms.clamp_min(torch.finfo(x.dtype).tiny)
        if exact is None:
            return x.div_(divisor) if in_place and writable(x, divisor) else x / divisor
        _, scaled, scaled_norms = self._scaled(x)
        return torch.where(exact, x / divisor, scaled / scaled_norms.clamp_min(1.0))

    def right_inverse(self, value: Tensor) -> Tensor:
        return self(value)

    def stacking(self) -> Stacking:
        # A zero slice cannot be normalized: every constraint before must keep slices nonzero.
        does = [KEEPS_SIGNS, scales_slices(self.dim), keeps_nonzero_slices(None), keeps_unit_slices(self.dim)]
        promise = f"every slice along dim {self.dim} of unit L2 norm"
        return declare(does, promise, kept_by=[keeps_unit_slices(self.dim)], needs=[keeps_nonzero_slices(self.dim)])

    def violation(self, value: Tensor) -> str | None:
        norms = self.norms(value).flatten()
        off = int(((norms - 1).abs() > _tolerance(value.dtype)).sum())  # (NaN entries: check reports them itself)
        if off == 0:
            return None
        return f"{off} slices along dim {self.dim} do not have unit L2 norm ({_norm_range(norms)})"

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
