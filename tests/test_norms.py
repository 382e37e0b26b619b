"""NonNeg, MaxNorm and UnitNorm hold after training, compose with masks and refuse what contradicts them."""

import math

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, snapshot
from conftest import train_checked as train
from torchconstrain import FakeQuant, FixedMask, MaxNorm, NonNeg, UnitNorm, check, constrain


def test_non_neg_holds_and_is_a_clamp_at_zero():
    layer = nn.Linear(6, 6)
    constrain(layer, {"weight": NonNeg()})
    assert repr(layer.parametrizations.weight[0]) == "NonNeg()"
    train(layer)
    assert layer.weight.min() >= 0


def test_max_norm_scales_only_channels_outside_the_ball():
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0, 0, 0], [0.3, 0.4, 0, 0], [0, 0, 0, 0]]))
    constrain(layer, {"weight": MaxNorm(1.0)})
    expected = torch.tensor([[0.6, 0.8, 0, 0], [0.3, 0.4, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(layer.weight, expected)
    assert torch.equal(layer.weight[1], expected[1])  # inside the ball: untouched, bitwise


def test_max_norm_per_input_dim_and_after_training():
    conv = nn.Conv2d(3, 4, 3)
    constrain(conv, {"weight": MaxNorm(0.1, dim=1)})
    norms = conv.weight.detach().transpose(0, 1).flatten(1).norm(dim=1)
    assert torch.all(norms <= 0.1 * (1 + 1e-5))
    layer = nn.Linear(8, 8)
    constrain(layer, {"weight": MaxNorm(0.2)})
    train(layer, lr=10.0)


def test_unit_norm_holds_after_training():
    layer = nn.Linear(8, 5)
    constrain(layer, {"weight": UnitNorm()})
    train(layer, lr=10.0)
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(5))


def test_norms_compose_with_masks_and_zeros_stay_zero():
    layer = nn.Linear(8, 4)
    constrain(layer, {"weight": [FixedMask.magnitude(sparsity=0.5), MaxNorm(0.1)]})
    zeros = layer.weight == 0
    train(layer, lr=5.0)
    assert torch.equal(layer.weight == 0, zeros) and int(zeros.sum()) == 16
    other = nn.Linear(8, 4)
    constrain(other, {"weight": [FixedMask.n_m(2, 4), UnitNorm()]})
    train(other, lr=5.0)
    assert int((other.weight == 0).sum()) == 16


def test_unit_norm_refuses_masks_that_empty_a_channel_or_come_after_it():
    layer = nn.Linear(8, 4)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"weight: UnitNorm\(dim=0\) from rule 0.*cannot follow FixedMask.*nonzero"):
        constrain(layer, {"weight": [FixedMask.structured(sparsity=0.5), UnitNorm()]})
    with pytest.raises(ValueError, match=r"FixedMask.*cannot follow UnitNorm.*unit L2 norm"):
        constrain(layer, {"weight": [UnitNorm(), FixedMask.magnitude(sparsity=0.5)]})
    assert_unchanged(layer, before)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: MaxNorm(0), "max_value to be a number > 0. Got 0.0"),
        (lambda: MaxNorm("1"), "MaxNorm: expected max_value to be a number. Got str"),
        (lambda: MaxNorm(1.0, dim="0"), "expected dim to be an int"),
        (lambda: MaxNorm(1.0, gradient="project"), "MaxNorm: unknown gradient 'project'. Expected one of 'pull_back', 'scale'"),
        (lambda: FakeQuant(bits=1), "bits to be an integer from 2 to 16. Got 1"),
        (lambda: FakeQuant(bits=8.0), "bits to be an integer"),
    ],
)
def test_bad_arguments(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_norm_dim_out_of_range_names_the_tensor():
    with pytest.raises(ValueError, match=r"weight: MaxNorm dim=2 is out of range for a tensor of shape \(4, 8\)"):
        constrain(nn.Linear(8, 4), {"weight": MaxNorm(1.0, dim=2)})


def test_unit_norm_is_scale_safe_in_float32():
    weight = torch.randn(4, 16, dtype=torch.float64)
    weight[0] *= 1e-21  # the plain norm's squares underflow
    weight[1] *= 1e20  # ... and overflow
    weight[2] *= 1e-41  # subnormal entries
    layer = nn.Linear(16, 4)
    with torch.no_grad():
        layer.weight.copy_(weight)
    constrain(layer, {"weight": UnitNorm()})
    check(layer)
    stored = layer.parametrizations.weight.original.detach().double()
    expected = stored / stored.norm(dim=1, keepdim=True)  # float64: no under- or overflow here
    torch.testing.assert_close(layer.weight.double(), expected, rtol=1e-6, atol=1e-7)


def test_norms_of_ordinary_slices_are_bitwise_the_plain_computation():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(6, 10, dtype=dtype) * torch.logspace(-8, 8, 6, dtype=dtype)[:, None]
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        assert torch.equal(UnitNorm()(x), x / norms.clamp_min(torch.finfo(dtype).tiny))
        assert torch.equal(MaxNorm(0.5)(x), x * (0.5 / norms.clamp_min(torch.finfo(dtype).tiny)).clamp_max(1.0))


def test_max_norm_scales_an_overflowing_slice_back_instead_of_zeroing_it():
    x = torch.tensor([[3e19, 4e19, 0.0], [0.3, 0.4, 0.0], [3e-22, 4e-22, 0.0]])
    y = MaxNorm(1.0)(x)
    torch.testing.assert_close(y[0], torch.tensor([0.6, 0.8, 0.0]))
    assert torch.equal(y[1:], x[1:])  # inside the ball: untouched
    assert MaxNorm(1.0).violation(y) is None


def test_unit_norm_in_half_precision_with_small_norms():
    x = torch.full((2, 16), 1e-5, dtype=torch.float16)  # norm 4e-5: below float16's smallest normal
    y = UnitNorm()(x)
    torch.testing.assert_close(y.float().norm(dim=1), torch.ones(2), rtol=2e-3, atol=0)
    assert UnitNorm().violation(y) is None


def test_zero_slices_stay_zero_and_check_reports_them():
    x = torch.zeros(2, 4)
    x[1] = torch.tensor([1e-30, 0, 0, 0])
    y = UnitNorm()(x)
    assert torch.equal(y[0], torch.zeros(4)) and torch.equal(y[1], torch.tensor([1.0, 0, 0, 0]))
    assert "1 slices along dim 0 do not have unit L2 norm" in UnitNorm().violation(y)


def _train_towards(layer, targets, steps=300):
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for target in targets:
        for _ in range(steps):
            optimizer.zero_grad()
            (layer.weight - target).pow(2).sum().backward()
            optimizer.step()
    return layer.weight.detach()


@pytest.mark.parametrize("gradient, comes_back", [("pull_back", True), ("scale", False)])
def test_a_max_norm_slice_pulled_outside_comes_back_inside_with_the_pull_back_gradient(gradient, comes_back):
    # The loss first wants the slice at norm 5 (outside the unit ball), then at norm 0.5.
    layer = nn.Linear(2, 1, bias=False)
    constrain(layer, {"weight": MaxNorm(1.0, gradient=gradient)})
    layer.weight = torch.tensor([[0.06, 0.08]])
    weight = _train_towards(layer, [torch.tensor([[3.0, 4.0]]), torch.tensor([[0.3, 0.4]])])
    check(layer)
    reached = torch.allclose(weight, torch.tensor([[0.3, 0.4]]), atol=1e-3)
    assert reached == comes_back  # the rescaling's own gradient leaves it on the sphere, at [0.6, 0.8]


def test_the_pull_back_gradient_is_the_rescalings_where_descent_moves_a_slice_outward():
    torch.manual_seed(0)
    original = torch.randn(4, 6) * torch.tensor([[0.1], [3.0], [3.0], [3.0]])  # row 0 inside, the others outside
    upstream = torch.randn(4, 6)
    effective = MaxNorm(1.0)(original)
    upstream[1] = -effective[1].detach()  # w . g < 0: descent moves it out
    upstream[2] = effective[2].detach() + 0.1 * upstream[2]  # w . g > 0: descent moves it in
    grads = {}
    for gradient in ("pull_back", "scale"):
        x = original.clone().requires_grad_()
        MaxNorm(1.0, gradient=gradient)(x).backward(upstream)
        grads[gradient] = x.grad
    factor = effective.detach().norm(dim=1, keepdim=True) / original.norm(dim=1, keepdim=True)
    torch.testing.assert_close(grads["pull_back"][[0, 1]], grads["scale"][[0, 1]])  # inside; outward
    torch.testing.assert_close(grads["pull_back"][2:3], factor[2:3] * upstream[2:3])  # inward: all of factor * g
    assert not torch.allclose(grads["pull_back"][2:3], grads["scale"][2:3])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_each_entry_of_a_1d_tensor_is_its_own_slice():
    # vector_norm(dim=[]) reduces over every dim: a bias was normalized as one vector.
    layer = nn.Linear(2, 4)
    constrain(layer, {"bias": MaxNorm(1.0)})
    with torch.no_grad():
        layer.parametrizations.bias.original.copy_(torch.tensor([3.0, -0.5, 0.2, 4.0]))
    assert torch.equal(layer.bias, torch.tensor([1.0, -0.5, 0.2, 1.0]))
    unit = nn.Linear(2, 4)
    constrain(unit, {"bias": UnitNorm()})
    assert torch.equal(unit.bias.abs(), torch.ones(4))
    check(layer), check(unit)
    empty = nn.Linear(2, 0)
    constrain(empty, {"bias": UnitNorm()})  # no slices: nothing to hold
    check(empty)


@pytest.mark.parametrize("gradient", ["scale", "pull_back"])
@pytest.mark.parametrize("size, max_value", [(1e-21, 1.0), (3e-30, 1e-30), (1.0, 1e-30), (1.0, 0.5)])
def test_gradients_of_tiny_slices_and_bounds_are_the_float64_ones(gradient, size, max_value):
    # Differentiated through max_value / norm, intermediate derivatives overflowed float32:
    # NaN for a slice of norm 1e-21 inside the ball, or for a max_value of 1e-30.
    torch.manual_seed(0)
    stored = torch.randn(4, 8) * size
    upstream = torch.randn(4, 8)
    original = stored.clone().requires_grad_()
    (MaxNorm(max_value, gradient=gradient)(original) * upstream).sum().backward()
    exact = stored.double().requires_grad_()
    rescaled = exact * (max_value / exact.norm(dim=1, keepdim=True)).clamp_max(1)
    (rescaled * upstream.double()).sum().backward()
    assert original.grad.isfinite().all()
    if gradient == "scale":
        torch.testing.assert_close(original.grad.double(), exact.grad, rtol=1e-5, atol=0)
    else:  # factor * (g - min(u . g, 0) u) outside the ball, u the unit slice: g inside
        norms = stored.double().norm(dim=1, keepdim=True)
        unit, g = stored.double() / norms, upstream.double()
        outward = ((unit * g).sum(dim=1, keepdim=True).clamp_max(0) * unit).where(norms > max_value, 0.0)
        expected = (max_value / norms).clamp_max(1) * (g - outward)
        torch.testing.assert_close(original.grad.double(), expected, rtol=1e-5, atol=0)


def test_the_pull_back_gradient_does_not_overflow_float16():
    torch.manual_seed(0)
    stored = torch.randn(4, 64)
    upstream = torch.randn(4, 64) * 1000  # a scaled loss (GradScaler)
    grads = {}
    for dtype in (torch.float16, torch.float32):
        original = stored.to(dtype).requires_grad_()
        (MaxNorm(0.01)(original) * upstream.to(dtype)).sum().backward()
        grads[dtype] = original.grad
    assert grads[torch.float16].isfinite().all()
    torch.testing.assert_close(grads[torch.float16].float(), grads[torch.float32], rtol=2e-3, atol=1e-2)


@pytest.mark.parametrize("entry", [5000.0, 60000.0])  # norm 4e4, and above float16's largest number
@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_float16_slice_far_outside_a_small_ball_is_rescaled_not_zeroed(entry, requires_grad):
    # The factor 1e-3 / 4e4 is below float16's smallest subnormal: computed in float16 it
    # was 0, and the zeroed slice (norm 0, inside the ball) passed check.
    x = torch.full((2, 64), entry, dtype=torch.float16).requires_grad_(requires_grad)
    y = MaxNorm(1e-3)(x)
    expected = torch.full((2, 64), 1e-3 / 8, dtype=torch.float64)
    torch.testing.assert_close(y.double(), expected, rtol=1e-3, atol=0)
    assert torch.equal(MaxNorm(1e-3).forward_in_place(x.detach().clone()), y.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_rescale_in_place_to_the_bits_of_the_new_tensor(dtype):
    torch.manual_seed(0)
    x = (torch.randn(8, 32) * torch.logspace(-2, 3, 8)[:, None]).to(dtype)
    y = MaxNorm(1.0)(x)
    assert y.dtype == dtype
    assert torch.equal(MaxNorm(1.0).forward_in_place(x.clone()), y)


def test_a_max_norm_below_the_dtypes_normal_numbers_is_refused():
    # In float16, slices rescaled to norm 1e-7 are subnormal: 46% over, and check, which
    # rounds norm and bound alike, passed them.
    layer = nn.Linear(8, 4).half()
    with pytest.raises(ValueError, match=r"weight: MaxNorm max_value=1e-07 over slices of 8 entries, leaves entries "
                                         r"of about 3.54e-08, below the smallest normal torch.float16"):
        constrain(layer, {"weight": MaxNorm(1e-7)})
    assert not hasattr(layer, "parametrizations")
    constrain(nn.Linear(8, 4), {"weight": MaxNorm(1e-7)})  # a float32 normal number


def test_a_max_norm_whose_slices_would_hold_subnormal_entries_is_refused():
    # 1e-4 is a normal float16 number, but a slice of 10000 entries at that norm holds
    # entries of 1e-6, subnormal: rounded, every row came out 1.3% over, and check failed
    # on MaxNorm's own output.
    layer = nn.Linear(10000, 2, bias=False).half()
    with pytest.raises(ValueError, match=r"max_value=0.0001 over slices of 10000 entries, leaves entries of about "
                                         r"1e-06, .* Expected max_value >= 0.0061"):
        constrain(layer, {"weight": MaxNorm(1e-4)})
    assert not hasattr(layer, "parametrizations")
    constrain(layer, {"weight": MaxNorm(0.01)})
    with torch.no_grad():
        layer.parametrizations.weight.original.fill_(1e-3)  # rows of norm 0.1: rescaled to 0.01
    check(layer)


def test_norm_violations_name_the_range_of_the_numbers_and_count_the_nan_norms():
    # A NaN row made the message read "norms from nan to nan".
    x = torch.ones(3, 4)
    x[1, 0] = math.nan
    assert UnitNorm().violation(x) == "2 slices along dim 0 do not have unit L2 norm (norms from 2 to 2, 1 NaN)"
    assert MaxNorm(1.0).violation(x) == "2 slices along dim 0 have an L2 norm above 1 (norms from 2 to 2, 1 NaN)"
