r"""One description of the inverted residual pattern, and the channel surgery done on it.

An inverted residual block *expands* its input (a 1x1 conv, or a kxk conv in a fused block),
filters the expanded channels with a *depthwise* conv, optionally re-weights them with
*squeeze-excitation* (``fc1``, ``fc2``), and *projects* them back (a 1x1 conv); when its input
and output have the same shape the input is added to the output (a *residual*). Every conv is
followed by a BatchNorm. Any part but the project conv may be missing. A model of such blocks
(MobileNetV2/V3, EfficientNet, EfficientNetV2, MNASNet) is a *stem* conv, the blocks in
order, a *last* conv, global pooling and a classifier of one or two linear layers.

An architecture's adapter (``mobilenetv3.py``, ``mobilenetv2.py``, ``efficientnet.py``,
``mnasnet.py``) only says where these layers are (:class:`Block`, :class:`Network`);
everything else here is generic: which channels belong together (:class:`Group`), the masks
that silence them, and the rewrite that removes them.

A channel can be removed exactly when every layer that reads it ignores it (zero weights
reading it), so groups list their *readers* (layers whose input channels are the group) and
their *writers* (layers whose output channels are the group, and the BatchNorms and
depthwise convs that act on each channel alone). The group kinds:

- ``expanded``: a block's expanded channels (written by expand, depthwise, SE ``fc2``; read
  by SE ``fc1`` and the project conv). A block without an expand conv has none: its
  depthwise conv filters its input, so those channels belong to the input's group.
- ``squeeze``: a block's SE squeeze channels (written by ``fc1``, read by ``fc2``).
- ``stem`` and ``stream``: the channels between blocks. The stem, or a block without a
  residual, starts a stream; every residual block after it adds its project conv's output
  to it and reads it. Its readers: the expand convs of the blocks reading it (or, for a block
  without an expand conv, that block's SE ``fc1`` and project conv, behind its depthwise
  conv), and the next block's or the last conv.
- ``last``: the last conv's channels, read (after pooling) by the first linear layer.
- ``hidden``: the hidden units of a two-layer classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from torchconstrain.constraints import FixedMask, LearnableMask
from torchconstrain.surgery.slicing import (
    conv_of,
    input_l1,
    not_resizable,
    resize_like,
    sliced_bn,
    sliced_conv,
    sliced_linear,
)

__all__ = [
    "BLOCK_KINDS", "KINDS", "ROLES", "Block", "ConvUnit", "Group", "Network", "Slot", "build_groups", "fixed_rules",
    "gate_of", "importance_of", "keep_share", "keep_top", "learnable_rules", "pair_unit", "read_channels", "select_kinds",
    "sequence_unit", "shrink_groups", "slice_group",
]

ROLES = ("expand", "depthwise", "se_fc1", "se_fc2", "project")
KINDS = ("expanded", "squeeze", "stem", "stream", "last", "hidden")
BLOCK_KINDS = ("expanded", "squeeze")  # the kinds a block alone defines; the others need the whole model


@dataclass(frozen=True)
class Slot:
    r"""Where a layer lives: ``owner``'s child ``key``, named ``fqn`` in the model; read live, so a
    replaced layer is seen at once."""

    owner: nn.Module
    key: str
    fqn: str

    @property
    def module(self) -> nn.Module:
        return self.owner._modules[self.key]


@dataclass(frozen=True)
class ConvUnit:
    r"""A conv and the BatchNorm right after it (``bn`` is ``None`` when the layer there is not one)."""

    conv_slot: Slot
    bn_slot: Slot | None

    @property
    def conv(self) -> nn.Module:
        return self.conv_slot.module

    @property
    def bn(self) -> nn.Module | None:
        return None if self.bn_slot is None else self.bn_slot.module

    @property
    def fqn(self) -> str:
        return self.conv_slot.fqn


def pair_unit(parent: nn.Module, index: int, prefix: str) -> ConvUnit:
    r"""The conv at ``parent[index]`` and the BatchNorm at ``parent[index + 1]`` (MobileNetV2's project,
    MNASNet's layers); ``prefix`` is ``parent``'s name in the model."""
    name = lambda i: f"{prefix}.{i}" if prefix else str(i)  # noqa: E731
    if not isinstance(parent[index], nn.Conv2d):
        raise ValueError(f"expected a Conv2d at {name(index)}. Got {type(parent[index]).__name__}.")
    after = parent[index + 1] if index + 1 < len(parent) else None
    bn = Slot(parent, str(index + 1), name(index + 1)) if isinstance(after, nn.BatchNorm2d) else None
    return ConvUnit(Slot(parent, str(index), name(index)), bn)


def sequence_unit(layer: nn.Sequential, prefix: str) -> ConvUnit:
    r"""The conv and BatchNorm that a conv/BN/activation sequence (``Conv2dNormActivation``) starts with."""
    conv_of(layer)
    return pair_unit(layer, 0, prefix)


@dataclass
class Block:
    r"""The layers of one inverted residual block, by role.

    ``expand``, ``depthwise`` and ``se`` may be ``None``; ``module`` is the block's module
    (``None`` for a block that is a run of layers inside a larger ``Sequential``, as MNASNet's
    first one); ``se_name`` is the SE module's name in the model.
    """

    name: str
    module: nn.Module | None
    expand: ConvUnit | None
    depthwise: ConvUnit | None
    se: nn.Module | None
    project: ConvUnit
    residual: bool
    se_name: str | None = None

    @property
    def channels(self) -> int:
        r"""The number of channels between the expand (or the input) and the project conv."""
        if self.depthwise is not None:
            return self.depthwise.conv.out_channels
        return (self.expand.conv.out_channels if self.expand is not None else self.project.conv.in_channels)

    def weights(self) -> dict[str, str]:
        r"""Role -> the fqn of that layer's weight."""
        names = {role: f"{unit.fqn}.weight" for role, unit in
                 (("expand", self.expand), ("depthwise", self.depthwise), ("project", self.project)) if unit is not None}
        if self.se is not None:
            names["se_fc1"], names["se_fc2"] = f"{self.se_name}.fc1.weight", f"{self.se_name}.fc2.weight"
        return dict(sorted(names.items(), key=lambda item: ROLES.index(item[0])))

    def check(self, family: str) -> None:
        r"""Raise ``ValueError`` naming what does not fit the pattern (``family`` names the expected block)."""
        channels = self.channels
        project = self.project.conv
        problems = []
        if self.depthwise is not None:
            dw = self.depthwise.conv
            if dw.groups != channels or dw.in_channels != channels:
                problems.append(f"depthwise conv has groups={dw.groups}, in_channels={dw.in_channels}, expected {channels}")
        if project.in_channels != channels or project.groups != 1:
            problems.append(f"project conv reads {project.in_channels} channels with groups={project.groups}")
        if self.expand is not None and (self.expand.conv.out_channels != channels or self.expand.conv.groups != 1):
            problems.append(f"expand conv makes {self.expand.conv.out_channels} channels")
        if self.se is not None and (self.se.fc1.in_channels != channels or self.se.fc2.out_channels != channels):
            problems.append("squeeze-excitation does not read and write the expanded channels")
        if self.residual and project.out_channels != (self.expand or self.depthwise or self.project).conv.in_channels:
            problems.append("the residual adds tensors of different widths")
        for unit in filter(None, (self.expand, self.depthwise, self.project)):
            if unit.bn is None:
                folded = isinstance(unit.conv_slot.owner._modules.get(str(int(unit.conv_slot.key) + 1)), nn.Identity)
                problems.append(f"{unit.fqn} has no BatchNorm2d after its conv"
                                + (" (folded by surgery.fold_batchnorm? the surgery needs the model before folding: "
                                   "save channel_plan(model) first)" if folded else ""))
        if problems:
            raise ValueError(f"not a {family} block: {'; '.join(problems)}.")


@dataclass
class Network:
    r"""A whole model of inverted residual blocks: stem conv, blocks in forward order, last conv,
    classifier linears (``head``: the one that reads the pooled last conv first)."""

    stem: ConvUnit
    blocks: list[Block]
    last: ConvUnit
    head: list[Slot]


@dataclass
class Group:
    r"""Channels that are kept or removed together, with every layer that touches them.

    ``rows``: convs and linears whose output channels are the group; ``depthwise``: depthwise
    convs over the group; ``bns``: its BatchNorms; ``readers``: convs and linears whose input
    channels are the group. ``gammas`` are the BatchNorms whose outputs the readers see (the
    ``"bn"`` importance); ``block`` is the block of an ``expanded`` group.
    """

    name: str
    kind: str
    rows: list[Slot] = field(default_factory=list)
    depthwise: list[Slot] = field(default_factory=list)
    bns: list[Slot] = field(default_factory=list)
    readers: list[Slot] = field(default_factory=list)
    gammas: list[Slot] = field(default_factory=list)
    block: Block | None = None
    minimum: int = 1

    @property
    def channels(self) -> int:
        r"""The current number of channels."""
        return self.readers[0].module.weight.shape[1]

    @property
    def label(self) -> str:
        return f"block {self.name}" if self.kind == "expanded" else f"group {self.name}"

    def slots(self) -> list[Slot]:
        r"""Every layer of the group."""
        return [*self.rows, *self.depthwise, *self.bns, *self.readers]

    def check(self) -> None:
        r"""Raise ``ValueError`` when a layer of the group does not have the group's width, or
        cannot be resized in place (:func:`~torchconstrain.surgery.slicing.not_resizable`)."""
        channels = self.channels
        sizes = [(slot, _out_size(slot.module)) for slot in self.rows]
        sizes += [(slot, slot.module.num_features) for slot in self.bns]
        sizes += [(slot, _in_size(slot.module)) for slot in self.readers]
        sizes += [(slot, slot.module.groups if slot.module.groups == slot.module.in_channels else -1)
                  for slot in self.depthwise]
        wrong = [f"{slot.fqn} has {size}" for slot, size in sizes if size != channels]
        if wrong:
            raise ValueError(f"the layers of {self.label} disagree on its {channels} channels: {', '.join(wrong)}.")
        for slot in self.slots():
            reason = not_resizable(slot.module)
            if reason is not None:
                raise ValueError(f"{self.label} cannot be resized: layer {slot.fqn} ({type(slot.module).__name__}): "
                                 f"{reason}.")


def _out_size(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _in_size(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels if module.groups == 1 else -1
    return module.in_features


def build_groups(blocks: list[Block], network: Network | None) -> list[Group]:
    r"""Every channel group of ``blocks`` (only ``expanded`` and ``squeeze`` ones) or, given the
    ``network`` the blocks make, of the whole model; in model order."""
    groups: list[Group] = []
    stream = None
    if network is not None:
        stem = network.stem
        stream = Group(f"{stem.fqn}:out", "stem", rows=[stem.conv_slot], bns=[stem.bn_slot], gammas=[stem.bn_slot])
        groups.append(stream)
    for block in blocks:
        inner = stream
        if block.expand is not None:
            expand = block.expand
            inner = Group(block.name, "expanded", rows=[expand.conv_slot], bns=[expand.bn_slot], block=block)
            groups.append(inner)
            if stream is not None:
                stream.readers.append(expand.conv_slot)
        _add_inner_layers(block, inner, groups)
        if stream is not None:
            project = block.project
            if block.residual:
                stream.rows.append(project.conv_slot)
                stream.bns.append(project.bn_slot)
                stream.gammas.append(project.bn_slot)
            else:
                stream = Group(f"{block.name}:out", "stream", rows=[project.conv_slot], bns=[project.bn_slot],
                               gammas=[project.bn_slot])
                groups.append(stream)
    if network is not None:
        groups += _head_groups(network, stream)
    return groups


def _add_inner_layers(block: Block, inner: Group | None, groups: list[Group]) -> None:
    """Put the depthwise, SE and project layers of ``block`` into ``inner``, the group of its
    middle channels (``None`` when that group is not known), and add its squeeze group."""
    if block.se is not None:
        fc1 = Slot(block.se, "fc1", f"{block.se_name}.fc1")
        fc2 = Slot(block.se, "fc2", f"{block.se_name}.fc2")
        groups.append(Group(f"{block.name}:se", "squeeze", rows=[fc1], readers=[fc2]))
    if inner is None:
        return
    if block.depthwise is not None:
        inner.depthwise.append(block.depthwise.conv_slot)
        inner.bns.append(block.depthwise.bn_slot)
        inner.gammas.append(block.depthwise.bn_slot)
    elif block.expand is not None:
        inner.gammas.append(block.expand.bn_slot)
    if block.se is not None:
        inner.readers.append(Slot(block.se, "fc1", f"{block.se_name}.fc1"))
        inner.rows.append(Slot(block.se, "fc2", f"{block.se_name}.fc2"))
    inner.readers.append(block.project.conv_slot)


def _head_groups(network: Network, stream: Group) -> list[Group]:
    last = network.last
    stream.readers.append(last.conv_slot)
    head = network.head
    groups = [Group(f"{last.fqn}:out", "last", rows=[last.conv_slot], bns=[last.bn_slot], readers=[head[0]],
                    gammas=[last.bn_slot])]
    if len(head) == 2:
        groups.append(Group(f"{head[0].fqn}:out", "hidden", rows=[head[0]], readers=[head[1]]))
    return groups


def select_kinds(groups, where: str) -> tuple[str, ...]:
    r"""Normalize a ``groups=`` argument: a kind, ``"all"`` or an iterable of kinds."""
    if groups == "all":
        return KINDS
    kinds = (groups,) if isinstance(groups, str) else tuple(groups) if isinstance(groups, Iterable) else None
    if not kinds or any(not isinstance(kind, str) or kind not in KINDS for kind in kinds):
        raise ValueError(f"{where}: expected groups to be 'all' or some of {', '.join(KINDS)}. Got {groups!r}.")
    return kinds


# --- masks --------------------------------------------------------------------------------------------


def _gamma_magnitudes(bn: nn.Module) -> Tensor:
    """``|gamma|`` of a BatchNorm, on the CPU in float32: ones for one with ``affine=False``."""
    if bn.weight is None:
        return torch.ones(bn.num_features)
    return bn.weight.detach().abs().float().cpu()


def importance_of(group: Group, importance) -> Tensor:
    r"""One score per channel of ``group``: ``"l1"`` (L1 norm of the readers' weights reading the
    channel), ``"bn"`` (``|gamma|`` of the BatchNorms the readers see, ``"l1"`` where the group
    has none) or a callable ``(name, group) -> scores``."""
    if callable(importance):
        scores = torch.as_tensor(importance(group.name, group))
    elif importance == "bn" and group.gammas:
        with torch.no_grad():
            scores = sum(_gamma_magnitudes(slot.module) for slot in group.gammas)
    elif importance in ("l1", "bn"):
        scores = sum(input_l1(slot.module).float().cpu() for slot in group.readers)
    else:
        raise ValueError(f"surgery.mask_blocks: unknown importance {importance!r}. Expected 'l1', 'bn' or a callable.")
    scores = scores.detach().float().flatten().cpu()
    if scores.numel() != group.channels:
        raise ValueError(
            f"surgery.mask_blocks: importance for {group.label} has {scores.numel()} scores, expected {group.channels}."
        )
    return scores


def keep_top(group: Group, scores: Tensor, kept: int) -> Tensor:
    r"""Bool keep-vector: the ``kept`` channels of ``group`` with the highest ``scores``."""
    keep = torch.zeros(group.channels, dtype=torch.bool)
    keep[torch.topk(scores, kept).indices] = True
    return keep


def keep_share(group: Group, sparsity: float, scores: Tensor) -> Tensor:
    r"""Bool keep-vector masking the ``sparsity`` share of ``group``'s channels with the lowest scores."""
    kept = max(group.channels - round(sparsity * group.channels), group.minimum)
    return keep_top(group, scores, kept)


def fixed_rules(keeps: list[tuple[Group, Tensor]]) -> list[tuple[str, FixedMask]]:
    r"""One :class:`~torchconstrain.FixedMask` per weight the groups touch: the rows of writers and
    depthwise convs, the columns of readers, combined where a weight is in two groups."""
    masks: dict[str, Tensor] = {}
    for group, keep in keeps:
        for dim, slots in ((0, group.rows), (0, group.depthwise), (1, group.readers)):
            for slot in slots:
                weight = slot.module.weight
                shape = [1] * weight.dim()
                shape[dim] = -1
                pattern = keep.to(weight.device).view(shape).expand(weight.shape)
                name = f"{slot.fqn}.weight"
                masks[name] = masks[name] & pattern if name in masks else pattern.clone()
    return [(name, channel_mask(mask)) for name, mask in masks.items()]


def channel_mask(mask: Tensor) -> FixedMask:
    r"""A :class:`~torchconstrain.FixedMask` of a channel group's whole channels in one layer
    (``chosen_by`` says so: a :class:`~torchconstrain.PruningSchedule` refuses to grow it
    alone, which would mask entries, not channels, and not in the group's other layers)."""
    constraint = FixedMask(mask)
    constraint.chosen_by = "surgery, as whole channels of a channel group"
    return constraint


def sparsity_keeping(sparsity: float | None, channels: int, minimum: int) -> float | None:
    r"""``sparsity``, lowered where it would keep fewer than ``minimum`` of ``channels``."""
    return None if sparsity is None else min(sparsity, (channels - minimum) / channels)


def learnable_rules(groups: list[Group], *, strength: float, hard: bool, sparsity: float | None = None,
                    rate: float = 0.05) -> tuple[list, Callable[[], None]]:
    r"""A :class:`~torchconstrain.LearnableMask` gate per channel on every reader of ``groups``, and the
    function that makes each group's readers share one set of scores once the rules are applied.
    With ``sparsity`` each group's gates carry that budget (one penalty per group: the leader's)."""
    for group in groups:
        if len({slot.module.weight.dim() for slot in group.readers}) != 1:
            raise ValueError(f"surgery.mask_blocks: the readers of {group.label} mix layer kinds; "
                             "one gate cannot be shared by them.")
    rules = [(f"{slot.fqn}.weight", LearnableMask(per="channel", dim=1, strength=strength, hard=hard,
                                                  sparsity=sparsity_keeping(sparsity, group.channels, group.minimum),
                                                  rate=rate))
             for group in groups for slot in group.readers]

    def share() -> None:
        for group in groups:
            leader = gate_of(group.readers[0])
            for slot in group.readers[1:]:
                follower = gate_of(slot)
                follower.scores = leader.scores
                follower.strength = follower.rate = 0.0  # one penalty per group: the leader's

    return rules, share


def gate_of(slot: Slot) -> LearnableMask:
    r"""The :class:`~torchconstrain.LearnableMask` :func:`learnable_rules` put on the weight at ``slot``
    (the last constraint of its stack, once the rules are applied)."""
    return slot.module.parametrizations.weight[-1]


# --- shrinking ------------------------------------------------------------------------------------------


def read_channels(group: Group) -> Tensor:
    r"""Bool vector: the channels of ``group`` that some reader reads (at least one, so layers keep a channel)."""
    read = torch.zeros(group.channels, dtype=torch.bool)
    for slot in group.readers:
        read |= (input_l1(slot.module) != 0).cpu()
    if not read.any():
        read[0] = True  # a layer needs one channel; an unread channel reads as nothing anyway
    return read


def slice_group(group: Group, index: Tensor) -> None:
    r"""Keep only the channels ``index`` of ``group`` in every layer of it, each resized in place
    (:func:`~torchconstrain.surgery.slicing.resize_like`: the same module objects)."""
    with torch.no_grad():
        for layer in _distinct(group.rows):
            resize_like(layer, _sliced(layer, rows=index))
        for layer in _distinct(group.depthwise):
            resize_like(layer, sliced_conv(layer, rows=index, depthwise=True))
        for layer in _distinct(group.bns):
            resize_like(layer, sliced_bn(layer, index))
        for layer in _distinct(group.readers):
            resize_like(layer, _sliced(layer, columns=index))


def _distinct(slots: list[Slot]) -> list[nn.Module]:
    """The modules at ``slots``, each once (a module at two places is resized once)."""
    return list({id(slot.module): slot.module for slot in slots}.values())


def _sliced(module: nn.Module, **index) -> nn.Module:
    return sliced_conv(module, **index) if isinstance(module, nn.Conv2d) else sliced_linear(module, **index)


def shrink_groups(groups: list[Group]) -> dict[str, tuple[int, int]]:
    r"""Remove every channel no reader reads, until none is left; return ``name -> (before, after)``
    for the groups that changed. Removing a channel can leave another unread (a project conv's
    input read only by rows another group dropped), hence the repetition."""
    before = {group.name: group.channels for group in groups}
    while True:
        keeps = [(group, read_channels(group)) for group in groups]
        keeps = [(group, keep) for group, keep in keeps if not keep.all()]
        if not keeps:
            break
        for group, keep in keeps:
            slice_group(group, keep.nonzero().flatten())
    return {group.name: (before[group.name], group.channels) for group in groups
            if group.channels != before[group.name]}
