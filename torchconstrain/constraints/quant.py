r"""Fake quantization: weights on an integer grid, for quantization-aware training."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchconstrain.constraints.arguments import flag, integer, number
from torchconstrain.constraints.base import Constraint, at_least_float32, writable
from torchconstrain.constraints.stacking import (
    KEEPS_SIGNS,
    WITHIN_LARGEST,
    Stacking,
    declare,
    keeps_nonzero_slices,
    scales_slices,
)
from torchconstrain.errors import warn_at_caller

__all__ = ["FakeQuant"]


def _significand(dtype: torch.dtype) -> int:
    """The significand bits of a floating-point ``dtype``, the implicit one included."""
    return round(-math.log2(torch.finfo(dtype).eps)) + 1


#: :func:`_significand` of the common dtypes, looked up on every forward.
_SIGNIFICAND = {dtype: _significand(dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


class FakeQuant(Constraint):
    r"""Round the effective tensor onto a ``bits``-bit integer grid, with a straight-through gradient.

    The grid is recomputed from the stored original on every access:

    - ``symmetric=True``: ``scale = max|w| / (2**(bits-1) - 1)``, integers in
      ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (the restricted symmetric range, so that
      +x and -x are both representable), effective ``w_q = scale * q``;
    - ``symmetric=False``: ``scale = (max w - min w) / (2**bits - 1)`` with the range
      widened to include 0, an integer ``zero_point`` so that 0 is exactly representable,
      integers in ``[0, 2**bits - 1]``, effective ``w_q = scale * (q - zero_point)``.

    With ``per_channel=True`` each slice along ``dim`` (each output channel) has its own
    scale; a 1-D tensor (a bias) gets one scale (a grid per entry would keep every entry
    as it is). ``min_scale`` floors every scale: a slice whose range would give a smaller one
    gets ``min_scale`` instead. Int8 backends floor their scales too (XNNPACK's quantizer at
    ``2**-12``); train with the backend's floor and its quantization leaves the baked
    weights as they are: :meth:`FakeQuant.xnnpack` is that grid for ExecuTorch's XNNPACK.
    Zeros map to exactly zero, so masked entries stay zero. The gradient passes
    straight through the rounding (quantization-aware training), and :func:`torchconstrain.bake`
    leaves every weight exactly on its grid. On the symmetric grid no entry's magnitude
    exceeds ``max|w|`` (``qmax * scale`` can round an ulp above it: that end is clamped),
    so a box ``[-a, a]`` before ``FakeQuant`` still holds after it (without ``min_scale``). A slice whose step would be
    a subnormal number (every entry below ``qmax`` times the dtype's smallest normal number)
    rounds to zero. :func:`torchconstrain.check` quantizes each
    slice of the effective tensor again on the grid of its own range and accepts it when no
    entry moves by more than 1e-3 of a step plus 8 float steps of the entry (at 16 bits,
    float32 holds the grid's top levels only to about 1/128 of a step); for the affine grid
    it also accepts a range of ``2**bits - 2`` steps (a rounding tie can leave one end a
    level short).

    Float16 and bfloat16 tensors are rounded in float32 and stored back in their dtype,
    which must keep the levels apart (``qmax <= 2**(significand bits - 3)``: float16 at most
    9 bits symmetric, 8 affine; bfloat16 6 and 5); a wider grid raises ValueError, when
    applied and at the forward of a model cast after :func:`torchconstrain.constrain`.
    Their check allows 2 float steps of the entry, and their smallest step is 8 subnormal
    steps of the dtype (float16's grid steps go down to about 5e-7).

    Rounding is to the nearest level: half to even on the symmetric grid, half up on the
    affine one. :func:`torch.fake_quantize_per_tensor_affine` and ``_per_channel_affine``
    give the same levels on float32 weights, with the same scale and zero point, except
    at ties (they round half to even, and multiply by ``1 / scale`` where this divides).

    Args:
        bits: integer width, 2 to 16.
        per_channel: one scale per slice along ``dim`` instead of one for the tensor.
        symmetric: symmetric grid around 0, or affine with a zero point.
        dim: the channel dimension when ``per_channel``.
        min_scale: the smallest scale a slice gets (default 0: no floor, and an all-zero
            slice gets scale 1). When applied, a floor that rounds every entry of a nonzero
            tensor to 0 is refused (ValueError), one that rounds whole nonzero slices to 0
            warns.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import FakeQuant, constrain
        >>> layer = nn.Linear(8, 4)
        >>> _ = constrain(layer, {"weight": FakeQuant(bits=4)})
        >>> steps = layer.weight / (layer.weight.abs().amax(dim=1, keepdim=True) / 7)
        >>> torch.allclose(steps, steps.round(), atol=1e-4)
        True
    """

    cacheable = True  # see Constraint
    returns_new = True  # a sum

    def __init__(self, bits: int = 8, *, per_channel: bool = True, symmetric: bool = True, dim: int = 0,
                 min_scale: float = 0.0) -> None:
        super().__init__()
        self.bits = integer("FakeQuant", "bits", bits, low=2, high=16)
        self.per_channel = flag("FakeQuant", "per_channel", per_channel)
        self.symmetric = flag("FakeQuant", "symmetric", symmetric)
        self.dim = integer("FakeQuant", "dim", dim)
        self.min_scale = number("FakeQuant", "min_scale", min_scale, low=0)

    @classmethod
    def xnnpack(cls) -> "FakeQuant":
        r"""The grid of ExecuTorch's XNNPACK int8 weights: 8 bits, per output channel, symmetric
        ``[-127, 127]``, scales floored at ``2**-12`` (as ``XNNPACKQuantizer`` with
        ``get_symmetric_quantization_config(is_per_channel=True)`` quantizes them).

        A weight baked from it goes through :func:`torchconstrain.deploy.to_executorch` with
        ``int8=True`` bitwise unchanged, unless a BatchNorm is folded into it on the way.

        Example:
            >>> from torchconstrain import FakeQuant
            >>> FakeQuant.xnnpack()
            FakeQuant(bits=8, per_channel=True, symmetric=True, dim=0, min_scale=0.000244140625)
        """
        return cls(8, per_channel=True, symmetric=True, dim=0, min_scale=2**-12)

    def _bind(self, fqn: str, tensor: Tensor) -> None:
        if not tensor.is_floating_point():
            raise ValueError(f"{fqn}: FakeQuant needs a floating-point tensor. Got {tensor.dtype}.")
        problem = self._dtype_problem(tensor.dtype)
        if problem:
            raise ValueError(f"{fqn}: {problem}")
        if self.per_channel and not -tensor.dim() <= self.dim < tensor.dim():
            raise ValueError(
                f"{fqn}: FakeQuant dim={self.dim} is out of range for a tensor of shape {tuple(tensor.shape)}."
            )
        if self.min_scale and not tensor.is_meta:
            self._refuse_a_floor_that_zeroes(fqn, tensor)
        self._slices_own_grids = self.per_channel and tensor.dim() > 1 and not self.min_scale

    def _refuse_a_floor_that_zeroes(self, fqn: str, tensor: Tensor) -> None:
        """Raise where ``min_scale`` rounds every entry of a nonzero tensor to 0; warn where
        it does so to whole nonzero slices."""
        dims = self._dims(tensor)
        zeroed = _extreme(self.quantize(tensor).abs(), dims, torch.amax) == 0
        lost = int((zeroed & (_extreme(tensor.abs(), dims, torch.amax) > 0)).sum())
        largest = tensor.abs().max().item() if tensor.numel() else 0.0
        if lost and bool(zeroed.all()):
            raise ValueError(
                f"{fqn}: FakeQuant min_scale={self.min_scale:g} rounds every entry to 0 (the largest "
                f"|w| is {largest:.6g}): the tensor would be all zeros. Expected a min_scale below "
                f"2 * max|w| (XNNPACK's floor is 2**-12, FakeQuant.xnnpack())."
            )
        if lost:
            warn_at_caller(
                f"{fqn}: FakeQuant min_scale={self.min_scale:g} rounds every entry of {lost} of its "
                f"{zeroed.numel()} slices to 0."
            )

    def _dtype_problem(self, dtype: torch.dtype) -> str | None:
        """Why ``dtype`` cannot hold this grid (its levels stored apart, with room for the
        rounding of ``scale * q``), or ``None``: it needs ``qmax <= 2**(significand - 3)``,
        so that neighbouring top levels are 8 float steps apart."""
        significand = _SIGNIFICAND.get(dtype) or _significand(dtype)
        most = 2 ** (significand - 3)
        qmax = 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1
        if qmax <= most:
            return None
        fits = next(b for b in range(self.bits, 1, -1) if (2 ** (b - 1) - 1 if self.symmetric else 2**b - 1) <= most)
        return (
            f"FakeQuant(bits={self.bits}, symmetric={self.symmetric}) needs integer levels up to {qmax}: "
            f"{dtype} (a {significand}-bit significand) keeps levels apart only up to {most}. Expected bits <= "
            f"{fits} for {dtype}, or float32 weights (torch.autocast computes in {dtype} from them)."
        )

    def grid(self, x: Tensor) -> tuple[Tensor, Tensor, int, int]:
        r"""Return ``(scale, zero_point, qmin, qmax)`` for ``x``, broadcastable against it."""
        dims = self._dims(x)
        if self.symmetric:
            qmax = 2 ** (self.bits - 1) - 1
            scale = self._floor(_extreme(x.detach().abs(), dims, torch.amax) / qmax)
            return _positive(scale), torch.zeros_like(scale), -qmax, qmax
        qmax = 2**self.bits - 1
        low = _extreme(x.detach(), dims, torch.amin).clamp_max(0)
        high = _extreme(x.detach(), dims, torch.amax).clamp_min(0)
        scale = _positive(self._floor((high - low) / qmax))
        # Half-down here and half-up in quantize() put the extremes exactly on 0 and qmax,
        # so the grid of a quantized tensor is its own (no half-to-even ties moving them).
        return scale, torch.ceil(-low / scale - 0.5).clamp(0, qmax), 0, qmax

    def quantize(self, x: Tensor) -> Tensor:
        r"""Return ``x`` rounded onto its grid (no gradient); float16 and bfloat16 are rounded
        in float32 (their own quotients land entries a level off)."""
        problem = self._dtype_problem(x.dtype)
        if problem:
            raise ValueError(problem)
        work = at_least_float32(x.detach())
        scale, zero_point, qmin, qmax = self.grid(work)
        q = _levels(work, scale, zero_point, qmin, qmax, symmetric=self.symmetric).mul_(scale)
        # A grid whose step the dtype cannot resolve cannot be represented: such a slice
        # (all its entries below qmax times that step) rounds to zero.
        q = q.masked_fill_(scale < _smallest_step(x.dtype), 0.0)
        if self.symmetric and not self.min_scale:  # (a floored grid's top level can exceed max|w|)
            # qmax * scale can round an ulp above the largest magnitude: clamped back, so
            # that a box [-a, a] before FakeQuant still holds after it.
            largest = _extreme(work.abs(), self._dims(x), torch.amax)
            q = torch.clamp(q, -largest, largest)  # (clamp_ with tensor bounds has no vmap rule)
        return q.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.quantize(x).sub_(x.detach())

    def forward_in_place(self, x: Tensor) -> Tensor:
        moves = self.quantize(x).sub_(x.detach())
        return x.add_(moves) if writable(x, moves) else x + moves

    def bake(self, value: Tensor) -> Tensor:
        return self.quantize(value)

    def violation(self, value: Tensor) -> str | None:
        problem = self._dtype_problem(value.dtype)  # a model cast after constrain
        if problem:
            return problem
        off = self._off_grid(value, levels=None)
        if not self.symmetric:  # a rounding tie can leave an end one level short of qmax
            off = off & self._off_grid(value, levels=2**self.bits - 2)
        count = int(off.sum())
        return f"{count} entries are off their {self.bits}-bit grid" if count else None

    def _off_grid(self, value: Tensor, *, levels: int | None) -> Tensor:
        """Per slice: whether quantizing ``value`` again on its own grid moves an entry."""
        work = at_least_float32(value.detach())
        scale, zero_point, qmin, qmax = self.grid(work)
        if levels is not None:
            scale = _positive(scale * qmax / levels)
            low = _extreme(work, self._dims(value), torch.amin).clamp_max(0)
            zero_point = torch.ceil(-low / scale - 0.5)
        steps = _levels(work, scale, zero_point, qmin, qmax, symmetric=self.symmetric)
        # float32 holds the top levels of a 16-bit grid only to about 1/128 of a step, and a
        # grid recomputed from quantized values has a scale a few float steps off its own;
        # float16 and bfloat16 round each level (computed in float32) to half a float step
        info = torch.finfo(value.dtype)
        narrow = value.dtype != work.dtype  # and half a subnormal step below its normal numbers
        floats = 2 * info.eps * work.abs() + info.tiny * info.eps if narrow else 8 * info.eps * work.abs()
        moved = (steps * scale - work).abs() > 1e-3 * scale + floats
        return _extreme(moved, self._dims(value), torch.amax).expand_as(value)

    def stacking(self) -> Stacking:
        # The grid is each slice's own: scaling a slice by one factor scales its grid; moving
        # single entries (a clamp, a mask, rounding again) moves the grid's ends.
        # A floored scale can put the top level above max|w|: no WITHIN_LARGEST then; nor
        # does a floored grid scale with its slice, nor keep it nonzero. On a 1-D tensor
        # there is one grid (per_channel is per tensor there).
        does = [KEEPS_SIGNS] + ([WITHIN_LARGEST] if self.symmetric and not self.min_scale else [])
        promise = f"every entry on its {self.bits}-bit grid"
        if not getattr(self, "_slices_own_grids", self.per_channel and not self.min_scale):  # a template: unbound
            return declare(does, promise)
        does.append(keeps_nonzero_slices(self.dim))  # a slice's largest entry stays nonzero
        return declare(does, promise, kept_by=[scales_slices(self.dim)])

    def _floor(self, scale: Tensor) -> Tensor:
        return scale.clamp_min(self.min_scale) if self.min_scale else scale

    def _dims(self, x: Tensor) -> list[int]:
        return [d for d in range(x.dim()) if not (self.per_channel and d == self.dim % x.dim())]

    def extra_repr(self) -> str:
        text = f"bits={self.bits}, per_channel={self.per_channel}, symmetric={self.symmetric}"
        text += f", dim={self.dim}" if self.per_channel else ""
        return text + (f", min_scale={self.min_scale!r}" if self.min_scale else "")


def _extreme(x: Tensor, dims: list[int], reduce) -> Tensor:
    """``reduce(x, dims, keepdim=True)`` (``torch.amax`` or ``torch.amin``); zeros of that
    shape for a tensor without entries, which has no extremes and nothing to quantize."""
    if x.numel() == 0:
        return x.new_zeros([1 if d in dims else size for d, size in enumerate(x.shape)])
    return reduce(x, dim=dims, keepdim=True)


def _levels(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, *, symmetric: bool) -> Tensor:
    """``q - zero_point`` for every entry of ``x``, in ``x``'s dtype: ``x / scale`` rounded
    (half to even on the symmetric grid, half up on the affine one) and clamped to the
    grid's range. The integer zero point is never added to the fraction before rounding:
    at 12 or 16 bits that sum would lose the fraction's low bits and land some entries a
    level off the nearest."""
    q = torch.div(x, scale)  # in place from here: one temporary (two for half up)
    if symmetric:
        return q.round_().clamp_min_(qmin).clamp_max_(qmax)
    # half up as floor + (fraction >= 0.5): floor(q + 0.5) would round 0.49999997 + 0.5 up to 1
    low = torch.floor(q)
    return q.sub_(low).ge_(0.5).add_(low).clamp_(qmin - zero_point, qmax - zero_point)


def _smallest_step(dtype: torch.dtype) -> float:
    """The smallest grid step ``dtype`` holds: its smallest normal number (a subnormal step
    loses the scale's precision), or for float16 and bfloat16, whose grids are computed in
    float32, 8 subnormal steps (each level then rounds by at most 1/16 of the step)."""
    info = torch.finfo(dtype)
    return info.tiny if info.bits >= 32 else 8 * info.tiny * info.eps


def _positive(scale: Tensor) -> Tensor:
    """Replace zero scales (an all-zero channel) by 1: any scale represents zeros exactly."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))
