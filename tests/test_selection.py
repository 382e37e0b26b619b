"""Mask templates choose the entries they promise: magnitude, threshold, structured, random, N:M."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.nn.utils import prune

from torchconstrain import FixedMask, check, constrain
from torchconstrain.errors import ConstraintViolation


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: FixedMask.magnitude(sparsity=1.0), ValueError, r"sparsity in \[0, 1\). Got 1.0"),
        (lambda: FixedMask.magnitude(sparsity=-0.1), ValueError, r"sparsity in \[0, 1\)"),
        (lambda: FixedMask.magnitude(sparsity=math.nan), ValueError, r"sparsity in \[0, 1\). Got nan"),
        (lambda: FixedMask.magnitude(), ValueError, "exactly one of sparsity= or threshold="),
        (lambda: FixedMask.magnitude(sparsity=0.5, threshold=0.1), ValueError, "exactly one of"),
        (lambda: FixedMask.magnitude(threshold=-1), ValueError, "threshold to be a finite number >= 0. Got -1.0"),
        (lambda: FixedMask.magnitude(threshold=math.nan), ValueError, "magnitude: expected threshold to be a finite number >= 0. Got nan"),
        (lambda: FixedMask.magnitude(threshold=math.inf), ValueError, "threshold to be a finite number >= 0. Got inf"),
        (lambda: FixedMask.magnitude(threshold="0.1"), TypeError, "magnitude: expected threshold to be a number. Got str: '0.1'"),
        (lambda: FixedMask.magnitude(threshold=True), TypeError, "expected threshold to be a number. Got bool"),
        (lambda: FixedMask.random(sparsity="half"), TypeError, "sparsity to be a number. Got str"),
        (lambda: FixedMask.random(sparsity=0.5, seed="a"), TypeError, "random: expected seed to be an integer. Got str: 'a'"),
        (lambda: FixedMask.random(sparsity=0.5, seed=1.5), TypeError, "expected seed to be an integer. Got float"),
        (lambda: FixedMask.random(sparsity=0.5, seed=2**64), ValueError, "seed to be an integer from"),
        (lambda: FixedMask.structured(sparsity=0.5, p=0), ValueError, "structured: expected p to be a number > 0. Got 0.0"),
        (lambda: FixedMask.structured(sparsity=0.5, p=math.nan), ValueError, "expected p to be a number > 0. Got nan"),
        (lambda: FixedMask.structured(sparsity=0.5, p="fro"), TypeError, "expected p to be a number. Got str"),
        (lambda: FixedMask.structured(sparsity=0.5, dim="0"), TypeError, "structured: expected dim to be an integer. Got str: '0'"),
        (lambda: FixedMask.structured(sparsity=0.5, dim=0.0), TypeError, "expected dim to be an integer. Got float"),
        (lambda: FixedMask.n_m(3, 2), ValueError, "0 < n <= m. Got n=3, m=2"),
        (lambda: FixedMask.n_m(2.0, 4), TypeError, "n_m: expected n to be an integer. Got float"),
        (lambda: FixedMask.n_m(True, 4), TypeError, "expected n to be an integer. Got bool"),
        (lambda: FixedMask.n_m(2, 4, dim="1"), TypeError, "n_m: expected dim to be an integer. Got str"),
    ],
)
def test_mask_templates_refuse_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_mask_templates_take_numpy_numbers():
    layer = nn.Linear(8, 4)
    constrain(layer, {"weight": FixedMask.structured(sparsity=np.float32(0.5), dim=np.int64(0), p=np.float64(1))})
    assert int((layer.weight == 0).all(dim=1).sum()) == 2


def test_a_threshold_that_masks_every_entry_is_refused_and_the_model_is_unchanged(net):
    before = snapshot(net)
    with pytest.raises(
        ValueError,
        match=r"head.weight: FixedMask.magnitude\(threshold=5\) masks all 32 entries \(the largest \|w\| is 0.3\d+\): "
        r"the tensor would be all zeros",
    ):
        constrain(net, {"features.0.weight": FixedMask.magnitude(threshold=0.01), "head.weight": FixedMask.magnitude(threshold=5)})
    assert_unchanged(net, before)
    with pytest.raises(ValueError, match=r"masks all 16 entries .*largest \|w\| is 0\)"):
        constrain(nn.Linear(4, 4, bias=False).requires_grad_(False).apply(lambda m: m.weight.zero_()),
                  {"weight": FixedMask.magnitude(threshold=0)})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_threshold_masks_exactly_the_entries_at_most_it_in_every_dtype(dtype):
    # Compared with the Python number, torch rounded the threshold to the weight's dtype
    # first: in float16, 0.100037 was masked by threshold=0.10002.
    threshold = 0.10002
    entries = torch.tensor([0.05, 0.0999, 0.10002, 0.100037, 0.1005, 0.2, -0.100037, 1.0]).to(dtype)
    layer = nn.Linear(8, 1, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(entries)
    constrain(layer, {"weight": FixedMask.magnitude(threshold=threshold)})
    kept = layer.parametrizations.weight[0].mask.flatten()
    exact = entries.double().abs() > threshold
    assert kept.tolist() == exact.tolist()


def test_a_threshold_that_masks_nothing_warns_as_a_share_that_prunes_nothing_does():
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    with pytest.warns(UserWarning, match=r"weight: threshold 0.5 masks no entry of 16 \(the smallest \|w\| is 1\)"):
        constrain(layer, {"weight": FixedMask.magnitude(threshold=0.5)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constrain(nn.Linear(4, 4), {"weight": FixedMask.magnitude(threshold=0)})  # masks exact zeros only


def _float64_layers(seed: int, shapes) -> list[nn.Linear]:
    """float64 layers whose weights are +-(1 + k * 2e-12), every k distinct across layers:
    all equal in float32."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [rows * columns for rows, columns in shapes]
    ranks = torch.randperm(sum(sizes), generator=generator, dtype=torch.float64).split(sizes)
    layers = []
    for (rows, columns), k in zip(shapes, ranks):
        layer = nn.Linear(columns, rows, dtype=torch.float64)
        sign = torch.where(torch.rand(rows, columns, generator=generator) < 0.5, -1.0, 1.0).double()
        with torch.no_grad():
            layer.weight.copy_(sign * (1 + k.view(rows, columns) * 2e-12))
        assert layer.weight.float().abs().eq(1).all()  # float32 ranks them all as ties
        assert layer.weight.abs().unique().numel() == rows * columns
        layers.append(layer)
    return layers


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_global_magnitude_ranks_float64_weights_as_global_unstructured_does(sparsity):
    ours = nn.Sequential(*_float64_layers(0, [(8, 16), (4, 16), (6, 5)]))
    peer = copy.deepcopy(ours)
    constrain(ours, {"*.weight": FixedMask.global_magnitude(sparsity=sparsity)})
    prune.global_unstructured([(layer, "weight") for layer in peer], pruning_method=prune.L1Unstructured, amount=sparsity)
    for mine, theirs in zip(ours, peer):
        assert torch.equal(mine.parametrizations.weight[0].mask, theirs.weight_mask.bool())
        assert torch.equal(mine.weight, theirs.weight)


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("dim", [0, 1])
def test_structured_ranks_float64_slices_as_ln_structured_does(p, dim):
    (ours,) = _float64_layers(1, [(12, 10)])
    with torch.no_grad():  # slices of equal float32 norm whose float64 norms differ
        order = torch.randperm(ours.weight.shape[dim], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        scale = 1 + order * 1e-12
        ours.weight.copy_(torch.ones_like(ours.weight) * (scale[:, None] if dim == 0 else scale[None, :]))
    peer = copy.deepcopy(ours)
    constrain(ours, {"weight": FixedMask.structured(sparsity=0.5, dim=dim, p=p)})
    prune.ln_structured(peer, "weight", amount=0.5, n=p, dim=dim)
    assert torch.equal(ours.parametrizations.weight[0].mask, peer.weight_mask.bool())
    assert torch.equal(ours.weight, peer.weight)


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


def test_a_seeded_random_mask_differs_between_tensors_of_one_shape():
    # One generator per tensor, seeded with the seed alone, gave them all one mask.
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    constrain(model, {nn.Linear: FixedMask.random(sparsity=0.5, seed=0)})
    masks = [layer.parametrizations.weight[0].mask for layer in model]
    assert all(not torch.equal(masks[0], other) for other in masks[1:])
    again = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    constrain(again, {nn.Linear: FixedMask.random(sparsity=0.5, seed=0)})
    assert all(torch.equal(mask, layer.parametrizations.weight[0].mask) for mask, layer in zip(masks, again))


def test_degenerate_sparsity_warns():
    with pytest.warns(UserWarning, match="prunes no slice along dim 0 of 1"):
        constrain(nn.Linear(4, 1), {"weight": FixedMask.structured(sparsity=0.3)})


def test_global_magnitude_warns_about_a_tensor_it_prunes_whole():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight.mul_(1e-6)  # far smaller than the first layer's: the global share takes all of it
    with pytest.warns(UserWarning, match=r"1.weight: sparsity 0.5 prunes all 64 entries; the tensor is all zeros"):
        constrain(model, {"*.weight": FixedMask.global_magnitude(sparsity=0.5)})
    assert not model[1].weight.any() and model[0].weight.all()


@pytest.mark.parametrize("make_mask", [lambda: FixedMask.magnitude(threshold=0.1), lambda: FixedMask.magnitude(sparsity=0.5)])
def test_a_nan_weight_is_kept_for_check_to_report_not_masked_into_a_zero(make_mask):
    # NaN > threshold is False: the threshold masked the NaN, its stored value became 0,
    # and check passed without a trace of it.
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[math.nan, 0.5, 0.01, -0.7]]))
    constrain(layer, {"weight": make_mask()})
    assert layer.weight[0, 0].isnan()
    with pytest.raises(ConstraintViolation, match="1 entries are NaN or infinite"):
        check(layer)
