"""Stacks: the ones that cannot always hold are refused by name, the others hold under training."""

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, snapshot
from torchconstrain import (
    Clamp,
    Constraint,
    FakeQuant,
    FixedMask,
    LearnableMask,
    MaxNorm,
    NonNeg,
    UnitNorm,
    check,
    constrain,
    penalty,
)
from torchconstrain.constraints.stacking import Fact, Stacking, conflict, keeps_nonzero_slices

REFUSED = {
    # name: (stack, what the message says after "cannot follow")
    "hard channel gates, then UnitNorm": (
        lambda: [LearnableMask(per="channel", hard=True), UnitNorm()],
        r"UnitNorm\(dim=0\) from rule 0 \(weight\) cannot follow LearnableMask\(per='channel'.*keeps every nonzero slice nonzero along dim 0",
    ),
    "soft gates, then UnitNorm": (lambda: [LearnableMask(), UnitNorm()], "UnitNorm.*cannot follow LearnableMask"),
    "MaxNorm, then FakeQuant": (
        lambda: [MaxNorm(1), FakeQuant(2)],
        r"FakeQuant\(bits=2.*cannot follow MaxNorm\(max_value=1, dim=0\).*L2 norm at most 1.*moves every entry towards zero",
    ),
    "FakeQuant, then NonNeg": (lambda: [FakeQuant(4), NonNeg()], r"NonNeg\(\) from rule 0 \(weight\) cannot follow FakeQuant.*4-bit grid"),
    "FakeQuant, then element gates": (lambda: [FakeQuant(4), LearnableMask()], "LearnableMask.*cannot follow FakeQuant"),
    "FakeQuant per tensor, then MaxNorm": (
        lambda: [FakeQuant(4, per_channel=False), MaxNorm(0.5)],
        "MaxNorm.*cannot follow FakeQuant.*which no later constraint keeps",
    ),
    "FakeQuant with a scale floor, then MaxNorm": (  # a floored grid does not scale with its slice
        lambda: [FakeQuant.xnnpack(), MaxNorm(1.0)],
        "MaxNorm.*cannot follow FakeQuant.*min_scale.*which no later constraint keeps",
    ),
    "FakeQuant along dim 0, then UnitNorm along dim 1": (lambda: [FakeQuant(4), UnitNorm(dim=1)], "UnitNorm.*cannot follow FakeQuant"),
    "NonNeg, then UnitNorm": (lambda: [NonNeg(), UnitNorm()], r"UnitNorm\(dim=0\) from rule 0 \(weight\) cannot follow NonNeg\(\)"),
    "UnitNorm, then FakeQuant": (lambda: [UnitNorm(), FakeQuant(8)], "FakeQuant.*cannot follow UnitNorm.*unit L2 norm"),
    "UnitNorm, then MaxNorm below 1": (lambda: [UnitNorm(), MaxNorm(0.5)], "MaxNorm.*cannot follow UnitNorm"),
    "MaxNorm, then UnitNorm": (lambda: [MaxNorm(2), UnitNorm()], "UnitNorm.*cannot follow MaxNorm"),
    "a box without zero, then MaxNorm": (lambda: [Clamp(0.01, 0.3), MaxNorm(0.5)], r"MaxNorm.*cannot follow Clamp.*\[0.01, 0.3\]"),
    "a box without zero, then a mask": (lambda: [Clamp(0.1, 1.0), FixedMask.magnitude(sparsity=0.5)], "FixedMask.*cannot follow Clamp"),
    "a mask, then a box without zero": (lambda: [FixedMask.magnitude(sparsity=0.5), Clamp(0.1, 1.0)], "Clamp.*cannot follow FixedMask"),
    "an asymmetric box, then FakeQuant": (lambda: [Clamp(-0.05, 0.3), FakeQuant(4)], "FakeQuant.*cannot follow Clamp"),
    "a box per channel, then FakeQuant": (
        lambda: [Clamp(-torch.full((4,), 0.1), torch.full((4,), 0.1)), FakeQuant(4)],
        "FakeQuant.*cannot follow Clamp",
    ),
    "a box, then UnitNorm": (lambda: [Clamp(-0.5, 0.5), UnitNorm()], "UnitNorm.*cannot follow Clamp"),
}

HOLDS = {
    "element gates, then FakeQuant": lambda: [LearnableMask(strength=1.0), FakeQuant(4)],
    "hard gates, then affine FakeQuant": lambda: [LearnableMask(hard=True, init=0.6), FakeQuant(3, symmetric=False)],
    "FakeQuant, then channel gates": lambda: [FakeQuant(4), LearnableMask(per="channel", hard=True, init=0.6)],
    "NonNeg, then FakeQuant": lambda: [NonNeg(), FakeQuant(4)],
    "a symmetric box, then FakeQuant": lambda: [Clamp(-0.1, 0.1), FakeQuant(3)],
    "a one-sided box, then FakeQuant per tensor": lambda: [Clamp(0, 0.1), FakeQuant(3, per_channel=False)],
    "FakeQuant, then MaxNorm": lambda: [FakeQuant(4), MaxNorm(0.5)],
    "FakeQuant, then UnitNorm": lambda: [FakeQuant(4), UnitNorm()],
    "FakeQuant along dim 1, then UnitNorm along dim -1": lambda: [FakeQuant(4, dim=1), UnitNorm(dim=-1)],
    "a mask, then FakeQuant": lambda: [FixedMask.magnitude(sparsity=0.5), FakeQuant(4)],
    "2:4, then UnitNorm": lambda: [FixedMask.n_m(2, 4), UnitNorm()],
    "UnitNorm, then MaxNorm at 1 or more": lambda: [UnitNorm(), MaxNorm(2)],
    "MaxNorm, then a box with zero": lambda: [MaxNorm(0.5), Clamp(-0.1, 0.2)],
    "a box with zero, then MaxNorm": lambda: [Clamp(-0.1, 0.2), MaxNorm(0.5)],
    "a box without zero, then a box": lambda: [Clamp(0.1, 1.0), Clamp(-0.5, 0.5)],
    "NonNeg, then MaxNorm, then a mask": lambda: [NonNeg(), MaxNorm(0.3), FixedMask.random(sparsity=0.5, seed=0)],
    "gates, NonNeg, FakeQuant": lambda: [LearnableMask(), NonNeg(), FakeQuant(4)],
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_stacks_that_cannot_always_hold_are_refused_with_the_model_unchanged(name):
    make, message = REFUSED[name]
    layer = nn.Linear(8, 4)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=message) as error:
        constrain(layer, {"weight": make()})
    assert str(error.value).startswith("weight: ") and "cannot always hold" in str(error.value)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("stack", [lambda: [FakeQuant(4), MaxNorm(0.25)], lambda: [FakeQuant(2), UnitNorm()]])
def test_per_channel_fake_quant_on_a_bias_is_one_grid_that_scaling_entries_breaks(stack):
    # On a 1-D tensor FakeQuant has one grid, and MaxNorm and UnitNorm scale each entry on
    # its own: the stacks were accepted, then broke after a step ([FakeQuant(2), UnitNorm()]
    # left an entry at 0, [FakeQuant(4), MaxNorm(0.25)] entries off the grid).
    layer = nn.Linear(4, 4)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"bias: .* cannot follow FakeQuant.*which no later constraint keeps"):
        constrain(layer, {"bias": stack()})
    assert_unchanged(layer, before)
    constrain(layer, {"weight": stack()})  # a grid per row: scaling a row scales its grid


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", sorted(HOLDS))
def test_accepted_stacks_hold_under_training_at_a_large_learning_rate(name, optimizer):
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    constrain(layer, {"weight": HOLDS[name]()})
    if optimizer == "sgd":
        opt = torch.optim.SGD(layer.parameters(), lr=10.0, momentum=0.9)
    else:
        opt = torch.optim.Adam(layer.parameters(), lr=10.0)
    for _ in range(8):
        opt.zero_grad()
        ((layer(torch.randn(3, 8)) * torch.randn(3, 4)).sum() + penalty(layer)).backward()
        opt.step()
        check(layer)


def test_constraints_already_there_are_checked_against_new_ones():
    layer = nn.Linear(8, 4)
    constrain(layer, {"weight": FakeQuant(4)})
    with pytest.raises(ValueError, match=r"NonNeg\(\) from rule 0 \(weight\) cannot follow FakeQuant.* from already there"):
        constrain(layer, {"weight": NonNeg()}, existing="stack")
    assert len(layer.parametrizations.weight) == 1
    constrain(layer, {"weight": MaxNorm(0.5)}, existing="stack")  # scales each row by one factor: kept
    check(layer)


def test_two_rules_on_one_tensor_are_one_stack():
    layer = nn.Linear(8, 4)
    with pytest.raises(ValueError, match=r"UnitNorm\(dim=0\) from rule 1 \(\*\) cannot follow NonNeg\(\) from rule 0 \(weight\)"):
        constrain(layer, [("weight", NonNeg()), ("*", UnitNorm())], strict=False)


class Shift(Constraint):
    """A constraint that declares nothing about stacks."""

    def forward(self, x):
        return x + 0.0


def test_a_constraint_that_declares_nothing_is_not_checked():
    layer = nn.Linear(8, 4)
    constrain(layer, {"weight": [UnitNorm(), Shift()]})  # only the current weights are checked
    assert isinstance(Constraint().stacking(), Stacking)


def test_facts_count_negative_dims_from_the_end():
    wants = Stacking(does=frozenset(), needs=frozenset({keeps_nonzero_slices(-1)}))
    gives = Stacking(does=frozenset({keeps_nonzero_slices(1)}))
    assert conflict(gives, wants, 2, ("A", "B")) is None
    assert "B needs each constraint before it" in conflict(gives, wants, 3, ("A", "B"))
    assert Fact("x", None).covers(Fact("x", 2)) and not Fact("x", 1).covers(Fact("x", 2))
