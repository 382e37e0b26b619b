import copy

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from torchconstrain import Clamp, FixedMask, LearnableMask, bake, check, constrain

RULES = {nn.Linear: [FixedMask.random(sparsity=0.5, seed=0), Clamp(-0.3, 0.3)], "2": LearnableMask()}


def constrained_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    constrain(model, [(nn.Linear, RULES[nn.Linear]), ("2", RULES["2"])])
    return model


def test_baking_a_deepcopy_leaves_the_original_working():
    model = constrained_mlp()
    x = torch.randn(3, 8)
    expected = model(x)
    twin = copy.deepcopy(model)
    bake(twin)
    assert type(twin[0]) is nn.Linear
    assert torch.equal(model(x), expected)
    assert len(check(model)) == 2


def test_constraining_a_deepcopy_more_leaves_the_original_alone():
    model = constrained_mlp()
    twin = copy.deepcopy(model)
    constrain(twin, {"0.bias": Clamp(0, 0.01)})
    assert not hasattr(type(model[0]), "bias")  # no property leaked into the original's class
    assert "bias" in dict(model[0].named_parameters())
    bake(twin)
    assert len(check(model)) == 2


def test_swa_and_ema_averages_stay_feasible_and_bake():
    model = constrained_mlp()
    swa = AveragedModel(model)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
        swa.update_parameters(model)
        ema.update_parameters(model)
    for averaged in (swa, ema):
        report = check(averaged.module)
        assert report["0.weight"]["sparsity"] == 0.5
        bound = torch.tensor(0.3).item()  # 0.3 in float32
        assert -bound <= report["0.weight"]["min"] and report["0.weight"]["max"] <= bound
    bake(swa.module)
    assert len(check(model)) == 2
