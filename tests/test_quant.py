"""FakeQuant: weights on an exact integer grid, straight-through gradient, zeros kept, check finds weights off the grid."""

import warnings

import pytest
import torch
from torch import nn

from conftest import train_checked as train
from torchconstrain import Clamp, FakeQuant, FixedMask, bake, check, constrain


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_bakes_onto_an_exact_integer_grid(bits, per_channel, symmetric):
    torch.manual_seed(bits)
    layer = nn.Linear(16, 6)
    constraint = FakeQuant(bits, per_channel=per_channel, symmetric=symmetric)
    constrain(layer, {"weight": constraint})
    train(layer, lr=0.5)
    stored = layer.parametrizations.weight.original.detach().clone()
    quant = layer.parametrizations.weight[0]
    scale, zero_point, qmin, qmax = quant.grid(stored)
    layer.eval()
    x = torch.randn(3, 16)
    before = layer(x)
    bake(layer)
    steps = (layer.weight.detach() / scale).round()
    assert torch.equal(layer.weight, steps * scale)  # exactly scale times an integer ...
    q = steps + zero_point
    assert q.min() >= qmin and q.max() <= qmax  # ... in range
    assert torch.equal(layer(x), before)


def test_fake_quant_gradient_is_straight_through():
    layer = nn.Linear(4, 2, bias=False)
    constrain(layer, {"weight": FakeQuant(4)})
    layer.weight.sum().backward()
    assert torch.equal(layer.parametrizations.weight.original.grad, torch.ones(2, 4))


def test_fake_quant_keeps_masked_zeros():
    layer = nn.Linear(16, 8)
    constrain(layer, {"weight": [FixedMask.magnitude(sparsity=0.75), FakeQuant(4, symmetric=False)]})
    train(layer)
    assert int((layer.weight == 0).sum()) >= 96
    bake(layer)
    assert int((layer.weight == 0).sum()) >= 96


def test_fake_quant_model_survives_dynamic_quantization():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    constrain(model, {nn.Linear: FakeQuant(8, per_channel=False)})
    model.eval()
    x = torch.randn(16, 32)
    fake = model(x).detach()
    bake(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    out = quantized(x)
    assert (out - fake).abs().max() < 0.05 * fake.abs().max()


def test_check_reports_weights_off_the_grid():
    layer = nn.Linear(8, 4)
    constrain(layer, {"weight": FakeQuant(4)})
    from torch.nn.utils import parametrize

    class Nudge(nn.Module):
        def forward(self, x):
            return x + 1e-3

    parametrize.register_parametrization(layer, "weight", Nudge())
    with pytest.raises(Exception, match="off their 4-bit grid"):
        check(layer)


def test_clamp_and_fake_quant_compose():
    layer = nn.Linear(8, 4)
    constrain(layer, {"weight": [Clamp(-0.1, 0.1), FakeQuant(8)]})
    train(layer)
    assert layer.weight.abs().max() <= 0.1


def test_affine_grid_with_a_rounding_tie_passes_check():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-10.0, 9.99999, 0.0, 5.0], [-9.999997, 9.999993, 0.0, -3.0]]))
    constrain(layer, {"weight": FakeQuant(4, symmetric=False, per_channel=False)})
    assert len(check(layer)) == 1
    bake(layer)
    values = set(layer.weight.flatten().tolist())
    scale = 20 / 15
    assert all(abs(v / scale - round(v / scale)) < 1e-4 for v in values)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: FakeQuant(bits=1), ValueError, "FakeQuant: expected bits to be an integer from 2 to 16. Got 1"),
        (lambda: FakeQuant(bits=17), ValueError, "bits to be an integer from 2 to 16. Got 17"),
        (lambda: FakeQuant(bits="8"), TypeError, "FakeQuant: expected bits to be an integer. Got str: '8'"),
        (lambda: FakeQuant(bits=8.0), TypeError, "expected bits to be an integer. Got float"),
        (lambda: FakeQuant(per_channel="yes"), TypeError, "FakeQuant: expected per_channel to be True or False. Got str"),
        (lambda: FakeQuant(symmetric=None), TypeError, "FakeQuant: expected symmetric to be True or False. Got NoneType"),
        (lambda: FakeQuant(dim="0"), TypeError, "FakeQuant: expected dim to be an integer. Got str: '0'"),
    ],
)
def test_fake_quant_refuses_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def _peer(x, scale, zero_point, qmin, qmax, per_channel):
    if per_channel:
        return torch.fake_quantize_per_channel_affine(x, scale.flatten(), zero_point.flatten().int(), 0, qmin, qmax)
    return torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zero_point.item()), qmin, qmax)


@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_wide_grids_round_to_the_nearest_level_as_torch_fake_quantize_does(bits, per_channel, symmetric):
    """Every entry lands on the level torch.fake_quantize_per_* gives it, except at ties.

    With the weights near 0 and the range reaching -1, the affine zero point sits near the
    top of the grid: adding it to ``w / scale`` before rounding would lose the fraction's
    low bits (float32 keeps 24), and some entries would land a level off. At ties (``w /
    scale`` within a few float32 steps of a half) the two may differ by design: the affine
    grid here rounds half up, torch half to even; and torch multiplies by ``1 / scale``
    where this divides by ``scale``.
    """
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(256, 256, generator=generator) * 0.01
    weight[:, 0] = -1.0
    layer = nn.Linear(256, 256, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    constrain(layer, {"weight": FakeQuant(bits, per_channel=per_channel, symmetric=symmetric)})
    quant = layer.parametrizations.weight[0]
    scale, zero_point, qmin, qmax = quant.grid(weight)
    if not symmetric:
        assert zero_point.min() > 0.95 * qmax
    expected = _peer(weight, scale, zero_point, qmin, qmax, per_channel)
    steps = weight.double() / scale.double()
    tie = (steps - steps.floor() - 0.5).abs() <= 4 * torch.finfo(torch.float32).eps * steps.abs().clamp_min(1)
    with torch.no_grad():
        effective = layer.weight
    assert torch.equal(effective[~tie], expected[~tie])
    assert int(tie.sum()) < 0.002 * tie.numel()
    level = scale.expand_as(weight)[tie]  # at ties: one of the two nearest levels
    assert bool(((effective[tie] - weight[tie]).abs() <= 0.5 * level * (1 + 1e-3)).all())
    assert bool(((effective[tie] - expected[tie]).abs() <= level * (1 + 1e-3)).all())
    check(layer)
    bake(layer)
    assert torch.equal(layer.weight, effective)


def test_symmetric_grid_ends_stay_within_the_largest_magnitude():
    # 0.1 / 3 * 3 rounds above 0.1 in float32: torch's fake quantization lands there.
    torch.manual_seed(0)
    w = torch.rand(64, 8) * 0.2 - 0.1
    w[:, 0] = torch.where(torch.rand(64) < 0.5, 0.1, -0.1)
    quant = FakeQuant(3)
    ours = quant.bake(w)
    largest = w.abs().amax(dim=1, keepdim=True)
    scale = largest.flatten() / 3
    theirs = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(64, dtype=torch.int32), 0, -3, 3)
    beyond = theirs.abs() > largest
    assert beyond.any()  # the peer's ends overshoot, by an ulp
    assert torch.equal(ours[~beyond], theirs[~beyond])
    assert torch.equal(ours[beyond], torch.sign(w[beyond]) * largest.expand_as(w)[beyond])
    assert bool((ours.abs() <= 0.1).all()) and quant.violation(ours) is None


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_slice_too_small_for_a_representable_grid_rounds_to_zero(symmetric):
    # Gates that have nearly closed leave weights around 1e-42: a float32 grid of such a
    # slice would have a subnormal step, which cannot hold its levels.
    x = torch.randn(3, 8)
    x[1] *= 1e-42
    quant = FakeQuant(4, symmetric=symmetric)
    y = quant(x)
    assert torch.equal(y[1], torch.zeros(8))
    assert torch.equal(y[[0, 2]], FakeQuant(4, symmetric=symmetric)(x[[0, 2]]))
    assert quant.violation(y) is None


def test_min_scale_floors_the_grid_like_torch_fake_quantize_with_a_floored_scale():
    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    with torch.no_grad():
        layer.weight[:3].mul_(0.01)  # these rows' max|w| / 127 is under the floor
    weight = layer.weight.detach().clone()
    constrain(layer, {"weight": FakeQuant.xnnpack()})
    check(layer)
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(2**-12)
    assert (scale[:3] == 2**-12).all() and (scale[3:] > 2**-12).all()
    peer = torch.fake_quantize_per_channel_affine(weight, scale, torch.zeros(6, dtype=torch.int32), 0, -127, 127)
    assert torch.equal(layer.weight, peer)
    bake(layer)
    assert torch.equal(layer.weight, peer)
    unfloored = FakeQuant(8).quantize(weight)
    assert not torch.equal(unfloored[:3], peer[:3])
    # above the floor the grids agree (the unfloored grid keeps its ends within max|w|: an ulp)
    torch.testing.assert_close(unfloored[3:], peer[3:], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (-1e-3, ValueError, "FakeQuant: expected min_scale to be a finite number >= 0"),
        (float("inf"), ValueError, "FakeQuant: expected min_scale to be a finite number >= 0"),
        (float("nan"), ValueError, "FakeQuant: expected min_scale to be a finite number >= 0"),
        ("0.1", TypeError, "FakeQuant: expected min_scale to be a number. Got str"),
        (True, TypeError, "FakeQuant: expected min_scale to be a number. Got bool"),
    ],
)
def test_a_bad_min_scale_is_refused(value, error, message):
    with pytest.raises(error, match=message):
        FakeQuant(8, min_scale=value)


def test_a_scale_floor_that_rounds_a_whole_tensor_to_zero_is_refused_and_one_that_zeroes_slices_warns():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)  # |w| <= 0.125
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"weight: FakeQuant min_scale=1 rounds every entry to 0 \(the largest \|w\| is 0.12"):
        constrain(layer, {"weight": FakeQuant(8, min_scale=1.0)})
    assert torch.equal(layer.weight, before) and not hasattr(layer, "parametrizations")
    with torch.no_grad():
        layer.weight[:3] *= 1e-3  # three rows far below the floor's half step
    with pytest.warns(UserWarning, match=r"weight: FakeQuant min_scale=0.001 rounds every entry of 3 of its 32 slices to 0"):
        constrain(layer, {"weight": FakeQuant(8, min_scale=1e-3)})
    constrain(nn.Linear(64, 32), {"weight": FakeQuant.xnnpack()})  # the usual floor: no warning


NARROW_LIMITS = [(torch.float16, True, 9), (torch.float16, False, 8), (torch.bfloat16, True, 6), (torch.bfloat16, False, 5)]


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype, symmetric, bits", NARROW_LIMITS)
def test_narrow_dtypes_land_on_the_nearest_level_of_the_exact_grid(dtype, symmetric, bits, per_channel):
    # Quotients in float16 or bfloat16 land entries a level off, and a float16 grid whose
    # step is below its smallest normal number (a slice with max|w| < 0.008) rounded to 0.
    torch.manual_seed(bits)
    weight = torch.randn(64, 128) * torch.logspace(-3, 0, 64).unsqueeze(1) + (0.0 if symmetric else 0.05)
    weight = weight.to(dtype)
    layer = nn.Linear(128, 64, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    constrain(layer, {"weight": FakeQuant(bits, per_channel=per_channel, symmetric=symmetric)})
    exact = FakeQuant(bits, per_channel=per_channel, symmetric=symmetric)
    scale, zero_point, _, _ = exact.grid(weight.double())
    steps = weight.double() / scale + zero_point
    tie = ((steps - steps.floor()) - 0.5).abs() < 1e-4  # both levels as near: either is right
    with torch.no_grad():
        effective = layer.weight.double()
    assert layer.weight.dtype == dtype
    level_off = (effective - exact.quantize(weight.double())).abs() > 0.25 * scale
    assert not bool((level_off & ~tie).any())
    check(layer)
    baked = layer.weight.detach().clone()
    bake(layer)
    assert torch.equal(layer.weight, baked)


@pytest.mark.parametrize("dtype, symmetric, bits", NARROW_LIMITS)
def test_a_grid_the_dtype_cannot_hold_is_refused_before_and_after_constrain(dtype, symmetric, bits):
    layer = nn.Linear(8, 4).to(dtype)
    before = {name: value.clone() for name, value in layer.state_dict().items()}
    with pytest.raises(ValueError, match=rf"weight: FakeQuant\(bits={bits + 1}, .*Expected bits <= {bits} for {dtype}"):
        constrain(layer, {"weight": FakeQuant(bits + 1, symmetric=symmetric)})
    assert not hasattr(layer, "parametrizations")
    assert all(torch.equal(layer.state_dict()[name], value) for name, value in before.items())
    cast_later = nn.Linear(8, 4)
    constrain(cast_later, {"weight": FakeQuant(bits + 1, symmetric=symmetric)})
    cast_later.to(dtype)
    with pytest.raises(ValueError, match="keeps levels apart only up to"):
        cast_later(torch.randn(2, 8, dtype=dtype))


def test_the_affine_grid_rounds_just_below_a_half_down():
    # floor(q + 0.5) rounds 0.49999997 + 0.5 to 1.0 in float32: a level off.
    x = torch.tensor([0.0, 255.0, 0.49999997, 0.5, 1.4999999])
    assert torch.equal(FakeQuant(8, per_channel=False, symmetric=False).quantize(x), torch.tensor([0.0, 255.0, 0.0, 1.0, 1.0]))


def test_a_per_channel_grid_on_a_1d_tensor_is_one_grid_for_the_tensor():
    bias = torch.tensor([0.3, -0.71, 0.05, 1.0])
    per_tensor = FakeQuant(2, per_channel=False).quantize(bias)
    assert torch.equal(FakeQuant(2, per_channel=True).quantize(bias), per_tensor)
    assert torch.equal(per_tensor, torch.tensor([0.0, -1.0, 0.0, 1.0]))
