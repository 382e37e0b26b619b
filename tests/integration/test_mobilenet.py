import pytest
import torch
import torchvision
from torch import nn

from torchconstrain import Clamp, FixedMask, LearnableMask, bake, check, constrain, penalty


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)


MIXED_RULES = {
    r"re:features\.\d+\.block\.1\.0\.weight": Clamp(-0.5, 0.5),  # depthwise convs of blocks with an expand conv
    "features.*.block.0.0.weight": FixedMask.magnitude(sparsity=0.5),  # expand convs
    "features.0.0": None,  # the stem stays free
    "classifier.3": LearnableMask(strength=0.1),
}


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
])
def test_mobilenet_v3_small_trains_checks_and_bakes_into_a_stock_model(make_optimizer):
    model = small()
    report = constrain(model, MIXED_RULES)
    assert "features.0.0.weight" not in report.names()
    assert "classifier.3.weight" in report.names()
    optimizer = make_optimizer(model.parameters())
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y) + penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        check(model)
    model.eval()
    with torch.no_grad():
        constrained = model(x)
        bake(model)
        baked = model(x)
    assert torch.equal(baked, constrained)  # every gate is still above the threshold
    stock = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    assert list(stock.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert torch.equal(stock(x), baked)
    expand = model.features[2].block[0][0].weight
    assert (expand == 0).float().mean().item() == 0.5


def test_state_dict_round_trip_into_an_identically_constrained_model():
    source, target = small(0), small(1)
    constrain(source, MIXED_RULES)
    constrain(target, MIXED_RULES)
    with torch.no_grad():
        source.classifier[3].parametrizations.weight[0].scores.normal_()
    target.load_state_dict(source.state_dict(), strict=True)
    source.eval(), target.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))
