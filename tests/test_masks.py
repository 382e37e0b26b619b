"""FixedMask and LearnableMask: masked entries stay zero, gates learn, bad arguments are refused."""

import math

import pytest
import torch
from torch import nn

from torchconstrain import (
    Clamp,
    ConstraintViolation,
    FixedMask,
    LearnableMask,
    bake,
    check,
    constrain,
)


def test_fixed_mask_zeroes_entries_and_their_gradient():
    layer = nn.Linear(4, 2)
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]])
    constrain(layer, {"weight": FixedMask(mask)})
    assert torch.equal(layer.weight == 0, mask == 0)
    layer(torch.randn(3, 4)).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1] != 0)
    assert layer.parametrizations.weight[0].mask.dtype == torch.bool


def test_fixed_mask_survives_momentum_and_weight_decay():
    layer = nn.Linear(6, 6)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(3):  # build up momentum before masking
        optimizer.zero_grad()
        layer(torch.randn(4, 6)).square().sum().backward()
        optimizer.step()
    constrain(layer, {"weight": FixedMask.magnitude(sparsity=0.5)})
    zeros = layer.weight == 0
    for _ in range(5):
        optimizer.zero_grad()
        layer(torch.randn(4, 6)).square().sum().backward()
        optimizer.step()
        assert torch.equal(layer.weight == 0, zeros)
    assert torch.isfinite(layer.parametrizations.weight.original).all()
    with torch.no_grad():
        layer.parametrizations.weight.original[zeros] = float("inf")
    with pytest.raises(ConstraintViolation, match="18 entries are NaN or infinite"):
        check(layer)


def test_fixed_mask_follows_in_place_edits_loads_and_dtype_moves():
    layer = nn.Linear(4, 2)
    constrain(layer, {"weight": FixedMask(torch.ones(2, 4))})
    layer.weight  # builds the cached multiplier
    layer.parametrizations.weight[0].mask[0, 0] = False
    assert layer.weight[0, 0] == 0
    state = layer.state_dict()
    state["parametrizations.weight.0.mask"] = torch.zeros(2, 4, dtype=torch.bool)
    layer.load_state_dict(state)
    assert torch.all(layer.weight == 0)
    layer.parametrizations.weight[0].mask = torch.ones(2, 4, dtype=torch.bool)
    assert torch.all(layer.weight != 0)
    layer.double()
    assert layer.weight.dtype == torch.float64


def test_fixed_mask_shape_mismatch_names_the_tensor():
    with pytest.raises(ValueError, match=r"0.weight: FixedMask of shape \(2, 2\) does not fit .*\(3, 4\)"):
        constrain(nn.Sequential(nn.Linear(4, 3)), {"0.weight": FixedMask(torch.ones(2, 2))})


def test_fixed_mask_needs_a_mask_or_template():
    with pytest.raises(TypeError, match="expected a mask tensor, or a template"):
        FixedMask()
    with pytest.raises(TypeError, match="expected mask to be a tensor. Got list"):
        FixedMask([1, 0])


def test_learnable_mask_starts_near_one_and_learns_gates():
    layer = nn.Linear(4, 3)
    constrain(layer, {"weight": LearnableMask()})
    mask = layer.parametrizations.weight[0]
    assert torch.allclose(mask.gate(), torch.full((3, 4), 0.98))
    assert isinstance(mask.scores, nn.Parameter)
    layer(torch.randn(2, 4)).sum().backward()
    assert mask.scores.grad is not None and mask.scores.grad.abs().sum() > 0


def test_learnable_mask_per_channel_has_one_score_per_output_channel():
    conv = nn.Conv2d(3, 5, 3)
    constrain(conv, {"weight": LearnableMask(per="channel")})
    assert conv.parametrizations.weight[0].scores.shape == (5, 1, 1, 1)


def test_learnable_mask_hard_forward_is_binary_with_straight_through_gradient():
    layer = nn.Linear(4, 2, bias=False)
    constrain(layer, {"weight": LearnableMask(hard=True)})
    mask = layer.parametrizations.weight[0]
    with torch.no_grad():
        mask.scores[0] = -3.0
    assert torch.all(layer.weight[0] == 0)
    assert torch.equal(layer.weight[1], layer.parametrizations.weight.original[1])
    layer.weight.sum().backward()
    assert torch.all(mask.scores.grad[0] != 0)


def test_learnable_mask_bake_binarizes_and_reports_sparsity():
    layer = nn.Linear(4, 2, bias=False)
    constrain(layer, {"weight": LearnableMask(threshold=0.5)})
    mask = layer.parametrizations.weight[0]
    with torch.no_grad():
        mask.scores[0] = -1.0  # gate 0.27: pruned
        mask.scores[1] = 0.5  # gate 0.62: kept at its gated value
    expected_kept = layer.weight[1].detach().clone()
    assert mask.sparsity == 0.5
    report = bake(layer)
    assert torch.all(layer.weight[0] == 0)
    assert torch.equal(layer.weight[1], expected_kept)
    assert report["weight"]["sparsity"] == 0.5


def test_learnable_mask_penalty_is_mean_gate_times_strength():
    layer = nn.Linear(4, 2)
    constrain(layer, {"weight": LearnableMask(strength=0.5, init=0.9)})
    assert math.isclose(layer.parametrizations.weight[0].penalty().item(), 0.45, rel_tol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"per": "row"}, ValueError, "LearnableMask: unknown per 'row'. Expected one of 'element', 'channel'"),
        ({"per": 0}, TypeError, "LearnableMask: expected per to be one of 'element', 'channel'. Got int"),
        ({"init": 1.0}, ValueError, r"expected init to be a finite number in \(0, 1\). Got 1.0"),
        ({"init": math.nan}, ValueError, r"init to be a finite number in \(0, 1\). Got nan"),
        ({"init": "0.5"}, TypeError, "LearnableMask: expected init to be a number. Got str: '0.5'"),
        ({"threshold": 0.0}, ValueError, r"threshold to be a finite number in \(0, 1\)"),
        ({"threshold": None}, TypeError, "expected threshold to be a number. Got NoneType"),
        ({"temperature": 0}, ValueError, "temperature to be a finite number > 0. Got 0.0"),
        ({"temperature": math.inf}, ValueError, "temperature to be a finite number > 0. Got inf"),
        ({"temperature": math.nan}, ValueError, "temperature to be a finite number > 0. Got nan"),
        ({"temperature": 1e39}, ValueError, "finite number > 0 in torch.float32 .*Got 1e[+]39, which is inf there"),
        ({"temperature": 1e-50}, ValueError, "finite number > 0 in torch.float32 .*Got 1e-50, which is 0 there"),
        ({"temperature": "1"}, TypeError, "expected temperature to be a number. Got str"),
        ({"strength": -1}, ValueError, "strength to be a finite number >= 0. Got -1.0"),
        ({"strength": math.inf}, ValueError, "strength to be a finite number >= 0. Got inf"),
        ({"dim": "0"}, TypeError, "LearnableMask: expected dim to be an integer. Got str: '0'"),
        ({"hard": "yes"}, TypeError, "LearnableMask: expected hard to be True or False. Got str"),
    ],
)
def test_learnable_mask_refuses_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        LearnableMask(**kwargs)


@pytest.mark.parametrize("odd", [0.5, 2.0, -1.0, math.nan, math.inf])
def test_a_mask_tensor_of_other_values_than_0_and_1_is_refused(odd):
    mask = torch.ones(3, 4)
    mask[1, 2] = odd
    with pytest.raises(ValueError, match=rf"FixedMask: expected a mask of 0s and 1s \(or bools\). Got 1 other values \({odd:g}\)"):
        FixedMask(mask)


def test_a_mask_that_masks_everything_warns():
    with pytest.warns(UserWarning, match="0.weight: the FixedMask masks all 6 entries; the tensor is all zeros"):
        constrain(nn.Sequential(nn.Linear(3, 2)), {"0.weight": FixedMask(torch.zeros(2, 3))})


@pytest.mark.parametrize("mask", [torch.tensor([[1, 0], [0, 1]]), torch.tensor([[1.0, 0.0], [-0.0, 1.0]]), torch.eye(2, dtype=torch.bool)])
def test_masks_of_0s_and_1s_of_any_dtype_are_bool_masks(mask):
    layer = nn.Linear(2, 2)
    constrain(layer, {"weight": FixedMask(mask)})
    assert torch.equal(layer.parametrizations.weight[0].mask, torch.eye(2, dtype=torch.bool))


def test_check_passes_for_every_constraint_kind():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    constrain(model, {"0": Clamp(-0.1, 0.1), "1": FixedMask.n_m(2, 4), "2": LearnableMask()})
    assert len(check(model)) == 3
