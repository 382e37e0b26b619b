"""L1 and L2: penalties on effective weights that leave the forward and state_dict alone."""

import copy
import math

import pytest
import torch
from torch import nn

from conftest import SmallNet
from torchconstrain import L1, L2, Clamp, FixedMask, bake, check, constrain, penalty


def test_soft_constraints_leave_forward_and_state_dict_alone(net):
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 9, 9)
    before = net(x)
    report = constrain(net, {"features.*.weight": L2(1e-2), "head.weight": L1(1e-3)})
    assert report["head.weight"]["constraints"] == ["L1(weight=0.001)"]
    assert list(net.state_dict()) == keys
    assert not hasattr(net.head, "parametrizations")
    assert torch.equal(net(x), before)
    expected = 1e-3 * net.head.weight.abs().sum() + sum(
        5e-3 * net.features[i].weight.square().sum() for i in (0, 1, 3)
    )
    torch.testing.assert_close(penalty(net), expected)
    assert len(check(net)) == 4


def test_l2_rule_with_sgd_equals_weight_decay_in_a_param_group():
    torch.manual_seed(0)
    a = SmallNet()
    b = copy.deepcopy(a)
    constrain(a, {"features.3.weight": L2(0.1)})
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    decayed = [b.features[3].weight]
    rest = [p for p in b.parameters() if p is not b.features[3].weight]
    opt_b = torch.optim.SGD([{"params": rest}, {"params": decayed, "weight_decay": 0.1}], lr=0.1, momentum=0.9)
    for _ in range(3):
        x = torch.randn(2, 3, 9, 9)
        for model, optimizer, extra in ((a, opt_a, penalty), (b, opt_b, lambda m: 0)):
            optimizer.zero_grad()
            (model(x).square().mean() + extra(model)).backward()
            optimizer.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_soft_penalty_sees_the_effective_weight():
    layer = nn.Linear(8, 8)
    constrain(layer, {"weight": [FixedMask.magnitude(sparsity=0.5), L1(1.0)]})
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(1.0)  # masked stored entries become 1
    torch.testing.assert_close(penalty(layer), layer.weight.abs().sum())
    assert penalty(layer) < layer.parametrizations.weight.original.abs().sum() - 31


def test_bake_drops_soft_constraints_and_refuses_duplicates(net):
    constrain(net, {"head": L2(0.1)})
    with pytest.raises(ValueError, match=r"head.weight is already constrained by L2\(weight=0.1\)"):
        constrain(net, {"head": L1(0.1)})
    report = bake(net)
    assert report.names() == ["head.weight"]
    assert "_torchconstrain_soft" not in net.head.__dict__
    assert penalty(net).item() == 0.0


def test_soft_registration_is_rolled_back_on_failure(net, monkeypatch):
    import torchconstrain.rules as rules

    real = rules.register
    calls = []

    def fail_second(slot, constraint):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        real(slot, constraint)

    monkeypatch.setattr(rules, "register", fail_second)
    with pytest.raises(RuntimeError, match="boom"):
        constrain(net, {"head": [L2(0.1), Clamp(-1, 1)]})
    assert "_torchconstrain_soft" not in net.head.__dict__
    assert not hasattr(net.head, "parametrizations")


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: L1(-1), ValueError, "L1: expected weight to be a finite number >= 0. Got -1.0"),
        (lambda: L2(math.nan), ValueError, "L2: expected weight to be a finite number >= 0. Got nan"),
        (lambda: L1(math.inf), ValueError, "L1: expected weight to be a finite number >= 0. Got inf"),
        (lambda: L2("0.1"), TypeError, "L2: expected weight to be a number. Got str: '0.1'"),
        (lambda: L1(torch.tensor(0.1)), TypeError, "L1: expected weight to be a number. Got Tensor"),
        (lambda: L1(10**400), ValueError, "L1: expected weight to be a finite number >= 0. Got an integer of 401 digits, beyond float64"),
    ],
)
def test_soft_weight_must_be_a_finite_non_negative_number(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_penalties_of_narrow_dtypes_are_summed_in_float32(dtype):
    # A float16 sum of 16M magnitudes passes 65504: the penalty was inf.
    torch.manual_seed(0)
    layer = nn.Linear(4096, 4096, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.mul_(20)  # squares up to ~0.1, sum far above float16's range
    constrain(layer, {"weight": [L1(1e-5), L2(1e-4)]})
    exact = layer.weight.detach().double()
    expected = 1e-5 * exact.abs().sum() + 1e-4 / 2 * exact.square().sum()
    assert penalty(layer).dtype == torch.float32
    torch.testing.assert_close(penalty(layer).double(), expected, rtol=1e-5, atol=0)
