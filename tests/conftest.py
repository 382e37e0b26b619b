import os

import pytest
import torch
from hypothesis import settings
from torch import nn

from torchconstrain import check

# CI runs the same examples every time (no flaky landing); local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


class SmallNet(nn.Module):
    """Two convs and a classifier: enough structure for rule matching."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class TiedNet(nn.Module):
    """An embedding and an output layer that share one weight, as language models tie them."""

    in_features = 12  # the vocabulary: inputs are token ids below it

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.emb(tokens))))


def tokens(n: int = 8) -> torch.Tensor:
    return torch.randint(0, TiedNet.in_features, (n,))


@pytest.fixture
def tied() -> TiedNet:
    torch.manual_seed(0)
    return TiedNet()


@pytest.fixture
def net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet()


def train_checked(model: nn.Module, steps: int = 5, lr: float = 1.0) -> None:
    """SGD steps (momentum) on a layer with ``in_features``, ``check`` after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, model.in_features)).pow(2).sum().backward()
        optimizer.step()
        check(model)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave untouched."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [(name, id(p)) for name, p in model.named_parameters()],
        "classes": [type(m) for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["params"] == before["params"]
    assert after["classes"] == before["classes"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
