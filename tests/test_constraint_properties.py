"""Every parametrization holds after random optimizer steps at large learning rates,
composes with masks, and survives bake."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torchconstrain import (
    Clamp,
    FakeQuant,
    FixedMask,
    LearnableMask,
    MaxNorm,
    NonNeg,
    UnitNorm,
    bake,
    check,
    constrain,
)

CONSTRAINTS = {
    "NonNeg": lambda: NonNeg(),
    "Clamp": lambda: Clamp(-0.2, 0.3),
    "MaxNorm": lambda: MaxNorm(0.5),
    "MaxNorm dim 1": lambda: MaxNorm(0.3, dim=1),
    "UnitNorm": lambda: UnitNorm(),
    "FakeQuant": lambda: FakeQuant(4),
    "FakeQuant affine per tensor": lambda: FakeQuant(3, symmetric=False, per_channel=False),
}
OPTIMIZERS = {
    "SGD": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-2),
    "Adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "AdamW": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1),
}
MASKS = {
    "none": lambda: [],
    "magnitude": lambda: [FixedMask.magnitude(sparsity=0.5)],
    "2:4": lambda: [FixedMask.n_m(2, 4)],
    "learnable hard": lambda: [LearnableMask(hard=True)],
}


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(CONSTRAINTS)),
    mask=st.sampled_from(sorted(MASKS)),
    optimizer=st.sampled_from(sorted(OPTIMIZERS)),
    lr=st.floats(1e-3, 10.0),
    out_features=st.integers(2, 6),
    in_groups=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_constraint_holds_under_training_composes_with_masks_and_bakes(
    name, mask, optimizer, lr, out_features, in_groups, seed
):
    torch.manual_seed(seed)
    layer = nn.Linear(4 * in_groups, out_features)
    try:
        constrain(layer, {"weight": MASKS[mask]() + [CONSTRAINTS[name]()]})
    except ValueError as error:  # a mask that empties a whole row is refused with UnitNorm
        assert name == "UnitNorm" and mask != "none" and "do not have unit L2 norm" in str(error)
        return
    first = layer.parametrizations.weight[0]
    zeros = ~first.mask if isinstance(first, FixedMask) else None
    opt = OPTIMIZERS[optimizer](layer.parameters(), lr)
    for _ in range(4):
        opt.zero_grad()
        layer(torch.randn(3, 4 * in_groups)).pow(2).mean().backward()
        opt.step()
        check(layer)
        if zeros is not None:
            assert torch.equal(layer.weight[zeros], torch.zeros(int(zeros.sum())))
    layer.eval()
    x = torch.randn(5, 4 * in_groups)
    before = layer(x)
    constraint = layer.parametrizations.weight[-1]
    bake(layer)
    assert type(layer) is nn.Linear
    if mask != "learnable hard":  # hard gates that sit exactly at the threshold may flip
        assert torch.equal(layer(x), before)
    assert constraint.violation(layer.weight.detach()) is None
