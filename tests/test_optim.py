import warnings

import pytest
import torch
from torch import nn

import torchconstrain.rules
from conftest import TiedNet
from torchconstrain import Clamp, FixedMask, LearnableMask, constrain, param_groups, unoptimized


class Layered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3)})
        self.layer2 = nn.ModuleDict({"conv1": nn.Conv2d(4, 4, 3), "conv2": nn.Conv2d(4, 4, 3), "bn": nn.BatchNorm2d(4)})
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.layer1["conv"](x)
        x = self.layer2["bn"](self.layer2["conv2"](self.layer2["conv1"](x)))
        return self.fc(x.mean(dim=(2, 3)))


def layered() -> Layered:
    torch.manual_seed(0)
    model = Layered()
    constrain(model, {"layer2.conv1": Clamp(-1, 1), "fc": LearnableMask(per="channel")})
    return model


def names(model: nn.Module, group: dict) -> list[str]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for p in group["params"]]


def test_weight_decay_on_chosen_layers_only_and_scores_on_their_own():
    model = layered()
    groups = param_groups(model, {"*": {"weight_decay": 0.0}, "layer2.conv*.weight": {"weight_decay": 0.5}},
                          scores={"lr": 1.0})
    assert [names(model, g) for g in groups] == [
        ["layer1.conv.weight", "layer1.conv.bias", "layer2.conv1.bias", "layer2.conv2.bias", "layer2.bn.weight",
         "layer2.bn.bias", "fc.bias", "fc.parametrizations.weight.original"],
        ["layer2.conv1.parametrizations.weight.original", "layer2.conv2.weight"],
        ["fc.parametrizations.weight.0.scores"],
    ]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.5, 0.0] and groups[2]["lr"] == 1.0
    optimizer = torch.optim.SGD(groups, lr=0.1)
    assert unoptimized(model, optimizer) == []
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.zero_grad()
    (0 * model(torch.randn(2, 3, 9, 9)).sum()).backward()  # zero gradients: only decay moves weights
    optimizer.step()
    for name, p in model.named_parameters():
        decayed = name.startswith(("layer2.conv1.parametrizations.weight.original", "layer2.conv2.weight"))
        torch.testing.assert_close(p.detach(), before[name] * (0.95 if decayed else 1.0), rtol=0, atol=1e-7, msg=name)


def test_later_rules_override_earlier_ones_and_plain_models_work():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    groups = param_groups(model, [(nn.Linear, {"lr": 0.1, "weight_decay": 1.0}), ("1.weight", {"lr": 0.2})])
    assert [(names(model, g), g.get("lr"), g.get("weight_decay")) for g in groups] == [
        (["0.weight"], 0.1, 1.0),
        (["0.bias", "1.bias"], None, None),  # the optimizer's defaults
        (["1.weight"], 0.2, 1.0),
    ]


def test_param_groups_refuses_rules_that_match_nothing_and_bad_options():
    model = layered()
    with pytest.raises(ValueError, match=r"param_groups: rule 0 \(layer2.conv3\) matches no parameter. Closest names"):
        param_groups(model, {"layer2.conv3": {"weight_decay": 0.1}})
    assert len(param_groups(model, {"layer2.conv3": {"weight_decay": 0.1}}, strict=False)) == 2
    with pytest.raises(TypeError, match=r"rule 0 \(fc\) options must be a dict of optimizer settings"):
        param_groups(model, {"fc": 0.1})
    with pytest.raises(TypeError, match="without 'params'"):
        param_groups(model, {"fc": {"params": []}})
    with pytest.raises(TypeError, match=r"param_groups: rule 0 key must be a name, glob"):
        param_groups(model, {3: {"lr": 0.1}})
    with pytest.raises(ValueError, match=r"param_groups: rule 0 \(re:\(\) is not a valid regex"):
        param_groups(model, {"re:(": {"lr": 0.1}})


def test_constrain_warns_about_new_parameters_an_earlier_optimizer_lacks():
    model = layered()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constrain(model, {"layer1.conv": FixedMask.magnitude(sparsity=0.5)}, optimizer=optimizer)  # nothing new
    with pytest.warns(UserWarning, match=r"constrain: 1 parameter\(s\) it created are not in the optimizer, so "
                                         r"they will not train: layer2.conv2.parametrizations.weight.0.scores"):
        constrain(model, {"layer2.conv2": LearnableMask()}, optimizer=optimizer)
    assert unoptimized(model, optimizer) == ["layer2.conv2.parametrizations.weight.0.scores"]
    optimizer.add_param_group({"params": [model.layer2.conv2.parametrizations.weight[0].scores], "weight_decay": 0.0})
    assert unoptimized(model, optimizer) == []


@pytest.mark.parametrize("apply", [constrain, torchconstrain.rules.constrain])
def test_the_warning_about_an_earlier_optimizer_points_at_the_call(apply):
    model = layered()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="not in the optimizer") as record:
        apply(model, {"layer2.conv2": LearnableMask()}, optimizer=optimizer)
    assert record[0].filename == __file__


@pytest.mark.parametrize("key", ["emb.weight", "head"])
def test_a_tied_parameter_is_one_entry_matched_by_any_of_its_names(key):
    torch.manual_seed(0)
    model = TiedNet()
    constrain(model, {"head": LearnableMask()})
    groups = param_groups(model, {key: {"weight_decay": 0.1}})
    assert [names(model, g) for g in groups] == [
        ["emb.parametrizations.weight.original"],
        ["emb.parametrizations.weight.0.scores"],
        ["body.weight", "body.bias"],
    ]
    assert groups[0]["weight_decay"] == 0.1
    assert unoptimized(model, torch.optim.AdamW(groups)) == []


def test_rules_reach_the_parameters_another_librarys_parametrization_computes_a_tensor_from():
    # weight_norm's two originals have no plain name: even "*" missed them, and they got
    # the optimizer's default weight decay silently.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    nn.utils.parametrizations.weight_norm(model[0])
    constrain(model, {"1": Clamp(-0.1, 0.1)})
    groups = param_groups(model, {"*": {"weight_decay": 0.0}, "0.weight": {"lr": 0.5}})
    options = {id(p): (g.get("weight_decay"), g.get("lr")) for g in groups for p in g["params"]}
    normed = model[0].parametrizations.weight
    assert options[id(normed.original0)] == options[id(normed.original1)] == (0.0, 0.5)
    assert options[id(model[0].bias)] == options[id(model[1].bias)] == (0.0, None)
