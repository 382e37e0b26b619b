r"""Channel masks and in-place shrinking for torchvision's MobileNetV3 inverted residual blocks.

An ``InvertedResidual`` block expands its input with a 1x1 conv (+BN+activation), filters
the expanded channels with a depthwise conv (+BN+activation), optionally re-weights them
with squeeze-excitation (``fc1``/``fc2``), and projects them back with a 1x1 conv (+BN).
The expanded channels are private to the block: once neither the project conv nor the SE
``fc1`` reads a channel, it contributes nothing and can be removed from every layer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.ops import SqueezeExcitation

from torchconstrain._tensors import parameter_slots
from torchconstrain.bake import bake
from torchconstrain.constraints import FixedMask, LearnableMask
from torchconstrain.rules import constrain
from torchconstrain.surgery.measure import count_macs, count_params, measure_latency
from torchconstrain.surgery.slicing import conv_of, input_l1, slice_outputs, sliced_conv

__all__ = [
    "ROLES", "Block", "RoleKey", "ShrinkReport", "block_rules", "channel_plan", "find_blocks", "mask_blocks", "resize",
    "role", "shrink",
]

ROLES = ("expand", "depthwise", "se_fc1", "se_fc2", "project")


@dataclass
class Block:
    r"""The layers of one inverted residual block, by role (``expand`` and ``se`` may be ``None``)."""

    name: str
    module: InvertedResidual
    expand: nn.Sequential | None
    depthwise: nn.Sequential
    se: SqueezeExcitation | None
    project: nn.Sequential

    @property
    def channels(self) -> int:
        r"""The number of expanded channels."""
        return conv_of(self.depthwise).out_channels

    def weights(self) -> dict[str, str]:
        r"""Role -> the fqn of that layer's weight."""
        prefix = f"{self.name}.block" if self.name else "block"
        names = {}
        for index, layer in enumerate(self.module.block):
            if layer is self.se:
                names["se_fc1"] = f"{prefix}.{index}.fc1.weight"
                names["se_fc2"] = f"{prefix}.{index}.fc2.weight"
            else:
                role = "expand" if layer is self.expand else "depthwise" if layer is self.depthwise else "project"
                names[role] = f"{prefix}.{index}.0.weight"
        return names


def find_blocks(model: nn.Module) -> list[Block]:
    r"""Return every inverted residual block of ``model``, parsed by role.

    Raises:
        ValueError: the model has no ``InvertedResidual`` block, or one whose layers are not
            the expected conv/BN/SE sequence (the message names the block and why).
    """
    blocks = [_parse(name, module) for name, module in model.named_modules() if isinstance(module, InvertedResidual)]
    if not blocks:
        kind = type(model).__name__
        raise ValueError(
            f"surgery: {kind} has no torchvision InvertedResidual block. The MobileNetV3 surgery "
            "supports torchvision's mobilenet_v3_small/large and models built from their blocks."
        )
    return blocks


def _parse(name: str, module: InvertedResidual) -> Block:
    layers = list(getattr(module, "block", []))
    where = f"surgery: block {name or '<root>'}"
    if not 2 <= len(layers) <= 4 or not all(isinstance(layer, (nn.Sequential, SqueezeExcitation)) for layer in layers):
        raise ValueError(f"{where}: expected [expand], depthwise, [squeeze-excitation], project layers. Got {layers!r}.")
    try:
        convs = [layer for layer in layers if isinstance(layer, nn.Sequential)]
        expand = layers.pop(0) if len(convs) == 3 else None
        se = layers[1] if len(layers) == 3 and isinstance(layers[1], SqueezeExcitation) else None
        block = Block(name, module, expand, layers[0], se, layers[-1])
        _check_widths(where, block)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return block


def _check_widths(where: str, block: Block) -> None:
    channels = block.channels
    dw, project = conv_of(block.depthwise), conv_of(block.project)
    problems = []
    if dw.groups != channels or dw.in_channels != channels:
        problems.append(f"depthwise conv has groups={dw.groups}, in_channels={dw.in_channels}, expected {channels}")
    if project.in_channels != channels or project.groups != 1:
        problems.append(f"project conv reads {project.in_channels} channels with groups={project.groups}")
    if block.expand is not None and conv_of(block.expand).out_channels != channels:
        problems.append(f"expand conv makes {conv_of(block.expand).out_channels} channels")
    if block.se is not None and (block.se.fc1.in_channels != channels or block.se.fc2.out_channels != channels):
        problems.append("squeeze-excitation does not read and write the expanded channels")
    for layer in filter(None, (block.expand, block.depthwise, block.project)):
        if len(layer) < 2 or not isinstance(layer[1], nn.BatchNorm2d):
            problems.append(f"{type(layer).__name__} has no BatchNorm2d after its conv")
    if problems:
        raise ValueError(f"not a MobileNetV3 inverted residual block: {'; '.join(problems)}.")


def role(model: nn.Module, name: str) -> "RoleKey":
    r"""Return a rule key picking the weight of every layer with role ``name`` in ``model``'s blocks.

    Roles: ``"expand"``, ``"depthwise"``, ``"se_fc1"``, ``"se_fc2"``, ``"se"`` (both SE fcs),
    ``"project"``.

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
    if not set(wanted) <= set(ROLES):
        raise ValueError(f"surgery.role: unknown role {name!r}. Expected one of {', '.join(ROLES)}, se.")
    names = {block.weights()[r] for block in find_blocks(model) for r in wanted if r in block.weights()}
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
    sparsity: float | None = None,
    learnable: bool = False,
    importance="l1",
    strength: float = 1e-2,
    hard: bool = False,
):
    r"""Put one channel mask on the expanded channels of every block that has an expand conv.

    Modifies ``model`` in place; the masks are torchconstrain constraints, so
    :func:`~torchconstrain.check`, :func:`~torchconstrain.penalty` and
    :func:`~torchconstrain.bake` see them, and :func:`shrink` removes the masked channels.

    - Fixed (``learnable=False``): in each block the ``sparsity`` share of channels with the
      lowest importance is masked in every layer that touches them: rows of the expand and
      depthwise convs and of SE ``fc2``, columns of SE ``fc1`` and of the project conv. The
      importance is ``"l1"`` (the L1 norm of the project conv's weights reading the
      channel), ``"bn"`` (``|gamma|`` of the depthwise BatchNorm) or a callable
      ``(block_name, block) -> scores`` of length ``channels``. Every block keeps at least
      one channel.
    - Learnable (``learnable=True``): one :class:`~torchconstrain.LearnableMask` gate per
      channel, shared by the two layers that read the channels (SE ``fc1`` and the project
      conv), so it gates the channel's activation exactly. Its penalty is
      ``strength * mean(gate)`` per block; ``hard=True`` trains with the binary gate. With
      ``sparsity=`` it is a budget instead: baking closes exactly that share of each
      block's lowest gates (at least one stays open), and the penalty is a Lagrange term
      that steers the gates to it (see :class:`~torchconstrain.LearnableMask`); ``strength``
      is not used.

    Masking the readers is what removes a channel: zeroing only the expand conv's filter
    leaves BatchNorm's shift and the activation, a nonzero constant that would still reach
    the SE squeeze and the project conv. Blocks without an expand conv (expand ratio 1)
    are skipped: their depthwise conv reads the block's input, which is not private.

    Returns:
        The :class:`~torchconstrain.report.Report` of :func:`~torchconstrain.constrain`.

    Raises:
        ValueError: a bad argument, or a model the surgery does not understand (nothing
            is changed then).

    Example:
        >>> import torchvision
        >>> from torchconstrain import surgery
        >>> model = torchvision.models.mobilenet_v3_small(weights=None)
        >>> report = surgery.mask_blocks(model, sparsity=0.5)
        >>> report["features.2.block.2.0.weight"]["constraints"]
        ['FixedMask(shape=(24, 72, 1, 1), sparsity=0.500)']
    """
    rules, finish = block_rules(model, sparsity=sparsity, learnable=learnable, importance=importance,
                                strength=strength, hard=hard)
    report = constrain(model, rules)
    finish()
    return report


def block_rules(model: nn.Module, *, sparsity: float | None = None, learnable: bool = False,
                importance="l1", strength: float = 1e-2, hard: bool = False):
    r"""The rules :func:`mask_blocks` applies, without applying them.

    Returns:
        ``(rules, finish)``: ``(key, constraint)`` pairs to pass to
        :func:`~torchconstrain.constrain` (alone or with other rules), and a function to
        call once they are applied (it makes each block's learnable gates share scores).
    """
    blocks = [block for block in find_blocks(model) if block.expand is not None]
    if learnable:
        if sparsity is not None and (isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0):
            raise ValueError(f"surgery.mask_blocks: expected sparsity in [0, 1) or None. Got {sparsity!r}.")
        rules = [(fqn, LearnableMask(per="channel", dim=1, strength=strength, hard=hard, sparsity=sparsity))
                 for block in blocks for fqn in _readers(block)]
        return rules, lambda: [_share_gate(block) for block in blocks]
    if sparsity is None or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"surgery.mask_blocks: expected sparsity in [0, 1) for fixed masks. Got {sparsity!r}.")
    rules = [rule for block in blocks for rule in _fixed_rules(block, _keep(block, sparsity, importance))]
    return rules, lambda: None


def _readers(block: Block) -> list[str]:
    names = block.weights()
    return [names["project"]] + ([names["se_fc1"]] if block.se is not None else [])


def _keep(block: Block, sparsity: float, importance) -> Tensor:
    """Bool keep-vector over the block's channels."""
    scores = _importance(block, importance).detach().float().flatten()
    if scores.numel() != block.channels:
        raise ValueError(
            f"surgery.mask_blocks: importance for block {block.name} has {scores.numel()} scores, "
            f"expected {block.channels}."
        )
    kept = max(block.channels - round(sparsity * block.channels), 1)
    if sparsity > 0 and kept == block.channels:
        warnings.warn(f"surgery.mask_blocks: sparsity {sparsity} masks no channel of block {block.name}.", stacklevel=4)
    keep = torch.zeros(block.channels, dtype=torch.bool)
    keep[torch.topk(scores, kept).indices] = True
    return keep


def _importance(block: Block, importance) -> Tensor:
    if callable(importance):
        return torch.as_tensor(importance(block.name, block))
    with torch.no_grad():
        if importance == "l1":
            return input_l1(conv_of(block.project))
        if importance == "bn":
            return block.depthwise[1].weight.abs()
    raise ValueError(f"surgery.mask_blocks: unknown importance {importance!r}. Expected 'l1', 'bn' or a callable.")


def _fixed_rules(block: Block, keep: Tensor) -> list[tuple[str, FixedMask]]:
    """One FixedMask per layer touching the channels: rows for writers, columns for readers."""
    rows, columns = keep.view(-1, 1, 1, 1), keep.view(1, -1, 1, 1)
    rules = []
    for role_name, fqn in block.weights().items():
        layer_shape = _weight_shape(block, role_name)
        pattern = columns if role_name in ("project", "se_fc1") else rows
        rules.append((fqn, FixedMask(pattern.expand(layer_shape).clone())))
    return rules


def _weight_shape(block: Block, role_name: str) -> torch.Size:
    if role_name == "se_fc1":
        return block.se.fc1.weight.shape
    if role_name == "se_fc2":
        return block.se.fc2.weight.shape
    return conv_of(getattr(block, role_name)).weight.shape


def _share_gate(block: Block) -> None:
    """Make SE fc1's gate the project conv's: one set of scores per block, one penalty."""
    if block.se is None:
        return
    leader = conv_of(block.project).parametrizations.weight[-1]
    follower = block.se.fc1.parametrizations.weight[-1]
    follower.scores = leader.scores
    follower.strength = follower.rate = 0.0  # one penalty per block: the leader's


@dataclass
class ShrinkReport:
    r"""What :func:`shrink` changed: per-block channels, the model's size and speed, and budgets.

    ``targets`` maps a budget (``"sparsity"``: the share of channels removed, ``"macs"``: the
    share of MACs kept) to ``(target, achieved)``.
    """

    channels: dict[str, tuple[int, int]]
    params: tuple[int, int]
    macs: tuple[int, int]
    latency: tuple[float, float] | None
    targets: dict[str, tuple[float, float]] = field(default_factory=dict)
    kind: str = "block"

    def __str__(self) -> str:
        width = max([14, *map(len, self.channels)]) + 1
        lines = [f"{self.kind:<{width}} channels", *(f"{name:<{width}} {a} -> {b}" for name, (a, b) in self.channels.items())]
        lines.append(f"params  {self.params[0]:,} -> {self.params[1]:,} ({self.params[1] / self.params[0]:.2f}x)")
        lines.append(f"MACs    {self.macs[0]:,} -> {self.macs[1]:,} ({self.macs[1] / self.macs[0]:.2f}x)")
        if self.latency is not None:
            before, after = self.latency
            lines.append(f"latency {before * 1e3:.2f} ms -> {after * 1e3:.2f} ms ({after / before:.2f}x, batch 1, CPU)")
        for name, (target, achieved) in self.targets.items():
            lines.append(f"{name:<7} target {target:.3f}, achieved {achieved:.3f}")
        return "\n".join(lines)


def shrink(model: nn.Module, *, example: Tensor | None = None, measure: bool = True) -> ShrinkReport:
    r"""Rewrite every block in place without the expanded channels that nothing reads.

    A channel is removed when the project conv's and the SE ``fc1``'s weights reading it
    are all zero (after baking): it then contributes nothing, whatever made those weights
    zero (:func:`mask_blocks`, a pruning schedule, an L1 penalty). The expand conv and its
    BatchNorm, the depthwise conv (its ``groups`` too) and its BatchNorm, SE ``fc1``/``fc2``
    and the project conv lose those channels; module names stay the same. In eval mode the
    shrunk model's outputs match the masked model's (after :func:`~torchconstrain.bake`)
    to float32 rounding.

    Every torchconstrain constraint on the blocks' tensors is baked first; constraints
    elsewhere in the model stay.

    Args:
        model: a MobileNetV3, or a model built from its blocks.
        example: the input used to count MACs and time inference (default: one
            224x224 RGB image).
        measure: time batch-1 CPU inference before (a dense copy) and after.

    Returns:
        A :class:`ShrinkReport`: channels per rewritten block, params, MACs and latency
        before and after.

    Raises:
        ValueError: a block the surgery does not understand; nothing is changed then.

    Example:
        >>> import torch, torchvision
        >>> from torchconstrain import surgery
        >>> model = torchvision.models.mobilenet_v3_small(weights=None).eval()
        >>> _ = surgery.mask_blocks(model, sparsity=0.5)
        >>> report = surgery.shrink(model, measure=False)
        >>> report.channels["features.2"], report.macs[1] < report.macs[0]
        ((72, 36), True)
    """
    blocks = find_blocks(model)
    example = torch.zeros(1, 3, 224, 224) if example is None else example
    example = example.to(next(model.parameters()).device)
    budgeted = _budgeted_blocks(blocks)
    bake(model, key=_block_tensors(blocks))
    before = (count_params(model), count_macs(model, example))
    latency_before = measure_latency(model, example) if measure else None
    channels = {}
    for block in blocks:
        keep = _read_channels(block)
        if block.expand is not None and not keep.all():
            channels[block.name] = (block.channels, int(keep.sum()))
            _rewrite(block, keep)
    latency = (latency_before, measure_latency(model, example)) if measure else None
    report = ShrinkReport(channels, (before[0], count_params(model)), (before[1], count_macs(model, example)), latency)
    if budgeted:
        full = sum(channels.get(name, (mask.scores.numel(),) * 2)[0] for name, mask in budgeted.items())
        kept = sum(channels.get(name, (mask.scores.numel(),) * 2)[1] for name, mask in budgeted.items())
        targets = {mask.target_sparsity for mask in budgeted.values()}
        report.targets["sparsity"] = (targets.pop() if len(targets) == 1 else math.nan, 1 - kept / full)
    return report


def _budgeted_blocks(blocks: list[Block]) -> dict[str, LearnableMask]:
    """Block name -> the learnable mask with a sparsity budget on its project conv."""
    found = {}
    for block in blocks:
        project = conv_of(block.project)
        weights = project.parametrizations.weight if parametrize.is_parametrized(project, "weight") else []
        mask = next((c for c in weights if isinstance(c, LearnableMask) and c.target_sparsity is not None), None)
        if block.expand is not None and mask is not None:
            found[block.name] = mask
    return found


def _block_tensors(blocks: list[Block]):
    """A rule key picking every tensor of ``blocks``."""
    names = {f"{block.name}.{name}" if block.name else name for block in blocks for name in parameter_slots(block.module)}
    return lambda fqn, module: fqn in names


def _read_channels(block: Block) -> Tensor:
    """Bool vector: the expanded channels that the project conv or SE fc1 reads."""
    read = input_l1(conv_of(block.project)) != 0
    if block.se is not None:
        read |= input_l1(block.se.fc1) != 0
    if not read.any():
        read[0] = True  # a conv needs one channel; an all-zero channel reads as nothing anyway
    return read.cpu()


def _rewrite(block: Block, keep: Tensor) -> None:
    """Replace each layer of ``block`` by one with only the ``keep`` channels, in place."""
    index = keep.nonzero().flatten()
    with torch.no_grad():
        slice_outputs(block.expand, index)
        slice_outputs(block.depthwise, index, depthwise=True)
        if block.se is not None:
            block.se.fc1 = sliced_conv(block.se.fc1, columns=index)
            block.se.fc2 = sliced_conv(block.se.fc2, rows=index)
        block.project[0] = sliced_conv(conv_of(block.project), columns=index)


def channel_plan(model: nn.Module) -> dict[str, int]:
    r"""Return the expanded channels of every block: what :func:`resize` needs to rebuild it.

    Save it with the ``state_dict`` of a shrunk model; see :func:`resize`.
    """
    return {block.name: block.channels for block in find_blocks(model)}


def resize(model: nn.Module, plan: dict[str, int]) -> None:
    r"""Give a freshly built model the block widths of ``plan``, so a shrunk ``state_dict`` loads.

    Modifies ``model`` in place (weights keep their first channels; load the real ones
    next). The way to save and load a shrunk model without pickling code::

        torch.save({"plan": surgery.channel_plan(model), "state_dict": model.state_dict()}, path)
        checkpoint = torch.load(path)                      # weights_only loading works
        fresh = torchvision.models.mobilenet_v3_large(weights=None)
        surgery.resize(fresh, checkpoint["plan"])
        fresh.load_state_dict(checkpoint["state_dict"])

    Raises:
        ValueError: ``plan`` names a block the model lacks, or asks a block without an
            expand conv, or more channels than it has. Nothing is changed then.
    """
    blocks = {block.name: block for block in find_blocks(model)}
    for name, width in plan.items():
        block = blocks.get(name)
        if block is None:
            raise ValueError(f"surgery.resize: the model has no block {name!r}. Blocks: {', '.join(blocks)}.")
        if not isinstance(width, int) or not 1 <= width <= block.channels:
            raise ValueError(f"surgery.resize: block {name} has {block.channels} channels; cannot make {width!r}.")
        if block.expand is None and width != block.channels:
            raise ValueError(f"surgery.resize: block {name} has no expand conv; its width cannot change.")
    for name, width in plan.items():
        if width != blocks[name].channels:
            _rewrite(blocks[name], torch.arange(blocks[name].channels) < width)
