import copy
import io
import math

import pytest
import torch
import torchvision
from conftest import FailingForward, SmallNet, TiedNet, tokens
from torch import nn
from torch.optim.swa_utils import AveragedModel

from torchconstrain import (
    CheckpointMismatch,
    Clamp,
    FakeQuant,
    FixedMask,
    LearnableMask,
    MaxNorm,
    NonNeg,
    PruningSchedule,
    UnitNorm,
    bake,
    check,
    constrain,
    penalty,
)

# Constraints that do not look at the weights' values: either order gives the same model.
VALUE_FREE = {
    "features.0": [Clamp(-0.1, 0.1), FixedMask.random(sparsity=0.5, seed=3)],
    "features.1.weight": NonNeg(),
    "features.3": [FakeQuant(4), MaxNorm(0.5)],
    "head": LearnableMask(per="channel", init=0.7),
}


def net(seed: int) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet()


def trained(rules, steps: int = 3) -> SmallNet:
    model = net(0)
    constrain(model, rules)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        (model(torch.randn(4, 3, 9, 9)).square().mean() + penalty(model)).backward()
        optimizer.step()
    return model


def state(model: nn.Module) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(first: dict, second: dict) -> None:
    assert list(first) == list(second)
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def saved_and_loaded(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_round_trip_into_an_identically_constrained_model_keeps_scores_masks_and_temperatures():
    rules = {**VALUE_FREE, "features.3": FixedMask.magnitude(sparsity=0.0)}
    source = trained(rules)
    PruningSchedule(source, final_sparsity=0.5, end=1, key="features.3").step()
    with torch.no_grad():
        source.head.parametrizations.weight[0].temperature.fill_(0.3)
    target = net(1)
    constrain(target, rules)
    target.load_state_dict(source.state_dict(), strict=True)
    assert_same_state(state(target), state(source))
    assert (target.features[3].weight == 0).float().mean().item() == 0.5
    check(target)


def test_plain_state_dict_loads_with_strict_and_either_order_gives_the_same_model():
    pretrained = net(7).state_dict()
    constrained_first = net(0)
    constrain(constrained_first, VALUE_FREE)
    result = constrained_first.load_state_dict(pretrained, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded_first = net(1)
    loaded_first.load_state_dict(pretrained)
    constrain(loaded_first, VALUE_FREE)
    assert_same_state(state(constrained_first), state(loaded_first))
    check(constrained_first)


def test_torchvision_checkpoints_load_into_constrained_models_and_baked_ones_into_stock_models():
    torch.manual_seed(1)
    pretrained = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    rules = {nn.Conv2d: Clamp(-0.5, 0.5), "classifier.3": LearnableMask()}
    constrain(model, rules)
    model.load_state_dict(pretrained.state_dict(), strict=True)
    constrain(pretrained, rules)
    model.eval(), pretrained.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(pretrained(x), expected)
    bake(model)
    stock = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(stock(x), expected)


def test_plain_load_into_value_dependent_masks_keeps_the_models_masks():
    # A magnitude mask is chosen from the weights constrain sees: loading a plain
    # checkpoint afterwards keeps that mask; to pick it from the checkpoint, load first.
    pretrained = net(7).state_dict()
    rules = {"features.3": FixedMask.magnitude(sparsity=0.5)}
    constrained_first = net(0)
    constrain(constrained_first, rules)
    mask = constrained_first.features[3].parametrizations.weight[0].mask.clone()
    constrained_first.load_state_dict(pretrained, strict=True)
    assert torch.equal(constrained_first.features[3].parametrizations.weight[0].mask, mask)
    loaded_first = net(0)
    loaded_first.load_state_dict(pretrained)
    constrain(loaded_first, rules)
    chosen = pretrained["features.3.weight"].abs() > pretrained["features.3.weight"].abs().median()
    assert torch.equal(loaded_first.features[3].parametrizations.weight[0].mask, chosen)
    check(constrained_first), check(loaded_first)


def test_plain_keys_load_into_a_constrained_submodule_and_with_assign():
    model = net(0)
    constrain(model, {"head": Clamp(-0.01, 0.01)})
    plain = nn.Linear(8, 4)
    model.head.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(model.head.weight, plain.weight.clamp(-0.01, 0.01), rtol=0, atol=0)
    model.load_state_dict(net(3).state_dict(), strict=True, assign=True)
    check(model)


def test_wrapped_models_load_plain_keys_and_check_them_under_their_prefix():
    model = net(0)
    constrain(model, VALUE_FREE)
    averaged = AveragedModel(model)
    plain = {f"module.{key}": value for key, value in net(3).state_dict().items()}
    averaged.load_state_dict({**plain, "n_averaged": torch.tensor(2)}, strict=True)
    check(averaged.module)
    plain["module.head.weight"] = torch.zeros(3, 8)
    with pytest.raises(CheckpointMismatch, match=r"module.head.weight: shape \(3, 8\) in the checkpoint"):
        averaged.load_state_dict({**plain, "n_averaged": torch.tensor(2)})


def test_wrong_shapes_name_every_tensor_and_load_nothing():
    model = net(0)
    constrain(model, VALUE_FREE)
    before = state(model)
    other = net(5)
    other.head = nn.Linear(8, 5)
    with pytest.raises(CheckpointMismatch, match=r"Nothing was loaded") as error:
        model.load_state_dict(other.state_dict())
    assert [p.split(":")[0] for p in error.value.problems] == ["head.weight", "head.bias"]
    assert "shape (5, 8) in the checkpoint, (4, 8) in the model" in str(error.value)
    assert_same_state(state(model), before)  # features were not loaded either


def _set(key: str, value):
    return lambda checkpoint: checkpoint.__setitem__(key, value)


MIN, MASK, TEMPERATURE = (
    "features.0.parametrizations.weight.0.min",
    "features.0.parametrizations.weight.1.mask",
    "head.parametrizations.weight.0.temperature",
)
BAD_STATE = [
    (_set(MASK, torch.ones(8, 3, 3, 2)), "features.0.parametrizations.weight.1.mask", r"shape \(8, 3, 3, 2\) in the checkpoint"),
    (_set(MASK, torch.full((8, 3, 3, 3), 0.5)), "features.0.weight", r"FixedMask .*expected a mask of 0s and 1s"),
    (_set(MASK, torch.full((8, 3, 3, 3), math.nan)), "features.0.weight", r"FixedMask .*Got 216 other values \(nan"),
    (_set(MASK, torch.full((8, 3, 3, 3), -1.0)), "features.0.weight", r"FixedMask .*Got 216 other values \(-1"),
    (_set(MIN, torch.tensor(0.2)), "features.0.weight", r"Clamp .*min > max"),
    # A box without 0 before a mask, which constrain refuses: masked entries left it.
    (_set(MIN, torch.tensor(0.05)), "features.0.weight",
     r"with the checkpoint's state, FixedMask\(.*\) cannot follow Clamp\(min=0.05, max=0.1\): .* cannot always hold"),
    # A Clamp's checkpoint has a NonNeg's keys: loaded, NonNeg() held -1 and check passed.
    (_set("features.1.parametrizations.weight.0.min", torch.tensor(-1.0)), "features.1.weight",
     r"NonNeg .*NonNeg's min is 0. Got min=-1"),
    (_set(MIN, torch.tensor(math.inf)), "features.0.weight", r"Clamp .*min is inf, which would make every entry inf"),
    (_set(MIN, torch.tensor(math.nan)), "features.0.weight", r"Clamp .*min contains NaN"),
    (_set("features.0.parametrizations.weight.0.max", torch.tensor(-math.inf)), "features.0.weight", r"Clamp .*max is -inf"),
    (_set(TEMPERATURE, torch.tensor(-1.0)), "head.weight", r"LearnableMask .*expected temperature to be a finite number > 0. Got -1"),
    (_set(TEMPERATURE, torch.tensor(0.0)), "head.weight", r"LearnableMask .*temperature .*Got 0"),
    (_set(TEMPERATURE, torch.tensor(math.inf)), "head.weight", r"LearnableMask .*temperature .*Got inf"),
    (_set("head.parametrizations.weight.0.scores", torch.full((4, 1), math.nan)), "head.weight",
     r"LearnableMask .*expected scores without NaN .*Got 4 NaN of 4"),
    (_set("features.3.parametrizations.weight.2.mask", torch.ones(8, 8, 3, 3, dtype=torch.bool)),
     "features.3.weight", r"constraint state \['2.mask', 'original'\], the model's constraints have \['original'\]"),
]


def _owner(culprit: str) -> str:
    """The module that owns the tensor ``culprit`` names (or whose constraint state it is)."""
    head, found, _ = culprit.partition(".parametrizations")
    return head if found else culprit.rsplit(".", 1)[0]


def _load(model: nn.Module, checkpoint: dict, culprit: str, path: str) -> None:
    """Load ``checkpoint`` the way ``path`` names: into the whole model (copying or with
    ``assign=True``) or into the module that owns the culprit tensor."""
    if path in ("model", "assign"):
        model.load_state_dict(checkpoint, strict=False, assign=path == "assign")
        return
    owner = _owner(culprit) + "."
    part = {key[len(owner):]: value for key, value in checkpoint.items() if key.startswith(owner)}
    model.get_submodule(owner[:-1]).load_state_dict(part, strict=False)


@pytest.fixture(scope="module")
def trained_checkpoint() -> dict:
    return trained(VALUE_FREE).state_dict()


@pytest.mark.parametrize("path", ["model", "assign", "submodule"])
@pytest.mark.parametrize("edit, culprit, message", BAD_STATE)
def test_constraint_state_that_does_not_fit_is_refused_before_loading(edit, culprit, message, path, trained_checkpoint):
    checkpoint = dict(trained_checkpoint)
    edit(checkpoint)
    model = net(1)
    constrain(model, VALUE_FREE)
    before = state(model)
    with pytest.raises(CheckpointMismatch, match=message) as error:
        _load(model, checkpoint, culprit, path)
    expected = culprit if path != "submodule" else culprit[len(_owner(culprit)) + 1:]
    assert error.value.problems[0].startswith(expected)
    assert_same_state(state(model), before)


def test_constraint_state_loaded_into_a_constraint_or_its_parametrization_list_is_checked():
    model = net(1)
    constrain(model, VALUE_FREE)
    before = state(model)
    chain = model.features[0].parametrizations.weight
    with pytest.raises(CheckpointMismatch, match=r"^load_state_dict: .* Nothing was loaded.\n  Clamp: min > max"):
        chain[0].load_state_dict({"min": torch.tensor(1.0), "max": torch.tensor(0.0)})
    with pytest.raises(CheckpointMismatch, match=r"  1: FixedMask: expected a mask of 0s and 1s"):
        chain.load_state_dict({**chain.state_dict(), "1.mask": torch.full((8, 3, 3, 3), 2.0)})
    with pytest.raises(CheckpointMismatch, match=r"  the tensor: with the checkpoint's state, FixedMask.* cannot follow "
                                                 r"Clamp\(min=0.05, max=0.1\)"):
        chain.load_state_dict({**chain.state_dict(), "0.min": torch.tensor(0.05)})  # a box without 0 before a mask
    wrapper = nn.ModuleList([model.head])  # not constrained itself: the head checks what it gets
    with pytest.raises(CheckpointMismatch, match=r"  0.weight: LearnableMask \(0.parametrizations.weight.0\)"):
        wrapper.load_state_dict({"0.parametrizations.weight.0.temperature": torch.tensor(-1.0)}, strict=False)
    assert_same_state(state(model), before)


def test_assign_stores_constraint_state_in_the_constraints_dtypes():
    source = trained(VALUE_FREE)
    checkpoint = source.state_dict()
    checkpoint[MASK] = checkpoint[MASK].float()  # a 0/1 mask saved as floats
    checkpoint[MIN] = checkpoint[MIN].double()
    copied, assigned = net(1), net(1)
    for model in (copied, assigned):
        constrain(model, VALUE_FREE)
    copied.load_state_dict(checkpoint)
    assigned.load_state_dict(checkpoint, assign=True)
    assert assigned.features[0].parametrizations.weight[1].mask.dtype == torch.bool
    assert assigned.features[0].parametrizations.weight[0].min.dtype == torch.float32
    assert_same_state(state(assigned), state(copied))
    assert [str(row) for row in check(assigned)] == [str(row) for row in check(copied)]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.equal(assigned(x), copied(x))
    bake(assigned), bake(copied)
    assert_same_state(state(assigned), state(copied))


def test_constrained_checkpoint_into_a_model_without_those_constraints_is_refused():
    source = trained(VALUE_FREE)
    model = net(1)
    constrain(model, {"head": LearnableMask(per="channel", init=0.7)})
    before = state(model)
    with pytest.raises(CheckpointMismatch, match=r"features.0.weight: the checkpoint has constraint state") as error:
        model.load_state_dict(source.state_dict(), strict=False)
    assert {p.split(":")[0] for p in error.value.problems} == {"features.0.weight", "features.1.weight", "features.3.weight"}
    assert "Constrain the model with the checkpoint's rules first" in str(error.value)
    assert_same_state(state(model), before)


def test_baked_state_dict_loads_into_the_plain_model_and_bake_removes_the_checks():
    model = trained(VALUE_FREE)
    bake(model)
    assert not any(m._load_state_dict_pre_hooks for m in model.modules())
    SmallNet().load_state_dict(model.state_dict(), strict=True)


def test_torch_save_of_a_whole_constrained_model_round_trips():
    model = trained(VALUE_FREE).eval()
    loaded = saved_and_loaded(model).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
    assert_same_state(state(loaded), state(model))
    assert [str(row) for row in check(loaded)] == [str(row) for row in check(model)]
    loaded.train()
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.5)
    loaded(x).square().mean().backward()
    optimizer.step()
    check(loaded)
    loaded.load_state_dict(net(4).state_dict(), strict=True)  # plain keys still load
    bake(loaded)
    assert type(loaded.features[0]) is nn.Conv2d
    with torch.no_grad():
        assert torch.equal(model(x), expected) and len(check(model)) == 4  # the original is untouched


def test_pickled_and_copied_modules_get_classes_of_their_own():
    layer = nn.Linear(3, 3)  # the constrained model is itself parametrized (its hook refers to it)
    constrain(layer, {"weight": Clamp(-0.1, 0.1)})
    for twin in (saved_and_loaded(layer), copy.deepcopy(layer)):
        assert type(twin) is not type(layer) and type(twin).__name__ == "ParametrizedLinear"
        twin.load_state_dict(nn.Linear(3, 3).state_dict(), strict=True)
        check(twin)
        bake(twin)
        assert type(twin) is nn.Linear
        assert layer.weight.abs().max() <= 0.1 and len(check(layer)) == 1


# --- tied parameters ---------------------------------------------------------------------

TIED_RULES = {"head": [FixedMask.magnitude(sparsity=0.5), Clamp(-0.2, 0.2)], "*.weight": LearnableMask(init=0.7)}


def tied_net(seed: int) -> TiedNet:
    torch.manual_seed(seed)
    return TiedNet()


def trained_tied(seed: int = 0) -> TiedNet:
    model = tied_net(seed)
    constrain(model, TIED_RULES)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        (model(tokens()).square().mean() + penalty(model)).backward()
        optimizer.step()
    return model


def assert_tied(model: TiedNet) -> None:
    chain = model.emb.parametrizations.weight
    assert model.head.parametrizations.weight is chain
    assert torch.equal(model.emb.weight, model.head.weight)


def test_a_tied_parameters_state_dict_holds_its_chain_under_every_name_and_round_trips():
    source = trained_tied()
    checkpoint = source.state_dict()
    inner = [key.split(".", 1)[1] for key in checkpoint if key.startswith(("emb.parametrizations", "head."))]
    assert inner[: len(inner) // 2] == inner[len(inner) // 2 :]  # the same entries under both names...
    assert checkpoint["head.parametrizations.weight.original"].data_ptr() == (
        checkpoint["emb.parametrizations.weight.original"].data_ptr()  # ...holding one tensor
    )
    model = tied_net(1)
    constrain(model, TIED_RULES)
    model.load_state_dict(checkpoint, strict=True)
    assert_tied(model)
    assert_same_state(state(model), state(source))
    x = tokens()
    assert torch.equal(model(x), source(x))
    for twin in (saved_and_loaded(model), copy.deepcopy(model)):
        assert_tied(twin)
        assert twin.emb.parametrizations.weight is not model.emb.parametrizations.weight
        assert torch.equal(twin(x), source(x))
        bake(twin)
        assert twin.head.weight is twin.emb.weight
    assert torch.equal(model(x), source(x))  # the copies' bakes did not reach the model


def test_a_plain_tied_checkpoint_loads_into_every_name():
    model = tied_net(0)
    constrain(model, TIED_RULES)
    plain = tied_net(1).state_dict()
    model.load_state_dict(plain, strict=True)
    assert_tied(model)
    chain = model.emb.parametrizations.weight
    assert torch.equal(chain.original, chain[0].right_inverse(plain["emb.weight"]))  # as constrain stores it
    assert torch.equal(model.head.weight, chain[2](chain[1](chain[0](plain["head.weight"]))))


def test_different_values_under_the_names_of_one_tensor_are_refused():
    model = tied_net(0)
    constrain(model, TIED_RULES)
    before = state(model)
    plain = tied_net(1).state_dict()
    plain["head.weight"] = plain["head.weight"] + 1  # an untied checkpoint
    with pytest.raises(CheckpointMismatch, match=r"emb.parametrizations.weight.original: one tensor in the model "
                       r"with head.parametrizations.weight.original \(tied weights\)"):
        model.load_state_dict(plain, strict=True)
    assert_same_state(state(model), before)


def test_bad_constraint_state_under_the_second_name_of_a_tied_tensor_is_refused():
    checkpoint = trained_tied().state_dict()
    checkpoint["head.parametrizations.weight.0.mask"] = torch.full((12, 6), 0.5)
    model = tied_net(1)
    constrain(model, TIED_RULES)
    before = state(model)
    with pytest.raises(CheckpointMismatch, match=r"head.weight: FixedMask .*expected a mask of 0s and 1s"):
        model.load_state_dict(checkpoint, strict=True)
    assert_same_state(state(model), before)


def test_a_plain_checkpoint_whose_weights_break_the_constraints_is_refused_as_constrain_refuses_them():
    weight = torch.randn(3, 4)
    weight[1] = 0.0  # a pruned output row: UnitNorm cannot normalize it
    state = {"weight": weight, "bias": torch.zeros(3)}
    plain = nn.Linear(4, 3)
    plain.load_state_dict(state)
    with pytest.raises(ValueError):
        constrain(plain, {"weight": UnitNorm()})  # load, then constrain: refused
    model = nn.Linear(4, 3)
    constrain(model, {"weight": UnitNorm()})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointMismatch, match=r"weight: with the checkpoint's values UnitNorm\(dim=0\) cannot hold: "
                       r"1 slices along dim 0 do not have unit L2 norm"):
        model.load_state_dict(state)  # constrain, then load: refused too
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    wrapped = nn.Sequential(model, nn.Linear(3, 3))
    constrain(wrapped, {"1.weight": Clamp(-1, 1)})  # the outer model is watched now: it checks first
    with pytest.raises(CheckpointMismatch, match=r"(?s)Nothing was loaded.*0.weight: with the checkpoint.s values UnitNorm"):
        wrapped.load_state_dict({"0.weight": weight, "0.bias": torch.zeros(3), "1.weight": torch.zeros(3, 3), "1.bias": torch.ones(3)})
    assert not torch.equal(wrapped[1].bias, torch.ones(3))


@pytest.mark.parametrize("device, budget", [("cpu", {"macs": 0.5, "hard": True}), ("meta", {})])
def test_assign_keeps_the_scores_that_learnable_gates_share_shared(device, budget):
    # The meta-device flow: build on meta, load with assign=True. A MAC budget's gates look
    # their shared scores up, so a hard forward and bake need them shared.
    from torchconstrain import surgery

    def gated(device):
        torch.manual_seed(0)
        with torch.device(device):
            model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
        surgery.mask_blocks(model, groups="all", learnable=True, example=torch.zeros(1, 3, 32, 32), **budget)
        return model.eval()

    def sharing(model):
        places = {}
        for name, module in model.named_modules():
            if isinstance(module, LearnableMask):
                places.setdefault(id(module.scores), []).append(name)
        return sorted(places.values())

    source = gated("cpu")
    expected = sharing(source)
    assert any(len(names) > 1 for names in expected)
    model = gated(device)
    model.load_state_dict(source.state_dict(), assign=True)
    assert sharing(model) == expected
    assert len(list(model.parameters())) == len(list(source.parameters()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    bake(model)


def test_a_refused_plain_load_leaves_a_spectral_norm_after_the_constraints_as_it_was():
    # The load's trial runs the whole chain: spectral_norm's power iteration moved, even
    # when the load was refused.
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    model = make()
    constrain(model, {"0": Clamp(-0.3, 0.3)})
    spectral_norm(model[0])
    model.train()
    power = model[0].parametrizations.weight[1]
    u, v = power._u.clone(), power._v.clone()
    bad = make().state_dict()
    bad["2.weight"] = torch.zeros(2, 4)
    with pytest.raises(CheckpointMismatch, match="Nothing was loaded"):
        model.load_state_dict(bad)
    assert torch.equal(power._u, u) and torch.equal(power._v, v)


def test_a_checkpoint_holding_a_tensor_both_plain_and_constrained_is_refused_before_loading():
    # Loaded the rest, then raised torch's "Unexpected key(s)" with the model half changed.
    model = nn.Sequential(nn.Linear(3, 2))
    constrain(model, {"0.bias": Clamp(-0.1, 0.1)})
    checkpoint = {**model.state_dict(), "0.bias": torch.zeros(2)}
    checkpoint["0.weight"] = torch.ones(2, 3)
    before = state(model)
    with pytest.raises(CheckpointMismatch, match=r"0.bias: the checkpoint holds it twice, as '0.bias' \(a plain "
                                                 r"tensor\) and as '0.parametrizations.bias.original'"):
        model.load_state_dict(checkpoint)
    assert_same_state(state(model), before)


def test_errors_of_a_custom_constraint_during_a_load_name_the_tensor():
    model = nn.Sequential(nn.Linear(3, 2))
    constrain(model, {"0.weight": FailingForward()})
    model[0].parametrizations.weight[0].__dict__["broken"] = True
    with pytest.raises(RuntimeError, match=r"load_state_dict: 0.weight: its constraints raised KeyError: 'forward failed'"):
        model.load_state_dict(nn.Sequential(nn.Linear(3, 2)).state_dict())  # a plain checkpoint goes through the chain
