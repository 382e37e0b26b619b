import copy

import pytest
import torch
import torch._dynamo.testing
from torch import nn

from torchconstrain import (
    Clamp,
    FakeQuant,
    FixedMask,
    L1,
    L2,
    LearnableMask,
    MaxNorm,
    NonNeg,
    PruningSchedule,
    TemperatureSchedule,
    UnitNorm,
    check,
    constrain,
    penalty,
)


def every_constraint() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8),
        nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4),
    )
    constrain(model, {
        "0": [Clamp(-0.3, 0.3), FixedMask.magnitude(sparsity=0.5)],
        "2": LearnableMask(temperature=0.5, strength=0.1),
        "4": [FakeQuant(4), MaxNorm(0.5)],
        "5": Clamp(torch.linspace(-1.0, -0.1, 8), 1.0),
        "6": UnitNorm(),
        "7": [NonNeg(gradient="straight_through"), LearnableMask(per="channel", hard=True, init=0.6)],
    })
    return model


def compiled(model: nn.Module):
    """The model compiled in one graph (fullgraph=True raises on any graph break) and a frame counter."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return torch.compile(model, backend=counter, fullgraph=True), counter


def test_inference_compiles_in_one_graph_and_matches_eager():
    model = every_constraint().eval()
    fast, counter = compiled(model)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
        fast(torch.randn(5, 8))
    assert counter.frame_count == 1


def test_training_steps_compile_once_and_follow_eager():
    model = every_constraint()
    twin = copy.deepcopy(model)
    fast, counter = compiled(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin)]
    schedules = [TemperatureSchedule(m, final_temperature=0.1, steps=4) for m in (model, twin)]
    for _ in range(4):
        x = torch.randn(5, 8)
        for forward, m, optimizer, schedule in zip((fast, twin), (model, twin), optimizers, schedules):
            loss = forward(x).square().mean() + penalty(m)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        check(model)
        for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)
    assert counter.frame_count == 1


def test_a_loss_with_penalty_compiles_in_one_graph():
    model = every_constraint()
    constrain(model, {"0": L1(1e-3), "4": L2(1e-3)}, existing="stack")
    counter = compiled(model)[1]
    loss = torch.compile(lambda x: model(x).square().mean() + penalty(model), backend=counter, fullgraph=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(loss(x), model(x).square().mean() + penalty(model))
    assert counter.frame_count == 1


def test_edits_to_masks_and_bounds_reach_compiled_code():
    model = every_constraint().eval()
    fast, counter = compiled(model)
    x = torch.randn(5, 8)
    fast(x)
    clamp, mask = model[0].parametrizations.weight
    with torch.no_grad():
        mask.mask[:4] = False  # in place
        clamp.max.fill_(0.05)
        model[5].parametrizations.weight[0].min.fill_(-0.01)
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    assert model[0].weight[:4].abs().sum() == 0 and model[0].weight.max() <= 0.05
    mask.mask = torch.ones(8, 8, dtype=torch.bool)  # a new buffer object
    model[2].parametrizations.weight[0].temperature.fill_(3.0)
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    assert counter.frame_count <= 2  # a replaced buffer may recompile, never go stale


def test_pruning_schedule_masks_reach_compiled_training_without_recompiling():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    constrain(model, {nn.Linear: FixedMask.magnitude(sparsity=0.0)})
    schedule = PruningSchedule(model, final_sparsity=0.75, end=3)
    fast, counter = compiled(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        fast(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    assert (model[0].weight == 0).float().mean().item() == 0.75
    x = torch.randn(4, 8)
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    assert counter.frame_count == 1


@pytest.mark.slow
def test_inductor_compiles_a_training_step_in_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    constrain(model, {"0": [Clamp(-0.3, 0.3), FixedMask.random(sparsity=0.5, seed=0)], "2": LearnableMask()})
    fast = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fast(x), model(x))
    fast(x).sum().backward()
    assert model[0].parametrizations.weight.original.grad[~model[0].parametrizations.weight[1].mask].abs().sum() == 0
