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
    assert not torch.equal(unfloored[:3], peer[:3]) and torch.equal(unfloored[3:], peer[3:])


@pytest.mark.parametrize("value", [-1e-3, float("inf"), float("nan"), "0.1", True])
def test_a_bad_min_scale_is_refused(value):
    with pytest.raises(ValueError, match="FakeQuant: expected min_scale to be a finite number >= 0"):
        FakeQuant(8, min_scale=value)
