"""Mask templates choose the entries they promise: magnitude, threshold, structured, random, N:M."""

import pytest
import torch
from torch import nn

from torchconstrain import FixedMask, constrain


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: FixedMask.magnitude(sparsity=1.0), r"sparsity in \[0, 1\). Got 1.0"),
        (lambda: FixedMask.magnitude(sparsity=-0.1), r"sparsity in \[0, 1\)"),
        (lambda: FixedMask.magnitude(), "exactly one of sparsity= or threshold="),
        (lambda: FixedMask.magnitude(sparsity=0.5, threshold=0.1), "exactly one of"),
        (lambda: FixedMask.magnitude(threshold=-1), "threshold to be a number >= 0"),
        (lambda: FixedMask.random(sparsity="half"), "sparsity to be a number. Got str"),
        (lambda: FixedMask.structured(sparsity=0.5, p=0), "expected p > 0"),
        (lambda: FixedMask.n_m(3, 2), "0 < n <= m. Got n=3, m=2"),
    ],
)
def test_mask_templates_refuse_bad_arguments(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_n_m_needs_a_divisible_dim():
    with pytest.raises(ValueError, match=r"weight: 2:4 sparsity needs dim 1 to be divisible by 4. Got size 6"):
        constrain(nn.Linear(6, 4), {"weight": FixedMask.n_m(2, 4)})


def test_magnitude_threshold_masks_small_entries():
    layer = nn.Linear(10, 10)
    constrain(layer, {"weight": FixedMask.magnitude(threshold=0.1)})
    stored = layer.parametrizations.weight.original
    assert torch.all((layer.weight == 0) == (stored.abs() <= 0.1))


def test_structured_mask_removes_whole_output_channels():
    conv = nn.Conv2d(4, 8, 3)
    constrain(conv, {"weight": FixedMask.structured(sparsity=0.25)})
    dead = (conv.weight == 0).flatten(1).all(dim=1)
    alive = (conv.weight != 0).flatten(1).all(dim=1)
    assert int(dead.sum()) == 2 and torch.all(dead | alive)


def test_random_mask_is_reproducible_with_seed():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    constrain(a, {"weight": FixedMask.random(sparsity=0.5, seed=3)})
    constrain(b, {"weight": FixedMask.random(sparsity=0.5, seed=3)})
    assert torch.equal(a.weight == 0, b.weight == 0)
    assert int((a.weight == 0).sum()) == 32


def test_degenerate_sparsity_warns():
    with pytest.warns(UserWarning, match="prunes no slice along dim 0 of 1"):
        constrain(nn.Linear(4, 1), {"weight": FixedMask.structured(sparsity=0.3)})
