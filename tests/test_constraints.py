import math

import pytest
import torch
from torch import nn

from torchconstrain import Clamp, ConstraintViolation, FixedMask, LearnableMask, bake, check, constrain


def test_clamp_holds_and_bounds_are_buffers():
    layer = nn.Linear(5, 4)
    constrain(layer, {"weight": Clamp(-0.1, 0.2)})
    assert layer.weight.min() >= -0.1 and layer.weight.max() <= 0.2
    keys = set(layer.state_dict())
    assert {"parametrizations.weight.0.min", "parametrizations.weight.0.max"} <= keys


def test_clamp_per_output_channel_bounds_broadcast_along_dim0():
    conv = nn.Conv2d(2, 3, 3)
    upper = torch.tensor([0.01, 0.02, 0.03])
    constrain(conv, {"weight": Clamp(-upper, upper)})
    per_channel_max = conv.weight.abs().amax(dim=(1, 2, 3))
    assert torch.all(per_channel_max <= upper + 0)


def test_clamp_one_sided_bound():
    layer = nn.Linear(4, 4)
    constrain(layer, {"weight": Clamp(min=0)})
    assert layer.weight.min() >= 0
    assert "min=0, max=None" in repr(layer.parametrizations.weight[0])


def test_clamp_follows_dtype_and_device_moves():
    layer = nn.Linear(3, 3)
    constrain(layer, {"weight": Clamp(-0.5, 0.5)})
    layer.double()
    assert layer.parametrizations.weight[0].min.dtype == torch.float64
    assert layer.weight.dtype == torch.float64


@pytest.mark.parametrize("low, high", [(1.0, 0.0), (torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]))])
def test_clamp_refuses_min_above_max(low, high):
    with pytest.raises(ValueError, match="expected min <= max"):
        Clamp(low, high)


def test_clamp_refuses_bad_arguments():
    with pytest.raises(ValueError, match="contains NaN"):
        Clamp(float("nan"), 1.0)
    with pytest.raises(TypeError, match="expected min to be a number"):
        Clamp("0", 1.0)
    with pytest.raises(ValueError, match="unknown gradient 'sign'.*pull_back"):
        Clamp(0, 1, gradient="sign")


def test_clamp_bound_of_wrong_length_names_the_tensor():
    with pytest.raises(ValueError, match=r"weight: Clamp max of shape \(5,\) does not fit .*\(3, 4\)"):
        constrain(nn.Linear(4, 3), {"weight": Clamp(None, torch.ones(5))})


def _grad_of_stored(gradient: str, stored: float, pull: float) -> float:
    """Gradient on a stored value with loss ``pull * effective``."""
    layer = nn.Linear(1, 1, bias=False)
    constrain(layer, {"weight": Clamp(-1, 1, gradient=gradient)})
    with torch.no_grad():
        layer.parametrizations.weight.original.fill_(stored)
    (pull * layer.weight.sum()).backward()
    return layer.parametrizations.weight.original.grad.item()


@pytest.mark.parametrize(
    "gradient, stored, pull, expected",
    [
        ("pull_back", 5.0, 1.0, 1.0),  # above the box, descent moves it down: passes
        ("pull_back", 5.0, -1.0, 0.0),  # above the box, descent would push it up: blocked
        ("pull_back", -5.0, -1.0, -1.0),
        ("pull_back", -5.0, 1.0, 0.0),
        ("pull_back", 0.5, -1.0, -1.0),  # inside: always passes
        ("pull_back", 0.5, math.inf, math.inf),  # ...infinite gradients too
        ("straight_through", 5.0, -1.0, -1.0),
        ("clamp", 5.0, 1.0, 0.0),
        ("clamp", 0.5, 1.0, 1.0),
    ],
)
def test_clamp_gradient_modes(gradient, stored, pull, expected):
    assert _grad_of_stored(gradient, stored, pull) == expected


def test_pull_back_treats_each_entry_of_a_tensor_on_its_own():
    layer = nn.Linear(4, 1, bias=False)
    constrain(layer, {"weight": Clamp(-1, 1)})
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.tensor([[0.5, 5.0, -5.0, 5.0]]))
    upstream = torch.tensor([[math.inf, 1.0, 1.0, -1.0]])
    (layer.weight * upstream).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad.tolist() == [[math.inf, 1.0, 0.0, 0.0]]


def test_clamp_weight_stuck_outside_comes_back_with_default_gradient():
    for gradient, comes_back in (("pull_back", True), ("clamp", False)):
        layer = nn.Linear(1, 1, bias=False)
        constrain(layer, {"weight": Clamp(-1, 1, gradient=gradient)})
        with torch.no_grad():
            layer.parametrizations.weight.original.fill_(50.0)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.25)
        for _ in range(300):  # the loss wants the weight at 0.3
            optimizer.zero_grad()
            ((layer.weight - 0.3) ** 2).sum().backward()
            optimizer.step()
        stored = layer.parametrizations.weight.original.item()
        assert (abs(stored - 0.3) < 1e-3) == comes_back, (gradient, stored)


def test_clamp_assignment_stores_clamped_value():
    layer = nn.Linear(2, 2)
    constrain(layer, {"weight": Clamp(-1, 1)})
    layer.weight = torch.full((2, 2), 3.0)
    assert torch.equal(layer.parametrizations.weight.original, torch.ones(2, 2))


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


def test_clamp_follows_in_place_edits_of_scalar_bounds():
    layer = nn.Linear(4, 4)
    constrain(layer, {"weight": Clamp(-1, 1)})
    assert layer.weight.abs().max() > 0.1
    layer.parametrizations.weight[0].max.fill_(0.1)
    layer.parametrizations.weight[0].min.fill_(-0.1)
    assert layer.weight.abs().max() <= 0.1


def test_fixed_mask_shape_mismatch_names_the_tensor():
    with pytest.raises(ValueError, match=r"0.weight: FixedMask of shape \(2, 2\) does not fit .*\(3, 4\)"):
        constrain(nn.Sequential(nn.Linear(4, 3)), {"0.weight": FixedMask(torch.ones(2, 2))})


def test_fixed_mask_needs_a_mask_or_template():
    with pytest.raises(TypeError, match="expected a mask tensor, or a template"):
        FixedMask()
    with pytest.raises(TypeError, match="expected mask to be a tensor. Got list"):
        FixedMask([1, 0])


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
    "kwargs, message",
    [
        ({"per": "row"}, "per='element' or 'channel'. Got 'row'"),
        ({"init": 1.0}, r"init in \(0, 1\)"),
        ({"threshold": 0.0}, r"threshold in \(0, 1\)"),
        ({"temperature": 0}, "temperature > 0"),
        ({"strength": -1}, "strength >= 0"),
    ],
)
def test_learnable_mask_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearnableMask(**kwargs)


def test_non_floating_tensor_is_refused():
    module = nn.Module()
    module.count = nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ValueError, match="count: rule 0 .* floating-point tensors. Got torch.int64"):
        constrain(module, {"count": Clamp(0, 1)})


def test_check_passes_for_every_constraint_kind():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    constrain(model, {"0": Clamp(-0.1, 0.1), "1": FixedMask.n_m(2, 4), "2": LearnableMask()})
    assert len(check(model)) == 3
