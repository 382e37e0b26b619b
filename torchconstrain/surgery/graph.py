r"""Structured pruning of any model: Torch-Pruning's dependency graph, torchconstrain's masks.

`Torch-Pruning <https://github.com/VainF/Torch-Pruning>`_ (``torch_pruning``, the ``graph``
extra) traces a model and finds its coupled channel groups: the channels that must go
together (a residual stream: every block output summed into it and every layer that reads
it; a conv's outputs with the BatchNorm after it and the convs that read them). This module
puts torchconstrain masks on each group's *readers* (the input columns of every conv and
linear layer that reads the channels), so the masked model is trained, checked and baked as
usual, and then lets Torch-Pruning remove the channels no reader reads. A channel whose
readers all ignore it contributes nothing, so the shrunk model computes what the masked one
computed.

Not every group can be removed exactly. Channels that pass through a layer that mixes them
(a LayerNorm over channels, GroupNorm, attention, softmax over channels) still change the
others through that layer while masked: removing them changes the outputs. Such groups are
refused by default, naming the layer (``mixing="error"``), left whole (``"skip"``), or
pruned anyway (``"approximate"``). Groups read or written by a grouped convolution (groups
other than 1 or the channel count) are always left whole.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path

from torchconstrain.bake import bake
from torchconstrain.constraints import FixedMask, LearnableMask
from torchconstrain.errors import warn_at_caller
from torchconstrain.rules import constrain, described_again
from torchconstrain.surgery.budget import (
    Allocation,
    ChannelGroup,
    GateBudget,
    LayerCost,
    allocate,
    check_minimum,
    minimum_count,
)
from torchconstrain.surgery.measure import count_params, evaluating, layer_macs, measure_latency
from torchconstrain.surgery.family import ShrinkReport
from torchconstrain.surgery.pattern import channel_mask, sparsity_keeping

__all__ = ["GraphGroup", "GraphMasks", "find_groups", "mask_groups", "shrink"]

MIXING_OPS = ("Softmax", "LayerNorm", "GroupNorm", "LinalgVectorNorm", "NormBackward", "Cumsum", "Sort", "Topk")
MIXING_CHOICES = ("error", "skip", "approximate")
ROUNDOFF_FACTOR = 8  # how many times its own rounding error the pruned model may differ by
DEFAULT_TOLERANCE = 1e-4  # rtol and atol where one is given, or float64 cannot run
SLOTS = ("_parameters", "_buffers", "_modules")  # the dicts of a module that pruning changes in place


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as error:
        raise ImportError(
            "torchconstrain.surgery.graph needs Torch-Pruning (torch_pruning): pip install 'torchconstrain[graph]'."
        ) from error
    return torch_pruning


@dataclass
class Layer:
    r"""One conv or linear weight a group touches: ``index[i]`` is the group channel of slice ``i`` (-1: other)."""

    name: str
    module: nn.Module
    index: Tensor

    @property
    def fqn(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"


@dataclass
class GraphGroup:
    r"""A coupled channel group of the dependency graph, as the masks see it.

    Attributes:
        name: the name of the layer whose output channels root the group.
        channels: the number of channels.
        readers: the conv and linear layers reading the channels (their input columns).
        writers: the conv and linear layers writing them (their output rows).
        mixing: the layer through which the channels mix, when removing them is not exact.
        grouped: a grouped conv the group passes through (the group is never pruned).
        through: the depthwise convs the channels pass through, one filter each: neither
            masked nor read, but sliced with the group (so counted in a MAC budget).
    """

    name: str
    channels: int
    readers: list[Layer]
    writers: list[Layer]
    mixing: str | None = None
    grouped: str | None = None
    root: object = field(default=None, repr=False)  # (module, pruning function) for Torch-Pruning
    through: list[Layer] = field(default_factory=list)

    def prunable(self, mixing: str) -> bool:
        r"""Whether the group is masked and shrunk under the ``mixing`` policy."""
        return self.grouped is None and bool(self.readers) and (self.mixing is None or mixing == "approximate")

    def read(self) -> Tensor:
        r"""Bool per channel: whether any reader's weights reading it are nonzero."""
        read = torch.zeros(self.channels, dtype=torch.bool)
        with torch.no_grad():
            for reader in self.readers:
                weight = reader.module.weight
                columns = weight.abs().sum(dim=[d for d in range(weight.dim()) if d != 1]).cpu() != 0
                inside = reader.index >= 0
                read[reader.index[inside & columns]] = True
        return read


def find_groups(model: nn.Module, example: Tensor, *, ignored: Sequence = ()) -> tuple[object, list[GraphGroup]]:
    r"""Trace ``model`` on ``example`` and return ``(dependency_graph, groups)``.

    The layers that write the model's outputs are left out (their channels are the
    outputs), and so are the ``ignored`` layers (modules or their names).

    Raises:
        ValueError: Torch-Pruning cannot trace ``model``, or maps a group's channels
            beyond a layer's (a chunk of them, a tensor concatenated with itself).
    """
    tp = _torch_pruning()
    names = {module: name for name, module in model.named_modules()}
    ignored = [_module(model, item) for item in ignored] + _output_layers(model, example)
    graph, traced = _traced(tp, model, example, ignored)
    return graph, [_describe(graph, group, names) for group in traced]


def _traced(tp, model: nn.Module, example: Tensor, ignored: list) -> tuple[object, list]:
    """Torch-Pruning's dependency graph of ``model`` and its groups; a ValueError where it fails."""
    try:
        with evaluating(model):
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        return graph, list(graph.get_all_groups(ignored_layers=ignored))
    except Exception as error:  # its index mapping of a reshape: a channel shuffle (ShuffleNetV2) divides by zero
        raise ValueError(f"surgery.graph: Torch-Pruning could not trace {type(model).__name__} "
                         f"({type(error).__name__}: {error}), so its channel groups are unknown: this model cannot "
                         "be pruned through the dependency graph.") from error


def _module(model: nn.Module, item) -> nn.Module:
    if isinstance(item, nn.Module):
        return item
    try:
        return model.get_submodule(item)
    except AttributeError:
        raise ValueError(f"surgery.graph: the model has no layer {item!r} to ignore.") from None


def _output_layers(model: nn.Module, example: Tensor) -> list[nn.Module]:
    """The conv and linear layers whose output is one of the model's outputs."""
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(id(o), (weakref.ref(o), m)))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with evaluating(model), torch.no_grad():
            result = model(example)
    finally:
        for hook in hooks:
            hook.remove()
    # by identity: a freed layer output's id can come back as the model's output
    return [outputs[id(r)][1] for r in tree_flatten(result)[0] if id(r) in outputs and outputs[id(r)][0]() is r]


def _describe(graph, group, names: dict) -> GraphGroup:
    """A Torch-Pruning group -> readers, writers, and why it may not be removable."""
    tp = _torch_pruning()
    items = group._group
    root_dep = items[0].dep
    root = root_dep.target.module
    channels = len(items[0].idxs)
    readers, writers, through, mixing, grouped = [], [], [], None, None
    for item in items:
        module, handler = item.dep.target.module, item.dep.handler
        name = names.get(module, str(module)) if isinstance(module, nn.Module) else "a parameter"
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            conv_groups = getattr(module, "groups", 1)
            depthwise = conv_groups > 1 and conv_groups == module.weight.shape[0] and module.weight.shape[1] == 1
            if conv_groups > 1 and not depthwise:
                grouped = grouped or f"{name} (groups={conv_groups})"
                continue
            inputs = graph.is_in_channel_pruning_fn(handler)
            size = module.weight.shape[1] if inputs and not depthwise else module.weight.shape[0]
            index = _index(item, size, channels, name, names.get(root, str(root)))
            (through if inputs and depthwise else readers if inputs else writers).append(Layer(name, module, index))
        elif mixing is None:
            mixing = _mixing(tp, module, name)
    return GraphGroup(names.get(root, str(root)), channels, readers, writers, mixing, grouped,
                      (root, root_dep.handler), through)


def _index(item, size: int, channels: int, name: str, root: str) -> Tensor:
    """``index[i]``: the group channel that slice ``i`` of layer ``name`` (``size`` slices) is, or -1."""
    slices = torch.tensor([int(i) for i in item.idxs], dtype=torch.long)
    group_channels = torch.tensor([int(i) for i in item.root_idxs], dtype=torch.long)
    if slices.numel() and (slices.max() >= size or group_channels.max() >= channels or slices.min() < 0):
        raise ValueError(
            f"surgery.graph: the dependency graph maps the {channels} channels of group {root} onto channel "
            f"{int(slices.max())} of {name}, which has {size}: Torch-Pruning could not trace how the model routes "
            "these channels (a chunk or split of them, a tensor concatenated with itself). Pass "
            f"ignored=[{root!r}] to leave that group whole."
        )
    index = torch.full((size,), -1, dtype=torch.long)
    index[slices] = group_channels
    return index


def _mixing(tp, module, name: str) -> str | None:
    """Why channels passing through ``module`` are not independent, or None."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU,
                           nn.Parameter)):
        return None
    if isinstance(module, tp.ops._ElementWiseOp):
        op = str(module._grad_fn)
        if any(word in op for word in MIXING_OPS) and "BatchNorm" not in op:
            return f"{op} (an operation on the channels together)"
        return None
    if isinstance(module, (tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._ReshapeOp, tp.ops._UnbindOp,
                           tp.ops._ExpandOp, tp.ops._SliceOp)):
        return None
    kind = type(module).__name__
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)):
        return f"{kind} {name}"
    return f"{kind} {name} (a layer not known to keep channels apart)"


def _cost(model: nn.Module, example: Tensor, groups: list[GraphGroup]) -> LayerCost:
    """The exact MACs of ``model`` on ``example`` as a function of the groups' kept channels."""
    reads, writes = {}, {}
    for group in groups:
        written = {layer.module for layer in group.writers}
        rows = group.writers + [layer for layer in group.through if layer.module not in written]
        for sides, layers in ((reads, group.readers), (writes, rows)):
            for layer in layers:
                per_channel = int((layer.index >= 0).sum()) / group.channels
                sides.setdefault(layer.module, []).append((group.name, per_channel))
    return LayerCost.of(layer_macs(model, example), reads, writes, {group.name: group.channels for group in groups})


def _importance(group: GraphGroup, importance) -> Tensor:
    if callable(importance):
        scores = torch.as_tensor(importance(group.name, group)).detach().float().flatten()
        if scores.numel() != group.channels:
            raise ValueError(f"surgery.mask_groups: importance for group {group.name} has {scores.numel()} scores, "
                             f"expected {group.channels}.")
        return scores.abs()
    if importance != "l1":
        raise ValueError(f"surgery.mask_groups: unknown importance {importance!r}. Expected 'l1' or a callable.")
    scores = torch.zeros(group.channels)
    with torch.no_grad():
        for reader in group.readers:
            weight = reader.module.weight
            columns = weight.abs().sum(dim=[d for d in range(weight.dim()) if d != 1]).float().cpu()
            inside = reader.index >= 0
            scores.index_add_(0, reader.index[inside], columns[inside])
    return scores


@dataclass
class GraphMasks:
    r"""What :func:`mask_groups` did: the groups, their masks' settings and the budget.

    Attributes:
        groups: every group of the graph (masked or not).
        masked: the names of the masked groups.
        example: the input the graph was traced with (for :meth:`shrink`).
        macs: the MAC share asked for, or ``None``.
        sparsity: the channel share asked for, or ``None``.
        allocation: fixed masks under a MAC budget: what :func:`~.budget.allocate` chose.
        budget: learnable masks under a MAC budget: the :class:`~.budget.GateBudget`.
        report: the :class:`~torchconstrain.report.Report` of :func:`~torchconstrain.constrain`.
    """

    groups: list[GraphGroup]
    masked: list[str]
    example: Tensor
    mixing: str
    ignored: tuple
    macs: float | None = None
    sparsity: float | None = None
    allocation: Allocation | None = None
    budget: GateBudget | None = None
    report: object = None

    def shrink(self, model: nn.Module, *, measure: bool = False) -> ShrinkReport:
        r""":func:`shrink` with the example, policy and targets used for the masks."""
        targets = {}
        if self.macs is not None:
            targets["macs"] = self.macs
        if self.sparsity is not None:
            targets["sparsity"] = self.sparsity
        return shrink(model, self.example, mixing=self.mixing, ignored=self.ignored, measure=measure, targets=targets)


def mask_groups(model: nn.Module, example: Tensor, *, sparsity: float | None = None, macs: float | None = None,
                learnable: bool = False, importance="l1", minimum: int | float = 0.1, strength: float = 1e-2,
                hard: bool = False, rate: float = 0.05, mixing: str = "error", ignored: Sequence = ()) -> GraphMasks:
    r"""Put channel masks on the readers of every coupled channel group of ``model``.

    The groups come from Torch-Pruning's dependency graph traced on ``example``. Each
    group's masks sit on the input columns of every conv and linear layer reading it, so
    a masked channel contributes nothing; :func:`shrink` then removes it for real.

    - Fixed (``learnable=False``): ``sparsity=`` masks that share of every group's channels
      with the lowest importance; ``macs=`` keeps that share of the model's MACs, choosing
      channels across all groups by importance per MAC (:func:`~.budget.allocate` with the
      exact cost of the pruned model). The writers' rows show the same zeros.
      ``importance`` is ``"l1"`` (the L1 norm of the reader weights reading a channel) or
      a callable ``(group_name, group) -> scores``.
    - Learnable (``learnable=True``): one :class:`~torchconstrain.LearnableMask` gate per
      channel, shared by every reader of the group (an indexed mask per reader, one
      ``scores`` parameter per group). ``sparsity=`` is a per-group budget that baking meets
      exactly, ``macs=`` a MAC budget across groups (a :class:`~.budget.GateBudget`, met at
      bake with the gates as importance); both are steered by a Lagrange term in
      :func:`~torchconstrain.penalty` (``rate``). Without either, the penalty is
      ``strength * mean(gate)`` per group. ``hard=True`` trains with the binary gate.

    Args:
        model: any model Torch-Pruning can trace; modified in place.
        example: an input batch for tracing and counting MACs.
        minimum: the fewest channels a group keeps: a share of its channels (float) or a
            count (int), at least 1. It binds fixed masks and the budgets of learnable ones
            (``sparsity=`` or ``macs=``); learnable masks with ``strength=`` alone keep the
            gates above their threshold, at least one.
        mixing: what to do with a group that passes through a layer mixing its channels:
            ``"error"`` (the default; the message names the layer), ``"skip"`` (leave the
            group whole; :meth:`GraphMasks.shrink` also leaves whole the groups whose
            removal changes the outputs) or ``"approximate"`` (mask it; the shrunk model
            then differs).
        ignored: layers (modules or names) whose output channels are not pruned; the
            layers writing the model's outputs always are.

    Returns:
        A :class:`GraphMasks`; its :meth:`~GraphMasks.shrink` removes the masked channels.

    Raises:
        ValueError: bad arguments, an unreachable budget, a group that mixes its
            channels under ``mixing="error"``, or a model Torch-Pruning cannot trace or
            whose channels it maps beyond a layer's (the message names the group and the
            layer; ``ignored=`` with the group's layer leaves it whole); nothing is changed
            then.
        ImportError: Torch-Pruning is not installed.

    Example:
        >>> import torch, torchvision
        >>> from torchconstrain.surgery import graph
        >>> model = torchvision.models.resnet18(weights=None, num_classes=10)
        >>> masks = graph.mask_groups(model, torch.zeros(1, 3, 32, 32), macs=0.5)
        >>> report = masks.shrink(model)
        >>> report.targets["macs"][1] <= 0.5
        True
    """
    _check_options(sparsity, macs, learnable, mixing, minimum)
    graph, groups = find_groups(model, example, ignored=ignored)
    refused = [g for g in groups if g.mixing is not None and g.grouped is None and g.readers]
    if refused and mixing == "error":
        raise ValueError(
            f"surgery.mask_groups: {len(refused)} channel groups pass through a layer that mixes their channels, so "
            f"their channels cannot be removed exactly: group {refused[0].name} through {refused[0].mixing}"
            + (f", and {len(refused) - 1} more" if len(refused) > 1 else "")
            + ". Pass mixing='skip' to leave them whole, or mixing='approximate' to prune them anyway."
        )
    chosen = [g for g in groups if g.prunable(mixing)]
    if not chosen:
        raise ValueError(f"surgery.mask_groups: {type(model).__name__} has no channel group that can be pruned.")
    result = GraphMasks(groups, [g.name for g in chosen], example, mixing, tuple(ignored), macs, sparsity)
    minimums = {g.name: minimum_count(minimum, g.channels) for g in chosen}
    if learnable:
        cost = _cost(model, example, groups) if macs is not None else None
        if macs is not None:  # validated (unreachable budgets too) before the model is touched
            described = [ChannelGroup(g.name, g.channels, torch.ones(g.channels), cost.per_channel(g.name),
                                      minimums[g.name]) for g in chosen]
            allocate(described, keep=macs, cost=cost, what="surgery.mask_groups macs")
        result.report = constrain(model, _learnable_rules(chosen, sparsity, strength, hard, rate, minimums))
        leaders, followers = _share_scores(chosen)
        if macs is not None:
            budget = GateBudget(list(zip(described, leaders)), keep=macs, cost=cost, rate=rate,
                                what="surgery.mask_groups macs")
            result.budget = budget.attach(followers)
        described_again(model, result.report)
        return result
    keeps = _fixed_keeps(model, example, groups, chosen, sparsity, macs, importance, minimums, result)
    result.report = constrain(model, _fixed_rules(chosen, keeps))
    return result


def _check_options(sparsity, macs, learnable: bool, mixing: str, minimum) -> None:
    if mixing not in MIXING_CHOICES:
        raise ValueError(f"surgery.mask_groups: expected mixing in {MIXING_CHOICES}. Got {mixing!r}.")
    if sparsity is not None and macs is not None:
        raise ValueError("surgery.mask_groups: pass sparsity= or macs=, not both.")
    if sparsity is not None and (isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0):
        raise ValueError(f"surgery.mask_groups: expected sparsity in [0, 1). Got {sparsity!r}.")
    if macs is not None and (isinstance(macs, bool) or not 0.0 < macs <= 1.0):
        raise ValueError(f"surgery.mask_groups: expected macs, the share of MACs to keep, in (0, 1]. Got {macs!r}.")
    if not learnable and sparsity is None and macs is None:
        raise ValueError("surgery.mask_groups: fixed masks need sparsity= or macs=.")
    check_minimum("surgery.mask_groups", minimum)


def _fixed_keeps(model, example, groups, chosen, sparsity, macs, importance, minimums, result) -> dict[str, Tensor]:
    scores = {g.name: _importance(g, importance) for g in chosen}
    if macs is None:
        keeps = {}
        for group in chosen:
            kept = max(group.channels - round(sparsity * group.channels), minimums[group.name])
            keep = torch.zeros(group.channels, dtype=torch.bool)
            keep[torch.sort(scores[group.name], descending=True, stable=True).indices[:kept]] = True
            keeps[group.name] = keep
        return keeps
    cost = _cost(model, example, groups)
    described = [ChannelGroup(g.name, g.channels, scores[g.name], cost.per_channel(g.name), minimums[g.name]) for g in chosen]
    result.allocation = allocate(described, keep=macs, cost=cost, what="surgery.mask_groups macs")
    return result.allocation.keep


def _fixed_rules(chosen: list[GraphGroup], keeps: dict[str, Tensor]) -> list[tuple[str, FixedMask]]:
    """Reader columns and writer rows of every dropped channel, one FixedMask per layer and side."""
    rules = []
    for group in chosen:
        keep = torch.cat([keeps[group.name], torch.ones(1, dtype=torch.bool)])  # index -1: another group's
        for side, layers in ((1, group.readers), (0, group.writers)):
            for layer in layers:
                weight = layer.module.weight
                kept = keep[layer.index]
                if kept.all():
                    continue
                shape = [1] * weight.dim()
                shape[side] = weight.shape[side]
                rules.append((layer.fqn, channel_mask(kept.view(shape).expand(weight.shape).clone())))
    return rules


def _learnable_rules(chosen, sparsity, strength, hard, rate, minimums) -> list[tuple[str, LearnableMask]]:
    return [(reader.fqn, LearnableMask.indexed(reader.index, group.channels, dim=1, strength=strength, hard=hard,
                                               sparsity=sparsity_keeping(sparsity, group.channels, minimums[group.name]),
                                               rate=rate))
            for group in chosen for reader in group.readers]


def _mask_of(layer: Layer, channels: int) -> LearnableMask:
    """The indexed LearnableMask :func:`mask_groups` put on ``layer`` for a group of ``channels``."""
    index = torch.where(layer.index < 0, channels, layer.index)
    return next(c for c in layer.module.parametrizations.weight
                if isinstance(c, LearnableMask) and c.gate_index is not None and c.gate_count == channels
                and torch.equal(c.gate_index.cpu(), index))


def _share_scores(chosen: list[GraphGroup]) -> tuple[list[LearnableMask], list[LearnableMask]]:
    """Give every reader of a group the first reader's scores; return the leaders and the followers."""
    leaders, followers = [], []
    for group in chosen:
        masks = [_mask_of(reader, group.channels) for reader in group.readers]
        for follower in masks[1:]:
            follower.scores = masks[0].scores
            follower.strength = follower.rate = 0.0  # one penalty per group: the leader's
            follower.cacheable = False  # its value depends on the leader's scores
        leaders.append(masks[0])
        followers += masks[1:]
    return leaders, followers


def shrink(model: nn.Module, example: Tensor, *, mixing: str = "error", ignored: Sequence = (),
           measure: bool = False, targets: dict | None = None, rtol: float | None = None,
           atol: float | None = None) -> ShrinkReport:
    r"""Bake ``model``'s constraints and remove, through Torch-Pruning, every channel no reader reads.

    A channel of a group is removed when every conv and linear layer reading it has zero
    weights for it (after :func:`~torchconstrain.bake`), whatever made them zero. Each
    group is removed by Torch-Pruning, which rewrites every coupled layer (convs, BatchNorms,
    linears, parameters) in place. In eval mode the outputs on ``example`` are compared
    before and after, every tensor of them (a tuple, list or dict of outputs too). They may
    differ by rounding only: by at most ``ROUNDOFF_FACTOR`` times the rounding error of the
    baked model on ``example`` (measured against a float64 copy of it), plus
    ``ROUNDOFF_FACTOR`` units of the output dtype's epsilon times ``max|output|``; or, if
    ``rtol`` or ``atol`` is given (or the float64 copy cannot run), by ``atol + rtol *
    max|output|`` (each 1e-4 where not given). If one differs by more (a layer that mixes
    channels in a way the graph does not show), the groups whose removal alone fails are
    found, and the model is restored and a ``ValueError`` raised naming them, unless
    ``mixing="skip"`` (those groups are left whole, with a warning, and the others removed)
    or ``mixing="approximate"``. An output whose shape or structure changed (a second
    output read from pruned channels, such as returned features) is refused under every
    policy.

    Args:
        model: the masked model; modified in place.
        example: an input batch for tracing, the comparison and counting MACs.
        mixing: as in :func:`mask_groups`: a group through a mixing layer with unread
            channels raises (``"error"``), stays whole (``"skip"``) or is pruned
            (``"approximate"``).
        ignored: layers whose output channels are not pruned (as in :func:`mask_groups`).
        measure: time batch-1 CPU inference before and after.
        targets: budgets to report against what was achieved: ``{"macs": share}`` and/or
            ``{"sparsity": share}``.
        rtol, atol: a fixed tolerance in place of the measured one.

    Returns:
        A :class:`~torchconstrain.surgery.ShrinkReport`: channels per group, params, MACs,
        latency, and ``targets`` as ``name -> (target, achieved)``.

    Raises:
        ValueError: a mixing group with unread channels under ``mixing="error"``, outputs
            that changed (the message names which, and the groups that change them alone),
            or a pruned model that cannot run ``example``, or tied weights that pruning
            would cut into different shapes or values (tied weights cut alike are tied
            again); the model is left baked but unpruned then, with the same module,
            Parameter and buffer objects as before the call (an optimizer built on the
            baked model still trains it).
    """
    if mixing not in MIXING_CHOICES:
        raise ValueError(f"surgery.graph.shrink: expected mixing in {MIXING_CHOICES}. Got {mixing!r}.")
    example = example.to(next(model.parameters()).device)
    bake(model)
    graph, groups = find_groups(model, example, ignored=ignored)
    plan = _removal_plan(groups, mixing)
    before = _measured(model, example, measure)
    approximate = mixing == "approximate"
    tolerance = _Tolerance.of(model, example, before["output"], rtol, atol, approximate)
    trial = _Trial(model, example, ignored, before, tolerance, measure, approximate)
    after, problem = trial.prune(plan, graph)
    if problem is not None:
        culprits = trial.culprits(plan)
        if mixing == "skip" and 0 < len(culprits) < len(plan):
            graph, groups = find_groups(model, example, ignored=ignored)
            plan = [(group, removed) for group, removed in _removal_plan(groups, mixing) if group.name not in culprits]
            after, problem = trial.prune(plan, graph)
            if problem is None:
                warn_at_caller(f"surgery.graph.shrink: left {_listed(culprits)} whole (mixing='skip'): removing the "
                               "unread channels of each alone changed the outputs or broke the model.")
        if problem is not None:
            message, cause = problem
            raise ValueError(f"surgery.graph.shrink: {message}{_blamed(culprits, mixing)}") from cause
    channels = {group.name: (group.channels, group.channels - len(removed)) for group, removed in plan}
    report = ShrinkReport(channels, (before["params"], after["params"]), (before["macs"], after["macs"]),
                          (before["latency"], after["latency"]) if measure else None, kind="group")
    report.targets = _achieved(targets or {}, report, groups, plan, mixing)
    return report


@dataclass
class _Tolerance:
    """How far each output of the pruned model may be from the baked one's, and why."""

    allowed: list  # per output leaf of the baked model: a float for a tensor, None otherwise
    reason: str

    @classmethod
    def of(cls, model: nn.Module, example: Tensor, before: tuple, rtol: float | None, atol: float | None,
           values_may_change: bool = False):
        leaves = [leaf for _, leaf in before[0]]
        fixed = rtol is not None or atol is not None or values_may_change  # (no bound needed then)
        exact = None if fixed else _in_float64(model, example, before[1])
        if exact is None:
            rtol, atol = (DEFAULT_TOLERANCE if rtol is None else rtol), (DEFAULT_TOLERANCE if atol is None else atol)
            return cls([atol + rtol * _largest(leaf) if isinstance(leaf, Tensor) else None for leaf in leaves],
                       f"atol={atol:g} + rtol={rtol:g} times the largest output")
        allowed = [_rounding(leaf, twin) if isinstance(leaf, Tensor) else None for leaf, twin in zip(leaves, exact)]
        if not all(math.isfinite(bound) for bound in allowed if bound is not None):  # float32 overflowed
            return cls.of(model, example, before, DEFAULT_TOLERANCE, DEFAULT_TOLERANCE)
        return cls(allowed, f"{ROUNDOFF_FACTOR} times the baked model's rounding error, measured against float64")


def _rounding(leaf: Tensor, exact) -> float:
    """``ROUNDOFF_FACTOR`` times how far ``leaf`` is from its float64 value ``exact``, plus as
    many units of its dtype's epsilon times its largest entry."""
    error = _difference(leaf, exact) if isinstance(exact, Tensor) and exact.shape == leaf.shape else math.inf
    return ROUNDOFF_FACTOR * (error + _epsilon(leaf) * _largest(leaf))


def _in_float64(model: nn.Module, example: Tensor, spec) -> list | None:
    """The outputs of a float64 copy of ``model`` on ``example``, each as the dtype of
    ``model``'s; None where the copy cannot run or gives another structure."""
    try:
        twin = copy.deepcopy(model).double()
        with evaluating(twin), torch.no_grad():
            leaves, twin_spec = tree_flatten(twin(example.double() if example.is_floating_point() else example))
    except Exception as error:  # an op or device without float64
        warn_at_caller(f"surgery.graph.shrink: a float64 copy of the model cannot run ({type(error).__name__}: "
                       f"{error}), so the outputs are compared with rtol=atol={DEFAULT_TOLERANCE:g}, not with the "
                       "model's measured rounding error.")
        return None
    return leaves if twin_spec == spec else None


def _largest(tensor: Tensor) -> float:
    return _real(tensor).nan_to_num(0.0, 0.0, 0.0).abs().max().item() if tensor.numel() else 0.0


def _epsilon(tensor: Tensor) -> float:
    return torch.finfo(tensor.dtype).eps if tensor.is_floating_point() or tensor.is_complex() else 0.0


class _Trial:
    """Prunes the baked model by a plan and says whether it still computes ``before``; each
    failed try puts the model back as :func:`_saved` saw it."""

    def __init__(self, model, example, ignored, before, tolerance, measure, values_may_change) -> None:
        self.model, self.example, self.ignored, self.before = model, example, ignored, before
        self.tolerance, self.measure, self.values_may_change = tolerance, measure, values_may_change
        self.saved, self.tied = _saved(model), _tied(model)

    def prune(self, plan: list, graph) -> tuple[dict | None, tuple[str, Exception | None] | None]:
        """``(after, None)`` with the model pruned, or ``(None, (what went wrong, its cause))`` restored."""
        try:
            for group, removed in plan:
                module, handler = group.root
                graph.get_pruning_group(module, handler, removed).prune()
            _keep_frozen(self.saved)
            untied = _retie(self.model, self.tied)
            after = None if untied else _measured(self.model, self.example, self.measure)
        except Exception as error:  # a layer the graph does not resize (timm's MixedConv2d keeps its split sizes)
            _restore(self.saved)
            return None, (f"the pruned model cannot run the example ({type(error).__name__}: {error}): a layer keeps "
                          "channel sizes the dependency graph does not update. The model is left baked and unpruned; "
                          "pass ignored=[...] with that layer.", error)
        if untied:
            _restore(self.saved)
            return None, (f"{untied} are one tied Parameter, which pruning would cut into different ones (other shapes "
                          "or values). The model is left baked and unpruned; pass ignored=[...] with the layers writing "
                          "the channels the tied layers would cut differently.", None)
        changed = _changed(self.before["output"], after["output"], self.tolerance, self.values_may_change)
        if changed is not None:
            _restore(self.saved)
            return None, (f"removing the unread channels {changed}: a layer mixes channels in a way the dependency "
                          "graph does not show. The model is left baked and unpruned; pass mixing='approximate' to "
                          "prune anyway (it accepts changed values, not changed shapes), or ignored=[...] with the "
                          "layer writing that output.", None)
        return after, None

    def culprits(self, plan: list) -> list[str]:
        """The groups of ``plan`` whose removal alone already fails, each tried on a graph traced
        anew (pruning a Parameter rekeys Torch-Pruning's graph)."""
        failing = []
        for name in [group.name for group, _ in plan]:
            graph, groups = find_groups(self.model, self.example, ignored=self.ignored)
            alone = [(group, removed) for group, removed in _removal_plan(groups, "approximate") if group.name == name]
            _, problem = self.prune(alone, graph)
            if problem is None:
                _restore(self.saved)
            else:
                failing.append(name)
        return failing


def _listed(names: list[str], shown: int = 3) -> str:
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return f"group{'s' if len(names) > 1 else ''} {listed}"


def _blamed(culprits: list[str], mixing: str) -> str:
    if not culprits:
        return ""
    remedy = "" if mixing == "skip" else "; graph.shrink(model, example, mixing='skip') leaves such groups whole"
    return f" The {_listed(culprits)} fail{'s' if len(culprits) == 1 else ''} when removed alone{remedy}."


def _removal_plan(groups: list, mixing: str) -> list[tuple[object, list[int]]]:
    """The groups with unread channels, each with the channels to remove (a group keeps one
    channel at least); a group through a mixing layer raises, is skipped or is kept, by
    ``mixing``."""
    plan = []
    for group in groups:
        if group.grouped is not None or not group.readers:
            continue
        unread = ~group.read()
        if unread.all():
            unread[0] = False  # a layer needs one channel; an all-zero channel reads as nothing anyway
        if not unread.any():
            continue
        if group.mixing is not None and mixing != "approximate":
            if mixing == "skip":
                continue
            raise ValueError(f"surgery.graph.shrink: group {group.name} has unread channels but passes through "
                             f"{group.mixing}, so removing them is not exact. Pass mixing='approximate' to remove them "
                             "anyway, or mixing='skip'.")
        plan.append((group, unread.nonzero().flatten().tolist()))
    return plan


def _saved(model: nn.Module) -> list[tuple[nn.Module, dict, dict]]:
    """What pruning changes in each module: its attributes (channel counts) and the contents
    of its parameter, buffer and submodule dicts, by reference (no copy of a tensor)."""
    return [(module, dict(module.__dict__), {key: dict(module.__dict__[key]) for key in SLOTS})
            for module in model.modules()]


def _keep_frozen(saved: list[tuple[nn.Module, dict, dict]]) -> None:
    """Give each Parameter pruning made the ``requires_grad`` of the one it replaced
    (Torch-Pruning's new Parameters all require gradients: frozen layers thawed)."""
    for module, _, slots in saved:
        for name, old in slots["_parameters"].items():
            new = module._parameters.get(name)
            if old is not None and new is not None and new is not old:
                new.requires_grad_(old.requires_grad)


def _restore(saved: list[tuple[nn.Module, dict, dict]]) -> None:
    """Put back what :func:`_saved` saw: the same module, Parameter and buffer objects."""
    for module, attributes, slots in saved:
        module.__dict__.clear()
        module.__dict__.update(attributes)
        for key, contents in slots.items():
            module.__dict__[key].clear()
            module.__dict__[key].update(contents)


def _tied(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """The slots ``(module, name)`` of each Parameter that more than one slot holds (tied weights)."""
    slots = {}
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                slots.setdefault(id(parameter), []).append((module, name))
    return [held for held in slots.values() if len(held) > 1]


def _retie(model: nn.Module, tied: list[list[tuple[nn.Module, str]]]) -> str | None:
    """Tie again the Parameters pruning cut into equal copies; name the first slots whose copies differ."""
    names = {module: name for name, module in model.named_modules()}
    for held in tied:
        parameters = [module._parameters[name] for module, name in held]
        first = parameters[0]
        if any(p.shape != first.shape or p.dtype != first.dtype or not torch.equal(p, first) for p in parameters[1:]):
            return " and ".join(".".join(filter(None, (names[module], name))) for module, name in held)
        for module, name in held[1:]:
            module._parameters[name] = first
    return None


def _changed(before: tuple, after: tuple, tolerance: _Tolerance, values_may_change: bool) -> str | None:
    """How the outputs ``after`` differ from ``before`` (both from :func:`_measured`), or None.

    Every tensor of the outputs counts (tuples, lists, dicts): a changed structure or shape
    always, a value beyond the ``tolerance`` unless ``values_may_change``.
    """
    (before_leaves, before_spec), (after_leaves, after_spec) = before, after
    if before_spec != after_spec:
        return f"changed the structure of the outputs (from {before_spec} to {after_spec})"
    for (path, old), (_, new), allowed in zip(before_leaves, after_leaves, tolerance.allowed):
        where = f"output {keystr(path)}" if path else "the outputs"
        if not isinstance(old, Tensor) or not isinstance(new, Tensor):
            if type(old) is not type(new) or (not values_may_change and old != new):
                return f"changed {where} from {old!r} to {new!r}"
            continue
        if old.shape != new.shape:
            return f"changed the shape of {where} from {tuple(old.shape)} to {tuple(new.shape)}"
        if values_may_change:
            continue
        difference = _difference(old, new)
        if not difference <= allowed:
            return f"changed {where} by {difference:.3g} (more than {allowed:.3g}, {tolerance.reason})"
    return None


def _difference(before: Tensor, after: Tensor) -> float:
    """The largest absolute difference; NaN where both are NaN counts as equal, elsewhere as infinite."""
    before, after = _real(before), _real(after)
    both = before.isnan() & after.isnan()
    difference = (after - before).abs().masked_fill(both, 0.0).nan_to_num(math.inf, math.inf)
    return difference.max().item() if difference.numel() else 0.0


def _real(tensor: Tensor) -> Tensor:
    """``tensor`` in float64, a complex one as its real and imaginary parts."""
    return (torch.view_as_real(tensor) if tensor.is_complex() else tensor).double()


def _measured(model: nn.Module, example: Tensor, measure: bool) -> dict:
    with evaluating(model), torch.no_grad():
        output = model(example)
    leaves, spec = tree_flatten_with_path(output)
    leaves = [(path, leaf.detach().clone() if isinstance(leaf, Tensor) else leaf) for path, leaf in leaves]
    return {"output": (leaves, spec), "params": count_params(model),
            "macs": sum(layer_macs(model, example).values()),
            "latency": measure_latency(model, example) if measure else None}


def _achieved(targets: dict, report: ShrinkReport, groups, plan, mixing: str) -> dict:
    achieved = {}
    if "macs" in targets:
        achieved["macs"] = (targets["macs"], report.macs[1] / report.macs[0])
    if "sparsity" in targets:
        total = sum(group.channels for group in groups if group.prunable(mixing))
        achieved["sparsity"] = (targets["sparsity"], sum(len(removed) for _, removed in plan) / total if total else 0.0)
    return achieved
