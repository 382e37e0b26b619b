r"""Channel masks and in-place shrinking for the inverted residual family: torchvision's MobileNetV2,
MobileNetV3, EfficientNet (B0-B7, V2 S/M/L) and MNASNet.

Each architecture's adapter (:mod:`~torchconstrain.surgery.mobilenetv3`, ...) says where the
pattern's layers are; :mod:`~torchconstrain.surgery.pattern` turns that into channel groups,
masks and rewrites. This module is what users call.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torchconstrain._tensors import parameter_slots
from torchconstrain.bake import bake
from torchconstrain.constraints import LearnableMask
from torchconstrain.constraints.arguments import flag, number
from torchconstrain.errors import warn_at_caller
from torchconstrain.rules import constrain_and_finish
from torchconstrain.surgery import efficientnet, mnasnet, mobilenetv2, mobilenetv3
from torchconstrain.surgery.budget import ChannelGroup, GateBudget, LayerCost, allocate, check_minimum, minimum_count
from torchconstrain.surgery.measure import count_macs, count_params, layer_macs, measure_latency
from torchconstrain.surgery.pattern import (
    BLOCK_KINDS, KINDS, ROLES, Block, Group, Network, build_groups, fixed_rules, gate_of, importance_of, keep_share,
    learnable_rules, select_kinds, shrink_groups, slice_group,
)

__all__ = [
    "ADAPTERS", "KINDS", "Block", "Group", "GroupCost", "RoleKey", "ShrinkReport", "block_rules", "channel_groups", "channel_plan",
    "find_blocks", "find_groups", "mask_blocks", "resize", "role", "shrink",
]

ADAPTERS = (mobilenetv3, mobilenetv2, efficientnet, mnasnet)
SUPPORTED = "torchvision's MobileNetV2/V3, EfficientNet (B0-B7, V2), MNASNet and models built from their blocks"


def find_blocks(model: nn.Module) -> list[Block]:
    r"""Return every inverted residual block of ``model``, in forward order, parsed by role.

    Raises:
        ValueError: the model has no supported block, or one whose layers are not the
            expected conv/BN/SE sequence (the message names the block and why).
    """
    return _describe(model)[0]


def _describe(model: nn.Module) -> tuple[list[Block], Network | None]:
    """The blocks of ``model`` and, for a whole torchvision model of the family, its network."""
    blocks = []
    for name, module in model.named_modules():
        adapter = next((a for a in ADAPTERS if type(module) in a.BLOCKS), None)
        if adapter is not None:
            try:
                block = adapter.parse(name, module)
                block.check(adapter.FAMILY)
            except ValueError as error:
                raise ValueError(f"surgery: block {name or '<root>'}: {error}") from None
            blocks.append(block)
    network = _network(model, blocks)
    if network is not None:
        blocks = network.blocks
    if not blocks:
        raise ValueError(
            f"surgery: {type(model).__name__} has no torchvision InvertedResidual block, nor any other block "
            f"of the inverted residual family. The surgery supports {SUPPORTED}."
        )
    return blocks, network


def _network(model: nn.Module, blocks: list[Block]) -> Network | None:
    for adapter in ADAPTERS:
        stock = next((cls for cls in adapter.MODELS if isinstance(model, cls)), None)
        if stock is not None and _same_forward(type(model), stock):
            try:
                return adapter.network(model, blocks)
            except ValueError as error:
                raise ValueError(f"surgery: {error}") from None
    return None


def _same_forward(cls: type, stock: type) -> bool:
    return all(getattr(cls, name, None) is getattr(stock, name, None) for name in ("forward", "_forward_impl"))


def find_groups(model: nn.Module, groups="all") -> list[Group]:
    r"""Return ``model``'s channel groups of the kinds ``groups`` (see :func:`channel_groups`), with their layers.

    Example:
        >>> import torchvision
        >>> from torchconstrain import surgery
        >>> model = torchvision.models.mobilenet_v2(weights=None)
        >>> stream = surgery.find_groups(model, "stream")[1]      # written by features.2, added to by features.3
        >>> stream.name, [slot.fqn for slot in stream.rows], [slot.fqn for slot in stream.readers]
        ('features.2:out', ['features.2.conv.2', 'features.3.conv.2'], ['features.3.conv.0.0', 'features.4.conv.0.0'])
    """
    return _groups(model, groups, "surgery.find_groups")


def _groups(model: nn.Module, groups, where: str) -> list[Group]:
    """The channel groups of the kinds ``groups`` names; raises when the model cannot have them."""
    kinds = select_kinds(groups, where)
    blocks, network = _describe(model)
    whole = set(kinds) - set(BLOCK_KINDS)
    if network is None and whole and groups != "all":
        raise ValueError(
            f"{where}: the {', '.join(sorted(whole))} groups need a whole torchvision model of the family "
            f"(MobileNetV2/V3, EfficientNet, MNASNet, its forward not overridden). Got {type(model).__name__}; "
            f"it has only {' and '.join(BLOCK_KINDS)} groups."
        )
    found = build_groups(blocks, network)
    for group in found:
        try:
            group.check()
        except ValueError as error:
            raise ValueError(f"surgery: {error}") from None
    return [group for group in found if group.kind in kinds]


@dataclass(frozen=True)
class GroupCost:
    r"""A channel group as a budget allocator sees it.

    ``importance``: one score per channel; ``macs``: the multiply-accumulates one channel
    costs (every layer it is in, for the example input); ``minimum``: the fewest channels
    the group keeps.
    """

    name: str
    kind: str
    channels: int
    importance: Tensor
    macs: float
    minimum: int = 1


def channel_groups(model: nn.Module, groups="all", *, importance="l1", example: Tensor | None = None) -> list[GroupCost]:
    r"""Describe ``model``'s channel groups of the kinds ``groups``: name, channels, importance and MACs per channel.

    Kinds: ``"expanded"`` (a block's expanded channels, named after the block),
    ``"squeeze"`` (``"<block>:se"``), ``"stem"`` and ``"stream"`` (``"<writer>:out"``: the
    channels the stem or a non-residual block writes and the residual blocks after it
    add to), ``"last"`` (the last conv's) and ``"hidden"`` (the classifier's hidden
    units); ``"all"`` for every kind the model has.

    Example:
        >>> import torchvision
        >>> from torchconstrain import surgery
        >>> model = torchvision.models.mobilenet_v3_small(weights=None)
        >>> groups = surgery.channel_groups(model)
        >>> [(g.name, g.kind, g.channels) for g in groups[:4]]
        [('features.0.0:out', 'stem', 16), ('features.1:se', 'squeeze', 8), ('features.1:out', 'stream', 16), ('features.2', 'expanded', 72)]
    """
    found = _groups(model, groups, "surgery.channel_groups")
    cost = _mac_cost(model, example, _groups(model, "all", "surgery.channel_groups"), "surgery.channel_groups")
    return [GroupCost(g.name, g.kind, g.channels, importance_of(g, importance), cost.per_channel(g.name), g.minimum)
            for g in found]


def _macs_of_example(model: nn.Module, example: Tensor, caller: str) -> int:
    """The MACs of ``model`` on ``example``; a ValueError where the model cannot run it."""
    with _running_the_example(example, caller):
        return count_macs(model, example)


@contextmanager
def _running_the_example(example: Tensor, caller: str):
    """Re-raise what running the model on ``example`` raises as a ValueError naming ``caller``."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"{caller}: the model cannot run the example, a {type(example).__name__} of shape "
                         f"{tuple(getattr(example, 'shape', ()))}: {type(error).__name__}: {error}") from None


def _example(model: nn.Module, example: Tensor | None, caller: str = "surgery") -> Tensor:
    """The input MACs are counted for: ``example``, or one 224x224 RGB image in the model's
    dtype, on the model's device."""
    like = next(model.parameters())
    if example is None:
        return torch.zeros(1, 3, 224, 224, dtype=like.dtype, device=like.device)
    if not isinstance(example, Tensor):
        raise TypeError(f"{caller}: expected example to be an input batch, a tensor (one 1x3x224x224 image by "
                        f"default). Got {type(example).__name__}.")
    return example.to(like.device)


def _mac_cost(model: nn.Module, example: Tensor | None, groups: list[Group], caller: str) -> LayerCost:
    """The exact MACs of ``model`` on ``example`` as a function of the kept channels of ``groups``
    (every group of the model, so that each layer's columns and rows are known)."""
    reads, writes = {}, {}
    for group in groups:
        for slot in group.readers:
            reads.setdefault(slot.module, []).append((group.name, 1.0))
        for slot in (*group.rows, *group.depthwise):
            writes.setdefault(slot.module, []).append((group.name, 1.0))
    example = _example(model, example, caller)
    with _running_the_example(example, caller):
        macs = layer_macs(model, example)
    return LayerCost.of(macs, reads, writes, {group.name: group.channels for group in groups})


def role(model: nn.Module, name: str) -> "RoleKey":
    r"""Return a rule key picking the weight of every layer with role ``name`` in ``model``'s blocks.

    Roles: ``"expand"``, ``"depthwise"``, ``"se_fc1"``, ``"se_fc2"``, ``"se"`` (both SE fcs),
    ``"project"``; for a whole model also ``"stem"`` and ``"last"`` (its first and last conv).

    Example:
        >>> import torchvision
        >>> from torchconstrain import Clamp, constrain
        >>> from torchconstrain.surgery import role
        >>> model = torchvision.models.mobilenet_v3_small(weights=None)
        >>> report = constrain(model, {role(model, "depthwise"): Clamp(-1, 1)})
        >>> len(report), report.names()[0]
        (11, 'features.1.block.0.0.weight')
    """
    wanted = ("se_fc1", "se_fc2") if name == "se" else (name,)
    if not set(wanted) <= {*ROLES, "stem", "last"}:
        raise ValueError(f"surgery.role: unknown role {name!r}. Expected one of {', '.join(ROLES)}, se, stem, last.")
    blocks, network = _describe(model)
    if name in ("stem", "last"):
        if network is None:
            raise ValueError(f"surgery.role: role {name!r} needs a whole torchvision model of the family. "
                             f"Got {type(model).__name__}.")
        return RoleKey(name, frozenset({f"{getattr(network, name).fqn}.weight"}))
    names = {block.weights()[r] for block in blocks for r in wanted if r in block.weights()}
    return RoleKey(name, frozenset(names))


@dataclass(frozen=True)
class RoleKey:
    r"""A rule key: a callable ``(fqn, module) -> bool`` over a fixed set of weight names."""

    role: str
    names: frozenset

    def __call__(self, fqn: str, module: nn.Module) -> bool:
        return fqn in self.names

    @property
    def __name__(self) -> str:
        return f"role {self.role}"


def mask_blocks(
    model: nn.Module,
    *,
    groups="expanded",
    sparsity: float | None = None,
    macs: float | None = None,
    learnable: bool = False,
    importance="l1",
    strength: float = 1e-2,
    hard: bool = False,
    rate: float = 0.05,
    example: Tensor | None = None,
    minimum: int | float = 0.1,
):
    r"""Put one channel mask on every channel group of the kinds ``groups`` (default: the blocks' expanded channels).

    Modifies ``model`` in place; the masks are torchconstrain constraints, so
    :func:`~torchconstrain.check`, :func:`~torchconstrain.penalty` and
    :func:`~torchconstrain.bake` see them, and :func:`shrink` removes the masked channels.
    ``groups`` is a kind, a list of kinds or ``"all"`` (see :func:`channel_groups`):
    ``"expanded"``, ``"squeeze"``, ``"stem"``, ``"stream"``, ``"last"``, ``"hidden"``.

    - Fixed (``learnable=False``): in each group the ``sparsity`` share of channels with the
      lowest importance is masked in every layer that touches them: the rows of the layers
      writing them (and of depthwise convs), the columns of the layers reading them. The
      importance is ``"l1"`` (the L1 norm of the readers' weights reading the channel),
      ``"bn"`` (``|gamma|`` of the BatchNorms whose output the readers see, summed; ``"l1"``
      for groups without one: squeeze and hidden) or a callable ``(group_name, group) ->
      scores`` of length ``group.channels``. Every group keeps at least one channel.
    - Learnable (``learnable=True``): one :class:`~torchconstrain.LearnableMask` gate per
      channel, shared by every layer that reads the group, so it gates each of the
      channel's contributions. Its penalty is ``strength * mean(gate)`` per group;
      ``hard=True`` trains with the binary gate. With ``sparsity=`` it is a budget instead:
      baking closes exactly that share of each group's lowest gates (at least one stays
      open), and the penalty is a Lagrange term that steers the gates to it, its
      multiplier rising by ``rate`` times the excess at each call of
      :func:`~torchconstrain.penalty` (see :class:`~torchconstrain.LearnableMask`);
      ``strength`` is not used.
    - A MAC budget (``macs=``, instead of ``sparsity=``): keep that share of the model's
      MACs for ``example`` (default: one 224x224 RGB image), choosing channels across all
      the chosen groups at once by importance per MAC, each group keeping its ``minimum``
      (:func:`~torchconstrain.surgery.budget.allocate` with the exact cost: a project conv
      costs the product of its kept expanded and stream widths). Fixed masks are chosen
      now, by ``importance``; learnable gates share one
      :class:`~torchconstrain.surgery.budget.GateBudget`, met exactly at bake with the gates
      as importance and steered by a Lagrange term while training (its ``rate`` as above;
      ``strength`` is not used).

    ``minimum`` is the fewest channels a group keeps under a MAC budget: a share of its
    channels (float, default 0.1, rounded up) or a count (int), at least 1. The budget
    spends channels where they cost the most MACs, so without it a stem or a stream would
    go down to one channel. (``sparsity=`` says itself how many each group keeps.)

    Masking the readers is what removes a channel: zeroing only a writer's filter leaves
    BatchNorm's shift and the activation, a nonzero constant that would still reach them.
    Without the whole model (blocks used in a model of your own) only the ``expanded`` and
    ``squeeze`` groups exist, and a block without an expand conv (expand ratio 1) has no
    expanded group: its depthwise conv filters its input, which belongs to the stream.

    Returns:
        The :class:`~torchconstrain.report.Report` of :func:`~torchconstrain.constrain`.

    Raises:
        ValueError: a bad argument, both ``sparsity`` and ``macs``, a MAC budget the
            minimums alone exceed (the message gives the smallest share that can be kept),
            or a model the surgery does not understand (nothing is changed then).

    Example:
        >>> import torch, torchvision
        >>> from torchconstrain import surgery
        >>> model = torchvision.models.mobilenet_v3_small(weights=None)
        >>> report = surgery.mask_blocks(model, sparsity=0.5)
        >>> report["features.2.block.2.0.weight"]["constraints"]
        ['FixedMask(shape=(24, 72, 1, 1), sparsity=0.500)']
        >>> model = torchvision.models.efficientnet_b0(weights=None)
        >>> report = surgery.mask_blocks(model, groups="all", sparsity=0.5)
        >>> report["features.2.0.block.3.0.weight"]["constraints"]   # project: expanded columns and stream rows
        ['FixedMask(shape=(24, 96, 1, 1), sparsity=0.750)']
        >>> model = torchvision.models.mobilenet_v3_small(weights=None)
        >>> example = torch.zeros(1, 3, 64, 64)
        >>> report = surgery.mask_blocks(model, groups="all", macs=0.5, learnable=True, example=example)
        >>> model.features[2].block[2][0].parametrizations.weight[0].budget.keep   # one budget for every gate
        0.5
    """
    rules, finish = block_rules(model, groups=groups, sparsity=sparsity, macs=macs, learnable=learnable,
                                importance=importance, strength=strength, hard=hard, rate=rate, example=example,
                                minimum=minimum)
    return constrain_and_finish(model, rules, finish)


def block_rules(model: nn.Module, *, groups="expanded", sparsity: float | None = None, macs: float | None = None,
                learnable: bool = False, importance="l1", strength: float = 1e-2, hard: bool = False,
                rate: float = 0.05, example: Tensor | None = None, minimum: int | float = 0.1):
    r"""The rules :func:`mask_blocks` applies, without applying them.

    Every argument is validated here (a MAC budget is allocated now), so a call that
    raises changes nothing.

    Returns:
        ``(rules, finish)``: ``(key, constraint)`` pairs to pass to
        :func:`~torchconstrain.constrain` (alone or with other rules), and a function to
        call once they are applied (it makes each group's learnable gates share scores, and
        a MAC budget's gates share the budget).
    """
    _check_budget(sparsity, macs, learnable, rate)
    check_minimum("surgery.mask_blocks", minimum)
    found = _groups(model, groups, "surgery.mask_blocks")
    if macs is not None:
        for group in found:
            group.minimum = minimum_count(minimum, group.channels)
        return _mac_rules(model, found, macs, learnable=learnable, importance=importance, strength=strength,
                          hard=hard, rate=rate, example=example)
    if learnable:
        return learnable_rules(found, strength=strength, hard=hard, sparsity=sparsity, rate=rate)
    keeps = [(group, keep_share(group, sparsity, importance_of(group, importance))) for group in found]
    untouched = [group.label for group, keep in keeps if keep.all()]
    if sparsity > 0 and untouched:
        warn_at_caller(f"surgery.mask_blocks: sparsity {sparsity} masks no channel of {', '.join(untouched)} "
                      "(too few channels).")
    return fixed_rules(keeps), lambda: None


def _check_budget(sparsity, macs, learnable: bool, rate) -> None:
    number("surgery.mask_blocks", "rate", rate, low=0)
    flag("surgery.mask_blocks", "learnable", learnable)  # "false" from a file would be truthy
    if sparsity is not None and macs is not None:
        raise ValueError("surgery.mask_blocks: pass sparsity= (a share of each group's channels) or macs= "
                         f"(a share of the model's MACs), not both. Got sparsity={sparsity!r}, macs={macs!r}.")
    if macs is not None:
        if isinstance(macs, bool) or not isinstance(macs, (int, float)) or not 0.0 < macs <= 1.0:
            raise ValueError(f"surgery.mask_blocks: expected macs, the share of the model's MACs to keep, in (0, 1]. "
                             f"Got {macs!r}.")
    elif learnable:
        if sparsity is not None and (isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0):
            raise ValueError(f"surgery.mask_blocks: expected sparsity in [0, 1) or None. Got {sparsity!r}.")
    elif sparsity is None or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"surgery.mask_blocks: expected sparsity in [0, 1) for fixed masks. Got {sparsity!r}; "
                         "or pass macs=, the share of the model's MACs to keep.")


def _mac_rules(model: nn.Module, found: list[Group], macs: float, *, learnable: bool, importance, strength: float,
               hard: bool, rate: float, example: Tensor | None):
    """The rules of a MAC budget over the groups ``found``: allocated now (fixed masks) or at bake (learnable)."""
    if not found:
        raise ValueError(f"surgery.mask_blocks: {type(model).__name__} has no channel group of the kinds asked for "
                         "to keep a share of the MACs with.")
    what = "surgery.mask_blocks macs"
    cost = _mac_cost(model, example, _groups(model, "all", "surgery.mask_blocks"), "surgery.mask_blocks")
    described = [ChannelGroup(g.name, g.channels, torch.ones(g.channels) if learnable else importance_of(g, importance),
                              cost.per_channel(g.name), g.minimum) for g in found]
    allocation = allocate(described, keep=macs, cost=cost, what=what)  # refuses an unreachable budget now
    if not learnable:
        return fixed_rules([(g, allocation.keep[g.name]) for g in found]), lambda: None
    rules, share = learnable_rules(found, strength=strength, hard=hard)

    def finish() -> None:
        share()
        leaders = [gate_of(group.readers[0]) for group in found]
        followers = [gate_of(slot) for group in found for slot in group.readers[1:]]
        GateBudget(list(zip(described, leaders)), keep=macs, cost=cost, rate=rate, what=what).attach(followers)

    return rules, finish


@dataclass
class ShrinkReport:
    r"""What :func:`shrink` changed: channels per group, the model's size and speed, and budgets.

    ``targets`` maps a budget (``"sparsity"``: the share of channels removed, ``"macs"``: the
    share of MACs kept) to ``(target, achieved)``.
    """

    channels: dict[str, tuple[int, int]]
    params: tuple[int, int]
    macs: tuple[int, int]
    latency: tuple[float, float] | None
    targets: dict[str, tuple[float, float]] = field(default_factory=dict)
    kind: str = "group"

    def __str__(self) -> str:
        width = max([14, *(len(name) + 1 for name in self.channels)])
        lines = [f"{self.kind:<{width}} channels", *(f"{name:<{width}} {a} -> {b}" for name, (a, b) in self.channels.items())]
        lines.append(f"params  {self.params[0]:,} -> {self.params[1]:,} ({self.params[1] / self.params[0]:.2f}x)")
        lines.append(f"MACs    {self.macs[0]:,} -> {self.macs[1]:,} ({self.macs[1] / self.macs[0]:.2f}x)")
        if self.latency is not None:
            before, after = self.latency
            lines.append(f"latency {before * 1e3:.2f} ms -> {after * 1e3:.2f} ms ({after / before:.2f}x, batch 1, CPU)")
        for name, (target, achieved) in self.targets.items():
            lines.append(f"{name:<7} target {target:.3f}, achieved {achieved:.3f}")
        return "\n".join(lines)


def shrink(model: nn.Module, *, example: Tensor | None = None, measure: bool = True,
           targets: dict | None = None) -> ShrinkReport:
    r"""Rewrite the model in place without the channels that nothing reads, in every channel group.

    A channel of a group (see :func:`channel_groups`) goes when every layer reading it has
    only zero weights for it (for instance after :func:`mask_blocks` and
    :func:`~torchconstrain.bake`): it leaves every layer of the group, the writers' rows,
    their BatchNorms, depthwise convs (and their ``groups``) and the readers' columns.
    Module names stay the same, and so do the layers: each is resized in place, keeping its
    class, hooks and attributes (one holding other tensors is refused), with new
    ``Parameter`` objects of the new sizes: build the optimizer for fine-tuning after it,
    as one built before holds the old ones. In eval mode the shrunk model's outputs match the masked
    model's (after :func:`~torchconstrain.bake`) to float32 rounding; in train mode too
    (stochastic depth acts on whole samples), except for dropout, whose random draws
    depend on the width.

    Every torchconstrain constraint on the groups' layers is baked first; constraints
    elsewhere in the model stay.

    Budgets are reported in ``report.targets`` as ``name -> (target, achieved)``: the
    learnable masks' budgets of :func:`mask_blocks` are read from the masks
    (``"sparsity"``: the share of the budgeted groups' channels removed; ``"macs"``: the
    shrunk model's MACs over the dense model's, both counted on ``example``, so pass the
    example the budget was set for). Fixed masks keep no target: pass it as ``targets``.

    Args:
        model: a model of the family, or a model built from its blocks.
        example: the input used to count MACs and time inference (default: one
            224x224 RGB image).
        measure: time batch-1 CPU inference before (a dense copy) and after.
        targets: ``{"macs": share}``, the MAC share to report the achieved share against
            (as in :func:`~torchconstrain.surgery.graph.shrink`); it replaces one read from
            the masks.

    Returns:
        A :class:`ShrinkReport`: channels per changed group, params, MACs and latency
        before and after, and the budgets' targets.

    Raises:
        ValueError: a block the surgery does not understand, bad ``targets``, or an
            ``example`` the model cannot run; nothing is changed then.

    Example:
        >>> import torch, torchvision
        >>> from torchconstrain import surgery
        >>> model = torchvision.models.mobilenet_v3_small(weights=None).eval()
        >>> _ = surgery.mask_blocks(model, sparsity=0.5)
        >>> report = surgery.shrink(model, measure=False)
        >>> report.channels["features.2"], report.macs[1] < report.macs[0]
        ((72, 36), True)
        >>> model = torchvision.models.mobilenet_v3_small(weights=None).eval()
        >>> example = torch.zeros(1, 3, 64, 64)
        >>> _ = surgery.mask_blocks(model, groups="all", macs=0.5, example=example)
        >>> report = surgery.shrink(model, example=example, measure=False, targets={"macs": 0.5})
        >>> target, achieved = report.targets["macs"]
        >>> target, 0.45 < achieved <= 0.5
        (0.5, True)
    """
    groups = _groups(model, "all", "surgery.shrink")
    asked = _check_targets(targets)
    example = _example(model, example, "surgery.shrink")
    budgets = _sparsity_budgets(groups)
    mac_target = asked.get("macs", _mac_budget(groups))
    macs_before = _macs_of_example(model, example, "surgery.shrink")  # before anything changes
    bake(model, key=_group_tensors(model, groups))
    before = (count_params(model), macs_before)
    latency_before = measure_latency(model, example) if measure else None
    channels = shrink_groups(groups)
    latency = (latency_before, measure_latency(model, example)) if measure else None
    report = ShrinkReport(channels, (before[0], count_params(model)), (before[1], count_macs(model, example)), latency)
    if budgets:
        full = sum(width for _, width in budgets.values())
        kept = sum(channels.get(name, (width, width))[1] for name, (_, width) in budgets.items())
        report.targets["sparsity"] = (_one_target({target for target, _ in budgets.values()}), 1 - kept / full)
    if mac_target is not None:
        report.targets["macs"] = (mac_target, report.macs[1] / report.macs[0])
    return report


def _check_targets(targets) -> dict:
    if targets is None:
        return {}
    if not isinstance(targets, dict) or set(targets) - {"macs"}:
        raise ValueError(f"surgery.shrink: expected targets as {{'macs': share}} (the share of MACs to keep; sparsity "
                         f"budgets are read from the masks). Got {targets!r}.")
    macs = targets.get("macs")
    if isinstance(macs, bool) or not isinstance(macs, (int, float)) or not 0.0 < macs <= 1.0:
        raise ValueError(f"surgery.shrink: expected targets['macs'], the share of MACs to keep, in (0, 1]. Got {macs!r}.")
    return dict(targets)


def _one_target(targets: set) -> float:
    """The target the budgets share, or NaN when they differ."""
    return targets.pop() if len(targets) == 1 else math.nan


def _learnable_masks(group: Group) -> list[LearnableMask]:
    """The learnable masks on the weight of ``group``'s first reader."""
    module = group.readers[0].module
    chain = module.parametrizations.weight if parametrize.is_parametrized(module, "weight") else []
    return [c for c in chain if isinstance(c, LearnableMask)]


def _sparsity_budgets(groups: list[Group]) -> dict[str, tuple[float, int]]:
    """Group name -> (sparsity target, channels) for the groups whose learnable gates carry a budget."""
    found = {}
    for group in groups:
        mask = next((c for c in _learnable_masks(group) if c.target_sparsity is not None), None)
        if mask is not None:
            found[group.name] = (mask.target_sparsity, group.channels)
    return found


def _mac_budget(groups: list[Group]) -> float | None:
    """The MAC share the groups' learnable gates are budgeted to keep (NaN for several), or None."""
    keeps = {mask.budget.keep for group in groups for mask in _learnable_masks(group)
             if mask.budget is not None and isinstance(mask.budget.cost, LayerCost)}
    return _one_target(keeps) if keeps else None


def _group_tensors(model: nn.Module, groups: list[Group]):
    """A rule key picking every tensor of the layers of ``groups``."""
    modules = {slot.fqn for group in groups for slot in group.slots()}
    names = {fqn for fqn, slot in parameter_slots(model).items() if slot.module_name in modules}
    return lambda fqn, module: fqn in names


def channel_plan(model: nn.Module) -> dict[str, int]:
    r"""Return the channels of every group: what :func:`resize` needs to rebuild the model.

    Save it with the ``state_dict`` of a shrunk model; see :func:`resize`.
    """
    return {group.name: group.channels for group in _groups(model, "all", "surgery.channel_plan")}


def resize(model: nn.Module, plan: dict[str, int]) -> None:
    r"""Give a freshly built model the group widths of ``plan``, so a shrunk ``state_dict`` loads.

    Modifies ``model`` in place (weights keep their first channels; load the real ones
    next). The way to save and load a shrunk model without pickling code::

        torch.save({"plan": surgery.channel_plan(model), "state_dict": model.state_dict()}, path)
        checkpoint = torch.load(path)                      # weights_only loading works
        fresh = torchvision.models.mobilenet_v3_large(weights=None)
        surgery.resize(fresh, checkpoint["plan"])
        fresh.load_state_dict(checkpoint["state_dict"])

    A plan may also name a block without an expand conv with its current width (plans of
    earlier versions listed every block).

    Raises:
        ValueError: ``plan`` names a group the model lacks, asks a block without an expand
            conv to change, or asks more channels than a group has. Nothing is changed then.
    """
    groups = {group.name: group for group in _groups(model, "all", "surgery.resize")}
    blocks = {block.name: block for block in find_blocks(model)}
    for name, width in plan.items():
        group = groups.get(name)
        block = blocks.get(name)
        if group is None and block is None:
            raise ValueError(f"surgery.resize: the model has no block {name!r} nor a channel group of that name. "
                             f"Groups: {', '.join(groups)}.")
        channels = group.channels if group is not None else block.channels
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= channels:
            raise ValueError(f"surgery.resize: {'block' if block else 'group'} {name} has {channels} channels; "
                             f"cannot make {width!r}.")
        if group is None and width != channels:
            raise ValueError(f"surgery.resize: block {name} has no expand conv; its width cannot change "
                             "(its channels belong to the group of its input).")
    for name, width in plan.items():
        if name in groups and width != groups[name].channels:
            slice_group(groups[name], torch.arange(width))

