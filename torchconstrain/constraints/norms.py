r"""Sign and norm constraints: ``NonNeg``, ``MaxNorm``, ``UnitNorm``."""

from __future__ import annotations

import torch
from torch import Tensor

from torchconstrain.constraints.base import Constraint
from torchconstrain.constraints.box import Clamp

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

    def extra_repr(self) -> str:
        return "" if self.gradient == "pull_back" else f"gradient={self.gradient!r}"


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for a norm recomputed from a rescaled tensor of ``dtype``."""
    return max(1e-5, 8 * torch.finfo(dtype).eps)


class _ChannelNorm(Constraint):
    """Shared by the norm constraints: the L2 norm of each slice along ``dim``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"{type(self).__name__}: expected dim to be an int. Got {dim!r}.")
        self.dim = dim

    def _bind(self, fqn: str, tensor: Tensor) -> None:
        if not tensor.is_floating_point():
            raise ValueError(f"{fqn}: {type(self).__name__} needs a floating-point tensor. Got {tensor.dtype}.")
        if not -tensor.dim() <= self.dim < tensor.dim():
            raise ValueError(
                f"{fqn}: {type(self).__name__} dim={self.dim} is out of range for a tensor of "
                f"shape {tuple(tensor.shape)}."
            )

    def norms(self, x: Tensor) -> Tensor:
        r"""The L2 norm of every slice along ``dim``, kept broadcastable against ``x``."""
        others = [d for d in range(x.dim()) if d != self.dim % x.dim()]
        return torch.linalg.vector_norm(x, dim=others, keepdim=True)


class MaxNorm(_ChannelNorm):
    r"""Keep the L2 norm of every slice along ``dim`` (every output channel) at most ``max_value``.

    Like Keras's ``MaxNorm``: a slice whose norm exceeds ``max_value`` is scaled back onto
    the sphere of radius ``max_value``; slices inside the ball are left exactly as they are.
    Zeros stay zeros, so it composes with masks. :func:`torchconstrain.check` allows a
    relative tolerance of ``max(1e-5, 8 * eps)`` of the dtype for the rescaled norms.

    Args:
        max_value: the largest allowed norm, > 0.
        dim: the dimension that indexes the slices (0: output channels).

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

    def __init__(self, max_value: float, *, dim: int = 0) -> None:
        super().__init__(dim)
        if isinstance(max_value, bool) or not isinstance(max_value, (int, float)) or not max_value > 0:
            raise ValueError(f"MaxNorm: expected max_value > 0. Got {max_value!r}.")
        self.max_value = float(max_value)

    def forward(self, x: Tensor) -> Tensor:
        norms = self.norms(x)
        scale = (self.max_value / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp_max(1.0)
        return x * scale

    def right_inverse(self, value: Tensor) -> Tensor:
        return self(value)

    def violation(self, value: Tensor) -> str | None:
        norms = self.norms(value).flatten()
        limit = self.max_value * (1 + _tolerance(value.dtype))
        count = int((norms > limit).sum())
        if count == 0:
            return None
        return f"{count} slices along dim {self.dim} have an L2 norm above {self.max_value:g} (largest {norms.max().item():.6g})"

    def extra_repr(self) -> str:
        return f"max_value={self.max_value:g}, dim={self.dim}"


class UnitNorm(_ChannelNorm):
    r"""Keep the L2 norm of every slice along ``dim`` (every output channel) equal to 1.

    The effective slice is the stored slice divided by its norm. A slice that is entirely
    zero cannot be normalized and stays zero, which :func:`torchconstrain.check` reports:
    so a mask that removes whole slices along ``dim`` contradicts ``UnitNorm`` and is
    refused by :func:`torchconstrain.constrain`; masks that leave every slice some entry
    compose with it. ``check`` allows a relative tolerance of ``max(1e-5, 8 * eps)``.

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
        return x / self.norms(x).clamp_min(torch.finfo(x.dtype).tiny)

    def right_inverse(self, value: Tensor) -> Tensor:
        return self(value)

    def violation(self, value: Tensor) -> str | None:
        norms = self.norms(value).flatten()
        off = int(((norms - 1).abs() > _tolerance(value.dtype)).sum())
        if off == 0:
            return None
        return f"{off} slices along dim {self.dim} do not have unit L2 norm (norms from {norms.min().item():.6g} to {norms.max().item():.6g})"

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
