"""The budget allocator: kept cost within the target, minimums, importance per cost; gate budgets at bake."""

import copy
import pickle
from unittest import mock


import pytest
import torch
from torch import nn

from torchconstrain import LearnableMask, bake, constrain, penalty
from torchconstrain.surgery import count_macs, layer_macs
from torchconstrain.surgery import budget as budget_module
from torchconstrain.surgery.budget import ChannelGroup, CostLayer, GateBudget, LayerCost, allocate, linear_cost


def random_groups(seed: int, count: int = 5) -> list[ChannelGroup]:
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for index in range(count):
        channels = int(torch.randint(2, 20, (1,), generator=generator))
        groups.append(ChannelGroup(
            f"g{index}", channels, importance=torch.rand(channels, generator=generator) * (index + 1),
            macs=float(torch.randint(1, 50, (1,), generator=generator)), minimum=1))
    return groups


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.9, 1.0])
def test_allocation_stays_within_the_budget_keeps_minimums_and_the_best_channels(seed, keep):
    groups = random_groups(seed)
    cost = linear_cost(groups, fixed=10.0)
    allocation = allocate(groups, keep=keep, fixed=10.0)
    kept = allocation.kept()
    assert allocation.total == cost({g.name: g.channels for g in groups})
    assert allocation.achieved == cost(kept) <= allocation.target + 1e-6
    assert allocation.target == pytest.approx(keep * allocation.total)
    assert allocation.target - allocation.achieved < max(g.macs for g in groups)  # the next one did not fit
    for group in groups:
        mask = allocation.keep[group.name]
        assert kept[group.name] >= group.minimum
        if mask.any() and not mask.all():  # every kept channel at least as important as every dropped one
            assert group.importance[mask].min() >= group.importance[~mask].max()
    if keep == 1.0:
        assert all(mask.all() for mask in allocation.keep.values())


def test_allocation_prefers_importance_per_cost_across_groups():
    cheap = ChannelGroup("cheap", 4, importance=torch.ones(4), macs=1.0)
    dear = ChannelGroup("dear", 4, importance=torch.ones(4), macs=10.0)
    allocation = allocate([cheap, dear], keep=0.5)  # 22 of 44: every cheap channel, then a second dear one is 24
    assert allocation.kept() == {"cheap": 4, "dear": 1}
    assert (allocation.achieved, allocation.target, allocation.total) == (14.0, 22.0, 44.0)


def test_allocation_normalizes_importance_per_group_unless_told_not_to():
    small = ChannelGroup("small", 2, importance=torch.tensor([0.02, 0.01]), macs=1.0)
    large = ChannelGroup("large", 2, importance=torch.tensor([20.0, 10.0]), macs=1.0)
    assert allocate([small, large], keep=0.75).kept() == {"small": 2, "large": 1}  # ties: group order
    assert allocate([small, large], keep=0.75, normalize=False).kept() == {"small": 1, "large": 2}


def test_allocation_meets_a_cost_that_is_not_linear():
    a = ChannelGroup("a", 8, importance=torch.arange(8.0, 0, -1), macs=8.0)
    b = ChannelGroup("b", 8, importance=torch.arange(8.0, 0, -1), macs=8.0)
    bilinear = lambda kept: float(kept["a"] * kept["b"])  # a conv from group a to group b
    allocation = allocate([a, b], keep=0.25, cost=bilinear)
    kept = allocation.kept()
    assert kept["a"] * kept["b"] <= 16 and allocation.achieved == kept["a"] * kept["b"]
    assert allocation.achieved >= 12  # not the linear estimate's (which would stop far lower or higher)


def test_allocation_refuses_an_unreachable_budget_and_bad_groups():
    groups = [ChannelGroup("a", 4, importance=torch.ones(4), macs=1.0, minimum=3)]
    with pytest.raises(ValueError, match=r"minimums alone cost 3 \(0.750 of it\)"):
        allocate(groups, keep=0.5)
    with pytest.raises(ValueError, match=r"share to keep in \(0, 1\]. Got 0"):
        allocate(groups, keep=0)
    with pytest.raises(ValueError, match="distinct names"):
        allocate(groups * 2, keep=0.9)
    with pytest.raises(ValueError, match="channel group 'x': expected an importance tensor of 3 scores. Got"):
        ChannelGroup("x", 3, importance=torch.ones(2), macs=1.0)
    with pytest.raises(ValueError, match=r"channel group 'x': expected minimum in \[1, 3\]. Got 0"):
        ChannelGroup("x", 3, importance=torch.ones(3), macs=1.0, minimum=0)
    with pytest.raises(ValueError, match="non-negative importance"):
        ChannelGroup("x", 1, importance=torch.tensor([float("nan")]), macs=1.0)


def narrow_net(a: int, b: int) -> nn.Sequential:
    """A stem writing ``a`` channels, a depthwise conv over them, a 1x1 conv from them to ``b``, a classifier."""
    return nn.Sequential(nn.Conv2d(3, a, 3), nn.Conv2d(a, a, 3, groups=a), nn.Conv2d(a, b, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(b, 5))


def narrow_cost(model: nn.Sequential, example: torch.Tensor) -> LayerCost:
    reads = {model[2]: [("a", 1.0)], model[5]: [("b", 1.0)]}
    writes = {model[0]: [("a", 1.0)], model[1]: [("a", 1.0)], model[2]: [("b", 1.0)]}
    return LayerCost.of(layer_macs(model, example), reads, writes, {"a": 8, "b": 6})


@pytest.mark.parametrize("a, b", [(8, 6), (1, 6), (5, 3), (8, 1), (2, 2)])
def test_layer_cost_is_the_macs_of_the_narrower_model(a, b):
    example = torch.zeros(1, 3, 12, 12)
    cost = narrow_cost(narrow_net(8, 6), example)
    assert cost({"a": a, "b": b}) == pytest.approx(count_macs(narrow_net(a, b), example), rel=1e-12)
    assert cost({"a": a}) == pytest.approx(count_macs(narrow_net(a, 6), example), rel=1e-12)  # b keeps every channel
    full = count_macs(narrow_net(8, 6), example)
    assert cost.per_channel("a") == pytest.approx(full - count_macs(narrow_net(7, 6), example), rel=1e-12)
    assert pickle.loads(pickle.dumps(cost)) == cost  # a model holding a budget pickles


def test_allocation_with_a_layer_cost_meets_the_budget_of_the_real_model():
    example = torch.zeros(1, 3, 12, 12)
    cost = narrow_cost(narrow_net(8, 6), example)
    groups = [ChannelGroup(name, width, torch.rand(width, generator=torch.Generator().manual_seed(width)),
                           cost.per_channel(name)) for name, width in (("a", 8), ("b", 6))]
    allocation = allocate(groups, keep=0.4, cost=cost)
    kept = allocation.kept()
    real = count_macs(narrow_net(kept["a"], kept["b"]), example)
    assert allocation.achieved == pytest.approx(real, rel=1e-12) and real <= 0.4 * allocation.total


def gated_pair(hard: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    constrain(model, {"2": LearnableMask(per="channel", dim=1, hard=hard),
                      "4": LearnableMask(per="channel", dim=1, hard=hard)})
    masks = [model[2].parametrizations.weight[0], model[4].parametrizations.weight[0]]
    with torch.no_grad():
        for mask in masks:
            mask.scores.copy_(torch.randn_like(mask.scores))
    groups = [ChannelGroup("hidden1", 8, torch.ones(8), macs=6.0 + 4.0), ChannelGroup("hidden2", 4, torch.ones(4), macs=8.0 + 2.0)]
    return model, masks, groups


def test_gate_budget_bakes_exactly_the_budget_with_the_gates_as_importance():
    model, masks, groups = gated_pair()
    budget = GateBudget(list(zip(groups, masks)), keep=0.5).attach()
    expected = budget.allocation()
    assert expected.achieved <= 60
    gates = [mask.gate().detach().flatten() for mask in masks]
    bake(model)
    for weight, gate, group in zip([model[2].weight, model[4].weight], gates, groups):
        kept = weight.abs().sum(0) != 0
        assert torch.equal(kept, expected.keep[group.name])
        assert gate[kept].min() >= gate[~kept].max()  # the lowest gates closed


def test_gate_budget_penalty_raises_one_multiplier_and_hard_forwards_follow_the_budget():
    model, masks, groups = gated_pair(hard=True)
    budget = GateBudget(list(zip(groups, masks)), keep=0.5).attach()
    term = penalty(model)
    assert masks[0].multiplier.item() > 0 and "multiplier" not in masks[1]._buffers
    term.backward()
    assert all(mask.scores.grad is not None for mask in masks)
    keep = budget.allocation().keep
    with torch.no_grad():
        assert torch.equal(model[2].weight.abs().sum(0) != 0, keep["hidden1"])
        masks[1].scores.mul_(-1)  # another member's gates change: the first member's hard forward follows
        assert torch.equal(model[2].weight.abs().sum(0) != 0, budget.allocation().keep["hidden1"])


def test_gate_budget_reuses_its_allocation_only_while_the_gates_and_budget_are_unchanged():
    model, masks, groups = gated_pair(hard=True)
    x = torch.randn(3, 6)
    with mock.patch.object(budget_module, "allocate", wraps=budget_module.allocate) as counted:
        budget = GateBudget(list(zip(groups, masks)), keep=0.5).attach()
        model(x)
        model(x)
        assert counted.call_count == 1  # one allocation: the budget's check, both members, both forwards
        first = budget.allocation()
        first.keep["hidden1"].fill_(False)  # callers get copies
        assert budget.allocation().keep["hidden1"].any() and counted.call_count == 1
        changes = [
            lambda: masks[1].scores.detach().mul_(-1),                # in place (as an optimizer step)
            lambda: masks[0].scores.data.mul_(-1),                    # through .data (Lightning's weight averaging)
            lambda: setattr(masks[0].scores, "data", masks[0].scores.data.flip(-1).contiguous()),
            lambda: masks[0].temperature.fill_(0.5),                  # a temperature schedule
            lambda: setattr(budget, "keep", 0.3),
        ]
        for step, change in enumerate(changes, start=1):
            before = {name: keep.clone() for name, keep in budget.allocation().keep.items()}
            change()
            expected = budget_module.allocate(
                [ChannelGroup(g.name, g.channels, m.gates().detach().flatten(), g.macs, g.minimum) for g, m in zip(groups, masks)],
                keep=budget.keep, cost=budget.cost, normalize=False)
            got = budget.allocation()
            assert counted.call_count == 1 + 2 * step  # recomputed once (the reference above is the other call)
            assert all(torch.equal(got.keep[name], expected.keep[name]) for name in before)
        with torch.no_grad():
            torch.testing.assert_close(model[4].weight.abs().sum(0) != 0, budget.allocation().keep["hidden2"])


def test_gate_budget_refuses_a_mask_that_does_not_fit_its_group():
    model, masks, groups = gated_pair()
    with pytest.raises(ValueError, match="channel group 'hidden1' has 8 channels but its mask has 4 gates"):
        GateBudget([(groups[0], masks[1])], keep=0.5)


def test_a_copied_model_keeps_its_own_budget():
    model, masks, groups = gated_pair()
    GateBudget(list(zip(groups, masks)), keep=0.5).attach()
    twin = copy.deepcopy(model)
    twin_masks = [twin[2].parametrizations.weight[0], twin[4].parametrizations.weight[0]]
    assert twin_masks[0].budget is twin_masks[1].budget is not masks[0].budget
    assert twin_masks[0].budget.masks == twin_masks
    restored = pickle.loads(pickle.dumps(model))
    bake(model)
    bake(twin)
    bake(restored)
    assert torch.equal(twin[2].weight, model[2].weight) and torch.equal(restored[4].weight, model[4].weight)


def exact_pair_cost() -> LayerCost:
    # gated_pair's MACs per sample: Linear(6, a), Linear(a, b) and Linear(b, 2).
    layers = (CostLayer(48.0, 6, (), 8, (("hidden1", 1.0),)),
              CostLayer(32.0, 8, (("hidden1", 1.0),), 4, (("hidden2", 1.0),)),
              CostLayer(8.0, 4, (("hidden2", 1.0),), 2, ()))
    return LayerCost(layers, {"hidden1": 8, "hidden2": 4})


def test_the_multiplier_steers_to_the_cost_that_baking_holds_to_the_budget():
    # The Lagrange term used a share linear in the gates: a layer between two groups
    # counted each width once, not their product, so the multiplier settled where the
    # baked model missed the budget (0.5 linear here, 36/88 of the real MACs).
    model, masks, groups = gated_pair()
    budget = GateBudget(list(zip(groups, masks)), keep=0.5, cost=exact_pair_cost()).attach()
    with torch.no_grad():
        for mask, open_ in zip(masks, (4, 2)):
            mask.scores.copy_(torch.tensor([30.0] * open_ + [-30.0] * (mask.scores.numel() - open_)))
    assert budget.expected_share().item() == pytest.approx((6 * 4 + 4 * 2 + 2 * 2) / 88, rel=1e-6)


def test_a_gate_budget_in_half_precision_stays_finite_and_its_multiplier_float32():
    # macs * sum(gates) overflowed float16 into an inf share and multiplier, and the
    # multiplier, cast with the model, rounded every rate * excess it was moved by.
    model, masks, groups = gated_pair()
    groups = [ChannelGroup(g.name, g.channels, g.importance, macs=1e5) for g in groups]
    budget = GateBudget(list(zip(groups, masks)), keep=0.5).attach()
    model.half()
    assert masks[0].multiplier.dtype == torch.float32
    first, second = penalty(model), penalty(model)  # twice before backward: the first term still backs up
    assert first.isfinite() and masks[0].multiplier.isfinite()
    (first + second).backward()
    excess = budget.expected_share().item() - 0.5
    assert masks[0].multiplier.item() == pytest.approx(2 * 0.05 * excess, rel=1e-6)
