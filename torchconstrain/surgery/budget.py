r"""Budgets: which channels to keep so that a model keeps a given share of its cost.

The allocator knows nothing about architectures. It reads a list of :class:`ChannelGroup`
descriptions (a name, a channel count, an importance per channel, the cost of one channel,
the fewest channels to keep) and chooses, across all groups at once, the channels with the
highest importance per unit of cost, never fewer than each group's minimum, until the cost
budget is spent. A cost is anything additive over the kept model: multiply-accumulates
(``macs=0.5`` keeps half the MACs), parameters, or plain channel counts (cost 1 per channel
gives a share of channels).

Surgery modules describe their channel groups (a MobileNet block's expanded channels, a
dependency-graph group of a ResNet) and call :func:`allocate`; :class:`GateBudget` does the
same with the gates of learnable masks, at bake time, and steers the gates towards the
budget while training.

Example:
    >>> import torch
    >>> from torchconstrain.surgery.budget import ChannelGroup, allocate
    >>> groups = [
    ...     ChannelGroup("a", 4, importance=torch.tensor([4.0, 3.0, 2.0, 1.0]), macs=10.0),
    ...     ChannelGroup("b", 2, importance=torch.tensor([1.0, 1.0]), macs=100.0),
    ... ]
    >>> allocation = allocate(groups, keep=0.5)       # keep at most half of 240 MACs
    >>> allocation.kept()
    {'a': 2, 'b': 1}
    >>> allocation.achieved, allocation.target
    (120.0, 120.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

import torchconstrain._tracked as _tracked
from torchconstrain._distributed import whole
from torchconstrain.constraints.base import tracing, transformed

__all__ = [
    "Allocation", "ChannelGroup", "CostLayer", "CountsCost", "GateBudget", "LayerCost", "LinearCost", "allocate",
    "linear_cost",
]


@dataclass(frozen=True)
class ChannelGroup:
    r"""The channels that are kept or removed together, as the allocator sees them.

    Args:
        name: names the group in results and error messages.
        channels: the number of channels.
        importance: one non-negative score per channel; higher is more worth keeping.
        macs: the cost of one channel of this group (MACs, parameters, or 1 to count
            channels), the same for every channel of the group.
        minimum: the fewest channels the group keeps (at least 1, at most ``channels``).
    """

    name: str
    channels: int
    importance: Tensor
    macs: float
    minimum: int = 1

    def __post_init__(self) -> None:
        where = f"budget: channel group {self.name!r}"
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"{where}: expected channels >= 1. Got {self.channels!r}.")
        if not isinstance(self.importance, Tensor) or self.importance.numel() != self.channels:
            got = tuple(self.importance.shape) if isinstance(self.importance, Tensor) else type(self.importance).__name__
            raise ValueError(f"{where}: expected an importance tensor of {self.channels} scores. Got {got}.")
        if not torch.isfinite(self.importance).all() or (self.importance < 0).any():
            raise ValueError(f"{where}: expected finite, non-negative importance scores.")
        if not (isinstance(self.macs, (int, float)) and math.isfinite(self.macs) and self.macs >= 0):
            raise ValueError(f"{where}: expected macs >= 0 per channel. Got {self.macs!r}.")
        if isinstance(self.minimum, bool) or not isinstance(self.minimum, int) or not 1 <= self.minimum <= self.channels:
            raise ValueError(f"{where}: expected minimum in [1, {self.channels}]. Got {self.minimum!r}.")


def check_minimum(caller: str, minimum) -> None:
    r"""Refuse a ``minimum=`` that is neither a share in [0, 1] (float) nor a count >= 0 (int)."""
    if isinstance(minimum, bool) or not isinstance(minimum, (int, float)) or minimum < 0 or (
            isinstance(minimum, float) and minimum > 1):
        raise ValueError(f"{caller}: expected minimum, a share in [0, 1] or a count >= 0. Got {minimum!r}.")


def minimum_count(minimum: int | float, channels: int) -> int:
    r"""The fewest channels of ``channels`` that ``minimum`` keeps: a share (float, rounded
    up) or a count (int), at least 1 and at most ``channels``.

    Example:
        >>> minimum_count(0.1, 16), minimum_count(0.1, 5), minimum_count(3, 2)
        (2, 1, 2)
    """
    count = math.ceil(minimum * channels) if isinstance(minimum, float) else minimum
    return min(max(1, count), channels)


@dataclass
class Allocation:
    r"""What :func:`allocate` chose.

    Attributes:
        keep: group name -> bool vector over its channels (``True``: kept).
        target: the cost the budget allows (``keep * total``).
        achieved: the cost of the kept channels, at most ``target``.
        total: the cost with every channel kept.
    """

    keep: dict[str, Tensor]
    target: float
    achieved: float
    total: float = field(default=0.0)

    def kept(self) -> dict[str, int]:
        r"""Group name -> the number of channels kept."""
        return {name: int(mask.sum()) for name, mask in self.keep.items()}

    @property
    def share(self) -> float:
        r"""The achieved share of the total cost."""
        return self.achieved / self.total if self.total else 1.0


def linear_cost(groups: Sequence[ChannelGroup], fixed: float = 0.0) -> "LinearCost":
    r"""The cost ``fixed + sum(group.macs * kept[group.name])``: each channel costs its own ``macs``.

    Exact for costs that are additive over channels (a block's private channels, channel
    counts); a conv whose inputs and outputs both belong to groups costs the product of
    the two widths instead, which a cost function of its own gives exactly.
    """
    return LinearCost({group.name: float(group.macs) for group in groups}, float(fixed))


@dataclass(frozen=True)
class LinearCost:
    r"""``fixed + sum(per_channel[name] * kept[name])`` (a class, so a model holding it pickles)."""

    per_channel: dict[str, float]
    fixed: float = 0.0

    def __call__(self, kept: Mapping[str, int]) -> float:
        return self.fixed + sum(self.per_channel[name] * count for name, count in kept.items())


class CostLayer(NamedTuple):
    r"""One conv or linear layer of a :class:`LayerCost`.

    ``macs``: its cost with every channel kept; ``inputs`` and ``outputs``: its input columns
    and output rows (a depthwise conv has 1 input column: its cost follows its rows alone);
    ``reads`` and ``writes``: ``(group name, columns or rows per channel)`` for each channel
    group its columns or rows belong to. Columns and rows in no group are always kept.
    """

    macs: float
    inputs: int
    reads: tuple[tuple[str, float], ...]
    outputs: int
    writes: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LayerCost:
    r"""The exact MACs of a model whose channel groups keep ``kept[name]`` channels (a ``cost`` for :func:`allocate`).

    Each conv or linear layer costs its full MACs times the kept share of its input columns
    times the kept share of its output rows: a 1x1 conv from one group to another scales with
    the product of both kept widths, a depthwise conv with its channels once, a layer in no
    group not at all (a fixed cost). A group missing from ``kept`` keeps every channel.

    Example:
        >>> from torchconstrain.surgery.budget import CostLayer, LayerCost
        >>> cost = LayerCost((CostLayer(100.0, 4, (("a", 1.0),), 10, (("b", 1.0),)),), {"a": 4, "b": 10})
        >>> cost({"a": 2, "b": 5}), cost.per_channel("a")
        (25.0, 25.0)
    """

    layers: tuple[CostLayer, ...]
    channels: dict[str, int]

    @classmethod
    def of(cls, macs: Mapping[nn.Module, float], reads: Mapping[nn.Module, Sequence[tuple[str, float]]],
           writes: Mapping[nn.Module, Sequence[tuple[str, float]]], channels: Mapping[str, int]) -> "LayerCost":
        r"""Build the cost of the conv and linear layers in ``macs`` (layer -> its MACs, as
        :func:`~torchconstrain.surgery.measure.layer_macs` gives them): ``reads[layer]`` and
        ``writes[layer]`` name the groups of its columns and rows, ``channels`` each group's width."""
        layers = tuple(CostLayer(float(count), module.weight.shape[1], tuple(reads.get(module, ())),
                                 module.weight.shape[0], tuple(writes.get(module, ())))
                       for module, count in macs.items())
        return cls(layers, dict(channels))

    def __call__(self, kept: Mapping[str, int]) -> float:
        total = 0.0
        for macs, inputs, reads, outputs, writes in self.layers:
            columns = inputs - sum((self.channels[g] - kept.get(g, self.channels[g])) * per for g, per in reads)
            rows = outputs - sum((self.channels[g] - kept.get(g, self.channels[g])) * per for g, per in writes)
            total += macs * columns / inputs * rows / outputs
        return total

    def per_channel(self, name: str) -> float:
        r"""The MACs one channel of group ``name`` costs with every other channel kept."""
        full = dict(self.channels)
        return self(full) - self({**full, name: full[name] - 1})


def allocate(groups: Sequence[ChannelGroup], *, keep: float,
             cost: Callable[[Mapping[str, int]], float] | None = None, fixed: float = 0.0,
             normalize: bool = True, what: str = "budget") -> Allocation:
    r"""Choose the channels to keep so the kept cost is at most ``keep`` times the full cost.

    Each group's ``minimum`` channels of highest importance are kept first. The others are
    ranked across all groups by importance per unit of cost (``importance / macs``, the
    importance divided by its group's mean first when ``normalize``, so that groups whose
    scores have different scales compete fairly) and kept in that order for as long as the
    cost stays within the budget. The cost is monotone in the kept counts, so the longest
    such prefix is found by bisection: no channel that would still fit is dropped.

    Args:
        groups: the channel groups; names must be distinct.
        keep: the share of the full cost to keep, in (0, 1].
        cost: ``kept counts by group name -> cost``, monotone non-decreasing in each
            count; default :func:`linear_cost` of ``groups`` and ``fixed``.
        fixed: the cost outside every group (layers that are never pruned), for the
            default cost.
        normalize: divide each group's importance by its mean before ranking.
        what: names the budget in error messages.

    Returns:
        An :class:`Allocation`.

    Raises:
        ValueError: bad groups or ``keep``, or a budget the minimums alone exceed (the
            message gives the smallest share that can be reached).
    """
    names = [group.name for group in groups]
    if not groups or len(set(names)) != len(names):
        raise ValueError(f"{what}: expected a non-empty list of channel groups with distinct names. Got {names}.")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"{what}: expected a share to keep in (0, 1]. Got {keep!r}.")
    cost = linear_cost(groups, fixed) if cost is None else cost
    full = {group.name: group.channels for group in groups}
    total = float(cost(full))
    target = keep * total
    orders = [torch.sort(group.importance.detach().float().flatten().cpu(), descending=True, stable=True).indices
              for group in groups]
    ranked = _ranked_optional(groups, orders, normalize)

    def counts(prefix: int) -> dict[str, int]:
        extra = torch.bincount(ranked[:prefix], minlength=len(groups)) if prefix else torch.zeros(len(groups))
        return {group.name: group.minimum + int(extra[i]) for i, group in enumerate(groups)}

    floor = float(cost(counts(0)))
    if floor > target * (1 + 1e-9):
        raise ValueError(
            f"{what}: keeping {keep:g} of the cost ({target:,.0f} of {total:,.0f}) is not possible: the "
            f"per-group minimums alone cost {floor:,.0f} ({floor / total:.3f} of it). Ask for at least that "
            "share, or lower the minimums."
        )
    low, high = 0, len(ranked)  # cost(counts(low)) fits; find the largest prefix that does
    while low < high:
        middle = (low + high + 1) // 2
        if cost(counts(middle)) <= target * (1 + 1e-9):
            low = middle
        else:
            high = middle - 1
    kept = counts(low)
    masks = {}
    for group, order in zip(groups, orders):
        mask = torch.zeros(group.channels, dtype=torch.bool)
        mask[order[: kept[group.name]]] = True
        masks[group.name] = mask
    return Allocation(masks, target, float(cost(kept)), total)


def _ranked_optional(groups: Sequence[ChannelGroup], orders: list[Tensor], normalize: bool) -> Tensor:
    """Group index of every channel beyond the minimums, best importance per cost first.

    Within a group channels come in importance order, so the first ``n`` entries of a
    group in the ranking are always its ``n`` most important optional channels.
    """
    scores, owners = [], []
    for index, (group, order) in enumerate(zip(groups, orders)):
        importance = group.importance.detach().float().flatten().cpu()[order[group.minimum:]]
        if normalize:
            mean = group.importance.detach().float().mean().item()
            importance = importance / mean if mean > 0 else torch.ones_like(importance)
        per_cost = importance / group.macs if group.macs > 0 else torch.full_like(importance, math.inf)
        scores.append(per_cost)
        owners.append(torch.full((len(per_cost),), index, dtype=torch.long))
    scores, owners = torch.cat(scores), torch.cat(owners)
    # Stable sort of -score: ties keep group order, then importance order within the group.
    # Costs that rise within a group (importance order) keep the ranking consistent per group.
    order = torch.sort(-scores, stable=True).indices
    return owners[order]


class GateBudget:
    r"""One budget shared by the channel gates of several learnable masks.

    Each member is a :class:`~torchconstrain.LearnableMask` with ``per="channel"`` whose gates
    are one channel group. At bake time every member closes the gates that :func:`allocate`
    drops with the gates as importance (lowest gates first, per unit of cost; each group
    keeps its ``minimum``), so the baked model meets the budget exactly whatever the gates
    learned. While training, the first member's penalty is a Lagrange term
    ``multiplier * (expected share - keep)``, where the expected share is ``cost`` of the
    gates' sums taken as channel counts over the full cost (:class:`CountsCost`; a cost
    of your own must then take tensor counts); each penalty call computed with gradients on first moves
    the multiplier by ``rate`` times the excess: up while the gates are over budget, down
    (below zero if need be) while they are under it. So the gates are pushed towards the
    budget from both sides as hard as it takes: no strength to tune. Call
    :func:`~torchconstrain.penalty` once per training step.

    Masks that share a member's ``scores`` parameter (the other readers of the same
    channels) follow it: pass them to :meth:`attach` too.

    Attach it with :meth:`attach` after the masks are registered. The multiplier is a buffer
    ``multiplier`` of the first member, so it is saved in the model's ``state_dict``.

    Args:
        members: ``(group, mask)`` pairs; each group's ``importance`` is ignored (the gates
            are the importance) and its ``channels`` must be the mask's gate count.
        keep: the share of the full cost to keep, in (0, 1].
        cost: as in :func:`allocate` (default: linear in the groups' ``macs`` plus ``fixed``).
        fixed: the cost outside every group.
        rate: how fast the multiplier rises per penalty call, per unit of excess share.
        what: names the budget in messages.
    """

    def __init__(self, members: Sequence[tuple[ChannelGroup, object]], *, keep: float, cost=None,
                 fixed: float = 0.0, rate: float = 0.05, what: str = "budget") -> None:
        if not members:
            raise ValueError(f"{what}: expected at least one learnable mask to share the budget.")
        if not (isinstance(rate, (int, float)) and rate >= 0):
            raise ValueError(f"{what}: expected rate >= 0. Got {rate!r}.")
        for group, mask in members:
            gates = mask.scores.numel() if getattr(mask, "scores", None) is not None else None
            if gates != group.channels:
                raise ValueError(f"{what}: channel group {group.name!r} has {group.channels} channels but its mask "
                                 f"has {gates} gates.")
        self.groups = [group for group, _ in members]
        self.masks = [mask for _, mask in members]
        self.keep, self.fixed, self.rate, self.what = keep, fixed, rate, what
        self.cost = linear_cost(self.groups, fixed) if cost is None else cost
        self.total = float(self.cost({g.name: g.channels for g in self.groups}))
        self._counts_cost = CountsCost(self.cost, [g.name for g in self.groups])
        self.allocation()  # validates keep and the minimums now, before anything is attached

    def attach(self, followers: Sequence[object] = ()) -> "GateBudget":
        r"""Make every member, and each follower (a mask sharing a member's ``scores``), use this
        budget (in place); return ``self``."""
        members = {id(mask.scores) for mask in self.masks}
        strays = [f for f in followers if id(f.scores) not in members]
        if strays:
            raise ValueError(f"{self.what}: {len(strays)} follower masks share no member's scores.")
        leader = self.masks[0]
        if "multiplier" not in leader._buffers:
            leader.register_buffer("multiplier", torch.zeros((), device=leader.scores.device))
        for mask in [*self.masks, *followers]:
            mask.budget = self
            mask.cacheable = False  # a hard forward now depends on the other members' gates too
        return self

    def allocation(self) -> Allocation:
        r"""The channels baking keeps now: :func:`allocate` over the members' current gates.

        A hard forward asks for it once per member, so the last result is reused while
        every member's ``scores`` and ``temperature`` are the same tensors at the same
        version, under the same ``keep`` and ``cost`` (the allocation is a function of nothing
        else); any in-place change, an optimizer step or a temperature schedule included,
        recomputes it. As for the fast path, a write through ``.data`` is not seen: edit
        scores in place under ``torch.no_grad()`` instead.
        """
        if tracing() or transformed():
            return self._allocate()
        sources = self._gate_sources()
        last = self.__dict__.get("_last")
        if last is None or not _same_sources(last[0], sources):
            last = self._last = (sources, self._allocate())
        allocation = last[1]
        return replace(allocation, keep={name: keep.clone() for name, keep in allocation.keep.items()})

    def _allocate(self) -> Allocation:
        with torch.no_grad():
            groups = [ChannelGroup(g.name, g.channels, mask.gates().detach().flatten().float().cpu(), g.macs, g.minimum)
                      for g, mask in zip(self.groups, self.masks)]
        return allocate(groups, keep=self.keep, cost=self.cost, normalize=False, what=self.what)

    def _gate_sources(self) -> tuple:
        for mask in self.masks:
            _tracked.track(mask.scores)  # writes through .data show in the version counter too
        tensors = tuple((t, t._version, t.data_ptr()) for mask in self.masks for t in (mask.scores, mask.temperature))
        return ((self.cost, self.keep), *tensors)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_last", None)  # a copy's gates are other tensors
        return state

    def keep_for(self, mask) -> Tensor:
        r"""The bool keep vector of one member's gates (or of a mask sharing a member's scores), in the scores' shape."""
        index = next(i for i, m in enumerate(self.masks) if m.scores is mask.scores)
        keep = self.allocation().keep[self.groups[index].name]
        return keep.to(mask.scores.device).view(mask.scores.shape)

    def expected_share(self) -> Tensor:
        r"""The budget's cost of the gates' sums as channel counts, over the full cost
        (differentiable): the cost that baking holds to ``keep``, so the multiplier settles
        where the baked model meets the budget (layers in no group, and a layer whose inputs
        and outputs both belong to groups, count as they do there)."""
        counts = torch.stack([whole(mask.gates().sum()) for mask in self.masks])  # FSDP2: all ranks
        return self._counts_cost(counts) / self.total

    def penalty_for(self, mask) -> Tensor | None:
        r"""The Lagrange term, for the first member only (``None`` for the others)."""
        if mask is not self.masks[0]:
            return None
        excess = self.expected_share() - self.keep
        multiplier = mask.multiplier
        if torch.is_grad_enabled():
            with torch.no_grad():
                multiplier.add_(self.rate * excess.detach())
        # A copy: the next penalty() edits the multiplier, which this term's backward reads.
        return multiplier.clone() * excess


class CountsCost:
    r"""``cost`` as a differentiable function of the kept counts in one tensor, one count per
    group of ``names``: for a :class:`LinearCost` or a :class:`LayerCost` a few operations on
    the whole vector (a penalty computes it every step; its coefficients are made once per
    device and dtype), for any other cost a call with a dict of the counts.

    Example:
        >>> import torch
        >>> from torchconstrain.surgery.budget import CostLayer, CountsCost, LayerCost
        >>> cost = LayerCost((CostLayer(100.0, 4, (("a", 1.0),), 10, (("b", 1.0),)),), {"a": 4, "b": 10})
        >>> CountsCost(cost, ["a", "b"])(torch.tensor([2.0, 5.0])).item()
        25.0
    """

    def __init__(self, cost, names: Sequence[str]) -> None:
        self.cost, self.names, self.made = cost, list(names), {}
        if isinstance(cost, LinearCost):
            self.lists = ([cost.per_channel.get(name, 0.0) for name in names],)
        elif isinstance(cost, LayerCost):
            layers = cost.layers
            self.lists = ([float(cost.channels[name]) for name in names],
                          [[dict(layer.reads).get(name, 0.0) for name in names] for layer in layers],
                          [[dict(layer.writes).get(name, 0.0) for name in names] for layer in layers],
                          [float(layer.inputs) for layer in layers], [float(layer.outputs) for layer in layers],
                          [layer.macs / (layer.inputs * layer.outputs) for layer in layers])
        else:
            self.lists = None

    def __call__(self, counts: Tensor) -> Tensor:
        if self.lists is None:
            return self.cost(dict(zip(self.names, counts.unbind())))
        key = (counts.device, counts.dtype)
        if key not in self.made:
            self.made[key] = tuple(counts.new_tensor(values) for values in self.lists)
        if isinstance(self.cost, LinearCost):
            (per,) = self.made[key]
            return self.cost.fixed + (per * counts).sum()
        full, reads, writes, inputs, outputs, scale = self.made[key]
        drop = full - counts
        return (scale * (inputs - reads @ drop) * (outputs - writes @ drop)).sum()


def _same_sources(first: tuple, second: tuple) -> bool:
    """Whether two :meth:`GateBudget._gate_sources` name the same tensors at the same versions and storages."""
    return len(first) == len(second) and all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(first, second))  # (cost, keep) too
