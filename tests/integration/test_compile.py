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
    schedules = [TemperatureSchedule(m, initial_temperature=1.0, final_temperature=0.1, steps=4) for m in (model, twin)]
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



# Masks of BYTES_FROM entries or more are read through a uint8 copy in compiled CPU code
# (torch.ops.torchconstrain.mask_bytes); smaller ones as they are. Both must give eager's
# values and gradients, follow edits of the mask and compile once.


def large_masks() -> nn.Module:
    from torchconstrain.constraints.masks import BYTES_FROM

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4),
    )
    constrain(model, {
        "0": [Clamp(-0.1, 0.1), FixedMask.magnitude(sparsity=0.5)],
        "3": FixedMask.random(sparsity=0.7, seed=0),
        "5": FixedMask.magnitude(sparsity=0.5),
    })
    sizes = [model[i].parametrizations.weight[-1].mask.numel() for i in (0, 3, 5)]
    assert sizes[0] >= BYTES_FROM and sizes[1] >= BYTES_FROM and sizes[2] < BYTES_FROM
    return model


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_training_steps_with_large_masks_follow_eager_and_compile_once(backend):
    model = large_masks()
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    fast = torch.compile(model, backend=counter, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin)]
    for _ in range(3):
        x = torch.randn(5, 16, 6, 6)
        for forward, optimizer in zip((fast, twin), optimizers):
            optimizer.zero_grad()
            forward(x).square().mean().backward()
            optimizer.step()
        for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)
        for i in (0, 3, 5):
            plist = model[i].parametrizations.weight
            assert plist.original.grad[~plist[-1].mask].abs().sum() == 0  # masked entries: exactly 0
    check(model)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_edits_and_replacements_of_large_masks_reach_compiled_code(backend):
    model = large_masks().eval()
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    fast = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
        mask = model[3].parametrizations.weight[0]
        mask.mask[:8] = False  # in place
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
        storage = torch.rand(mask.mask.numel() + 1, generator=torch.Generator().manual_seed(1)) > 0.5
        mask.mask = storage[1:].view(mask.mask.shape)  # a view at an odd byte offset
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
        mask.mask = mask.mask.t().contiguous().t()  # not contiguous (eager's weight takes its strides)
        torch.testing.assert_close(fast(x), model(x))
    assert counter.frame_count <= 2  # a replaced buffer may recompile, never go stale


def test_exported_graphs_multiply_by_the_mask_itself():
    model = large_masks().eval()
    program = torch.export.export(model, (torch.randn(2, 16, 6, 6),))
    assert "torchconstrain" not in program.graph_module.code
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


def test_the_mask_byte_copy_is_a_copy_of_the_bytes_under_vmap_too():
    from torchconstrain.constraints import masks  # noqa: F401  (defines the op)

    copy_bytes = torch.ops.torchconstrain.mask_bytes.default
    batch = torch.rand(3, 5, 7) > 0.5
    assert torch.equal(copy_bytes(batch), batch.to(torch.uint8))
    assert torch.equal(torch.func.vmap(copy_bytes, in_dims=2, out_dims=2)(batch), batch.to(torch.uint8))


def test_a_constrained_tied_model_compiles_in_one_graph():
    # Every read of a tied chain's stored original looked up the calling frame
    # (sys._getframe), which dynamo cannot trace: fullgraph=True raised.
    from conftest import TiedNet, tokens

    torch.manual_seed(0)
    model = TiedNet()
    constrain(model, {"head.weight": Clamp(-0.1, 0.1)})
    fast, counter = compiled(model)
    x = tokens()
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    assert counter.frame_count == 1


def test_hard_gates_at_the_threshold_s_rounding_compile_to_the_eager_and_baked_gates():
    # Compiled code compared the gates with the Python threshold, rounded to float32 first:
    # a gate of float32(0.1) was open in eager code and after bake, closed when compiled.
    layer = nn.Linear(1, 1, bias=False)
    constrain(layer, {"weight": LearnableMask(hard=True, threshold=0.1)})
    mask = layer.parametrizations.weight[0]
    with torch.no_grad():
        layer.parametrizations.weight.original.fill_(1.0)
        mask.scores.fill_(torch.logit(torch.tensor(0.1, dtype=torch.float64)).item())
    x = torch.ones(1, 1)
    model, _ = compiled(layer)
    assert mask.sparsity == 0.0 and torch.equal(model(x), layer(x)) and layer(x).item() > 0

