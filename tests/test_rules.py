"""constrain: values, stacking, validation before anything changes, rollback, contradictions, the report."""

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, snapshot, tokens
from torch.nn.utils import parametrizations, parametrize, prune

from torchconstrain import Clamp, Constraint, FakeQuant, FixedMask, LearnableMask, MaxNorm, NonNeg, UnitNorm, bake, check, constrain


def constrained_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if hasattr(m, "parametrizations")]


def test_template_gives_each_tensor_a_fresh_instance(net):
    template = LearnableMask()
    constrain(net, {nn.Conv2d: template})
    first = net.features[0].parametrizations.weight[0]
    second = net.features[3].parametrizations.weight[0]
    assert first is not template and first is not second
    assert first.scores is not second.scores
    assert template.scores is None


def test_list_value_stacks_in_order(net):
    constrain(net, {"head": [Clamp(-0.5, 0.5), FixedMask.magnitude(sparsity=0.5)]})
    chain = net.head.parametrizations.weight
    assert [type(c).__name__ for c in chain] == ["Clamp", "FixedMask"]


def _stacked_in_two_calls(layer, first, second):
    constrain(layer, {"weight": first})
    constrain(layer, {"weight": second}, existing="stack")
    return layer.weight.detach()


@pytest.mark.parametrize("make_mask", [
    lambda: FixedMask.magnitude(sparsity=0.5),
    lambda: FixedMask.structured(sparsity=0.5),
    lambda: FixedMask.global_magnitude(sparsity=0.5),
    lambda: FixedMask.magnitude(threshold=0.1),
])
@pytest.mark.parametrize("form", ["list", "rules", "callable"])
def test_a_mask_later_in_a_stack_chooses_from_the_value_it_masks(make_mask, form):
    # Bound to the raw weight, the mask kept large negative entries (0 after NonNeg) and
    # pruned positive ones: 73% of entries zero instead of 50%, unlike the same stack
    # built in two calls.
    torch.manual_seed(0)
    weight = torch.randn(16, 16)
    one, two = nn.Linear(16, 16), nn.Linear(16, 16)
    with torch.no_grad():
        one.weight.copy_(weight), two.weight.copy_(weight)
    rules = {
        "list": {"weight": [NonNeg(), make_mask()]},
        "rules": [("weight", NonNeg()), ("w*", make_mask())],
        "callable": {"weight": lambda fqn, tensor: [NonNeg(), make_mask()]},
    }[form]
    constrain(one, rules)
    assert torch.equal(one.weight, _stacked_in_two_calls(two, NonNeg(), make_mask()))
    kept = weight.clamp_min(0) * one.parametrizations.weight[1].mask
    assert torch.equal(one.weight, kept)


def test_a_callable_later_in_a_stack_sees_the_value_it_constrains(net):
    seen = []
    constrain(net, [("head", Clamp(-0.01, 0.01)), ("head", lambda fqn, tensor: seen.append(tensor.abs().max()))])
    assert seen == [torch.tensor(0.01)]


def test_every_matching_rule_applies_in_rule_order(net):
    report = constrain(net, [("head", FixedMask.magnitude(sparsity=0.5)), (nn.Linear, Clamp(-0.2, 0.2))])
    assert [type(c).__name__ for c in net.head.parametrizations.weight] == ["FixedMask", "Clamp"]
    assert report["head.weight"]["rules"] == "rule 0 (head), rule 1 (Linear)"


def test_none_excludes_from_every_other_rule(net):
    report = constrain(net, [(nn.Conv2d, Clamp(-1, 1)), ("features.3", None)])
    assert report.names() == ["features.0.weight"]
    assert constrained_names(net) == ["features.0"]


def test_callable_value_builds_per_tensor_constraints(net):
    seen = []

    def per_tensor(fqn, tensor):
        seen.append((fqn, tuple(tensor.shape)))
        return None if fqn.startswith("features.3") else Clamp(-tensor.abs().max() / 2, None)

    report = constrain(net, {nn.Conv2d: per_tensor})
    assert seen == [("features.0.weight", (8, 3, 3, 3)), ("features.3.weight", (8, 8, 3, 3))]
    assert report.names() == ["features.0.weight"]


def test_global_magnitude_shares_one_threshold_across_matched_tensors(net):
    values = torch.cat([net.features[0].weight.flatten(), net.features[3].weight.flatten()]).abs()
    constrain(net, {nn.Conv2d: FixedMask.global_magnitude(sparsity=0.5)})
    kept = torch.cat([net.features[0].weight.flatten(), net.features[3].weight.flatten()]) != 0
    assert int(kept.sum()) == values.numel() // 2
    assert values[kept].min() >= values[~kept].max()


def test_bad_value_is_refused_even_when_its_rule_matches_nothing(net):
    with pytest.raises(TypeError, match=r"rule 0 \(nothing\) value must be a Constraint.*Got Linear"):
        constrain(net, {"nothing": nn.Linear(2, 2)}, strict=False)


@pytest.mark.parametrize(
    "rules, error, message",
    [
        ("head", ValueError, "head: no such rules file"),
        (3, TypeError, "expected rules as a dict or a sequence of \\(key, value\\) pairs. Got int"),
        ([("head",)], TypeError, r"rule 0 must be a \(key, value\) pair"),
        ({3: Clamp(-1, 1)}, TypeError, "rule 0 key must be a name, glob.*Got int: 3"),
        ({torch.Tensor: Clamp(-1, 1)}, TypeError, "Tensor is a class but not an nn.Module subclass"),
        ({"re:(": Clamp(-1, 1)}, ValueError, r"rule 0 \(re:\(\) is not a valid regex"),
        ({"head": "clamp"}, TypeError, r"rule 0 \(head\) value must be a Constraint.*Got str"),
        ({"head": []}, TypeError, r"rule 0 \(head\) value must be a Constraint"),
        ({"head": lambda fqn, t: 3}, TypeError, r"head.weight: rule 0 \(head\) callable must return a Constraint.*Got int"),
    ],
)
def test_bad_rules_are_refused_with_the_culprit_named(net, rules, error, message):
    before = snapshot(net)
    with pytest.raises(error, match=message):
        constrain(net, rules)
    assert_unchanged(net, before)


def test_failure_late_in_planning_leaves_model_unchanged(net):
    before = snapshot(net)
    with pytest.raises(ValueError, match="FixedMask of shape"):
        constrain(net, [(nn.Conv2d, Clamp(-1, 1)), ("head", LearnableMask()), ("head", FixedMask(torch.ones(3, 3)))])
    assert_unchanged(net, before)


def test_failure_during_registration_rolls_back(net, monkeypatch):
    import torchconstrain.rules as rules

    calls = []
    real = rules.register

    def fail_on_third(slot, constraint):
        calls.append(slot.fqn)
        if len(calls) == 3:
            raise RuntimeError("registration failed")
        real(slot, constraint)

    monkeypatch.setattr(rules, "register", fail_on_third)
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="registration failed"):
        constrain(net, {"features.*.weight": Clamp(-0.01, 0.01)})
    assert_unchanged(net, before)


def test_contradiction_between_mask_and_box_is_refused(net):
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"head.weight: FixedMask.*cannot follow Clamp\(min=0.1, max=1\).*every entry in \[0.1, 1\]"):
        constrain(net, {"head": [Clamp(0.1, 1.0), FixedMask.magnitude(sparsity=0.5)]})
    assert_unchanged(net, before)
    with pytest.raises(ValueError, match="Clamp.*cannot follow LearnableMask.*zeros where its gates are closed"):
        constrain(net, {"head": [LearnableMask(), Clamp(0.1, 1.0)]})
    assert_unchanged(net, before)


def test_disjoint_boxes_are_refused_naming_both_rules(net):
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"head.weight: Clamp\(min=2, max=3\) from rule 1 \(Linear\) cannot follow "
                       r"Clamp\(min=0, max=1\) from rule 0 \(head\): the boxes .* do not intersect"):
        constrain(net, [("head", Clamp(0, 1)), (nn.Linear, Clamp(2, 3))])
    with pytest.raises(ValueError, match=r"Clamp\(min=-3, max=-2\) from rule 2 \(head\) cannot follow Clamp\(min=0, max=1\) from rule 0"):
        constrain(net, [("head", Clamp(0, 1)), ("head", Clamp(-5, 5)), ("head", Clamp(-3, -2))])
    assert_unchanged(net, before)
    constrain(net, {"head": Clamp(0, 1)})
    with pytest.raises(ValueError, match=r"Clamp\(min=2, max=3\) from rule 0 \(head\) cannot follow Clamp\(min=0, max=1\) from already there"):
        constrain(net, {"head": Clamp(2, 3)}, existing="stack")
    with torch.device("meta"):  # no weights to try the stack on: the boxes alone refuse it
        meta = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"the boxes .* do not intersect"):
        constrain(meta, [("weight", Clamp(0, 1)), ("weight", Clamp(2, 3))])
    assert not hasattr(meta, "parametrizations")
    per_channel = Clamp(torch.tensor([[0.0], [5.0], [0.0], [0.0]]), 6.0)
    with pytest.raises(ValueError, match=r"the boxes .* do not intersect"):  # row 1: [5, 6] against [0, 1]
        constrain(nn.Linear(4, 4), [("weight", Clamp(0, 1)), ("weight", per_channel)])
    constrain(nn.Linear(4, 4), [("weight", Clamp(0, 2)), ("weight", Clamp(1, 3))])  # they intersect: accepted


def test_errors_of_a_callable_value_name_the_rule(net):
    before = snapshot(net)

    def bounds(fqn, tensor):
        return Clamp(-1, 1) if tensor.dim() in (1, 4) else {}["no rule for " + fqn]

    with pytest.raises(RuntimeError, match=r"head.weight: rule 0 \(\*.weight\) value \(a callable\) raised KeyError") as caught:
        constrain(net, {"*.weight": bounds})
    assert isinstance(caught.value.__cause__, KeyError)
    with pytest.raises(ValueError, match=r"features.0.weight: rule 0 \(features.0\) value \(a callable\) raised ValueError: bad") as caught:
        constrain(net, {"features.0": lambda fqn, tensor: (_ for _ in ()).throw(ValueError("bad"))})
    assert str(caught.value.__cause__) == "bad"
    with pytest.raises(TypeError, match=r"rule 0 \(head\) value must be callable as \(fqn, tensor\). Got <lambda>\(tensor\)"):
        constrain(net, {"head": lambda tensor: Clamp(-1, 1)})
    assert_unchanged(net, before)


def test_a_constraint_that_does_not_fit_names_its_rule(net):
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"rule 1 \(features.0\): features.0.weight: 2:4 sparsity needs dim 1 to be divisible by 4"):
        constrain(net, [("head", FixedMask.n_m()), ("features.0", FixedMask.n_m())])
    with pytest.raises(ValueError, match=r"rule 0 \(Conv2d\): features.0.weight: 2:4 sparsity"):
        constrain(net, {nn.Conv2d: lambda fqn, tensor: FixedMask.n_m()})
    assert_unchanged(net, before)


def test_a_failed_call_leaves_another_librarys_parametrization_state_alone(net):
    """spectral_norm's forward updates its power-iteration vectors in training mode: reading
    the weight to validate rules must not, so a refused call changes nothing."""
    constrain(net, {"head": Clamp(-1, 1)})
    parametrizations.spectral_norm(net.head)
    before = snapshot(net)
    assert any(key.endswith("_u") for key in before["state"])
    with pytest.raises(ValueError, match="already constrained"):
        constrain(net, {"head": Clamp(-1, 1)})
    with pytest.raises(ValueError, match="carries _SpectralNorm, which is not a torchconstrain parametrization"):
        constrain(net, {"head.weight": Clamp(5, 6)}, existing="stack")  # the rule reads the weight first
    assert_unchanged(net, before)
    check(net)
    assert_unchanged(net, before)


def test_constraining_again_is_refused_unless_stacked(net):
    constrain(net, {"head": FixedMask.magnitude(sparsity=0.25)})
    with pytest.raises(ValueError, match=r"head.weight is already constrained by FixedMask.*existing='stack'"):
        constrain(net, {"head": FixedMask.magnitude(sparsity=0.5)})
    assert len(net.head.parametrizations.weight) == 1
    report = constrain(net, {"head": FixedMask.magnitude(sparsity=0.5)}, existing="stack")
    assert len(net.head.parametrizations.weight) == 2
    assert report["head.weight"]["constraints"][0].startswith("FixedMask(shape=(4, 8), sparsity=0.250")
    assert (net.head.weight == 0).float().mean() == 0.5  # the second mask ranks the masked value
    with pytest.raises(ValueError, match="existing must be one of error, stack. Got 'replace'"):
        constrain(net, {"head": Clamp(-1, 1)}, existing="replace")
    with pytest.raises(TypeError, match="constrain: expected strict to be True or False. Got str: 'no'"):
        constrain(net, {"head": Clamp(-1, 1)}, strict="no")  # a truthy string


def test_constrain_refuses_non_modules():
    with pytest.raises(TypeError, match="expected an nn.Module. Got dict"):
        constrain({}, {"w": Clamp(-1, 1)})


def test_constrain_refuses_a_scripted_model_saying_what_to_do():
    # It failed inside parametrize ("contains(): incompatible function arguments").
    scripted = torch.jit.trace(nn.Linear(2, 2), torch.zeros(1, 2))
    with pytest.raises(TypeError, match=r"expected an eager nn.Module. Got a TorchScript .*: constrain the eager model, "
                                        r"then bake it and script the baked one"):
        constrain(scripted, {"weight": Clamp(-1, 1)})
    with pytest.raises(TypeError, match=r"Got 1, a TorchScript module"):
        constrain(nn.Sequential(nn.Linear(2, 2), scripted), {"1.weight": Clamp(-1, 1)})


def test_constrain_refuses_a_model_already_wrapped_in_ddp(tmp_path):
    # Accepted: DDP's gradient hooks never fired for the parametrized originals, and the
    # ranks' weights and scores drifted apart (its "unused parameters" error pointed away).
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4))
        ddp = DistributedDataParallel(model)
        for wrapped in (ddp, nn.Sequential(ddp)):
            with pytest.raises(ValueError, match=r"is a DistributedDataParallel wrapper.* Constrain the model, then "
                                                 r"wrap it"):
                constrain(wrapped, {"*weight": Clamp(-1, 1)})
        assert not hasattr(model[0], "parametrizations")
    finally:
        dist.destroy_process_group()


def test_report_prints_a_table(net):
    text = str(constrain(net, {"head": Clamp(-1, 1)}))
    assert text.splitlines()[1].split() == ["tensor", "shape", "constraints", "rules"]
    assert "head.weight  (4, 8)  Clamp(min=-1, max=1)  rule 0 (head)" in text


# --- tied parameters: one Parameter under several names ---------------------------------


def test_a_rule_on_one_name_of_a_tied_parameter_constrains_every_name(tied):
    stored = tied.emb.weight
    report = constrain(tied, {"head": Clamp(-0.05, 0.05)})
    assert report.names() == ["emb.weight", "head.weight"]
    chain = tied.emb.parametrizations.weight
    assert tied.head.parametrizations.weight is chain and chain.original is stored  # one original, one chain
    assert [name for name, _ in tied.named_parameters()].count("emb.parametrizations.weight.original") == 1
    optimizer = torch.optim.SGD(tied.parameters(), lr=5.0)
    for _ in range(5):
        optimizer.zero_grad()
        tied(tokens()).pow(2).sum().backward()
        optimizer.step()
    assert chain.original.abs().max() > 0.05  # the stored original left the box...
    for effective in (tied.emb.weight, tied.head.weight, tied.emb(torch.arange(12))):
        assert effective.abs().max() <= 0.05  # ...the embedding's use did not, nor the head's
    assert torch.equal(tied.emb.weight, tied.head.weight)
    assert check(tied).names() == ["emb.weight", "head.weight"]


def test_a_rule_matching_several_names_of_a_tied_parameter_applies_once(tied):
    constrain(tied, {"*.weight": LearnableMask()})
    assert len(tied.emb.parametrizations.weight) == 1
    scores = [name for name, _ in tied.named_parameters() if name.endswith("scores")]
    assert scores == ["emb.parametrizations.weight.0.scores", "body.parametrizations.weight.0.scores"]


def test_a_global_magnitude_mask_counts_a_tied_parameter_once(tied):
    peer = copy_untied(tied)
    constrain(tied, {"*.weight": FixedMask.global_magnitude(sparsity=0.6)})
    prune.global_unstructured([(peer.emb, "weight"), (peer.body, "weight")], prune.L1Unstructured, amount=0.6)
    assert torch.equal(tied.emb.parametrizations.weight[0].mask, peer.emb.weight_mask.bool())
    assert torch.equal(tied.body.parametrizations.weight[0].mask, peer.body.weight_mask.bool())


def copy_untied(model: nn.Module) -> nn.Module:
    import copy

    peer = copy.deepcopy(model)
    peer.head.weight = nn.Parameter(peer.emb.weight.detach().clone())
    return peer


def test_rules_on_different_names_of_a_tied_parameter_stack_as_on_one_name(tied):
    import copy

    one_name = copy.deepcopy(tied)
    constrain(tied, [("emb", Clamp(-0.1, 0.1)), ("head", FixedMask.magnitude(sparsity=0.5))])
    constrain(one_name, [("emb", Clamp(-0.1, 0.1)), ("emb", FixedMask.magnitude(sparsity=0.5))])
    assert [type(c) for c in tied.head.parametrizations.weight] == [Clamp, FixedMask]
    assert torch.equal(tied.head.weight, one_name.emb.weight)
    assert torch.equal(tied.emb.weight, one_name.head.weight)


def test_a_callable_value_sees_the_name_its_rule_matched(tied):
    seen = []
    constrain(tied, {"head": lambda fqn, tensor: seen.append(fqn) or NonNeg()})
    assert seen == ["head.weight"]
    assert (tied.emb.weight >= 0).all()


def test_none_on_any_name_of_a_tied_parameter_excludes_it(tied):
    report = constrain(tied, {"*.weight": Clamp(-1, 1), "head": None})
    assert report.names() == ["body.weight"]
    assert tied.head.weight is tied.emb.weight


def test_constraining_a_tied_parameter_again_stacks_for_every_name(tied):
    constrain(tied, {"emb": Clamp(-0.2, 0.2)})
    with pytest.raises(ValueError, match=r"emb.weight \(one Parameter with head.weight\) is already constrained"):
        constrain(tied, {"head": NonNeg()})
    constrain(tied, {"head": NonNeg()}, existing="stack")
    assert [type(c) for c in tied.emb.parametrizations.weight] == [Clamp, NonNeg]
    assert (tied.emb.weight >= 0).all() and (tied.head.weight >= 0).all()


def test_a_tie_split_by_another_parametrization_is_refused(tied):
    parametrize.register_parametrization(tied.head, "weight", _Double())
    stored = tied.emb.weight
    before = {key: value.clone() for key, value in tied.state_dict().items()}
    with pytest.raises(ValueError, match=r"head.weight has parametrizations of its own \(_Double\)"):
        constrain(tied, {"emb": Clamp(-1, 1)})
    assert not parametrize.is_parametrized(tied.emb) and tied.emb.weight is stored
    assert len(tied.head.parametrizations.weight) == 1
    assert all(torch.equal(value, tied.state_dict()[key]) for key, value in before.items())


class _Double(nn.Module):
    def forward(self, x):
        return 2 * x


def test_a_failure_while_sharing_rolls_a_tie_back(tied, monkeypatch):
    import torchconstrain.rules as rules

    def fail(slot, alias):
        raise RuntimeError("sharing failed")

    monkeypatch.setattr(rules, "share", fail)
    stored = tied.emb.weight
    before = snapshot(tied)
    with pytest.raises(RuntimeError, match="sharing failed"):
        constrain(tied, {"body": Clamp(-0.01, 0.01), "head": Clamp(-0.01, 0.01)})
    assert_unchanged(tied, before)
    assert tied.head.weight is tied.emb.weight is stored


class _Raises(Constraint):
    def forward(self, x):
        raise RuntimeError("boom")


class _HalvesInPlace(Constraint):  # a careless custom constraint: writes its input
    def forward(self, x):
        return x.mul_(0.5)


class _ViolationRaises(Clamp):
    def violation(self, value):
        raise KeyError("no such bound")


@pytest.mark.parametrize(
    "constraint, message",
    [
        (_Raises(), r"^head.weight: _Raises\(\) from rule 0 \(head.weight\) raised RuntimeError: boom$"),
        (_ViolationRaises(-1, 1), r"^head.weight: _ViolationRaises\(min=-1, max=1\).violation from rule 0 \(head.weight\) raised KeyError"),
        (_HalvesInPlace(), r"^head.weight: registering _HalvesInPlace\(\) from rule 0 \(head.weight\) raised RuntimeError: a leaf Variable"),
    ],
)
def test_errors_from_a_custom_constraint_name_the_tensor_and_rule_and_leave_the_model_as_it_was(net, constraint, message):
    before = snapshot(net)
    with pytest.raises(Exception, match=message):
        constrain(net, {"head.weight": constraint})
    assert_unchanged(net, before)


def test_a_rule_whose_every_match_is_excluded_is_an_error_when_strict(net):
    names = [name for name, p in net.named_parameters() if name.startswith("features")]
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"rule 0 \(features\.\*\.weight\) matches only tensors that a None rule excludes .*excluded by rule 1 \(features\.\*\)"):
        constrain(net, {"features.*.weight": Clamp(-1, 1), "features.*": None})
    assert_unchanged(net, before)
    report = constrain(net, {"features.*.weight": Clamp(-1, 1), "features.*": None}, strict=False)
    assert names and not report.names()


def test_constraints_after_another_librarys_parametrization_are_refused_as_they_could_never_be_baked():
    layer = nn.Linear(4, 4)
    parametrizations.orthogonal(layer)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"^weight carries _Orthogonal, which is not a torchconstrain parametrization: "
                       r"constraints registered after it could never be baked .* register _Orthogonal after"):
        constrain(layer, {"weight": FixedMask.magnitude(sparsity=0.5)})
    assert_unchanged(layer, before)
    plain = nn.Linear(4, 4)
    constrain(plain, {"weight": Clamp(-1, 1)})
    parametrizations.orthogonal(plain)  # registered after: bake keeps it
    bake(plain)
    assert [type(p).__name__ for p in plain.parametrizations.weight] == ["_Orthogonal"]


@pytest.mark.parametrize("make", [lambda: LearnableMask(), lambda: MaxNorm(1.0), lambda: UnitNorm()])
def test_a_constraint_needing_dense_gradients_is_refused_on_a_sparse_embedding(make):
    embedding = nn.Embedding(10, 4, sparse=True)
    with pytest.raises(ValueError, match=r"weight: .* from rule 0 \(weight\) needs a dense gradient, but Embedding\(sparse=True\)"):
        constrain(embedding, {"weight": [FixedMask.random(sparsity=0.5, seed=0), make()]})
    assert not hasattr(embedding, "parametrizations")


def test_masks_boxes_and_grids_train_a_sparse_embedding_as_a_dense_one():
    grads = []
    for sparse in (True, False):
        torch.manual_seed(0)
        embedding = nn.Embedding(10, 4, sparse=sparse)
        with torch.no_grad():
            embedding.weight.mul_(3)  # entries outside the box: the pull-back gradient works
        constrain(embedding, {"weight": [FixedMask.random(sparsity=0.5, seed=0), Clamp(-0.5, 0.5), FakeQuant(8)]})
        (embedding(torch.tensor([1, 2, 2])) * torch.arange(4.0)).sum().backward()
        grad = embedding.parametrizations.weight.original.grad
        assert grad.is_sparse == sparse
        grads.append(grad.to_dense())
    assert torch.equal(*grads)


class _Failing(Constraint):
    """A custom constraint that raises a TypeError from the method named ``where``."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def _fail(self, where: str) -> None:
        if self.where == where:
            raise TypeError("custom failure")

    def _bind(self, fqn, tensor):
        self._fail("bind")

    def forward(self, x):
        return x

    def stacking(self):
        self._fail("stacking")
        return super().stacking()

    def violation(self, value):
        self._fail("violation")

    def bake(self, value):
        self._fail("bake")
        return value


@pytest.mark.parametrize("where, call, message", [
    ("bind", "constrain", r"rule 0 \(0\): binding _Failing\(\) raised TypeError: custom failure"),
    ("stacking", "constrain", r"0.weight: _Failing\(\) from rule 0 \(0\): stacking\(\) raised TypeError: custom failure"),
    ("violation", "check", r"check: 0.weight: _Failing\(\).violation raised TypeError: custom failure"),
    ("bake", "bake", r"bake: 0.weight: _Failing\(\).bake raised TypeError: custom failure Nothing was baked"),
])
def test_a_custom_constraints_errors_keep_their_type_and_name_the_rule_or_tensor(where, call, message):
    model = nn.Sequential(nn.Linear(3, 3))
    if call != "constrain":
        constrain(model, {"0.weight": _Failing("never")})
        model[0].parametrizations.weight[0].where = where
    before = snapshot(model)
    with pytest.raises(TypeError, match=message):
        {"constrain": lambda: constrain(model, {"0": _Failing(where)}), "check": lambda: check(model),
         "bake": lambda: bake(model)}[call]()
    assert_unchanged(model, before)


class _RefusesToStore(Constraint):
    def forward(self, x):
        return x

    def right_inverse(self, x):
        raise RuntimeError("boom")


def test_a_rolled_back_registration_gives_back_the_storage_and_the_class():
    # Registration swaps in a storage of its own (set_): rolled back by copying values into
    # it, an earlier view of the weight no longer aliased it; a stacked module kept a new class.
    first = nn.Linear(3, 3)
    view = first.weight.view(-1)
    with pytest.raises(RuntimeError, match="boom"):
        constrain(nn.Sequential(first, nn.Linear(3, 3)), {"0": Clamp(-1, 1), "1": [Clamp(-1, 1), _RefusesToStore()]})
    with torch.no_grad():
        first.weight.fill_(0.5)
    assert view[0].item() == 0.5 and type(first) is nn.Linear
    stacked = nn.Sequential(nn.Linear(4, 4))
    constrain(stacked, {"0": NonNeg()})
    cls = type(stacked[0])
    with pytest.raises(RuntimeError, match="boom"):
        constrain(stacked, {"0": [Clamp(-1, 1), _RefusesToStore()]}, existing="stack")
    assert type(stacked[0]) is cls


def test_a_constraint_that_changes_the_dtype_is_refused_naming_its_rule():
    class ToDouble(Constraint):
        def forward(self, x):
            return x.double()

    layer = nn.Linear(3, 3)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"weight: ToDouble\(\) from rule 0 \(weight\) turns a torch.float32 tensor "
                                         r"of shape \(3, 3\) into a torch.float64 tensor of shape \(3, 3\)"):
        constrain(layer, {"weight": ToDouble()})
    assert_unchanged(layer, before)


class _FailsOnItsThirdCall(Constraint):
    """A user's constraint whose forward fails on its third call: the dry run and the
    registration call it once each."""

    def forward(self, x):
        self.__dict__["calls"] = self.__dict__.get("calls", 0) + 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return x * 0.5


def test_constrain_runs_no_constraint_after_registering_outside_its_rollback():
    # Its report evaluated every chain after registration, outside the rollback: this
    # constraint's error came back bare, and the model stayed parametrized.
    model = nn.Sequential(nn.Linear(3, 2))
    report = constrain(model, {"0.bias": _FailsOnItsThirdCall()})
    assert report["0.bias"]["shape"] == (2,)
    assert model[0].parametrizations.bias[0].calls == 2
