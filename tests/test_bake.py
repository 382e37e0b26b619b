import pytest
import torch
from conftest import FailingForward, SmallNet, TiedNet, assert_unchanged, snapshot, tokens
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from torchconstrain import (
    L1,
    Clamp,
    ConstraintViolation,
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

RULES = {
    "features.0": Clamp(-0.1, 0.1),
    "features.3": [FixedMask.magnitude(sparsity=0.5), Clamp(-0.2, 0.2)],
    "head": LearnableMask(per="channel"),
}


def test_bake_keeps_outputs_classes_keys_and_parameters(net):
    plain_keys = list(SmallNet().state_dict())
    weight_ids = {name: id(p) for name, p in net.named_parameters()}
    constrain(net, RULES)
    net.eval()
    x = torch.randn(2, 3, 9, 9)
    before = net(x)
    report = bake(net)
    assert torch.equal(net(x), before)
    assert type(net.features[0]) is nn.Conv2d and type(net.head) is nn.Linear
    assert list(net.state_dict()) == plain_keys
    assert {name: id(p) for name, p in net.named_parameters()} == weight_ids
    assert report.names() == ["features.0.weight", "features.3.weight", "head.weight"]
    assert report["features.3.weight"]["sparsity"] == 0.5
    fresh = SmallNet()
    fresh.load_state_dict(net.state_dict(), strict=True)


def test_optimizer_built_before_constrain_keeps_training_after_bake(net):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    constrain(net, {"head": FixedMask.magnitude(sparsity=0.5)})
    bake(net)
    before = net.head.weight.detach().clone()
    net(torch.randn(2, 3, 9, 9)).sum().backward()
    optimizer.step()
    assert not torch.equal(net.head.weight, before)


def test_bake_leaves_other_parametrizations_alone():
    layer = nn.Linear(4, 4)
    constrain(layer, {"weight": Clamp(-0.3, 0.3)})
    parametrizations.spectral_norm(layer)  # registered after: it stays, ours is baked
    layer.eval()
    x = torch.randn(3, 4)
    expected = layer(x)
    bake(layer)
    chain = layer.parametrizations.weight
    assert [type(p).__name__ for p in chain] == ["_SpectralNorm"]
    assert layer.parametrizations.weight.original.abs().max() <= 0.3
    torch.testing.assert_close(layer(x), expected)


def test_bake_refuses_a_constraint_behind_another_parametrization():
    layer = nn.Linear(4, 4)
    parametrizations.spectral_norm(layer)
    parametrize.register_parametrization(layer, "weight", Clamp(-0.3, 0.3))  # by hand: constrain refuses it
    other = nn.Linear(4, 4)
    constrain(other, {"weight": Clamp(-1, 1)})
    model = nn.Sequential(other, layer)
    with pytest.raises(ValueError, match=r"1.weight: Clamp\(min=-0.3, max=0.3\) comes after _SpectralNorm"):
        bake(model)
    assert len(layer.parametrizations.weight) == 2
    assert parametrize.is_parametrized(other, "weight")  # nothing was baked


def test_bake_with_a_key_bakes_only_what_it_picks(net):
    constrain(net, RULES)
    report = bake(net, key=nn.Conv2d)
    assert report.names() == ["features.0.weight", "features.3.weight"]
    assert type(net.features[0]) is nn.Conv2d
    assert len(net.head.parametrizations.weight) == 1


def test_bake_without_constraints_is_a_no_op(net):
    assert len(bake(net)) == 0


def test_check_reports_constraints_min_max_and_sparsity(net):
    constrain(net, RULES)
    report = check(net)
    row = report["features.3.weight"]
    assert row["constraints"] == ["FixedMask(shape=(8, 8, 3, 3), sparsity=0.500)", "Clamp(min=-0.2, max=0.2)"]
    assert -0.2 <= row["min"] and row["max"] <= 0.2 and row["sparsity"] == 0.5
    assert "features.3.weight" in str(report)


def test_check_names_every_broken_tensor(net):
    constrain(net, RULES)
    parametrize.register_parametrization(net.features[3], "weight", _AddOne())
    with torch.no_grad():
        net.features[0].parametrizations.weight.original[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConstraintViolation) as caught:
        check(net)
    reasons = caught.value.violations
    assert [fqn for fqn, _ in reasons] == ["features.0.weight", "features.3.weight", "features.3.weight"]
    assert reasons[0][1] == "1 entries are NaN or infinite"
    assert reasons[1][1].startswith("FixedMask(shape=(8, 8, 3, 3), sparsity=0.500): 288 masked entries are not zero")
    assert reasons[2][1].startswith("Clamp(min=-0.2, max=0.2): 576 entries outside [-0.2, 0.2]")
    assert str(caught.value).startswith("2 tensor(s) break their constraints:")


def test_check_catches_a_leaking_mask():
    layer = nn.Linear(4, 4)
    constrain(layer, {"weight": FixedMask.magnitude(sparsity=0.5)})
    parametrize.register_parametrization(layer, "weight", _AddOne())
    with pytest.raises(ConstraintViolation, match=r"weight: FixedMask.*: 8 masked entries are not zero"):
        check(layer)


class _AddOne(nn.Module):
    def forward(self, x):
        return x + 1


def test_penalty_is_zero_without_terms_and_sums_learnable_masks(net):
    assert penalty(net).item() == 0.0
    constrain(net, {nn.Conv2d: LearnableMask(strength=0.1, init=0.5, threshold=0.25), "head": Clamp(-1, 1)})
    total = penalty(net)
    assert total.shape == () and total.item() == pytest.approx(0.1)
    total.backward()
    assert net.features[0].parametrizations.weight[0].scores.grad is not None


# --- tied parameters ---------------------------------------------------------------------


def test_bake_restores_a_tie_with_the_constrained_models_outputs(tied):
    stored = tied.emb.weight
    optimizer = torch.optim.SGD(tied.parameters(), lr=0.5)
    constrain(tied, {"head": [FixedMask.magnitude(sparsity=0.5), Clamp(-0.2, 0.2)]})
    x = tokens()
    expected = tied(x)
    report = bake(tied)
    assert tied.head.weight is tied.emb.weight is stored  # one Parameter again, the optimizer's
    assert type(tied.emb) is nn.Embedding and type(tied.head) is nn.Linear
    assert torch.equal(tied(x), expected)
    assert report.names() == ["emb.weight", "head.weight"] and report["head.weight"]["sparsity"] == 0.5
    assert list(tied.state_dict()) == list(TiedNet().state_dict())
    TiedNet().load_state_dict(tied.state_dict(), strict=True)
    tied(x).sum().backward()
    optimizer.step()
    assert tied.head.weight is tied.emb.weight


def test_bake_with_a_key_on_one_name_bakes_the_tied_parameter_for_all(tied):
    constrain(tied, {"emb": Clamp(-0.1, 0.1), "body": Clamp(-0.1, 0.1)})
    assert bake(tied, "head").names() == ["emb.weight", "head.weight"]
    assert tied.head.weight is tied.emb.weight and isinstance(tied.emb.weight, nn.Parameter)
    assert parametrize.is_parametrized(tied.body)


def test_check_names_a_broken_tied_parameter_once_by_all_its_names(tied):
    constrain(tied, {"head": FixedMask.magnitude(sparsity=0.5)})
    parametrize.register_parametrization(tied.head, "weight", _AddOne())  # joins the shared chain
    assert tied.emb.parametrizations.weight[1].__class__ is _AddOne
    with pytest.raises(ConstraintViolation) as caught:
        check(tied)
    assert [fqn for fqn, _ in caught.value.violations] == ["emb.weight = head.weight"]


def test_penalty_counts_a_tied_parameter_once(tied):
    constrain(tied, {"*.weight": LearnableMask(strength=0.1, init=0.5, threshold=0.25), "head": L1(0.01)})
    mask = tied.emb.parametrizations.weight[0]
    expected = mask.penalty() + tied.body.parametrizations.weight[0].penalty() + 0.01 * tied.emb.weight.abs().sum()
    assert torch.allclose(penalty(tied), expected, rtol=0, atol=1e-6)
    # two masks of mean gate 0.5 at strength 0.1, and one L1 term: the tied weight is counted once
    assert penalty(tied).item() == pytest.approx(2 * 0.05 + 0.01 * tied.head.weight.abs().sum().item())


def test_bake_refuses_a_submodule_holding_only_some_names_of_a_tied_parameter(tied):
    constrain(tied, {"head": Clamp(-0.1, 0.1)})
    x = tokens()
    expected = tied(x)
    with pytest.raises(ValueError, match=r"^weight: this tied Parameter has 1 more name\(s\) outside"):
        bake(tied.head)
    assert tied.head.parametrizations.weight is tied.emb.parametrizations.weight
    assert len(tied.emb.parametrizations.weight) == 1 and torch.equal(tied(x), expected)
    check(tied)

def test_bake_refuses_nan_gate_scores_instead_of_closing_their_gates(net):
    constrain(net, RULES)
    with torch.no_grad():
        net.head.parametrizations.weight[0].scores[1] = float("nan")
    before = {key: value.clone() for key, value in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"bake: head.weight: LearnableMask: .*scores without NaN.*Got 1 NaN of 4. Nothing was baked"):
        bake(net)
    after = net.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)
    assert parametrize.is_parametrized(net.features[0], "weight")  # the tensors baked before it were not touched


def test_bake_refuses_a_key_that_matches_nothing(net):
    constrain(net, RULES)
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"bake: key \(features.0.wieght\) matches no parameter. Closest names: features.0.weight"):
        bake(net, "features.0.wieght")
    with pytest.raises(ValueError, match=r"bake: key \(Conv1d\) matches no parameter. Module types with parameters"):
        bake(net, nn.Conv1d)
    assert_unchanged(net, before)


ZERO_SIZE = {
    "Clamp": lambda: Clamp(-0.5, 0.5),
    "NonNeg": lambda: NonNeg(),
    "MaxNorm": lambda: MaxNorm(1.0),
    "UnitNorm": lambda: UnitNorm(),
    "FakeQuant": lambda: FakeQuant(4),
    "FakeQuant per tensor, affine": lambda: FakeQuant(4, per_channel=False, symmetric=False),
    "LearnableMask": lambda: LearnableMask(strength=0.1),
    "LearnableMask per channel": lambda: LearnableMask(per="channel", hard=True),
    "magnitude": lambda: FixedMask.magnitude(sparsity=0.5),
    "threshold": lambda: FixedMask.magnitude(threshold=0.1),
    "global_magnitude": lambda: FixedMask.global_magnitude(sparsity=0.5),
    "random": lambda: FixedMask.random(sparsity=0.5, seed=0),
    "structured": lambda: FixedMask.structured(sparsity=0.5),
    "structured, inf norm": lambda: FixedMask.structured(sparsity=0.5, dim=1, p=float("inf")),  # (no inf norm of nothing)
    "n_m": lambda: FixedMask.n_m(),
    "L1": lambda: L1(0.1),
    "stack": lambda: [FixedMask.magnitude(sparsity=0.5), Clamp(-0.5, 0.5), FakeQuant(6)],
}


@pytest.mark.parametrize("name", [*ZERO_SIZE, "FixedMask"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_tensors_without_entries_constrain_train_check_and_bake(name):
    """Weights of shape (0, 8) and (8, 0) (layers without outputs or inputs) constrain, train,
    check, bake and load like any other; the bias of the second one has entries."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 8))
    if name == "FixedMask":
        rules = {"0.weight": FixedMask(torch.ones(0, 8)), "1.weight": FixedMask(torch.ones(8, 0))}
    elif name == "UnitNorm":  # the (8, 0) weight: see test_unit_norm_on_slices_without_entries_is_refused
        rules = {"0.weight": UnitNorm()}
    else:
        rules = {"*.weight": ZERO_SIZE[name](), "1.bias": Clamp(-0.1, 0.1)}
    report = constrain(model, rules)
    assert report["0.weight"]["shape"] == (0, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (model(torch.randn(2, 8)).square().sum() + penalty(model)).backward()
        optimizer.step()
        rows = check(model)
    assert penalty(model).isfinite()
    assert rows["0.weight"]["min"] is None and rows["0.weight"]["sparsity"] == 0.0
    assert "nan" not in str(report) + str(rows)
    twin = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 8))
    constrain(twin, rules)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 8)
    expected = model(x)
    assert torch.equal(twin(x), expected)
    bake(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    assert model[0].weight.shape == (0, 8) and torch.equal(model(x), expected)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_unit_norm_on_slices_without_entries_is_refused():
    model = nn.Linear(0, 4)  # weight (4, 0): four rows of nothing cannot have norm 1
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"weight: UnitNorm\(dim=0\) cannot hold on a tensor of shape \(4, 0\): its 4 slices along dim 0 have no entries"):
        constrain(model, {"weight": UnitNorm()})
    assert_unchanged(model, before)
    constrain(model, {"weight": UnitNorm(dim=1)})  # no slices along dim 1: nothing to normalize
    check(model)


def test_a_tie_split_by_constraining_one_of_its_modules_is_refused_by_check_and_bake():
    torch.manual_seed(0)
    model = TiedNet()
    constrain(model.head, {"weight": Clamp(-0.1, 0.1)})  # emb.weight, the same Parameter, is outside
    before = snapshot(model)
    for call in (check, bake):
        with pytest.raises(ValueError, match=r"head.weight: its Parameter is also emb.weight, which reads it without the constraints"):
            call(model)
    assert_unchanged(model, before)
    bake(model.head)  # as the message says: bake what was constrained, then constrain the whole model
    assert model.head.weight is model.emb.weight and model.head.weight.abs().max() <= 0.1
    constrain(model, {"head.weight": Clamp(-0.1, 0.1)})
    assert check(model).names() == ["emb.weight", "head.weight"]


@pytest.mark.parametrize("make", [lambda: Clamp(-0.3, 0.3), lambda: FixedMask.random(sparsity=0.5, seed=0)])
def test_a_baked_channels_last_1x1_conv_computes_what_the_constrained_one_did(make):
    # Its size-1 dims let the stored original and the effective weight differ in strides,
    # and conv kernels choose by strides: copied into the original's, outputs moved 1e-6.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(480, 20, 1)).to(memory_format=torch.channels_last).eval()
    constrain(model, {"0": make()})
    x = torch.randn(4, 480, 1, 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        constrained = model(x)
    parameter = model[0].parametrizations.weight.original
    bake(model)
    assert model[0].weight is parameter  # the optimizer's Parameter, with the effective strides
    with torch.no_grad():
        assert torch.equal(model(x), constrained)


def test_constrain_and_bake_under_inference_mode_leave_ordinary_tensors_that_train():
    # Inside inference_mode, constrain failed on its own buffers' version counters, and
    # bake left a channels-last conv's baked weight an inference tensor: the next
    # backward raised "Inference tensors cannot be saved for backward".
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(64, 4)).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        constrain(model, {"0.weight": FixedMask.random(sparsity=0.5, seed=0),
                          "2.weight": [Clamp(-0.1, 0.1), LearnableMask()]})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 8, 2, 2)).sum().backward()
    optimizer.step()
    with torch.inference_mode():
        bake(model)
    assert not any(tensor.is_inference() for tensor in model.state_dict().values())
    model(torch.randn(2, 8, 2, 2)).sum().backward()
    optimizer.step()


def test_check_names_the_tensor_whose_custom_constraint_fails():
    # check re-raised a custom forward's error bare, while bake named the tensor.
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    constrain(model, {"1.weight": FailingForward()})
    model[1].parametrizations.weight[0].__dict__["broken"] = True
    with pytest.raises(RuntimeError, match=r"check: 1.weight: its effective value raised KeyError: 'forward failed'"):
        check(model)
