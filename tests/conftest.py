import os

import pytest
import torch
from hypothesis import settings
from torch import nn

from torchconstrain import Constraint, check, penalty

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


class FailingForward(Constraint):
    """A user's constraint that halves its tensor, and whose forward fails once ``broken`` is set."""

    cacheable = True

    def forward(self, x):
        if self.__dict__.get("broken"):
            raise KeyError("forward failed")
        return x * 0.5


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



def train_gates(model: nn.Module, steps: int, size=(4, 3, 64, 64)) -> None:
    """Adam steps on an image model with learnable masks (the gates at a high learning rate),
    the penalty added to the loss, ``check`` after each."""
    scores = [p for name, p in model.named_parameters() if name.endswith("scores")]
    others = [p for name, p in model.named_parameters() if not name.endswith("scores")]
    optimizer = torch.optim.Adam([{"params": others, "lr": 1e-3}, {"params": scores, "lr": 1.5}])
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(torch.randn(*size)).square().mean() + penalty(model)
        loss.backward()
        optimizer.step()
        check(model)

def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave untouched."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [(name, id(p)) for name, p in model.named_parameters()],
        "classes": [type(m) for m in model.modules()],
        "parametrized": [name for name, m in model.named_modules() if hasattr(m, "parametrizations")],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """The model is as ``snapshot`` saw it: same tensors and values (shapes on the meta
    device, which has no values), same classes, the same modules parametrized."""
    after = snapshot(model)
    assert after["params"] == before["params"]
    assert after["classes"] == before["classes"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        if value.is_meta:
            assert after["state"][key].shape == value.shape, key
        else:
            assert torch.equal(after["state"][key], value), key
    assert after["parametrized"] == before["parametrized"]


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    r"""Give every BatchNorm2d of ``model`` non-trivial statistics and affine parameters; return ``model``."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.5, generator=generator)
    return model
