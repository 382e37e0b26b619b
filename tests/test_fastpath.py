"""The fast path gives bitwise what parametrize gives, and never a stale value."""

import contextlib
import copy
import io
import pickle
import threading
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from torchconstrain import (
    Clamp,
    Constraint,
    FakeQuant,
    FixedMask,
    LearnableMask,
    MaxNorm,
    NonNeg,
    UnitNorm,
    bake,
    check,
    constrain,
    fast_path_enabled,
    set_fast_path,
)
from torchconstrain import fastpath
from torchconstrain.constraints import masks
from conftest import TiedNet, tokens


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
    "LearnableMask hard budget": lambda: LearnableMask(hard=True, sparsity=0.5),  # its keep, built out of place
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
    elif isinstance(rule, Clamp) and rule.bound("min").dim():  # per-channel bounds: the middle layer only
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


def _kept(layer, name="weight"):
    """What the fast path keeps for reuse with gradients off, or ``None``."""
    return vars(layer.parametrizations[name]).get(fastpath._KEY)


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


def test_reuse_is_never_stale_after_data_assignment_or_an_assigned_checkpoint():
    model, other = constrained_pair(RULES["Clamp + FixedMask"])
    layer = model[0]
    _reused(layer)
    original = layer.parametrizations.weight.original
    original.data = torch.full_like(original, 0.05)  # no version bump
    assert torch.equal(_reused(layer), _plain_value(layer)) and _reused(layer).abs().max() == 0.05
    with torch.no_grad():
        other[0].parametrizations.weight[1].mask.fill_(False)
    model.load_state_dict(other.state_dict(), assign=True)  # new tensors, set as attributes
    assert not _reused(layer).any()
    assert same_bits(_reused(layer), _plain_value(layer))


def test_reuse_is_never_stale_after_writes_through_data():
    model, _ = constrained_pair(RULES["Clamp + FixedMask"])
    layer = model[0]
    before = _reused(layer).clone()
    original = layer.parametrizations.weight.original
    original.data.copy_(torch.randn_like(original))  # as Lightning's weight averaging swaps weights
    assert same_bits(_reused(layer), _plain_value(layer)) and not torch.equal(_reused(layer), before)
    before = _reused(layer).clone()
    original.data.mul_(0.5)  # as code written for plain parameters scales or clamps
    assert same_bits(_reused(layer), _plain_value(layer)) and not torch.equal(_reused(layer), before)
    assert isinstance(original, nn.Parameter) and original.requires_grad and original.data.requires_grad is False


def test_a_tracked_original_is_a_plain_parameter_again_once_baked():
    model, _ = constrained_pair(RULES["Clamp + FixedMask"])
    _reused(model[0])
    original = model[0].parametrizations.weight.original
    assert type(original) is not nn.Parameter  # tracked: its .data writes show in its version
    copy.deepcopy(model)  # copies keep working
    expected = model(torch.ones(2, 6))
    bake(model)
    assert model[0].weight is original and type(original) is nn.Parameter
    program = torch.export.export(model, (torch.ones(2, 6),))
    assert torch.equal(program.module()(torch.ones(2, 6)), expected)


def test_reuse_follows_tensors_and_constraints_swapped_into_their_dicts():
    model, _ = constrained_pair(RULES["Clamp + FixedMask"])
    layer = model[0]
    _reused(layer)
    no_mask = {"parametrizations.weight.1.mask": torch.zeros_like(layer.parametrizations.weight[1].mask)}
    with torch.no_grad():  # functional_call writes the given tensors into the modules' dicts
        out = torch.func.functional_call(layer, no_mask, (torch.randn(2, 6),))
    assert torch.equal(out, layer.bias.expand_as(out))
    assert same_bits(_reused(layer), _plain_value(layer)) and _reused(layer).any()
    layer.parametrizations.weight[1] = FixedMask(torch.zeros_like(layer.weight))  # same chain length
    assert not _reused(layer).any()
    assert same_bits(_reused(layer), _plain_value(layer))


def test_a_hook_added_after_a_value_was_kept_runs():
    model, _ = constrained_pair(RULES["Clamp pull_back"])
    kept = _reused(model[0])
    calls = []
    model[0].parametrizations.weight[0].register_forward_hook(lambda module, args, out: calls.append(1) or out * 0.5)
    assert same_bits(_reused(model[0]), kept * 0.5) and calls


def test_editing_the_returned_tensor_does_not_poison_the_reuse():
    model, _ = constrained_pair(RULES["FixedMask"])
    layer = model[0]
    with torch.no_grad():
        layer.weight.fill_(7.0)  # edits a computed tensor, as with plain parametrize
    assert same_bits(_reused(layer), _plain_value(layer))
    with torch.inference_mode():
        layer.weight.fill_(7.0)
    assert same_bits(_reused(layer), _plain_value(layer))


def test_writes_through_data_or_numpy_of_the_returned_tensor_do_not_poison_the_reuse():
    model, _ = constrained_pair(RULES["Clamp + FixedMask"])
    layer = model[0]
    expected = _plain_value(layer)
    with torch.no_grad():
        layer.weight.data.normal_(0.0, 3.0)  # a DCGAN-style init, a habit from plain layers
        assert same_bits(layer.weight, expected)
        layer.weight.data = torch.full_like(expected, 3.0)
        assert same_bits(layer.weight, expected)
        layer.weight.numpy()[:] = 3.0
        assert same_bits(layer.weight, expected)
        assert same_bits(model(torch.ones(2, 6)), _plain_outputs(model, torch.ones(2, 6)))


def _plain_outputs(model, x):
    with torch.no_grad(), set_fast_path(False):
        return model(x)


def test_a_reused_tensor_is_a_plain_tensor_to_whoever_copies_saves_or_prints_it():
    model, _ = constrained_pair(RULES["FixedMask"])
    value = _reused(model[0])
    assert isinstance(value, torch.Tensor) and type(value * 1) is torch.Tensor
    assert type(copy.deepcopy(value)) is torch.Tensor and torch.equal(copy.deepcopy(value), value)
    buffer = io.BytesIO()
    torch.save({"weight": value}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["weight"]
    assert type(loaded) is torch.Tensor and torch.equal(loaded, value)
    assert repr(value) == repr(value.clone())


@pytest.mark.parametrize("grad", [True, False])
def test_hooks_on_the_parametrization_list_run(grad):
    model, _ = constrained_pair(RULES["Clamp pull_back"])
    layer = model[0]
    _reused(layer)  # kept before the hooks exist
    calls = []
    plist = layer.parametrizations.weight
    plist.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    plist.register_forward_hook(lambda module, args, out: out * 0.5)
    with torch.set_grad_enabled(grad):
        fast = layer.weight
        with set_fast_path(False):
            plain = layer.weight
    assert calls == ["pre", "pre"] and same_bits(fast, plain) and fast.abs().max() <= 0.1


def test_weights_in_shared_memory_are_not_reused_as_other_processes_train_them():
    # Hogwild training: nn.Module.share_memory(), then worker processes write the weights.
    model, _ = constrained_pair(RULES["Clamp pull_back"])
    model.share_memory()
    before = _reused(model[0]).clone()
    worker = torch.multiprocessing.get_context("fork").Process(target=_train_in_place, args=(model,))
    worker.start()
    worker.join(timeout=60)
    assert worker.exitcode == 0
    assert not torch.equal(_reused(model[0]), before)
    assert same_bits(_reused(model[0]), _plain_value(model[0]))


def _train_in_place(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 6)).pow(2).sum().backward()
        optimizer.step()


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


def _stacked_copied_and_tied():
    """Tensors whose property was installed every way: stacked on, copied, unpickled, tied."""
    layer = nn.Linear(4, 4)
    constrain(layer, {"weight": Clamp(-0.2, 0.2)})
    constrain(layer, {"weight": FixedMask.magnitude(sparsity=0.5)}, existing="stack")
    net = TiedNet()
    constrain(net, {"emb.weight": Clamp(-0.2, 0.2)})
    return {
        "stacked": (layer, "weight"),
        "deep copy": (copy.deepcopy(layer), "weight"),
        "unpickled": (pickle.loads(pickle.dumps(layer)), "weight"),
        "tied name": (net.head, "weight"),
    }


@pytest.mark.parametrize("case", ["stacked", "deep copy", "unpickled", "tied name"])
def test_assignment_and_parametrize_cached_work_however_the_property_was_installed(case):
    module, name = _stacked_copied_and_tied()[case]
    plist = module.parametrizations[name]
    setattr(module, name, torch.full_like(getattr(module, name), 0.5))  # through the first right_inverse
    assert torch.equal(plist.original[plist.original != 0], torch.full_like(plist.original, 0.2)[plist.original != 0])
    with parametrize.cached():
        first = getattr(module, name)
        assert getattr(module, name) is first
        assert same_bits(first, plist())


def test_set_fast_path_checks_its_argument():
    with pytest.raises(TypeError, match="expected True or False"):
        set_fast_path("no")
    assert fast_path_enabled()


@pytest.mark.parametrize("plain", [contextlib.nullcontext, lambda: set_fast_path(False), parametrize.cached])
def test_training_drops_the_copy_kept_for_no_grad_reuse(plain):
    # Training on the plain path (the fast path off, parametrize.cached()) kept it alive.
    model, _ = constrained_pair(RULES["FixedMask"])
    _reused(model[0])
    assert _kept(model[0]) is not None
    with plain():
        model(torch.randn(2, 6)).sum().backward()
    assert _kept(model[0]) is None


@pytest.mark.parametrize("optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, foreach=True),
    lambda params: torch.optim.Adam(params, lr=0.1, foreach=True),
    lambda params: torch.optim.Adam(params, lr=0.1, fused=True),
])
def test_multi_tensor_and_fused_optimizer_steps_are_seen(optimizer):
    model = stack()
    constrain(model, {nn.Linear: FixedMask.magnitude(sparsity=0.5)})
    step = optimizer(model.parameters())
    model(torch.randn(3, 6)).sum().backward()
    before = _reused(model[0]).clone()  # kept between backward and step (a metric, a log)
    step.step()  # fused kernels move no version counter: the step's post-hook does
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
    with parametrize.cached():  # each replica's own value, not the first one's
        assert torch.equal(replica.weight, 0.5 * layer.weight)
        assert same_bits(replica.weight, replica.parametrizations.weight())


class _Unrecoverable(Constraint):
    """Accepted by constrain's checks, then refused by parametrize at registration."""

    def forward(self, x):
        return x

    def right_inverse(self, value):
        raise RuntimeError("cannot store this value")


def test_a_rolled_back_constrain_leaves_later_constraints_applied():
    model, _ = constrained_pair(RULES["Clamp pull_back"])
    model[0].weight.sum().backward()  # the evaluator has run, with and without gradients
    _reused(model[0])
    with pytest.raises(RuntimeError, match="cannot store"):
        constrain(model, [("0.weight", Clamp(-0.4, 0.4)), ("2.weight", _Unrecoverable())], existing="stack")
    assert len(model[0].parametrizations.weight) == 1  # rolled back
    constrain(model, {"0.weight": Clamp(-0.1, 0.1)}, existing="stack")
    assert _reused(model[0]).abs().max() <= 0.1
    assert model[0].weight.abs().max() <= 0.1
    assert same_bits(_reused(model[0]), _plain_value(model[0]))


class _Checkpointed(nn.Module):
    """A model whose forward checkpoints each of its layers, as Hugging Face models do
    after ``gradient_checkpointing_enable()``: the model constrained and called is this one."""

    def __init__(self, layers: nn.Module, reentrant: bool):
        super().__init__()
        self.layers, self.reentrant = layers, reentrant

    def forward(self, x):
        if self.reentrant:  # it gives gradients only where an input requires them
            x = x.detach().requires_grad_()
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=self.reentrant)
        return x


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", list(RULES))
def test_activation_checkpointing_gives_the_bits_of_the_plain_path(name, reentrant):
    torch.manual_seed(0)
    fast = _Checkpointed(stack(), reentrant)
    rule = RULES[name]()
    if isinstance(rule, dict):
        rule = {f"layers.{key}": value for key, value in rule.items()}
    elif isinstance(rule, Clamp) and rule.bound("min").dim():
        rule = {"layers.2.weight": rule}
    else:
        rule = {nn.Linear: rule}
    constrain(fast, rule)
    with torch.no_grad():
        for p in fast.parameters():
            p.mul_(3.0)  # stored values outside the box, so pull-back has work to do
    plain = copy.deepcopy(fast)
    fast_record = train(fast, steps=4)
    with set_fast_path(False):
        plain_record = train(plain, steps=4)
    assert_same_training(fast_record, plain_record)


def test_a_pre_hook_that_edits_stored_weights_gives_the_bits_of_the_plain_path():
    def shrink(module, args):
        with torch.no_grad():
            module.parametrizations.weight.original.mul_(0.9)

    fast, plain = constrained_pair(RULES["Clamp + FixedMask"])
    for model in (fast, plain):
        model[2].register_forward_pre_hook(shrink)  # after the first layer has run
    fast_record = train(fast)
    with set_fast_path(False):
        plain_record = train(plain)
    assert_same_training(fast_record, plain_record)


def _loss_of(model, x):
    def loss(params):
        return torch.func.functional_call(model, params, (x,)).pow(2).sum()

    return loss


@pytest.mark.parametrize("name", list(RULES))
def test_torch_func_grad_gives_the_gradients_of_backward(name):
    model, _ = constrained_pair(RULES[name])
    x = torch.randn(5, 6)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(_loss_of(model, x))(params)
    model(x).pow(2).sum().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-6, atol=1e-7)
    with set_fast_path(False):
        plain = torch.func.grad(_loss_of(model, x))(params)
    assert all(same_bits(grads[k], plain[k]) for k in grads)


@pytest.mark.parametrize("name", list(RULES))
def test_torch_func_vmap_over_inputs_and_over_an_ensemble(name):
    models = [constrained_pair(RULES[name])[0] for _ in range(3)]
    for i, model in enumerate(models):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 0.1 * i)
    x = torch.randn(4, 2, 6)
    params = {k: v.detach() for k, v in models[0].named_parameters()}
    per_sample = torch.func.vmap(lambda xi: torch.func.functional_call(models[0], params, (xi,)))(x)
    with torch.no_grad():
        torch.testing.assert_close(per_sample, torch.stack([models[0](xi) for xi in x]))
    stacked, buffers = torch.func.stack_module_state(models)

    def one(p, b, xi):
        return torch.func.functional_call(models[0], (p, b), (xi,))

    ensemble = torch.func.vmap(one, in_dims=(0, 0, None))(stacked, buffers, x[0])
    with torch.no_grad():
        torch.testing.assert_close(ensemble, torch.stack([m(x[0]) for m in models]))


@pytest.mark.parametrize("name", list(RULES))
def test_per_sample_gradients_with_vmap_over_grad_are_each_samples_gradient(name):
    # The usual recipe (vmap over grad of functional_call): the weights are shared, each
    # sample's gradient is batched; stored weights outside a box take the pull-back there.
    model, _ = constrained_pair(RULES[name])
    x, target = torch.randn(4, 6), torch.randn(4, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, ti):
        return (torch.func.functional_call(model, p, (xi[None],)) - ti).pow(2).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow batching fallback either
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(len(x)):
        one = torch.func.grad(loss)(params, x[i], target[i])
        for k in params:
            torch.testing.assert_close(per_sample[k][i], one[k], rtol=1e-5, atol=1e-6)


def test_functional_call_with_gradients_gives_the_bits_of_the_plain_path():
    model, _ = constrained_pair(RULES["Clamp + FixedMask"])
    name = "2.parametrizations.weight.original"
    replaced = {name: dict(model.named_parameters())[name].detach().mul(2).requires_grad_()}
    x = torch.randn(3, 6)
    fast = torch.func.functional_call(model, replaced, (x,))
    (fast_grad,) = torch.autograd.grad(fast.sum(), replaced[name])
    with set_fast_path(False):
        plain = torch.func.functional_call(model, replaced, (x,))
        (plain_grad,) = torch.autograd.grad(plain.sum(), replaced[name])
    assert same_bits(fast, plain) and same_bits(fast_grad, plain_grad)


def test_set_fast_path_holds_for_the_calling_thread_only():
    inside, leave = threading.Barrier(2), threading.Barrier(2)
    seen = {}

    def toggle(name, delay_exit):
        with set_fast_path(False):
            inside.wait()  # both threads are inside their blocks
            seen[name] = fast_path_enabled()
            if delay_exit:
                leave.wait()
        if not delay_exit:
            leave.wait()  # this thread left its block first
        seen[name + " after"] = fast_path_enabled()

    threads = [threading.Thread(target=toggle, args=(name, name == "b")) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"a": False, "b": False, "a after": True, "b after": True}
    assert fast_path_enabled()
    seen.clear()
    with set_fast_path(False):
        worker = threading.Thread(target=lambda: seen.update(worker=fast_path_enabled()))
        worker.start()
        worker.join()
    assert seen == {"worker": True}  # a new thread starts with it on, like grad mode


def test_threads_reading_the_same_model_get_its_values():
    model, _ = constrained_pair(RULES["Clamp + FixedMask"])
    expected = _plain_value(model[0])
    results = []

    def read():
        for _ in range(50):
            with torch.no_grad():
                results.append(same_bits(model[0].weight, expected))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 200 and all(results)


def test_a_hook_on_a_constraint_runs_on_every_access():
    model, _ = constrained_pair(RULES["Clamp pull_back"])
    clamp = model[0].parametrizations.weight[0]
    calls = []
    handle = clamp.register_forward_hook(lambda module, args, out: calls.append(1) or out * 0.5)
    with torch.no_grad():
        first, second = model[0].weight, model[0].weight
        with set_fast_path(False):
            plain = model[0].weight
    handle.remove()
    assert len(calls) == 3 and same_bits(first, plain) and same_bits(second, plain)


def test_cacheable_is_inherited_unless_a_subclass_defines_forward():
    class Renamed(Clamp):
        def extra_repr(self):
            return "renamed"

    class OwnForward(Clamp):
        def forward(self, x):
            return super().forward(x)

    assert NonNeg.cacheable and Renamed.cacheable
    assert not OwnForward.cacheable and _ShrunkClamp.cacheable


def test_a_training_step_keeps_no_weight_sized_tensor():
    # (What a mask's product saves until backward: test_masks.py.)
    model, _ = constrained_pair(RULES["Clamp + FixedMask"])
    _reused(model[0])
    assert _kept(model[0]) is not None
    model[0].weight  # with gradients
    assert _kept(model[0]) is None
    mask = model[0].parametrizations.weight[1]
    assert [k for k, v in vars(mask).items() if isinstance(v, torch.Tensor)] == []


def test_constrain_and_check_leave_no_value_kept_for_reuse():
    model = stack()
    constrain(model, {nn.Linear: [Clamp(-0.1, 0.1), FixedMask.magnitude(sparsity=0.5)]})
    check(model)
    assert all(_kept(m) is None for m in (model[0], model[2], model[4]))


class _WeightSizedOutputs(TorchDispatchMode):
    """Records the storage of every floating-point tensor of ``numel`` entries an
    operation returns (not a mask's bytes)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.storages = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel() == self.numel:
            self.storages.append(out.untyped_storage().data_ptr())
        return out


IN_PLACE_CHAINS = {
    "Clamp + FixedMask": lambda: [Clamp(-0.2, 0.2), FixedMask.magnitude(sparsity=0.5)],
    "FixedMask + Clamp": lambda: [FixedMask.magnitude(sparsity=0.3), Clamp(-0.1, 0.1)],
    "FixedMask + per-channel Clamp": lambda: [FixedMask.magnitude(sparsity=0.3), Clamp(-torch.full((8,), 0.1), 0.1)],
    "FixedMask + NonNeg": lambda: [FixedMask.magnitude(sparsity=0.3), NonNeg()],
    "Clamp + LearnableMask": lambda: [Clamp(-0.2, 0.2), LearnableMask(temperature=0.5)],
    "Clamp + hard LearnableMask": lambda: [Clamp(-0.2, 0.2), LearnableMask(per="channel", hard=True, init=0.6)],
    "FixedMask + MaxNorm": lambda: [FixedMask.magnitude(sparsity=0.5), MaxNorm(0.3)],
    "FixedMask + UnitNorm": lambda: [FixedMask.magnitude(sparsity=0.5), UnitNorm()],
    "Clamp + FakeQuant": lambda: [Clamp(-0.2, 0.2), FakeQuant(bits=4)],
    "Clamp + FixedMask + FixedMask": lambda: RULES["Clamp + FixedMask + FixedMask"](),
}


def _in_place_pair(name):
    torch.manual_seed(0)
    layer = nn.Linear(6, 8)
    constrain(layer, {"weight": IN_PLACE_CHAINS[name]()})
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(3.0)  # partly outside the boxes and balls
    return layer


@pytest.mark.parametrize("name", list(IN_PLACE_CHAINS))
def test_a_no_grad_chain_computes_in_the_first_constraints_output(name):
    layer = _in_place_pair(name)
    original = layer.parametrizations.weight.original
    before, version = original.detach().clone(), original._version
    with torch.no_grad(), _WeightSizedOutputs(original.numel()) as outputs:
        value = layer.weight
    assert outputs.storages[0] != original.untyped_storage().data_ptr()  # the first made a new tensor
    assert value.untyped_storage().data_ptr() == outputs.storages[0]  # the others wrote into it
    assert same_bits(value, _plain_value(layer))
    assert same_bits(original, before) and original._version == version


def test_a_clamp_and_a_mask_allocate_one_weight_sized_tensor():
    torch.manual_seed(0)
    layer = nn.Linear(500, 300)  # 150,000 entries: the mask multiplies in three chunks
    constrain(layer, {"weight": [Clamp(-0.01, 0.01), FixedMask.magnitude(sparsity=0.5)]})
    weight_bytes = layer.parametrizations.weight.original.nbytes
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as profiled:
        value = layer.weight
    allocations = [e.self_cpu_memory_usage for e in profiled.events() if e.self_cpu_memory_usage > 0]
    assert [size for size in allocations if size >= weight_bytes] == [weight_bytes]  # the clamp's output
    assert max(size for size in allocations if size < weight_bytes) <= masks.IN_PLACE_CHUNK * 4  # a chunk's conversion
    assert same_bits(value, _plain_value(layer))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_no_grad_chain_on_a_conv_gives_the_bits_and_layout_of_the_plain_path(layout):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3)
    constrain(conv, {"weight": [Clamp(-0.1, 0.1), FixedMask.magnitude(sparsity=0.5), LearnableMask()]})
    conv.to(memory_format=layout)
    with torch.no_grad():
        value = conv.weight
        with set_fast_path(False):
            plain = conv.weight
    assert same_bits(value, plain) and value.stride() == plain.stride()


class _Identity(Constraint):
    cacheable = True
    returns_new = True  # a false claim: the evaluator must not trust it with the original

    def forward(self, x):
        return x


class _View(_Identity):
    cacheable, returns_new = True, True

    def forward(self, x):
        return x.view_as(x)


class _Undeclared(Constraint):
    cacheable = True  # returns_new left False: its input is given, never overwritten

    def forward(self, x):
        return x


@pytest.mark.parametrize("first", [
    lambda: Clamp(-10, 10),  # every entry inside its box
    lambda: Clamp(-10, 10, gradient="clamp"),
    _Identity, _View, _Undeclared,
])
def test_no_grad_forwards_never_write_the_stored_original(first):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    constrain(model, {nn.Linear: [first(), FixedMask.magnitude(sparsity=0.5), Clamp(-0.1, 0.1)]})
    originals = [m.parametrizations.weight.original for m in (model[0], model[2])]
    before = [(o.detach().clone(), o._version) for o in originals]
    x = torch.randn(4, 6)
    with torch.no_grad(), set_fast_path(False):
        plain = model(x)
    for mode in (torch.no_grad, torch.inference_mode, torch.no_grad):
        with mode():
            assert same_bits(model(x), plain)
    assert all(same_bits(o, b) and o._version == v for o, (b, v) in zip(originals, before))
    assert (originals[0] != 0).all()  # no entry was masked in the stored original


def test_a_stale_kept_value_is_released_before_its_replacement_is_computed():
    stale = []

    class Watching(Clamp):
        cacheable = True  # its forward depends on its input and own state only

        def forward(self, x):
            stale.append(None if not refs else refs[0]())  # the stale value, if still alive
            return super().forward(x)

    refs = []
    layer = nn.Linear(8, 8)
    constrain(layer, {"weight": Watching(-0.1, 0.1)})
    refs.append(weakref.ref(_reused(layer)))
    layer.eval()  # an attribute of the constraint changes: the kept value is stale
    stale.clear()
    fresh = _reused(layer)
    assert stale == [None] and refs[0]() is None
    assert same_bits(fresh, _plain_value(layer))


def test_every_cached_value_belongs_to_a_constraint_and_changes_with_it():
    layer = nn.Linear(4, 4)
    constrain(layer, {"weight": [Clamp(-0.1, 0.1), LearnableMask(temperature=2.0)]})
    clamp, gate = layer.parametrizations.weight
    before = _reused(layer).clone()
    clamp.max.fill_(0.05)  # a bound, in place: the float bound derived from it follows
    gate.temperature.fill_(0.5)
    assert same_bits(_reused(layer), _plain_value(layer))
    assert not torch.equal(before, _reused(layer))
    assert _reused(layer).max() <= 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(RULES))
def test_training_on_cuda_gives_the_bits_of_the_plain_path(name):
    fast, plain = constrained_pair(RULES[name])
    fast, plain = fast.cuda(), plain.cuda()

    def train_cuda(model):
        torch.manual_seed(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        record = []
        for _ in range(3):
            out = model(torch.randn(5, 6, device="cuda"))
            optimizer.zero_grad(set_to_none=True)
            out.pow(2).sum().backward()
            record.append((out, [p.grad for p in model.parameters()]))
            optimizer.step()
        return record

    fast_record = train_cuda(fast)
    with set_fast_path(False):
        plain_record = train_cuda(plain)
    assert_same_training(fast_record, plain_record)


# --- tied parameters ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Clamp + FixedMask", "LearnableMask channel hard", "FakeQuant"])
def test_a_tied_parameter_trains_with_the_bits_of_the_plain_path(name):
    torch.manual_seed(0)
    fast = TiedNet()
    constrain(fast, {"head": RULES[name]()})
    plain = copy.deepcopy(fast)
    records = []
    for model in (fast, plain):
        with set_fast_path(model is fast):
            torch.manual_seed(1)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
            record = []
            for _ in range(3):
                optimizer.zero_grad(set_to_none=True)
                out = model(tokens())
                out.pow(2).sum().backward()
                record.append((out, [p.grad for p in model.parameters()]))
                optimizer.step()
            records.append(record)
    assert_same_training(*records)


def test_a_tied_parameter_keeps_one_value_for_all_its_names_and_follows_steps():
    torch.manual_seed(0)
    model = TiedNet()
    constrain(model, {"head": [Clamp(-0.3, 0.3), FixedMask.magnitude(sparsity=0.5)]})
    with torch.no_grad():
        first = model.emb.weight
        assert model.head.weight is first  # one kept value, not one per name
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(tokens()).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(model.head.weight, first)
        assert same_bits(model.head.weight, model.emb.parametrizations.weight())
        assert model.emb.weight is model.head.weight


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_functional_call_leaves_the_callers_tensors_of_a_tied_model_where_they_were(fast, grad):
    # With tie_weights=False one name is swapped; the swap's marker for the next tied name
    # outlived it, and torch's restore read the model's Parameter into the caller's dict:
    # the next call ran with the model's weights.
    torch.manual_seed(0)
    model = TiedNet()
    constrain(model, {"head.weight": Clamp(-0.1, 0.1)})
    params = {k: v.detach() * 1.5 for k, v in model.named_parameters()}
    given = dict(params)
    x = tokens()
    with set_fast_path(fast), torch.set_grad_enabled(grad):
        first = torch.func.functional_call(model, params, (x,), tie_weights=False)
        second = torch.func.functional_call(model, params, (x,), tie_weights=False)
    assert all(params[k] is given[k] for k in given)
    assert same_bits(first, second)
    stored = model.emb.parametrizations.weight.original
    both = {"emb.parametrizations.weight.original": params["emb.parametrizations.weight.original"],
            "head.parametrizations.weight.original": params["emb.parametrizations.weight.original"] * 2}
    with pytest.raises(ValueError, match="two different tensors for one constrained tensor that several names share"):
        torch.func.functional_call(model, both, (x,), tie_weights=False)
    assert model.emb.parametrizations.weight.original is stored and model.head.parametrizations.weight.original is stored
    same = dict(params, **{"head.parametrizations.weight.original": params["emb.parametrizations.weight.original"]})
    assert same_bits(torch.func.functional_call(model, same, (x,), tie_weights=False), first)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_functional_call_on_a_tied_model_uses_the_tensor_given_and_puts_the_parameter_back(tie_weights):
    # tie_weights=True swaps the given tensor in under both names; through one shared
    # chain the second name read the tensor just swapped in and put it back last, for good.
    torch.manual_seed(0)
    model = TiedNet()
    constrain(model, {"head.weight": Clamp(-0.1, 0.1)})
    stored = model.emb.parametrizations.weight.original
    x = tokens()
    with torch.no_grad():
        before = model(x)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = lambda p: torch.func.functional_call(model, p, (x,), tie_weights=tie_weights).pow(2).sum()
    for _ in range(2):  # twice in a row: nothing of the first call is left for the second
        grads = torch.func.grad(loss)(params)
        assert model.emb.parametrizations.weight.original is stored
        assert model.head.parametrizations.weight.original is stored
    model(x).pow(2).sum().backward()
    torch.testing.assert_close(grads["emb.parametrizations.weight.original"], stored.grad, rtol=1e-6, atol=1e-7)
    zeros = {"emb.parametrizations.weight.original": torch.zeros_like(stored)}
    with torch.no_grad():
        given = torch.func.functional_call(model, zeros, (x,), tie_weights=tie_weights)
        assert same_bits(given, torch.func.functional_call(model, zeros, (x,), tie_weights=tie_weights))
        assert same_bits(model(x), before)
    assert not same_bits(given, before) and model.emb.parametrizations.weight.original is stored
