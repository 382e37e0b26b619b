import pytest
import torch
from torch import nn

from torchconstrain import (
    Clamp,
    FakeQuant,
    FixedMask,
    LearnableMask,
    MaxNorm,
    NonNeg,
    UnitNorm,
    check,
    constrain,
    penalty,
)

RULES = {
    "0": [Clamp(-0.3, 0.3), FixedMask.magnitude(sparsity=0.5)],
    "1": LearnableMask(strength=0.1),
    "2": [FixedMask.n_m(2, 4), MaxNorm(0.5)],
    "3": UnitNorm(),
    "4": [FixedMask.structured(sparsity=0.25), FakeQuant(4)],
    "5": NonNeg(),
    "*.bias": FixedMask.global_magnitude(sparsity=0.5),
}


def stack(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)]).to(device)


def test_constrain_inside_autocast_makes_the_same_constraints_as_outside():
    outside = stack()
    constrain(outside, RULES)
    inside = stack()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        constrain(inside, RULES)
    assert list(inside.state_dict()) == list(outside.state_dict())
    for key, value in outside.state_dict().items():
        assert torch.equal(inside.state_dict()[key], value), key


def train_under_autocast(model: nn.Module, device: str, dtype: torch.dtype, scaler=None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        with torch.autocast(device, dtype=dtype):
            out = model(torch.randn(8, 16, device=device))
            assert out.dtype == dtype
            loss = out.float().square().mean() + penalty(model)
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        for module in model:
            assert module.weight.dtype == torch.float32
        check(model)


def test_bfloat16_autocast_training_on_cpu_keeps_fp32_weights_feasible():
    model = stack()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        constrain(model, RULES)
    train_under_autocast(model, "cpu", torch.bfloat16)
    assert model[2].parametrizations.weight.original.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_autocast_training_on_cuda_keeps_fp32_weights_feasible():
    model = stack("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        constrain(model, RULES)
    train_under_autocast(model, "cuda", torch.float16, scaler=torch.amp.GradScaler("cuda"))
