import warnings

import pytest
import torch
from torch import nn

from torchconstrain import (
    Clamp,
    FakeQuant,
    FixedMask,
    MaxNorm,
    NonNeg,
    UnitNorm,
    bake,
    check,
    constrain,
)


def train(model: nn.Module, steps: int = 5, lr: float = 1.0) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, model.in_features)).pow(2).sum().backward()
        optimizer.step()
        check(model)


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
    with pytest.raises(ValueError, match=r"contradict each other.*UnitNorm\(dim=0\).*do not have unit L2 norm"):
        constrain(nn.Linear(8, 4), {"weight": [FixedMask.structured(sparsity=0.5), UnitNorm()]})
    with pytest.raises(ValueError, match="contradict each other.*UnitNorm"):
        constrain(nn.Linear(8, 4), {"weight": [UnitNorm(), FixedMask.magnitude(sparsity=0.5)]})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: MaxNorm(0), "max_value > 0. Got 0"),
        (lambda: MaxNorm(1.0, dim="0"), "expected dim to be an int"),
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
