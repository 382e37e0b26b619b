r"""Masks: fixed binary masks and sigmoid-gated learnable masks."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from torchconstrain._distributed import buffers_written_unseen, whole
from torchconstrain.constraints.arguments import choice, flag, integer, number
from torchconstrain.constraints.base import Constraint, at_least_float32, largest_at_most, tracing, transformed, writable
from torchconstrain.constraints.stacking import (
    KEEPS_SIGNS,
    MOVES_TO_ZERO,
    Stacking,
    declare,
    keeps_nonzero_slices,
    scales_slices,
)
from torchconstrain.constraints.selection import (
    NM,
    GlobalMagnitude,
    Magnitude,
    RandomSelection,
    Structured,
)
from torchconstrain.errors import warn_at_caller

__all__ = ["FixedMask", "LearnableMask"]


class FixedMask(Constraint):
    r"""Keep the masked entries of the effective tensor at exactly zero.

    The mask is a bool buffer named ``mask`` (``True`` keeps an entry). The effective
    tensor is ``original * mask``: masked entries are exactly 0 and their stored originals
    receive exactly 0 gradient, so whatever momentum or weight decay does to the stored
    value, the effective weight stays 0. (No float copy of the mask is kept: each product
    converts it, and backward saves only the bool mask, or for a mask of fewer than
    :data:`SAVES_BOOLS_FROM` entries the converted copy. Stored values at masked entries
    are set to 0 when the mask is applied and never receive a gradient, so they stay
    finite; a NaN or inf written there by hand would show through, and
    :func:`torchconstrain.check` reports it.)

    ``FixedMask(mask)`` takes a concrete mask. The class methods build templates that
    choose each tensor's mask when :func:`torchconstrain.constrain` applies them:
    :meth:`magnitude`, :meth:`global_magnitude`, :meth:`random`, :meth:`structured` and
    :meth:`n_m`.

    Args:
        mask: a bool tensor of the constrained tensor's shape (``True`` keeps an entry), or
            a tensor of 0s and 1s.

    Raises:
        TypeError: ``mask`` is not a tensor.
        ValueError: ``mask`` holds a value other than 0 and 1 (NaN, 0.5, -1, ...), or its
            shape differs from the tensor's (when applied).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import FixedMask, constrain
        >>> layer = nn.Linear(4, 2)
        >>> _ = constrain(layer, {"weight": FixedMask(torch.tensor([[1, 0, 1, 0]] * 2))})
        >>> layer.weight[:, 1].abs().sum().item()
        0.0
        >>> _ = constrain(nn.Linear(8, 8), {"weight": FixedMask.magnitude(sparsity=0.5)})
    """

    cacheable = True  # see Constraint
    returns_new = True  # a product (see _MaskProduct)

    def __init__(self, mask: Tensor | None = None, *, _selector=None) -> None:
        super().__init__()
        if (mask is None) == (_selector is None):
            raise TypeError(
                "FixedMask: expected a mask tensor, or a template such as "
                "FixedMask.magnitude(sparsity=0.5). Got no mask."
            )
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(f"FixedMask: expected mask to be a tensor. Got {type(mask).__name__}.")
        problem = None if mask is None else _mask_problem(mask)
        if problem:
            raise ValueError(f"FixedMask: {problem}")
        self.selector = _selector
        #: What chose the mask: the template's selector, a description (surgery's channel
        #: masks), or None for a mask given as it is. A PruningSchedule grows it alike.
        self.chosen_by = None
        self.register_buffer("mask", None if mask is None else mask.detach().ne(0))

    @classmethod
    def magnitude(cls, *, sparsity: float | None = None, threshold: float | None = None) -> "FixedMask":
        r"""Template: mask the ``sparsity`` share of each tensor's smallest-magnitude entries.

        With ``threshold=`` instead, mask every entry with ``|w| <= threshold``. Either way a
        NaN entry is kept (it ranks above every number), for :func:`~torchconstrain.check` to report.
        """
        return cls(_selector=Magnitude(sparsity=sparsity, threshold=threshold))

    @classmethod
    def global_magnitude(cls, *, sparsity: float) -> "FixedMask":
        r"""Template: mask the smallest-magnitude entries across all tensors one rule matches.

        Like :func:`torch.nn.utils.prune.global_unstructured` with L1 scores: one
        threshold for all matched tensors, so each tensor's own sparsity varies.
        """
        return cls(_selector=GlobalMagnitude(sparsity=sparsity))

    @classmethod
    def random(cls, *, sparsity: float, seed: int | None = None) -> "FixedMask":
        r"""Template: mask a random ``sparsity`` share of each tensor's entries."""
        return cls(_selector=RandomSelection(sparsity=sparsity, seed=seed))

    @classmethod
    def structured(cls, *, sparsity: float, dim: int = 0, p: float = 2) -> "FixedMask":
        r"""Template: mask whole slices along ``dim`` with the smallest L``p`` norm.

        With ``dim=0`` this removes whole output channels (conv filters, Linear rows; a
        ``ConvTranspose`` weight is ``(in, out / groups, *kernel)``: ``dim=1`` there).
        """
        return cls(_selector=Structured(sparsity=sparsity, dim=dim, p=p))

    @classmethod
    def n_m(cls, n: int = 2, m: int = 4, *, dim: int = 1) -> "FixedMask":
        r"""Template: keep the ``n`` largest of every ``m`` consecutive entries along ``dim``.

        The default is 2:4 along the input dimension, the pattern sparse tensor cores run.
        """
        return cls(_selector=NM(n, m, dim=dim))

    def for_tensors(self, tensors: Mapping[str, Tensor]) -> dict[str, Constraint]:
        if not isinstance(self.selector, GlobalMagnitude):
            return super().for_tensors(tensors)
        values = {fqn: tensor.detach() for fqn, tensor in tensors.items()}  # each read once (it may be computed)
        for fqn, tensor in values.items():
            self._refuse_meta(fqn, tensor)
        masks = self.selector.select_all(values)
        bound = {fqn: FixedMask(_laid_out_like(masks[fqn], values[fqn])).to(values[fqn].device) for fqn in values}
        for constraint in bound.values():
            constraint.chosen_by = self.selector
        return bound

    def _refuse_meta(self, fqn: str, tensor: Tensor) -> None:
        """Refuse to choose a mask from the values of a tensor on the meta device (it has none)."""
        if tensor.is_meta and self.selector.reads_values:
            raise ValueError(
                f"{fqn}: FixedMask({self.extra_repr()}) chooses from the tensor's values, but it is on "
                "the meta device (no values). Load real weights first (model.to_empty(device=...) and "
                "load_state_dict), then constrain; or use a constraint that needs no values (Clamp, "
                "NonNeg, MaxNorm, UnitNorm, FakeQuant, LearnableMask, FixedMask(mask), FixedMask.random)."
            )

    def _bind(self, fqn: str, tensor: Tensor) -> None:
        if self.selector is not None:
            self._refuse_meta(fqn, tensor)
            self.mask = _laid_out_like(self.selector.select(fqn, tensor), tensor)
            self.chosen_by, self.selector = self.selector, None
            return
        if self.mask.shape != tensor.shape:
            raise ValueError(
                f"{fqn}: FixedMask of shape {tuple(self.mask.shape)} does not fit a tensor of "
                f"shape {tuple(tensor.shape)}."
            )
        self.mask = _laid_out_like(self.mask, tensor)
        if self.mask.numel() and not self.mask.is_meta and not self.mask.any():
            warn_at_caller(
                f"{fqn}: the FixedMask masks all {self.mask.numel()} entries; the tensor is all zeros."
            )

    def forward(self, x: Tensor) -> Tensor:
        mask = self.mask
        if tracing() or transformed():
            return x * _traced_mask(mask).to(x.dtype)
        if not (x.requires_grad and torch.is_grad_enabled()):
            return _times_mask(x, mask)  # nothing to save for backward
        if mask.numel() < SAVES_BOOLS_FROM:
            return x * mask.view(torch.uint8).to(x.dtype)  # see _MaskProduct
        return _MaskProduct.apply(x, mask)

    def forward_in_place(self, x: Tensor) -> Tensor:
        mask = self.mask
        fits = x.is_floating_point() and mask.shape == x.shape and mask.is_contiguous() and writable(x)
        return _mask_in_place(x, mask) if fits and not (tracing() or transformed()) else self.forward(x)

    def right_inverse(self, value: Tensor) -> Tensor:
        return torch.where(self.mask, value, 0.0)

    def violation(self, value: Tensor) -> str | None:
        leaks = (value != 0) & ~self.mask
        count = int(leaks.sum())
        if not count:
            return None
        nan = int((leaks & value.isnan()).sum())
        why = f" ({nan} NaN: an inf or NaN that reached the mask, times 0)" if nan else ""
        return f"{count} masked entries are not zero{why}"

    def state_problem(self, state: Mapping[str, Tensor]) -> str | None:
        mask = state.get("mask")
        return None if mask is None else _mask_problem(mask)

    def stacking(self) -> Stacking:
        does = [MOVES_TO_ZERO, KEEPS_SIGNS]
        does += [keeps_nonzero_slices(d) for d in range(self.mask.dim()) if _keeps_every_slice(self.mask, d)]
        return declare(does, "zeros at every masked entry", kept_by=[KEEPS_SIGNS])

    @property
    def sparsity(self) -> float:
        r"""The share of masked entries (0 for a tensor without entries)."""
        return 1.0 - self.mask.float().mean().item() if self.mask.numel() else 0.0

    def extra_repr(self) -> str:
        if self.mask is None:
            return repr(self.selector)
        if self.mask.is_meta:
            return f"shape={tuple(self.mask.shape)}"
        return f"shape={tuple(self.mask.shape)}, sparsity={self.sparsity:.3f}"


def _laid_out_like(source: Tensor, tensor: Tensor) -> Tensor:
    """``source`` (on its device, in its dtype) with the strides an elementwise operation
    on ``tensor`` gives its result: ``tensor``'s memory layout, and for dims of size 1,
    whose strides do not change it (a channels-last 1x1 or depthwise conv), the strides
    torch's own products and clamps pick, which kernels then choose by. A mask laid out so
    keeps every product with it (the effective tensor with gradients on or off, the masked
    stored original, the value baked) in the layout the operations around it give: a
    channels-last conv stays channels-last through ``constrain``, training and ``bake``."""
    contiguous = source.stride() == tensor.stride() == _contiguous_strides(tensor.shape)
    if contiguous:  # what an elementwise operation gives a contiguous tensor, without running one
        return source
    shaped = torch.logical_not(torch.empty_like(tensor, dtype=torch.bool, device=source.device))
    if source.stride() == shaped.stride():
        return source
    return torch.empty_like(shaped, dtype=source.dtype).copy_(source)


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _mask_problem(mask: Tensor) -> str | None:
    """Why ``mask`` is no mask (a value other than 0 and 1), or ``None``."""
    if mask.dtype == torch.bool or mask.is_meta:
        return None
    odd = (mask != 0) & (mask != 1)
    count = int(odd.sum())
    if not count:
        return None
    shown = list(dict.fromkeys(f"{v:g}" for v in mask[odd].flatten()[:100].tolist()))
    examples = ", ".join(shown[:3]) + (", ..." if count > 3 else "")
    return f"expected a mask of 0s and 1s (or bools). Got {count} other values ({examples})."


def _keeps_every_slice(mask: Tensor, dim: int) -> bool:
    """Whether every slice of ``mask`` along ``dim`` keeps at least one entry."""
    if mask.numel() == 0:
        return True
    return bool(mask.movedim(dim, 0).reshape(mask.shape[dim], -1).any(dim=1).all())


class _MaskProduct(torch.autograd.Function):
    """``x * mask`` and its gradient ``grad * mask``, bitwise, saving only the bool mask,
    for masks of :data:`SAVES_BOOLS_FROM` entries or more.

    Autograd's own product by a float copy of the mask would save that copy, the size of
    the weight, until backward; by the bool mask itself it saves the bools, but on the CPU
    it converts them one entry at a time, several times slower. Each product here
    converts the mask through a ``uint8`` view into a copy it then multiplies in place.
    A smaller mask takes autograd's product by such a copy: a Function call's fixed cost
    weighs more there than the copy saved until backward. (The eager form of a Function:
    under ``torch.func`` transforms the mask takes autograd's own product instead.)
    """

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return _times_mask(x, mask)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return _times_mask(grad, mask), None


def _times_mask(x: Tensor, mask: Tensor) -> Tensor:
    return mask.view(torch.uint8).to(x.dtype, copy=True).mul_(x)  # (a uint8 x: a copy, not the mask)


#: The smallest mask whose eager product saves only its bools (see :class:`_MaskProduct`);
#: a smaller one saves a float copy until backward (at most 128 KiB in float32).
SAVES_BOOLS_FROM = 2**15

#: Entries per product when a mask multiplies a tensor in place (:func:`_mask_in_place`).
IN_PLACE_CHUNK = 2**16


def _mask_in_place(x: Tensor, mask: Tensor) -> Tensor:
    """``x *= mask`` for a contiguous ``x`` and ``mask``: the bits of :func:`_times_mask`
    (``x * m`` is ``m * x``), one chunk at a time on the CPU. There a product with a
    ``uint8`` operand converts it to ``x``'s dtype in a temporary of its size, so a chunk's
    conversion (256 KiB in float32) is the only temporary instead of one of the tensor's
    size. (CUDA kernels convert as they read.)"""
    if x.device.type != "cpu":
        return x.mul_(mask.view(torch.uint8))
    flat, keep = x.view(-1), mask.view(torch.uint8).view(-1)
    for start in range(0, flat.numel(), IN_PLACE_CHUNK):
        flat[start : start + IN_PLACE_CHUNK].mul_(keep[start : start + IN_PLACE_CHUNK])
    return x


#: The smallest mask that compiled CPU code reads through a byte copy (see :func:`_traced_mask`).
BYTES_FROM = 4096


def _traced_mask(mask: Tensor) -> Tensor:
    """The mask as traced code multiplies by it: under ``torch.compile`` on the CPU, for a
    mask of :data:`BYTES_FROM` entries or more, a ``uint8`` copy of it
    (``torch.ops.torchconstrain.mask_bytes``); else the mask itself.

    Inductor's C++ kernels read a bool tensor one entry at a time (about 3 ns an entry on
    AVX-512, several times a float's vector load) and a ``uint8`` tensor a vector at a
    time. A same-width view (``mask.view(torch.uint8)``) is still read as bool, so the
    bytes are copied by an op the compiled code calls out to ATen for (a few microseconds
    a call, hence the threshold): the product then reads them in vectors, and backward
    reads the saved copy (one byte an entry) instead of the bool mask again. Same values
    (0 or 1 in the product's dtype); the copy is made on every call, so in-place edits
    of the mask reach compiled code. Exported graphs (which then need no torchconstrain
    to run), eager ``torch.func`` transforms and other devices (Triton reads bool tensors
    in vectors) multiply by the mask itself. (Under Dynamo, :func:`transformed` is always
    true, so a transform inside compiled code takes the copy too: it has a vmap rule.)
    """
    if (
        not tracing()
        or mask.device.type != "cpu"
        or mask.dtype != torch.bool
        or mask.numel() < BYTES_FROM
        or torch.compiler.is_exporting()
    ):
        return mask
    return torch.ops.torchconstrain.mask_bytes.default(mask)


def _mask_bytes(mask: Tensor) -> Tensor:
    return mask.view(torch.uint8).clone(memory_format=torch.contiguous_format)


def _mask_bytes_meta(mask: Tensor) -> Tensor:
    return mask.new_empty(mask.shape, dtype=torch.uint8)


# ``mask_bytes(mask)``: a contiguous uint8 copy of a bool mask, an op of its own so that
# inductor calls it instead of generating the copy (which would read bool entries one at a
# time). Not differentiable: masks are buffers.
_LIBRARY = torch.library.Library("torchconstrain", "FRAGMENT")
_LIBRARY.define("mask_bytes(Tensor mask) -> Tensor")
_LIBRARY.impl("mask_bytes", _mask_bytes, "CPU")
_LIBRARY.impl("mask_bytes", _mask_bytes_meta, "Meta")


@torch.library.register_vmap("torchconstrain::mask_bytes")
def _mask_bytes_vmap(info, in_dims, mask):
    return torch.ops.torchconstrain.mask_bytes.default(mask), in_dims[0]


def _temperature_problem(temperature: Tensor) -> str | None:
    """Why ``temperature`` (as its buffer holds it) would make NaN or infinite gates, or ``None``."""
    if temperature.is_meta:
        return None
    value = temperature.item() if temperature.numel() == 1 else None
    if value is not None and math.isfinite(value) and value > 0:
        return None
    shown = f"{value:g}" if value is not None else f"a tensor of shape {tuple(temperature.shape)}"
    return f"expected temperature to be a finite number > 0. Got {shown}."


def _scores_problem(scores: Tensor | None) -> str | None:
    """Why ``scores`` would make NaN gates (which baking closes: a silent zero), or ``None``."""
    if scores is None or scores.is_meta or not scores.is_floating_point():
        return None
    nans = int(torch.isnan(scores).sum())
    return f"expected scores without NaN (a NaN gate is closed at bake). Got {nans} NaN of {scores.numel()}." if nans else None


class LearnableMask(Constraint):
    r"""Multiply the tensor by a learnable gate ``sigmoid(scores / temperature)``.

    ``scores`` is an ``nn.Parameter`` on this module, one per entry (``per="element"``) or
    one per slice along ``dim`` (``per="channel"``; ``dim=0`` gates output channels). Scores
    start at ``temperature * logit(init)``, so every gate starts at ``init`` (near 1).
    ``temperature`` is a buffer, so a :class:`~torchconstrain.TemperatureSchedule` can
    anneal it and checkpoints keep it.

    With ``hard=True`` the forward uses the binary gate ``gate > threshold`` and the
    gradient of the soft gate (straight-through), so training sees the pruned network.

    :meth:`penalty` is ``strength * mean(gate)``: the expected share of kept entries,
    scaled. Add :func:`torchconstrain.penalty` to the loss to push gates towards 0.

    Baking rule: :func:`torchconstrain.bake` zeroes every entry whose gate is at most
    ``threshold`` and keeps the others at their gated value ``original * gate`` (with
    ``hard=True`` that is the forward value, except that a closed gate leaves +0.0 where
    the forward's product leaves -0.0 for a negative entry, and NaN for an inf or NaN one,
    which :func:`torchconstrain.check` reports). :attr:`sparsity` reports the share
    that baking will zero.

    A budget instead of a strength: with ``sparsity=s`` baking closes exactly the
    ``round(s * n)`` lowest of the ``n`` gates (at least one stays open), whatever they
    learned, and ``threshold`` is not used. While training the penalty is a Lagrange term
    ``multiplier * (mean(gate) - (1 - s))``: each :func:`torchconstrain.penalty` call made
    with gradients on first moves the ``multiplier`` buffer by ``rate`` times the excess of
    open gates over the budget: it rises while the gates are over it and falls, below zero
    if need be, while they are under it. So the gates are pushed towards the budget from
    both sides as hard as it takes, and ``strength`` is not used. With ``hard=True`` the forward keeps exactly the gates that
    baking keeps. Call :func:`torchconstrain.penalty` once per training step.

    Args:
        per: ``"element"`` or ``"channel"``.
        dim: the channel dimension when ``per="channel"``.
        temperature: divides the scores; smaller is sharper.
        init: the starting gate value, in (0, 1).
        threshold: the gate value at or below which an entry is pruned, in (0, 1).
        hard: use the binary gate in the forward (straight-through gradient).
        strength: the weight of the sparsity penalty (without ``sparsity``).
        sparsity: the share of gates baking closes, in [0, 1); ``None``: the gates
            at or below ``threshold``.
        rate: with ``sparsity``, how fast the multiplier rises per penalty call, per unit
            of excess share.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import LearnableMask, constrain, penalty
        >>> layer = nn.Linear(4, 2)
        >>> _ = constrain(layer, {"weight": LearnableMask(strength=1e-2)})
        >>> round(penalty(layer).item(), 4)
        0.0098
        >>> budgeted = nn.Linear(8, 4)
        >>> _ = constrain(budgeted, {"weight": LearnableMask(per="channel", dim=1, sparsity=0.75)})
        >>> budgeted.parametrizations.weight[0].sparsity  # what baking closes: 6 of 8 gates
        0.75
    """

    cacheable = True  # see Constraint
    sparse_gradients = False  # sigmoid_backward has no sparse kernel
    returns_new = True  # a product

    def __init__(
        self,
        *,
        per: str = "element",
        dim: int = 0,
        temperature: float = 1.0,
        init: float = 0.98,
        threshold: float = 0.5,
        hard: bool = False,
        strength: float = 1e-3,
        sparsity: float | None = None,
        rate: float = 0.05,
    ) -> None:
        super().__init__()
        where = "LearnableMask"
        self.per = choice(where, "per", per, ("element", "channel"))
        self.dim = integer(where, "dim", dim)
        self.hard = flag(where, "hard", hard)
        self.init = number(where, "init", init, low=0, high=1, low_open=True, high_open=True)
        self.threshold = threshold
        self.strength = number(where, "strength", strength, low=0)
        temperature = number(where, "temperature", temperature, low=0, low_open=True)
        stored = torch.tensor(temperature)
        if _temperature_problem(stored):
            raise ValueError(
                f"{where}: expected temperature to be a finite number > 0 in {stored.dtype} (its "
                f"buffer's dtype). Got {temperature!r}, which is {stored.item():g} there."
            )
        self.register_buffer("temperature", stored)
        self.target_sparsity = None if sparsity is None else number(where, "sparsity", sparsity, low=0, high=1, high_open=True)
        self.rate = number(where, "rate", rate, low=0)
        #: A budget shared with other masks (``torchconstrain.surgery.budget.GateBudget``), or None.
        self.budget = None
        if sparsity is not None:
            self.register_buffer("multiplier", torch.zeros(()))
        self.register_buffer("gate_index", None)  # see indexed()
        self.register_parameter("scores", None)

    @property
    def threshold(self) -> float:
        r"""The gate value at or below which a gate is closed (without ``sparsity``)."""
        return self.__dict__["_threshold"]

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = number("LearnableMask", "threshold", value, low=0, high=1, low_open=True, high_open=True)
        self.__dict__["_threshold"] = value
        # what gates are compared with, per dtype they come in (compiled code too: no helper call to trace)
        self.__dict__["_closed_up_to"] = {dtype: largest_at_most(value, dtype) for dtype in (torch.float32, torch.float64)}

    def __setstate__(self, state: dict) -> None:
        threshold = state.pop("threshold", None)  # a mask pickled before threshold was a property
        super().__setstate__(state)
        if threshold is not None:
            self.threshold = threshold

    def _apply(self, fn, *args, **kwargs):
        before = self._buffers.get("multiplier")
        result = super()._apply(fn, *args, **kwargs)
        after = self._buffers.get("multiplier")
        if after is not None and after.is_floating_point() and torch.finfo(after.dtype).bits < 32:
            # kept in float32: rate * excess rounded into a float16 multiplier overshot, into bfloat16 it
            # stalled; moved from the value before the cast (1e5 is inf in float16)
            kept = before is not None and before is not after and not before.is_meta and not after.is_meta
            self._buffers["multiplier"] = before.to(after.device, torch.float32) if kept else after.float()
        return result

    def _bind(self, fqn: str, tensor: Tensor) -> None:
        if not tensor.is_floating_point():
            raise ValueError(f"{fqn}: LearnableMask needs a floating-point tensor. Got {tensor.dtype}.")
        shape = list(tensor.shape)
        if self.per == "channel":
            if not -tensor.dim() <= self.dim < tensor.dim():
                raise ValueError(
                    f"{fqn}: LearnableMask dim={self.dim} is out of range for a tensor of shape "
                    f"{tuple(tensor.shape)}."
                )
            shape = [size if d == self.dim % tensor.dim() else 1 for d, size in enumerate(shape)]
        if self.gate_index is not None:
            shape = self._bind_index(fqn, tensor, shape)
        start = self.temperature.item() * math.log(self.init / (1.0 - self.init))
        self.scores = nn.Parameter(torch.full(shape, start, dtype=tensor.dtype))
        if self.target_sparsity is None and self.scores.numel() and not self._kept_gates(self.gates()).any():
            warn_at_caller(
                f"{fqn}: LearnableMask(init={self.init:g}, threshold={self.threshold:g}) starts with every gate "
                f"closed (a gate of {self.gates().flatten()[0].item():.9g} in {tensor.dtype}, at or below the "
                f"threshold): {'the forward is all zeros' if self.hard else 'bake would zero the whole tensor'} "
                "until the gates rise above it. Expected init above threshold, as the default init=0.98."
            )

    def _bind_index(self, fqn: str, tensor: Tensor, shape: list[int]) -> list[int]:
        """Check the gate index against the tensor; return the scores' shape, one per gate."""
        slices = tensor.shape[self.dim % tensor.dim()]
        index = self.gate_index
        if self.per != "channel" or index.dim() != 1 or index.numel() != slices:
            raise ValueError(f"{fqn}: a LearnableMask index needs per='channel' and one entry per slice along "
                             f"dim {self.dim} ({slices}). Got {tuple(index.shape)}.")
        self.slice_shape = shape
        return [self.gate_count]

    @classmethod
    def indexed(cls, index: Tensor, gates: int, **kwargs) -> "LearnableMask":
        r"""Template: ``gates`` gates spread over the slices along ``dim`` by ``index``.

        ``index[i]`` is the gate of slice ``i`` (``-1``: not gated, always kept), so several
        tensors whose slices are laid out differently (a conv's input channels, a linear's
        flattened ``channels x positions`` inputs) can share one set of gates: give every
        mask the same ``scores`` parameter once they are applied (each mask still adds its
        own penalty: set ``strength`` and ``rate`` to 0 on all but one, as
        :func:`~torchconstrain.surgery.mask_blocks` does, so the shared gates count once). ``scores`` has one entry
        per gate; :meth:`gates` returns them, :meth:`gate` the per-slice view. Keyword
        arguments are :class:`LearnableMask`'s, with ``per="channel"``. ``index`` holds
        integers (a float index is refused, not truncated), ``gates`` is an integer >= 1.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torchconstrain import LearnableMask, constrain
            >>> layer = nn.Linear(6, 2)
            >>> _ = constrain(layer, {"weight": LearnableMask.indexed(torch.tensor([0, 0, 1, 1, -1, -1]), 2, dim=1)})
            >>> mask = layer.parametrizations.weight[0]
            >>> tuple(mask.scores.shape), tuple(mask.gate().shape)
            ((2,), (1, 6))
        """
        gates = integer("LearnableMask.indexed", "gates", gates, low=1)
        given = torch.as_tensor(index)
        if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool:
            raise TypeError(f"LearnableMask.indexed: expected an integer index (one gate per slice). Got {given.dtype}.")
        index = given.to(torch.long).flatten()
        if index.numel() and (int(index.min()) < -1 or int(index.max()) >= gates):
            raise ValueError(f"LearnableMask.indexed: expected index entries in [-1, {gates}). "
                             f"Got {int(index.min())}..{int(index.max())}.")
        mask = cls(per="channel", **kwargs)
        mask.gate_index = torch.where(index < 0, gates, index)  # gate ``gates``: the constant 1
        mask.gate_count = gates
        return mask

    def gates(self) -> Tensor:
        r"""Return the soft gates, one per score: ``sigmoid(scores / temperature)``, in float32
        for float16 and bfloat16 scores (where a small positive score rounded to a gate of
        exactly 0.5 and closed at the default threshold; the forward rounds the gate once)."""
        scores = at_least_float32(self.scores)
        if tracing() or transformed() or self.temperature.is_meta or buffers_written_unseen():
            return torch.sigmoid(scores / self.temperature)
        temperature = self._derived("temperature", self.temperature, self.temperature.item)
        return torch.sigmoid(scores if temperature == 1.0 else scores / temperature)

    def gate(self) -> Tensor:
        r"""Return the soft gate ``sigmoid(scores / temperature)``, in the shape it multiplies the tensor with."""
        return self._spread(self.gates(), 1.0)

    def _spread(self, values: Tensor, fill) -> Tensor:
        """Per-gate values -> per-slice values (an indexed mask), ``fill`` for ungated slices."""
        if self.gate_index is None:
            return values
        padded = torch.cat([values.flatten(), values.new_full((1,), fill)])
        return padded[self.gate_index].view(self.slice_shape)

    def forward(self, x: Tensor) -> Tensor:
        return x * self._forward_gate()

    def forward_in_place(self, x: Tensor) -> Tensor:
        gate = self._forward_gate()
        return x.mul_(gate) if writable(x, gate) else x * gate

    def _forward_gate(self) -> Tensor:
        """What the forward multiplies the tensor by: the soft gate, or with ``hard=True``
        the binary gate carrying the soft gate's gradient."""
        gates = self.gates()
        gate = self._spread(gates, 1.0)
        if self.hard:
            binary = self._spread(self._kept_gates(gates), True).to(gate.dtype)
            gate = binary + (gate - gate.detach())
        return gate.to(self.scores.dtype)

    def bake(self, value: Tensor) -> Tensor:
        problem = self.state_problem({"temperature": self.temperature, "scores": self.scores})
        if problem:
            raise ValueError(f"{type(self).__name__}: cannot bake: {problem}")
        gates = self.gates()
        kept = self._spread(self._kept_gates(gates), True)
        baked = torch.where(kept, value * (1.0 if self.hard else self._spread(gates, 1.0).to(self.scores.dtype)), 0.0)
        return _laid_out_like(baked, value)  # the forward's product has the layout of its input

    def _kept_gates(self, gates: Tensor) -> Tensor:
        """Bool, the scores' shape: the gates baking keeps open, given the current ``gates()``."""
        if self.budget is not None:
            return self.budget.keep_for(self)
        gates = gates.detach()
        if self.target_sparsity is None:
            closed_up_to = self._closed_up_to.get(gates.dtype)
            return gates > (largest_at_most(self.threshold, gates.dtype) if closed_up_to is None else closed_up_to)
        count = gates.numel()
        kept = max(count - round(self.target_sparsity * count), 1)
        order = torch.sort(gates.flatten(), descending=True, stable=True).indices
        keep = torch.zeros(count, dtype=torch.bool, device=gates.device).index_fill(0, order[:kept], True)
        return keep.view(gates.shape)  # out of place: vmap over an ensemble batches it

    def penalty(self) -> Tensor | None:
        if self.budget is not None:
            return self.budget.penalty_for(self)
        if self.target_sparsity is None:
            gates = self.gates()
            return self.strength * (gates.mean() if gates.numel() else gates.sum())  # no gates: 0, not NaN
        gates = self.gates()
        if not gates.numel():
            return gates.sum()
        excess = whole(gates.mean()) - (1.0 - self.target_sparsity)  # every rank's gates under FSDP2
        if torch.is_grad_enabled():
            with torch.no_grad():
                self.multiplier.add_(self.rate * excess.detach())
        # A copy: the next penalty() edits the multiplier, which this term's backward reads.
        return self.multiplier.clone() * excess

    def state_problem(self, state: Mapping[str, Tensor]) -> str | None:
        temperature = state.get("temperature")
        problem = None if temperature is None else _temperature_problem(temperature)
        return problem or _scores_problem(state.get("scores"))

    def stacking(self) -> Stacking:
        # Gates can close (hard) or underflow to 0 (soft): a whole slice can become zero.
        does = [MOVES_TO_ZERO, KEEPS_SIGNS] + ([scales_slices(self.dim)] if self.per == "channel" else [])
        return declare(does, "zeros where its gates are closed", kept_by=[KEEPS_SIGNS])

    @property
    def sparsity(self) -> float:
        r"""The share of gates baking will close: those at or below ``threshold``, or the
        budget's (0 without gates)."""
        with torch.no_grad():
            gates = self.gates()
            return 1.0 - self._kept_gates(gates).float().mean().item() if gates.numel() else 0.0

    def extra_repr(self) -> str:
        temperature = "?" if self.temperature.is_meta else f"{self.temperature.item():g}"
        text = f"per={self.per!r}, temperature={temperature}, threshold={self.threshold:g}"
        if self.per == "channel":
            text += f", dim={self.dim}"
        if self.gate_index is not None:
            text += f", gates={self.gate_count}"
        if self.hard:
            text += ", hard=True"
        if self.budget is not None:
            return text + f", budget={self.budget.what}"
        if self.target_sparsity is not None:
            return text + f", sparsity={self.target_sparsity:g}"
        return text + f", strength={self.strength:g}"
