"""FixedMask and LearnableMask: masked entries stay zero, gates learn, bad arguments are refused."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from torchconstrain import (
    Clamp,
    ConstraintViolation,
    FixedMask,
    LearnableMask,
    NonNeg,
    bake,
    check,
    constrain,
    penalty,
)
from torchconstrain.constraints import masks


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


CHANNELS_LAST_MASKS = {
    "magnitude": lambda: FixedMask.magnitude(sparsity=0.5),
    "random": lambda: FixedMask.random(sparsity=0.5, seed=0),
    "structured": lambda: FixedMask.structured(sparsity=0.5),
    "2:4": lambda: FixedMask.n_m(2, 4),
    "given": lambda: FixedMask(torch.rand(16, 8, 3, 3, generator=torch.Generator().manual_seed(0)) > 0.5),
    "global": lambda: FixedMask.global_magnitude(sparsity=0.5),
    "learnable": lambda: LearnableMask(),
    "learnable per element": lambda: LearnableMask(per="element"),
    "clamp then mask": lambda: [Clamp(-0.1, 0.1), FixedMask.magnitude(sparsity=0.5)],
}


@pytest.mark.parametrize("make", CHANNELS_LAST_MASKS.values(), ids=CHANNELS_LAST_MASKS.keys())
def test_a_channels_last_conv_keeps_its_layout_through_masks_training_and_bake(make):
    # A mask chosen or given in the contiguous layout made the stored original, the
    # effective weight and the baked weight contiguous: the conv left channels-last for
    # good (slower kernels), and a learnable mask baked into another layout than its
    # forward's, whose conv kernels round differently.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3)).to(memory_format=torch.channels_last)
    layout = model[0].weight.stride()
    constrain(model, {"0.weight": make()})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    model(x).square().mean().backward()
    optimizer.step()
    assert model[0].parametrizations.weight.original.stride() == layout
    assert model[0].weight.stride() == layout
    model.eval()
    with torch.no_grad():
        assert model[0].weight.stride() == layout
        constrained = model(x)
    bake(model)
    assert model[0].weight.stride() == layout
    with torch.no_grad():
        assert torch.equal(model(x), constrained)


@pytest.mark.parametrize("conv", [lambda: nn.Conv2d(32, 8, 1), lambda: nn.Conv2d(32, 32, 3, groups=32)],
                         ids=["1x1", "depthwise"])
@pytest.mark.parametrize("rules", [
    lambda: FixedMask.random(sparsity=0.3, seed=1),
    lambda: [FixedMask.random(sparsity=0.3, seed=1), Clamp(-0.2, 0.2)],
    lambda: [FixedMask.random(sparsity=0.3, seed=1), NonNeg()],
], ids=["mask", "mask, clamp", "mask, non-neg"])
def test_a_channels_last_conv_with_size_1_dims_computes_the_bits_of_the_plain_path_and_of_bake(conv, rules):
    # Size-1 dims leave strides a choice that conv kernels choose by: a mask laid out with
    # the weight's own strides made the no-grad fast path (a clamp in place on the product),
    # the grad-mode product and bake pick different ones, outputs 3e-8 apart.
    from torchconstrain import set_fast_path

    torch.manual_seed(0)
    model = nn.Sequential(conv()).to(memory_format=torch.channels_last).eval()
    constrain(model, {"0.weight": rules()})
    x = torch.randn(4, 32, 1, 1) if model[0].kernel_size == (1, 1) else torch.randn(2, 32, 5, 5)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = (model[0].weight.stride(), model(x))
        with set_fast_path(False):
            plain = (model[0].weight.stride(), model(x))
    training = (model[0].weight.stride(), model(x).detach())  # gradients on, eval mode
    bake(model)
    with torch.no_grad():
        baked = (model[0].weight.stride(), model(x))
    for other in (plain, training, baked):
        assert other[0] == fast[0] and torch.equal(other[1], fast[1])


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


def test_learnable_mask_bake_refuses_a_temperature_that_makes_nan_gates():
    layer = nn.Linear(4, 2, bias=False)
    constrain(layer, {"weight": LearnableMask()})
    with torch.no_grad():
        layer.parametrizations.weight[0].temperature.fill_(0.0)  # every gate sigmoid(x / 0): NaN at 0
    with pytest.raises(ValueError, match=r"cannot bake: expected temperature to be a finite number > 0. Got 0"):
        bake(layer)
    assert parametrize.is_parametrized(layer, "weight")


@pytest.mark.parametrize("hard, effect", [(True, "the forward is all zeros"), (False, "bake would zero the whole tensor")])
def test_a_learnable_mask_whose_gates_start_closed_warns(hard, effect):
    # init at or below the threshold closed every gate from the start without a word.
    with pytest.warns(UserWarning, match=rf"weight: LearnableMask\(init=0.5, threshold=0.5\) starts with every gate "
                                         rf"closed \(a gate of 0.5 in torch.float32, .*\): {effect}"):
        constrain(nn.Linear(4, 4), {"weight": LearnableMask(init=0.5, hard=hard)})
    with pytest.warns(UserWarning, match=r"starts with every gate closed"):  # above it, but its gate rounds to it
        constrain(nn.Linear(4, 4), {"weight": LearnableMask(init=0.5 + 1e-9)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constrain(nn.Linear(4, 4), {"weight": LearnableMask(init=0.3, sparsity=0.5)})  # a budget closes by rank
        constrain(nn.Linear(4, 4), {"weight": LearnableMask(init=0.51)})


def test_a_learnable_mask_keeps_exactly_the_gates_above_its_threshold():
    # Compared with the Python number, torch rounded the threshold to float32 first: a
    # gate of float32(0.1) = 0.10000000149 was closed by threshold=0.1.
    layer = nn.Linear(1, 1, bias=False)
    constrain(layer, {"weight": LearnableMask(threshold=0.1)})
    mask = layer.parametrizations.weight[0]
    with torch.no_grad():
        mask.scores.fill_(torch.logit(torch.tensor(0.1, dtype=torch.float64)).item())
    assert mask.gates().item() > 0.1 and mask.sparsity == 0.0


def test_learnable_mask_penalty_is_mean_gate_times_strength():
    layer = nn.Linear(4, 2)
    constrain(layer, {"weight": LearnableMask(strength=0.5, init=0.9)})
    assert math.isclose(layer.parametrizations.weight[0].penalty().item(), 0.45, rel_tol=1e-6)


def test_learnable_mask_budget_bakes_exactly_the_lowest_gates_whatever_the_threshold():
    layer = nn.Linear(10, 3, bias=False)
    constrain(layer, {"weight": LearnableMask(per="channel", dim=1, sparsity=0.3, threshold=0.9)})
    mask = layer.parametrizations.weight[0]
    with torch.no_grad():  # every gate above the threshold, yet the budget closes three
        mask.scores.copy_(torch.linspace(5.0, 6.0, 10).flip(0).view(1, 10))
    assert mask.sparsity == pytest.approx(0.3)
    gated = layer.weight.detach().clone()
    bake(layer)
    assert torch.equal(layer.weight[:, 7:], torch.zeros(3, 3))  # the three lowest gates
    assert torch.equal(layer.weight[:, :7], gated[:, :7])


def test_learnable_mask_budget_hard_forward_keeps_what_bake_keeps():
    layer = nn.Linear(8, 2, bias=False)
    constrain(layer, {"weight": LearnableMask(per="channel", dim=1, sparsity=0.5, hard=True)})
    mask = layer.parametrizations.weight[0]
    with torch.no_grad():
        mask.scores.copy_(torch.randn(1, 8))
    forward = layer.weight.detach().clone()
    assert int((forward.abs().sum(0) == 0).sum()) == 4
    bake(layer)
    assert torch.equal(layer.weight, forward)


def test_learnable_mask_budget_multiplier_rises_until_the_gates_meet_the_target():
    torch.manual_seed(0)
    layer = nn.Linear(16, 1, bias=False)
    constrain(layer, {"weight": LearnableMask(per="channel", dim=1, sparsity=0.75)})
    mask = layer.parametrizations.weight[0]
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(256, 16)
    truth = torch.full((16, 1), 0.1)
    truth[[2, 5, 11, 13]] = 2.0  # four inputs matter; the task alone would keep all sixteen
    for _ in range(300):
        loss = nn.functional.mse_loss(layer(x), x @ truth) + penalty(layer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gates = mask.gate().detach().flatten()
    assert mask.multiplier.item() > 0
    assert gates.mean().item() == pytest.approx(0.25, abs=0.05)
    assert (gates > 0.5).nonzero().flatten().tolist() == [2, 5, 11, 13]  # the gates agree with the budget
    with torch.no_grad():  # a penalty computed without gradients leaves the multiplier alone
        before = mask.multiplier.clone()
        penalty(layer)
        assert torch.equal(mask.multiplier, before)


def test_two_penalties_before_one_backward_each_use_the_multiplier_they_read():
    # Each penalty() raises the multiplier in place: the first term's backward read it.
    layer = nn.Linear(4, 2, bias=False)
    constrain(layer, {"weight": LearnableMask(sparsity=0.5)})
    mask = layer.parametrizations.weight[0]
    first = penalty(layer)
    read_by_first = mask.multiplier.clone()
    second = penalty(layer)
    read_by_second = mask.multiplier.clone()
    assert read_by_second > read_by_first
    (first + second).backward()
    scores = mask.scores.grad.clone()
    mask.scores.grad = None
    ((mask.gate().mean() - 0.5) * (read_by_first + read_by_second)).backward()
    torch.testing.assert_close(scores, mask.scores.grad)


def test_learnable_mask_budget_multiplier_is_saved_with_the_model():
    layer = nn.Linear(4, 2)
    constrain(layer, {"weight": LearnableMask(sparsity=0.5)})
    penalty(layer).backward()
    state = layer.state_dict()
    assert state["parametrizations.weight.0.multiplier"].item() > 0
    fresh = nn.Linear(4, 2)
    constrain(fresh, {"weight": LearnableMask(sparsity=0.5)})
    fresh.load_state_dict(state)
    assert torch.equal(fresh.parametrizations.weight[0].multiplier, state["parametrizations.weight.0.multiplier"])


def test_indexed_masks_share_gates_across_differently_laid_out_tensors():
    conv, linear = nn.Conv2d(2, 3, 1), nn.Linear(6, 2)  # the linear reads the conv's 2 channels x 3 positions
    constrain(conv, {"weight": LearnableMask.indexed(torch.tensor([0, 1]), 2, dim=1, sparsity=0.5, hard=True)})
    constrain(linear, {"weight": LearnableMask.indexed(torch.tensor([0, 0, 0, 1, 1, 1]), 2, dim=1,
                                                       sparsity=0.5, hard=True)})
    leader, follower = conv.parametrizations.weight[0], linear.parametrizations.weight[0]
    follower.scores = leader.scores
    with torch.no_grad():
        leader.scores.copy_(torch.tensor([-1.0, 2.0]))
    assert torch.equal(follower.gate(), torch.sigmoid(torch.tensor([-1.0] * 3 + [2.0] * 3)).view(1, 6))
    assert torch.equal(conv.weight[:, 0], torch.zeros(3, 1, 1)) and torch.equal(linear.weight[:, :3], torch.zeros(2, 3))
    assert conv.weight[:, 1].abs().sum() > 0 and linear.weight[:, 3:].abs().sum() > 0
    untouched = nn.Linear(3, 1)
    with pytest.warns(UserWarning, match=r"LearnableMask\(init=0.3, threshold=0.5\) starts with every gate closed"):
        constrain(untouched, {"weight": LearnableMask.indexed(torch.tensor([-1, 0, -1]), 1, dim=1, init=0.3)})
    mask = untouched.parametrizations.weight[0]
    assert torch.equal(mask.gate(), torch.tensor([[1.0, mask.gates().item(), 1.0]]))
    bake(untouched)
    assert untouched.weight[0, 1] == 0 and (untouched.weight[0, [0, 2]] != 0).all()


@pytest.mark.parametrize(
    "index, gates, message",
    [
        (torch.tensor([0, 2]), 2, r"index entries in \[-1, 2\). Got 0..2"),
        (torch.tensor([0, -2]), 2, r"index entries in \[-1, 2\). Got -2..0"),
        (torch.tensor([0, 1]), 0, "expected gates to be an integer >= 1. Got 0"),
    ],
)
def test_indexed_mask_refuses_bad_indices(index, gates, message):
    with pytest.raises(ValueError, match=message):
        LearnableMask.indexed(index, gates, dim=1)


@pytest.mark.parametrize(
    "index, gates, message",
    [
        (torch.tensor([0.0, 0.9]), 2, "expected an integer index .* Got torch.float32"),  # would truncate 0.9 to gate 0
        (torch.tensor([0.0, float("nan")]), 2, "expected an integer index"),
        (torch.tensor([True, False]), 2, "expected an integer index"),
        (torch.tensor([0, 1]), 2.0, "expected gates to be an integer. Got float"),
    ],
)
def test_indexed_mask_refuses_indices_and_counts_that_are_not_integers(index, gates, message):
    with pytest.raises(TypeError, match=message):
        LearnableMask.indexed(index, gates, dim=1)


def test_indexed_mask_takes_numpy_integers():
    mask = LearnableMask.indexed(np.array([0, 1, 1]), np.int64(2), dim=1)
    assert mask.gate_count == 2 and type(mask.gate_count) is int


def test_indexed_mask_must_cover_every_slice():
    with pytest.raises(ValueError, match=r"weight: a LearnableMask index needs per='channel' and one entry per slice "
                                         r"along dim 1 \(4\). Got \(3,\)"):
        constrain(nn.Linear(4, 2), {"weight": LearnableMask.indexed(torch.tensor([0, 1, 2]), 3, dim=1)})


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
        ({"sparsity": 1.0}, ValueError, r"LearnableMask: expected sparsity to be a finite number in \[0, 1\). Got 1.0"),
        ({"sparsity": True}, TypeError, "LearnableMask: expected sparsity to be a number. Got bool"),
        ({"sparsity": 0.5, "rate": -0.1}, ValueError, "LearnableMask: expected rate to be a finite number >= 0. Got -0.1"),
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


@pytest.mark.parametrize("entries", [masks.SAVES_BOOLS_FROM - 1, masks.SAVES_BOOLS_FROM])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_fixed_mask_product_has_the_bits_of_a_float_product_and_saves_bools_unless_small(entries, dtype):
    # Either side of the size where the product switches from autograd's to a Function.
    torch.manual_seed(0)
    original = torch.randn(entries, dtype=dtype)
    original[:4] = torch.tensor([-0.0, float("nan"), float("-inf"), -1.0])  # masked below: -0.0, nan, nan, -0.0
    mask = torch.rand(entries) > 0.5
    mask[:4] = False
    original.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        effective = FixedMask(mask)(original)
    expected = original.detach() * mask.to(dtype)
    assert torch.equal(effective.detach().view(torch.uint8), expected.view(torch.uint8))
    assert saved == [dtype if entries < masks.SAVES_BOOLS_FROM else torch.bool]
    upstream = torch.randn(entries, dtype=dtype)
    upstream[:2] = -1.0
    effective.backward(upstream)
    assert torch.equal(original.grad.view(torch.uint8), (upstream * mask.to(dtype)).view(torch.uint8))


def test_a_fixed_mask_over_a_masked_inf_stores_zero_as_registration_does():
    # The trial run multiplied the inf by 0 (NaN) and refused a constraint that holds.
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 0] = False
    constrain(layer, {"weight": FixedMask(keep)})
    assert layer.weight[0, 0] == 0 and layer.parametrizations.weight.original[0, 0] == 0
    check(layer)
    after_an_unbounded_box = nn.Linear(4, 2)
    with torch.no_grad():
        after_an_unbounded_box.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"1 masked entries are not zero \(1 NaN: an inf or NaN that reached the mask"):
        constrain(after_an_unbounded_box, {"weight": [NonNeg(), FixedMask(keep)]})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_learnable_gates_in_half_precision_decide_as_in_float32(dtype):
    # sigmoid in float16 rounded small positive scores to a gate of exactly 0.5, the
    # threshold: hard gates closed (122 of 128 open kept in float16, 78 in bfloat16).
    layer = nn.Linear(4, 256)
    constrain(layer, {"weight": LearnableMask(per="channel", hard=True)})
    mask = layer.parametrizations.weight[0]
    with torch.no_grad():
        mask.scores.copy_(torch.linspace(-1e-3, 1e-3, 256).view_as(mask.scores))
    kept = (layer.weight != 0).any(dim=1)
    layer.to(dtype)
    assert layer.weight.dtype == dtype
    assert torch.equal((layer.weight != 0).any(dim=1), kept) and int(kept.sum()) == 128


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_sparsity_multiplier_stays_float32_in_a_half_precision_model(dtype):
    # Cast with the model, it rounded each rate * excess: float16 overshot, bfloat16 stalled.
    layer = nn.Linear(64, 64)
    constrain(layer, {"weight": LearnableMask(sparsity=0.5, rate=0.0025)})
    layer.to(dtype)
    mask = layer.parametrizations.weight[0]
    assert mask.multiplier.dtype == torch.float32
    excess = mask.gates().mean().item() - 0.5
    for _ in range(100):
        penalty(layer)
    assert mask.multiplier.item() == pytest.approx(100 * 0.0025 * excess, rel=1e-4)


def test_a_sparsity_multiplier_keeps_its_value_through_a_cast_to_half_precision():
    # Widened back after the cast, it had been rounded first: 70000 became inf in float16.
    layer = nn.Linear(4, 4)
    constrain(layer, {"weight": LearnableMask(sparsity=0.5)})
    mask = layer.parametrizations.weight[0]
    mask.multiplier.fill_(70000.0)
    layer.half()
    assert mask.multiplier.dtype == torch.float32 and mask.multiplier.item() == 70000.0
    layer.bfloat16()
    assert mask.multiplier.item() == 70000.0


def test_warnings_point_at_the_user_s_line():
    # They pointed at lines inside torchconstrain (base.py, api.py), whatever the call.
    with pytest.warns(UserWarning, match="masks all 16 entries") as caught:
        constrain(nn.Linear(4, 4), {"weight": FixedMask(torch.zeros(4, 4))})
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match="starts with every gate closed") as caught:
        constrain(nn.Linear(4, 4), {"weight": LearnableMask(init=0.4)})
    assert caught[0].filename == __file__


def test_a_learnable_mask_pickled_with_its_threshold_as_an_attribute_loads():
    mask = LearnableMask(threshold=0.3)
    state = mask.__getstate__()
    state["threshold"] = state.pop("_threshold")  # as pickles of earlier versions hold it
    del state["_closed_up_to"]
    loaded = LearnableMask.__new__(LearnableMask)
    loaded.__setstate__(state)
    assert loaded.threshold == 0.3 and loaded._closed_up_to == mask._closed_up_to
