"""Rule keys pick tensors by name, module name, glob, regex, module type or predicate; a key that matches nothing names the closest names."""

import re

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.nn.utils import parametrizations

from torchconstrain import Clamp, LearnableMask, constrain, match
from torchconstrain.keys import label


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


class Recurrent(nn.Module):
    """Modules whose tensors are not called ``weight``, next to one whose are."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 4)
        self.gru = nn.GRU(4, 4, num_layers=2)
        self.attention = nn.MultiheadAttention(4, 2)
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize(
    "key, tensors",
    [
        (nn.LSTM, "lstm \\(LSTM\\) has no tensor named 'weight'.*its tensors are weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0"),
        (nn.GRU, "gru \\(GRU\\) has no tensor named 'weight'.*weight_ih_l1, weight_hh_l1"),
        (nn.MultiheadAttention, "attention \\(MultiheadAttention\\) has no tensor named 'weight'.*in_proj_weight, in_proj_bias"),
        ("lstm", "lstm \\(LSTM\\) has no tensor named 'weight'"),
        ("lstm.weight", "lstm \\(LSTM\\) has no tensor named 'weight'"),
    ],
)
def test_keys_for_modules_without_a_weight_say_what_their_tensors_are_called(key, tensors):
    model = Recurrent()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"rule 0 \\({label(key)}\\) matches no parameter. {tensors}") as caught:
        constrain(model, {key: Clamp(-1, 1)})
    assert_unchanged(model, before)
    offered = re.search(r"Pick them by name: '([^']+)'", str(caught.value)).group(1)
    assert constrain(model, {offered: Clamp(-1, 1)}).names() == [offered]  # the name offered is one that works


def test_a_type_key_on_a_root_module_without_a_weight_names_its_tensors():
    model = nn.LSTM(4, 4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="The model \\(LSTM\\) has no tensor named 'weight'.*weight_ih_l0") as caught:
        constrain(model, {nn.LSTM: Clamp(-1, 1)})
    assert_unchanged(model, before)
    offered = re.search(r"Pick them by name: '([^']+)'", str(caught.value)).group(1)
    assert constrain(model, {offered: Clamp(-1, 1)}).names() == ["weight_ih_l0"]


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_a_weight_under_another_librarys_parametrization_says_so():
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(4, 4, bias=False)),
        torch.nn.utils.weight_norm(nn.Linear(4, 4)),
        torch.nn.utils.spectral_norm(nn.Linear(4, 4)),
    )
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"0 \(Linear\): weight is under _WeightNorm, another library's parametrization "
                       r"with 2 stored originals \(original0, original1\)"):
        constrain(model, {"0": Clamp(-1, 1)})
    with pytest.raises(ValueError, match=r"1 \(Linear\): weight is computed before each forward by the WeightNorm hook "
                       r"\(torch.nn.utils.weight_norm\) from weight_g, weight_v"):
        constrain(model, {"1.weight": Clamp(-1, 1)})
    with pytest.raises(ValueError, match=r"2 \(Linear\): weight is computed .* SpectralNorm hook .* from weight_orig"):
        constrain(model, {"2": Clamp(-1, 1)})
    assert_unchanged(model, before)


def test_a_module_instance_is_not_a_key(net):
    before = snapshot(net)
    with pytest.raises(TypeError, match=r"constrain: rule 0 key is a module instance \(Linear\).*name in the model.*class Linear"):
        constrain(net, {net.head: Clamp(-1, 1)})
    with pytest.raises(TypeError, match=r"match: key is a module instance \(Linear\)"):
        match(net, net.head)
    assert_unchanged(net, before)


def test_errors_of_a_callable_key_name_the_rule(net):
    before = snapshot(net)

    def by_depth(fqn, module):
        return int(fqn.split(".")[1]) > 0  # "head.weight" has no depth

    with pytest.raises(ValueError, match=r"rule 1 \(by_depth\) key, called on 'head.weight' raised ValueError: invalid literal") as caught:
        constrain(net, [("head", Clamp(-1, 1)), (by_depth, Clamp(-1, 1))])
    assert isinstance(caught.value.__cause__, ValueError)
    with pytest.raises(ZeroDivisionError, match=r"match: key \(<lambda>\), called on 'features.0.weight' raised") as caught:
        match(net, lambda fqn, module: 1 / 0)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    with pytest.raises(RuntimeError, match=r"rule 0 \(<lambda>\) key, called on 'features.0.weight' raised KeyError: 'x'") as caught:
        constrain(net, {lambda fqn, module: {}["x"]: Clamp(-1, 1)})
    assert isinstance(caught.value.__cause__, KeyError)  # KeyError quotes its message: a RuntimeError says it plainly
    with pytest.raises(TypeError, match=r"rule 0 \(<lambda>\) key must be callable as \(fqn, module\). Got <lambda>\(fqn\)"):
        constrain(net, {lambda fqn: True: Clamp(-1, 1)})
    with pytest.raises(TypeError, match=r"rule 0 \(<lambda>\) key must return True or False.*Got a tensor of shape \(\) for 'features.0.weight'"):
        constrain(net, {lambda fqn, module: torch.tensor(True): Clamp(-1, 1)})
    assert_unchanged(net, before)


@pytest.mark.parametrize("key, first", [("2", "'0'"), ("2.weight", "'0.weight'")])
def test_a_key_naming_a_reused_module_by_its_second_name_is_told_the_first(key, first):
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.ReLU(), layer)  # its parameters go by their first name
    with pytest.raises(ValueError, match=rf"names a module used twice in the model: its tensors go by its first name. Use {first}"):
        constrain(model, {key: Clamp(-1, 1)})
    assert not hasattr(layer, "parametrizations")


@pytest.mark.parametrize("key, hint", [
    ("1.running_mean", r"'1.running_mean' names a buffer: constraints apply to parameters"),
    ("1.running_*", r"'1.running_\*' names a buffer \(1.running_mean\): constraints apply to parameters"),
])
def test_a_key_naming_a_buffer_says_so(key, hint):
    # It said only "matches no parameter. Pass strict=False", which would then do nothing.
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=hint):
        constrain(model, {key: Clamp(-1, 1)})


@pytest.mark.parametrize("wrap, prefix, wrapper", [
    (nn.DataParallel, "module.", "nn.DataParallel"),
    (torch.compile, "_orig_mod.", "torch.compile"),
])
def test_a_key_of_a_wrapped_model_names_the_wrapper(wrap, prefix, wrapper):
    inner = nn.Sequential(nn.Linear(4, 4))
    for key in ("0", r"re:0\.weight"):
        with pytest.raises(ValueError, match=rf"matches no parameter. The model wraps another \({wrapper}\), and its "
                                             rf"names start with '{re.escape(prefix)}': constrain the model it wraps"):
            constrain(wrap(inner), {key: Clamp(-1, 1)})
    assert not hasattr(inner[0], "parametrizations")


def test_a_model_of_one_s_own_with_a_child_named_module_is_not_called_a_wrapper():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)

    with pytest.raises(ValueError) as error:
        constrain(Holder(), {"weight": Clamp(-1, 1)})
    assert "wraps another" not in str(error.value)


@pytest.mark.parametrize("rules", [
    lambda: {lambda fqn, module: next(iter([])): Clamp(-1, 1)},
    lambda: {"0": lambda fqn, tensor: next(iter([]))},
])
def test_a_stop_iteration_from_a_users_callable_comes_back_naming_the_rule(rules):
    # Leaving the generator-based context manager that names the rule, it escaped as a
    # bare StopIteration with an empty message.
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match=r"rule 0 .* raised StopIteration") as error:
        constrain(model, rules())
    assert isinstance(error.value.__cause__, StopIteration)
