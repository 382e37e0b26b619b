import copy

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from torchconstrain import Clamp, FixedMask, LearnableMask, NonNeg, PruningSchedule, bake, check, constrain

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


def test_an_average_over_buffers_keeps_one_sided_bounds():
    """``use_buffers=True`` interpolates every floating-point buffer: an infinite bound would become NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    constrain(model, {"0.weight": NonNeg(), "2.weight": [Clamp(max=0.1), LearnableMask()]})
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        ema.update_parameters(model)
    report = check(ema.module)
    assert report["0.weight"]["min"] >= 0 and report["2.weight"]["max"] <= torch.tensor(0.1).item()
    assert ema.module[0].parametrizations.weight[0].max is None


def test_an_average_follows_masks_that_grow_during_training():
    """The default ``use_buffers=False`` copies the model's buffers at every update."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    constrain(model, {nn.Linear: FixedMask.magnitude(sparsity=0.0)})
    schedule = PruningSchedule(model, final_sparsity=0.5, end=3)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        schedule.step()
        ema.update_parameters(model)
    for index in (0, 2):
        live, averaged = model[index].parametrizations.weight[0], ema.module[index].parametrizations.weight[0]
        assert torch.equal(averaged.mask, live.mask) and (~live.mask).float().mean() == 0.5


def test_update_bn_recomputes_batch_norm_statistics_of_a_constrained_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    constrain(model, {nn.Conv2d: [Clamp(-0.2, 0.2), FixedMask.random(sparsity=0.5, seed=0)], "1.weight": Clamp(0.5, 2)})
    swa = AveragedModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(4, 3, 8, 8) * 3 + 1 for _ in range(3)]
    for x in data:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        swa.update_parameters(model)
    update_bn(data, swa)
    with torch.no_grad():  # momentum=None: the plain average of the per-batch statistics
        features = [swa.module[0](x) for x in data]
    bn = swa.module[1]
    torch.testing.assert_close(bn.running_mean, torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([f.var(dim=(0, 2, 3)) for f in features]).mean(0))
    report = check(swa.module)
    assert report["0.weight"]["sparsity"] == 0.5 and report["1.weight"]["min"] >= 0.5
