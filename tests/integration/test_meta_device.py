"""Meta-device initialization: constrain a model built under ``torch.device("meta")``, then
``to_empty`` and ``load_state_dict``: the same model as constraining the loaded one."""

import pytest
import torch
import torchvision
from conftest import assert_unchanged, snapshot
from torch import nn

from torchconstrain import (
    L1,
    Clamp,
    FakeQuant,
    FixedMask,
    LearnableMask,
    MaxNorm,
    NonNeg,
    UnitNorm,
    bake,
    check,
    constrain,
    penalty,
)

# Constraints that read no weight values when they bind: their state comes from the
# template (bounds, the temperature), the shape (scores, a random mask) or nothing.
RULE_SETS = {
    "boxes and norms": lambda: {
        "conv1": Clamp(torch.full((64,), -0.02), torch.linspace(0.01, 0.1, 64)),
        "layer1.0.conv1": NonNeg(),
        "layer2.*.conv1.weight": MaxNorm(0.5),
        "fc": UnitNorm(dim=1),
    },
    "masks": lambda: {
        "conv1": [FixedMask.random(sparsity=0.5, seed=1), FakeQuant(6)],
        "layer1.0.conv2": FixedMask(torch.arange(64 * 64 * 9).reshape(64, 64, 3, 3) % 3 != 0),
        "layer3.*.conv1.weight": LearnableMask(per="channel", init=0.7, temperature=0.5),
        nn.Linear: [Clamp(-0.05, 0.05), LearnableMask(strength=0.1)],
        "layer4.0.conv1": L1(0.01),
    },
}


@pytest.fixture(scope="module")
def pretrained() -> dict:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def on_meta() -> nn.Module:
    with torch.device("meta"):
        return torchvision.models.resnet18(weights=None)


@pytest.mark.parametrize("name", RULE_SETS)
def test_constrain_on_meta_then_load_equals_constraining_the_loaded_model(name, pretrained):
    model = on_meta()
    report = constrain(model, RULE_SETS[name]())
    assert model.conv1.parametrizations.weight.original.is_meta
    model.to_empty(device="cpu")
    model.load_state_dict(pretrained)

    loaded = torchvision.models.resnet18(weights=None)
    loaded.load_state_dict(pretrained)
    assert str(report) == str(constrain(loaded, RULE_SETS[name]()))  # bounds, sparsities as bound
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    check(model)
    model.eval(), loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert torch.equal(penalty(model), penalty(loaded))
    bake(model), bake(loaded)
    assert torch.equal(model(x), loaded(x))


def test_a_meta_model_also_takes_a_constrained_checkpoint(pretrained):
    loaded = torchvision.models.resnet18(weights=None)
    loaded.load_state_dict(pretrained)
    constrain(loaded, {"conv1": LearnableMask(), "fc": Clamp(-0.01, 0.01)})
    with torch.no_grad():
        loaded.conv1.parametrizations.weight[0].scores.uniform_(-3, 3)  # trained scores
    model = on_meta()
    constrain(model, {"conv1": LearnableMask(), "fc": Clamp(-0.01, 0.01)})
    model.to_empty(device="cpu")
    model.load_state_dict(loaded.state_dict())
    assert torch.equal(model.conv1.weight, loaded.conv1.weight)


@pytest.mark.parametrize(
    "template",
    [
        FixedMask.magnitude(sparsity=0.5),
        FixedMask.magnitude(threshold=0.01),
        FixedMask.global_magnitude(sparsity=0.5),
        FixedMask.structured(sparsity=0.5),
        FixedMask.n_m(2, 4),
    ],
    ids=repr,
)
def test_templates_that_read_the_weights_need_real_weights_first(template):
    model = on_meta()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^rule 1 \(Conv2d\): conv1.weight: FixedMask\(.*\) chooses from the tensor's "
                       r"values, but it is on the meta device \(no values\). Load real weights first"):
        constrain(model, [("fc", Clamp(-1, 1)), (nn.Conv2d, template)], strict=False)
    with pytest.raises(ValueError, match="on the meta device"):
        constrain(model, {"fc": lambda fqn, tensor: [Clamp(-1, 1), template]})
    assert_unchanged(model, before)


def test_check_and_bake_ask_for_real_weights_and_messages_show_the_bound_values():
    model = on_meta()
    report = constrain(model, {"fc": [Clamp(-0.5, 0.5), LearnableMask(temperature=0.5)]})
    assert report["fc.weight"]["constraints"] == [
        "Clamp(min=-0.5, max=0.5)", "LearnableMask(per='element', temperature=0.5, threshold=0.5, strength=0.001)",
    ]
    assert "Clamp(min=-0.5, max=0.5)" in repr(model.fc)
    for call in (check, bake):
        with pytest.raises(ValueError, match=rf"{call.__name__}: fc.weight is on the meta device: it has no values yet"):
            call(model)
    assert model.fc(torch.empty(2, 512, device="meta")).shape == (2, 1000)  # shape inference still runs


def test_load_state_dict_with_assign_gives_a_meta_model_its_weights_and_constraint_state(pretrained):
    rules = {"conv1": [Clamp(-0.1, 0.1), LearnableMask(init=0.6)], "fc": FixedMask.random(sparsity=0.5, seed=0)}
    model = on_meta()
    constrain(model, rules)
    model.load_state_dict(pretrained, assign=True)  # a plain checkpoint: the constraints keep their bound state
    assert not any(t.is_meta for t in model.state_dict().values())
    loaded = torchvision.models.resnet18(weights=None)
    loaded.load_state_dict(pretrained)
    constrain(loaded, rules)
    for key, value in loaded.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with torch.no_grad():
        loaded.conv1.parametrizations.weight[1].scores.uniform_(-3, 3)
    again = on_meta()
    constrain(again, rules)
    again.load_state_dict(loaded.state_dict(), assign=True)  # a constrained one: its state wins
    assert torch.equal(again.conv1.weight, loaded.conv1.weight)
    again.to(torch.float64)  # moving it later keeps what was loaded
    scores = again.conv1.parametrizations.weight[1].scores
    assert torch.equal(scores, loaded.conv1.parametrizations.weight[1].scores.double())
    check(again)


def test_contradictions_are_refused_on_the_meta_device_too():
    model = on_meta()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"fc.weight: Clamp\(min=0.1, max=1\) from rule 0 \(fc\) cannot follow FixedMask"):
        constrain(model, {"fc": [FixedMask.random(sparsity=0.5, seed=0), Clamp(0.1, 1.0)]})
    with pytest.raises(ValueError, match=r"fc.weight: Clamp\(min=0.1, max=1\) from rule 0 \(fc\) cannot follow LearnableMask"):
        constrain(model, {"fc": [LearnableMask(), Clamp(0.1, 1.0)]})
    assert_unchanged(model, before)


def test_a_tied_tensor_gets_its_constraints_values_once_through_both_names():
    # to_empty reaches a tied tensor's one chain under each name: the second visit emptied
    # the mask and bounds the first had just restored.
    from conftest import TiedNet, tokens

    torch.manual_seed(0)
    state = TiedNet().state_dict()
    rules = lambda: {"head": [FixedMask.random(sparsity=0.5, seed=0), Clamp(-0.05, 0.05)]}
    loaded_first = TiedNet()
    loaded_first.load_state_dict(state)
    constrain(loaded_first, rules())
    with torch.device("meta"):
        model = TiedNet()
    constrain(model, rules())
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    check(model)
    assert torch.equal(model.state_dict()["head.parametrizations.weight.0.mask"],
                       loaded_first.state_dict()["head.parametrizations.weight.0.mask"])
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), loaded_first(x))
