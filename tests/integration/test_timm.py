"""timm models built with ``pretrained=False``, trained with timm's optimizer factory and its
EMA (``ModelEmaV3``, which interpolates every floating-point entry of ``state_dict`` and
copies the others), checked and baked."""

import pytest
import torch
from torch import nn

from torchconstrain import Clamp, FixedMask, LearnableMask, MaxNorm, NonNeg, PruningSchedule, bake, check, constrain, penalty

timm = pytest.importorskip("timm")
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402

MODELS = {
    "resnet18": ({}, {nn.Conv2d: Clamp(-0.2, 0.2), "fc.weight": FixedMask.magnitude(sparsity=0.0)}),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "init_values": 1e-5},
                             {"*.qkv.weight": FixedMask.magnitude(sparsity=0.0), "*.mlp.fc1.weight": LearnableMask(per="channel"),
                              "*.ls*.gamma": NonNeg()}),
    "convnext_atto": ({}, {"*.gamma": NonNeg(), "*.mlp.fc1.weight": MaxNorm(1.0), "head.fc.weight": FixedMask.magnitude(sparsity=0.0)}),
}


def build(name: str):
    options, rules = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **options)
    constrain(model, rules)
    return model


def originals(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if name.endswith(".original")}


@pytest.mark.parametrize("name", list(MODELS))
def test_training_with_timm_optimizer_and_ema_keeps_model_and_average_feasible(name):
    model = build(name)
    schedule = PruningSchedule(model, final_sparsity=0.5, end=2)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05)
    ema = ModelEmaV3(model, decay=0.5)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    averages = {key: p.detach().clone() for key, p in originals(model).items()}
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y) + penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update(model)
        for key, p in originals(model).items():
            averages[key].lerp_(p.detach(), 0.5)
    live, averaged = check(model), check(ema.module)  # no bound became NaN in the average
    for key, p in originals(ema.module).items():  # the average is of the stored originals ...
        torch.testing.assert_close(p, averages[key], rtol=1e-6, atol=1e-7)
    for row in live:  # ... under the live model's masks: timm copies the bool masks
        if row["constraints"][0].startswith("FixedMask"):
            assert averaged[row["tensor"]]["sparsity"] >= 0.5 and live[row["tensor"]]["sparsity"] >= 0.5
    ema.module.eval()
    expected = ema.module(x)
    bake(ema.module)
    torch.testing.assert_close(ema.module(x), expected, rtol=0, atol=0)


def test_ema_of_a_one_sided_bound_keeps_the_bound():
    """An absent bound is no buffer: interpolating ``inf`` with ``inf`` would give NaN."""
    model = build("convnext_atto")
    ema = ModelEmaV3(model, decay=0.9)
    ema.update(model)
    block = ema.module.stages[0].blocks[0]
    assert block.parametrizations.gamma[0].max is None
    assert bool((block.gamma >= 0).all()) and not block.gamma.isnan().any()
