"""Rule keys pick tensors by name, module name, glob, regex, module type or predicate; a key that matches nothing names the closest names."""

import pytest
from torch import nn

from torchconstrain import Clamp, LearnableMask, constrain, match


@pytest.mark.parametrize(
    "key, expected",
    [
        ("features.0.weight", ["features.0.weight"]),
        ("features.0", ["features.0.weight"]),  # a module name means its weight
        ("features.*.weight", ["features.0.weight", "features.1.weight", "features.3.weight"]),
        ("*.bias", ["features.0.bias", "features.1.bias", "features.3.bias", "head.bias"]),
        ("features.[03].weight", ["features.0.weight", "features.3.weight"]),
        (r"re:features\.\d\.weight", ["features.0.weight", "features.1.weight", "features.3.weight"]),
        (nn.Conv2d, ["features.0.weight", "features.3.weight"]),
        (lambda name, module: isinstance(module, nn.Linear), ["head.weight", "head.bias"]),
    ],
)
def test_keys_pick_tensors(net, key, expected):
    assert match(net, key) == expected
    report = constrain(net, {key: Clamp(-1, 1)})
    assert report.names() == expected


def test_regex_is_full_matched(net):
    assert match(net, "re:features") == []
    with pytest.raises(ValueError, match=r"rule 0 \(re:features\) matches no parameter"):
        constrain(net, {"re:features": Clamp(-1, 1)})


def test_names_stay_plain_on_a_constrained_model(net):
    constrain(net, {"head": LearnableMask()})
    assert match(net, "*") == [
        "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
        "features.3.weight", "features.3.bias", "head.weight", "head.bias",
    ]  # no '...original', and the mask's scores are never candidates
    assert match(net, nn.Linear) == ["head.weight"]


def test_strict_error_names_rule_and_closest_names(net):
    with pytest.raises(ValueError, match=r"rule 1 \(featurs.0.weight\) matches no parameter. Closest names: features.0.weight"):
        constrain(net, {"head": Clamp(-1, 1), "featurs.0.weight": Clamp(-1, 1)})
    with pytest.raises(ValueError, match=r"rule 0 \(Conv1d\) matches no parameter. Module types with parameters: BatchNorm2d, Conv2d, Linear"):
        constrain(net, {nn.Conv1d: Clamp(-1, 1)})


def test_non_strict_allows_unmatched_rules(net):
    report = constrain(net, {"nothing.here": Clamp(-1, 1), "head": Clamp(-1, 1)}, strict=False)
    assert report.names() == ["head.weight"]
