r"""How a :class:`~torchconstrain.FixedMask` template chooses which entries to keep.

Each selector turns tensors into bool masks (``True`` keeps the entry). They are built by
the ``FixedMask.magnitude``/``global_magnitude``/``random``/``structured``/``n_m``
constructors; users rarely touch them directly.
"""

from __future__ import annotations

import numbers
import zlib
from collections.abc import Mapping

import torch
from torch import Tensor

from torchconstrain.constraints.arguments import integer, number
from torchconstrain.constraints.base import largest_at_most
from torchconstrain.errors import warn_at_caller

__all__ = ["Magnitude", "GlobalMagnitude", "RandomSelection", "Structured", "NM"]


def _check_sparsity(sparsity: float, where: str) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{where}: expected sparsity to be a number. Got {type(sparsity).__name__}.")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{where}: expected sparsity in [0, 1). Got {sparsity}.")
    return float(sparsity)


def _keep_largest(scores: Tensor, sparsity: float) -> Tensor:
    """Bool mask keeping the ``1 - sparsity`` share of ``scores`` with the largest values."""
    flat = scores.flatten()
    pruned = round(sparsity * flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if pruned < flat.numel():
        keep[torch.topk(flat, flat.numel() - pruned, sorted=False).indices] = True
    return keep.view_as(scores)


def _plural(unit: str) -> str:
    """``entry`` -> ``entries``, ``slice along dim 0`` -> ``slices along dim 0``."""
    noun, _, rest = unit.partition(" ")
    noun = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{noun} {rest}".strip()


def _warn_if_degenerate(fqn: str, sparsity: float, keep: Tensor, unit: str) -> None:
    kept, total = int(keep.sum()), keep.numel()
    if total == 0:
        return  # nothing to prune: a tensor without entries
    if sparsity > 0 and kept == total:
        warn_at_caller(
            f"{fqn}: sparsity {sparsity} prunes no {unit} of {total}; the mask keeps everything."
        )
    elif kept == 0:
        warn_at_caller(
            f"{fqn}: sparsity {sparsity} prunes all {total} {_plural(unit)}; the tensor is all zeros."
        )


class Magnitude:
    """Keep the entries of largest absolute value, by share (``sparsity``) or ``threshold``.

    A threshold that masks every entry of a tensor is refused when the mask is chosen
    (the tensor would be all zeros, its output constant); one that masks none warns, as
    a share that prunes nothing does.
    """

    reads_values = True  # whether select() reads the tensor's values (not only its shape)

    def __init__(self, *, sparsity: float | None = None, threshold: float | None = None) -> None:
        if (sparsity is None) == (threshold is None):
            raise ValueError(
                "FixedMask.magnitude: give exactly one of sparsity= or threshold=. "
                f"Got sparsity={sparsity}, threshold={threshold}."
            )
        if sparsity is not None:
            sparsity = _check_sparsity(sparsity, "FixedMask.magnitude")
        else:
            threshold = number("FixedMask.magnitude", "threshold", threshold, low=0)
        self.sparsity, self.threshold = sparsity, threshold

    def select(self, fqn: str, tensor: Tensor) -> Tensor:
        if self.threshold is None:
            keep = _keep_largest(tensor.abs(), self.sparsity)
            _warn_if_degenerate(fqn, self.sparsity, keep, "entry")
            return keep
        magnitudes = tensor.abs()
        keep = ~(magnitudes <= largest_at_most(self.threshold, magnitudes.dtype))  # a NaN stays, as topk keeps it: check reports it
        if tensor.numel() and not keep.any():
            raise ValueError(
                f"{fqn}: FixedMask.magnitude(threshold={self.threshold:g}) masks all {tensor.numel()} "
                f"entries (the largest |w| is {magnitudes.max().item():.6g}): the tensor would be all "
                "zeros. Expected a threshold below the largest |w|, or use sparsity=."
            )
        if self.threshold > 0 and tensor.numel() and keep.all():
            warn_at_caller(
                f"{fqn}: threshold {self.threshold:g} masks no entry of {tensor.numel()} (the smallest "
                f"|w| is {magnitudes.min().item():.9g}); the mask keeps everything."
            )
        return keep

    def __repr__(self) -> str:
        if self.threshold is not None:
            return f"magnitude(threshold={self.threshold:g})"
        return f"magnitude(sparsity={self.sparsity:g})"


class GlobalMagnitude:
    """Keep the entries of largest absolute value across all tensors a rule matched."""

    reads_values = True  # whether select() reads the tensor's values (not only its shape)

    def __init__(self, *, sparsity: float) -> None:
        self.sparsity = _check_sparsity(sparsity, "FixedMask.global_magnitude")

    def select(self, fqn: str, tensor: Tensor) -> Tensor:
        return self.select_all({fqn: tensor})[fqn]

    def select_all(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.keep_largest({fqn: tensor.detach().abs() for fqn, tensor in tensors.items()})

    def keep_largest(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Bool masks keeping the ``1 - sparsity`` share of the largest ``scores`` across all tensors."""
        # Ranked in the scores' own (promoted) dtype: a float32 copy would tie float64
        # magnitudes that differ past float32's precision.
        keep = _keep_largest(torch.cat([score.flatten().cpu() for score in scores.values()]), self.sparsity)
        masks, start = {}, 0
        for fqn, score in scores.items():
            stop = start + score.numel()
            masks[fqn] = keep[start:stop].view(score.shape).to(score.device)
            start = stop
            if score.numel() and not masks[fqn].any():  # the others' magnitudes took its share
                _warn_if_degenerate(fqn, self.sparsity, masks[fqn], "entry")
        return masks

    def __repr__(self) -> str:
        return f"global_magnitude(sparsity={self.sparsity:g})"


class RandomSelection:
    """Keep a random ``1 - sparsity`` share of the entries.

    With ``seed`` the choice uses its own generator, seeded from ``seed`` and the tensor's
    name (so two tensors of one shape get different masks, and a tensor the same mask
    whenever it is constrained under that name); without, it draws from torch's global
    generator (so ``torch.manual_seed`` makes it reproducible, like any initialization).
    """

    reads_values = False  # whether select() reads the tensor's values (not only its shape)

    def __init__(self, *, sparsity: float, seed: int | None = None) -> None:
        self.sparsity = _check_sparsity(sparsity, "FixedMask.random")
        if seed is not None:
            seed = integer("FixedMask.random", "seed", seed, low=-(2**63), high=2**64 - 1)
        self.seed = seed

    def select(self, fqn: str, tensor: Tensor) -> Tensor:
        generator = None if self.seed is None else torch.Generator().manual_seed(self._seed_for(fqn))
        scores = torch.rand(tensor.shape, generator=generator)
        keep = _keep_largest(scores, self.sparsity)  # on the CPU: for_tensor moves it
        _warn_if_degenerate(fqn, self.sparsity, keep, "entry")
        return keep

    def _seed_for(self, fqn: str) -> int:
        """``seed`` combined with a stable hash of the tensor's name, in the generator's range."""
        return (self.seed + zlib.crc32(fqn.encode())) % 2**64

    def __repr__(self) -> str:
        return f"random(sparsity={self.sparsity:g}, seed={self.seed})"


class Structured:
    """Keep whole slices along ``dim`` with the largest L``p`` norm (channel pruning)."""

    reads_values = True  # whether select() reads the tensor's values (not only its shape)

    def __init__(self, *, sparsity: float, dim: int = 0, p: float = 2) -> None:
        self.sparsity = _check_sparsity(sparsity, "FixedMask.structured")
        self.dim = integer("FixedMask.structured", "dim", dim)
        self.p = number("FixedMask.structured", "p", p, low=0, low_open=True, finite=False)

    def select(self, fqn: str, tensor: Tensor) -> Tensor:
        if not -tensor.dim() <= self.dim < tensor.dim():
            raise ValueError(
                f"{fqn}: FixedMask.structured dim={self.dim} is out of range for a tensor of "
                f"shape {tuple(tensor.shape)}."
            )
        dim = self.dim % tensor.dim()
        others = [d for d in range(tensor.dim()) if d != dim]
        dtype = torch.promote_types(tensor.dtype, torch.float32)
        if not tensor.numel():  # slices without entries (vector_norm has no inf norm of nothing)
            norms = torch.zeros(tensor.shape[dim], dtype=dtype, device=tensor.device)
        elif others:  # in float32 at least (half sums overflow), float64 stays float64
            norms = torch.linalg.vector_norm(tensor, ord=self.p, dim=others, dtype=dtype)
        else:
            norms = tensor.abs()
        keep_slices = _keep_largest(norms, self.sparsity)
        _warn_if_degenerate(fqn, self.sparsity, keep_slices, f"slice along dim {dim}")
        shape = [1] * tensor.dim()
        shape[dim] = -1
        return keep_slices.view(shape).expand(tensor.shape).clone()

    def __repr__(self) -> str:
        return f"structured(sparsity={self.sparsity:g}, dim={self.dim}, p={self.p:g})"


class NM:
    """Keep the ``n`` largest entries of every ``m`` consecutive ones along ``dim`` (N:M)."""

    reads_values = True  # whether select() reads the tensor's values (not only its shape)

    def __init__(self, n: int, m: int, *, dim: int = 1) -> None:
        n, m = integer("FixedMask.n_m", "n", n), integer("FixedMask.n_m", "m", m)
        if not 0 < n <= m:
            raise ValueError(f"FixedMask.n_m: expected integers 0 < n <= m. Got n={n!r}, m={m!r}.")
        self.n, self.m, self.dim = n, m, integer("FixedMask.n_m", "dim", dim)

    def select(self, fqn: str, tensor: Tensor) -> Tensor:
        if not -tensor.dim() <= self.dim < tensor.dim():
            raise ValueError(
                f"{fqn}: FixedMask.n_m dim={self.dim} is out of range for a tensor of "
                f"shape {tuple(tensor.shape)}."
            )
        size = tensor.shape[self.dim]
        if size % self.m:
            raise ValueError(
                f"{fqn}: {self.n}:{self.m} sparsity needs dim {self.dim} to be divisible by "
                f"{self.m}. Got size {size} (shape {tuple(tensor.shape)})."
            )
        moved = tensor.abs().movedim(self.dim, -1)
        groups = moved.reshape(*moved.shape[:-1], size // self.m, self.m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(groups, self.n, dim=-1).indices, True)
        return keep.reshape(moved.shape).movedim(-1, self.dim).contiguous()

    def __repr__(self) -> str:
        return f"n_m({self.n}:{self.m}, dim={self.dim})"
