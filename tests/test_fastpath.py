"""The fast path gives bitwise what parametrize gives, and never a stale value."""

import copy
import pickle
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from torchconstrain import (
    Clamp,
    Constraint,
    FakeQuant,
    FixedMask,
    LearnableMask,
    MaxNorm,
    NonNeg,
    UnitNorm,
    constrain,
    fast_path_enabled,
    set_fast_path,
)
from torchconstrain import fastpath


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal bit patterns (tells -0.0 from 0.0 and matches NaNs), or both None."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16}[a.dtype]
    return torch.equal(a.detach().view(bits), b.detach().view(bits))


def stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


RULES = {
    "Clamp pull_back": lambda: Clamp(-0.2, 0.2),
    "Clamp straight_through": lambda: Clamp(-0.2, 0.2, gradient="straight_through"),
    "Clamp clamp": lambda: Clamp(-0.2, 0.2, gradient="clamp"),
    "Clamp one-sided": lambda: Clamp(None, 0.1),
    "Clamp per channel": lambda: Clamp(-torch.full((8,), 0.2), 0.2),
    "NonNeg": NonNeg,
    "FixedMask": lambda: FixedMask.magnitude(sparsity=0.5),
    "LearnableMask": lambda: LearnableMask(temperature=0.5),
    "LearnableMask channel hard": lambda: LearnableMask(per="channel", hard=True, init=0.6),
    "MaxNorm": lambda: MaxNorm(0.5),
    "UnitNorm": UnitNorm,
    "FakeQuant": lambda: FakeQuant(bits=4),
    "Clamp + FixedMask": lambda: [Clamp(-0.2, 0.2), FixedMask.magnitude(sparsity=0.5)],
    "FixedMask + Clamp": lambda: [FixedMask.magnitude(sparsity=0.3), Clamp(-0.1, 0.1)],
    "wide Clamp + FixedMask": lambda: [Clamp(-10, 10), FixedMask.magnitude(sparsity=0.5)],  # all inside
    "Clamp straight_through + FixedMask": lambda: [
        Clamp(-0.2, 0.2, gradient="straight_through"), FixedMask.magnitude(sparsity=0.5)
    ],
    "FixedMask + FixedMask": lambda: [FixedMask.magnitude(sparsity=0.5), FixedMask.random(sparsity=0.3)],
    "Clamp + FixedMask + FixedMask": lambda: [
        Clamp(-0.2, 0.2), FixedMask.magnitude(sparsity=0.5), FixedMask.magnitude(sparsity=0.3)
    ],
    "a different chain per layer": lambda: {  # one fused call, some outputs masked, some not
        "0.weight": Clamp(-0.2, 0.2),
        "2.weight": [Clamp(-0.2, 0.2), FixedMask.magnitude(sparsity=0.5), LearnableMask()],
        "4.weight": [FixedMask.magnitude(sparsity=0.5), Clamp(-0.1, 0.1), FixedMask.magnitude(sparsity=0.3)],
    },
}


def constrained_pair(make_rule):
    """Two identical constrained stacks whose stored weights partly leave the box."""
    model = stack()
    rule = make_rule()
    if isinstance(rule, dict):
        constrain(model, rule)
    elif isinstance(rule, Clamp) and rule.min.dim():  # per-channel bounds: the middle layer only
        constrain(model, {"2.weight": rule})
    else:
        constrain(model, {nn.Linear: rule})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("original"):
                p.mul_(3.0)  # stored values outside the box, so pull-back has work to do
    return model, copy.deepcopy(model)


def train(model, steps=3):
    """Outputs and gradients of a few SGD steps (momentum), forward through the whole model."""
    torch.manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    record = []
    for _ in range(steps):
        x = torch.randn(5, 6)
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        out.pow(2).sum().backward()
        record.append((out, [p.grad for p in model.parameters()]))
        optimizer.step()
    return record


def assert_same_training(fast_record, plain_record):
    """Every step's output and gradients, bit for bit."""
    for (out_f, grads_f), (out_p, grads_p) in zip(fast_record, plain_record, strict=True):
        assert same_bits(out_f, out_p)
        assert all(same_bits(a, b) for a, b in zip(grads_f, grads_p, strict=True))


@pytest.mark.parametrize("name", list(RULES))
def test_training_gives_the_bits_of_the_plain_path(name):
    fast, plain = constrained_pair(RULES[name])
    fast_record = train(fast)
    with set_fast_path(False):
        plain_record = train(plain)
    assert_same_training(fast_record, plain_record)
    for a, b in zip(fast.parameters(), plain.parameters()):
        assert same_bits(a, b)


@pytest.mark.parametrize("name", list(RULES))
def test_inference_gives_the_bits_of_the_plain_path(name):
    fast, _ = constrained_pair(RULES[name])
    x = torch.randn(4, 6)
    with torch.inference_mode():
        first, again = fast(x), fast(x)
    with torch.no_grad(), set_fast_path(False):
        plain = fast(x)
    assert same_bits(first, plain) and same_bits(again, plain)


@pytest.mark.parametrize("frozen", [(2,), (0, 2, 4)])
@pytest.mark.parametrize("name", ["Clamp + FixedMask", "FixedMask + FixedMask"])
def test_frozen_stored_weights_give_the_bits_of_the_plain_path(name, frozen):
    fast, plain = constrained_pair(RULES[name])
    for model in (fast, plain):
        for i in frozen:
            model[i].parametrizations.weight.original.requires_grad_(False)
    fast_record = train(fast)
    with set_fast_path(False):
        plain_record = train(plain)
    assert_same_training(fast_record, plain_record)
    assert all(fast[i].parametrizations.weight.original.grad is None for i in frozen)


def test_no_grad_reuses_the_value_and_the_switch_turns_it_off():
    model, _ = constrained_pair(RULES["Clamp pull_back"])
    layer = model[0]
    with torch.no_grad():
        assert layer.weight is layer.weight
        with set_fast_path(False):
            assert not fast_path_enabled()
            assert layer.weight is not layer.weight
    assert fast_path_enabled()
    assert layer.weight is not layer.weight  # with gradients: a fresh graph every access


def _plain_value(layer, name="weight"):
    with torch.no_grad(), set_fast_path(False):
        return getattr(layer, name).clone()


def _reused(layer, name="weight"):
    with torch.no_grad():
        getattr(layer, name)  # fill the reuse cache
        return getattr(layer, name)


def test_reuse_is_never_stale_after_an_optimizer_step():
    model = stack()
    constrain(model, {nn.Linear: [FixedMask.magnitude(sparsity=0.5), Clamp(-1, 1)]})
    before = _reused(model[0]).clone()
    train(model, steps=1)
    after = _reused(model[0])
    assert not torch.equal(before, after)
    assert same_bits(after, _plain_value(model[0]))


def test_reuse_is_never_stale_after_load_state_dict():
    model, other = constrained_pair(RULES["Clamp + FixedMask"])
    _reused(model[0])
    with torch.no_grad():
        other[0].parametrizations.weight.original.mul_(0.5)
        other[0].parametrizations.weight[1].mask[0].fill_(False)
    model.load_state_dict(other.state_dict())
    assert same_bits(_reused(model[0]), _plain_value(other[0]))
    assert not _reused(model[0])[0].any()


def test_reuse_is_never_stale_after_an_in_place_edit():
    model, _ = constrained_pair(RULES["Clamp pull_back"])
    layer = model[0]
    _reused(layer)
    with torch.no_grad():
        layer.parametrizations.weight.original.zero_()
    assert not _reused(layer).any()
    with torch.no_grad():
        layer.weight = torch.full_like(layer.weight, 0.05)  # through right_inverse
    assert torch.equal(_reused(layer), torch.full_like(layer.weight, 0.05))


def test_editing_the_returned_tensor_does_not_poison_the_reuse():
    model, _ = constrained_pair(RULES["FixedMask"])
    layer = model[0]
    with torch.no_grad():
        layer.weight.fill_(7.0)  # edits a computed tensor, as with plain parametrize
    assert same_bits(_reused(layer), _plain_value(layer))
    with torch.inference_mode():
        layer.weight.fill_(7.0)
    assert same_bits(_reused(layer), _plain_value(layer))


def test_reuse_follows_to():
    model, _ = constrained_pair(RULES["Clamp + FixedMask"])
    _reused(model[0])
    model.to(torch.float64)
    value = _reused(model[0])
    assert value.dtype == torch.float64
    assert same_bits(value, _plain_value(model[0]))
    x = torch.randn(2, 6, dtype=torch.float64)
    assert model(x).dtype == torch.float64


def test_reuse_follows_mask_and_bound_changes():
    model, _ = constrained_pair(RULES["Clamp + FixedMask"])
    layer = model[2]
    clamp, mask = layer.parametrizations.weight
    _reused(layer)
    with torch.no_grad():
        mask.mask[:, :4] = False  # in place
    assert not _reused(layer)[:, :4].any()
    mask.mask = torch.zeros_like(mask.mask)  # assignment
    assert not _reused(layer).any()
    mask.mask = torch.ones_like(mask.mask)
    with torch.no_grad():
        clamp.max.fill_(0.01)  # a bound, in place
    assert _reused(layer).max() <= 0.01
    assert same_bits(_reused(layer), _plain_value(layer))


def test_attribute_changes_reach_values_and_gradients():
    model, twin = constrained_pair(RULES["LearnableMask"])
    for m in (model, twin):
        m[0].parametrizations.weight[0].hard = True
        m[2].parametrizations.weight[0].temperature.fill_(2.0)
    assert same_bits(_reused(model[0]), _plain_value(model[0]))
    fast = train(model, steps=2)
    with set_fast_path(False):
        plain = train(twin, steps=2)
    assert_same_training(fast, plain)


def test_a_changed_gradient_mode_is_followed():
    model, twin = constrained_pair(RULES["Clamp pull_back"])
    train(model, steps=1)  # plans built for pull_back
    with set_fast_path(False):
        train(twin, steps=1)
    for m in (model, twin):
        for layer in (m[0], m[2], m[4]):
            layer.parametrizations.weight[0].gradient = "clamp"
    fast = train(model, steps=1)
    with set_fast_path(False):
        plain = train(twin, steps=1)
    assert all(same_bits(a, b) for a, b in zip(fast[0][1], plain[0][1]))


def test_a_tensor_used_twice_gets_the_gradient_of_two_uses():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4)

        def forward(self, x):
            return self.layer(torch.relu(self.layer(x)))

    torch.manual_seed(0)
    fast = Twice()
    constrain(fast, {"layer.weight": Clamp(-0.1, 0.1)})
    with torch.no_grad():
        fast.layer.parametrizations.weight.original.mul_(5)
    plain = copy.deepcopy(fast)
    x = torch.randn(3, 4)
    for _ in range(2):
        for m in (fast, plain):
            m.zero_grad()
        fast(x).sum().backward()
        with set_fast_path(False):
            plain(x).sum().backward()
        assert same_bits(fast.layer.parametrizations.weight.original.grad,
                         plain.layer.parametrizations.weight.original.grad)


def test_functional_call_uses_the_tensors_it_is_given():
    model, _ = constrained_pair(RULES["Clamp + FixedMask"])
    _reused(model[0])
    name = "0.parametrizations.weight.original"
    replaced = {name: torch.zeros_like(dict(model.named_parameters())[name])}
    x = torch.randn(2, 6)
    with torch.no_grad():
        out = torch.func.functional_call(model, replaced, (x,))
        with set_fast_path(False):
            expected = torch.func.functional_call(model, replaced, (x,))
        assert same_bits(out, expected)
        assert same_bits(_reused(model[0]), _plain_value(model[0]))  # the model's own again


def test_copies_keep_their_own_values():
    model, _ = constrained_pair(RULES["Clamp pull_back"])
    _reused(model[0])
    replica = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        replica[0].parametrizations.weight.original.zero_()
    assert not _reused(replica[0]).any()
    assert _reused(model[0]).abs().sum() > 0
    assert same_bits(_reused(restored[0]), _plain_value(model[0]))
    restored(torch.randn(2, 6)).sum().backward()


def test_a_foreign_parametrization_in_the_chain_is_evaluated():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    model, _ = constrained_pair(RULES["Clamp pull_back"])
    _reused(model[0])
    parametrize.register_parametrization(model[0], "weight", Double())
    assert same_bits(_reused(model[0]), _plain_value(model[0]))
    assert _reused(model[0]).abs().max() <= 0.4 + 1e-7


def test_a_constraint_class_that_does_not_declare_itself_cacheable_is_evaluated_every_time():
    class Noisy(Constraint):
        def forward(self, x):
            return x + torch.rand_like(x)

    layer = nn.Linear(3, 3)
    constrain(layer, {"weight": Noisy()})
    with torch.no_grad():
        assert not torch.equal(layer.weight, layer.weight)


class _HalvedMask(FixedMask):
    cacheable = True  # its forward depends on its input and own state only

    def forward(self, x):
        return super().forward(x) * 0.5


class _ShrunkClamp(Clamp):
    cacheable = True

    def forward(self, x):
        return super().forward(x) * 0.5


def test_a_subclass_with_its_own_forward_is_not_evaluated_with_its_parents_plan():
    # FixedMask and Clamp evaluate fused plans of their own forward; a subclass that
    # overrides forward (and declares itself cacheable) must get its forward, not theirs.
    fast, plain = constrained_pair(lambda: [_ShrunkClamp(-0.2, 0.2), _HalvedMask.magnitude(sparsity=0.5)])
    fast_record = train(fast)
    with set_fast_path(False):
        plain_record = train(plain)
    assert_same_training(fast_record, plain_record)
    with torch.no_grad():
        reused = fast[2].weight
        assert same_bits(reused, fast[2].weight)
        with set_fast_path(False):
            assert same_bits(reused, fast[2].weight)


def test_parametrize_cached_is_respected():
    model, _ = constrained_pair(RULES["Clamp + FixedMask"])
    with parametrize.cached():
        first = model[0].weight
        assert model[0].weight is first
        assert same_bits(first, _plain_value(model[0]))


def test_set_fast_path_checks_its_argument():
    with pytest.raises(TypeError, match="expected True or False"):
        set_fast_path("no")
    assert fast_path_enabled()


def test_training_drops_the_copy_kept_for_no_grad_reuse():
    model, _ = constrained_pair(RULES["FixedMask"])
    evaluator = model[0].parametrizations.weight.__dict__[fastpath._KEY]
    _reused(model[0])
    assert evaluator.kept is not None
    model(torch.randn(2, 6)).sum().backward()
    assert evaluator.kept is None


@pytest.mark.parametrize("optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, foreach=True),
    lambda params: torch.optim.Adam(params, lr=0.1, foreach=True),
    lambda params: torch.optim.Adam(params, lr=0.1, fused=True),
])
def test_multi_tensor_and_fused_optimizer_steps_are_seen(optimizer):
    model = stack()
    constrain(model, {nn.Linear: FixedMask.magnitude(sparsity=0.5)})
    step = optimizer(model.parameters())
    before = _reused(model[0]).clone()
    model(torch.randn(3, 6)).sum().backward()
    step.step()
    after = _reused(model[0])
    assert not torch.equal(before, after)
    assert same_bits(after, _plain_value(model[0]))


def test_a_replica_sharing_the_class_uses_its_own_tensors():
    layer = stack()[0]
    constrain(layer, {"weight": FixedMask.magnitude(sparsity=0.5)})
    _reused(layer)
    replica = layer._replicate_for_data_parallel()  # what nn.DataParallel makes: same class
    replica._modules["parametrizations"] = copy.deepcopy(layer.parametrizations)  # own children
    assert type(replica) is type(layer)
    with torch.no_grad():
        replica.parametrizations.weight.original.mul_(0.5)
    assert same_bits(_reused(replica), _plain_value(replica))
    assert torch.equal(_reused(replica), 0.5 * _reused(layer))
    assert same_bits(_reused(layer), _plain_value(layer))


