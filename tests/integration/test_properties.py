r"""Property-based tests for torchconstrain.

Every test draws small models (``nn.Linear`` / ``nn.Conv2d`` with a few channels), seeds,
bounds, masks, optimizers and learning rates with hypothesis, and asserts something a
user of the library relies on: constraints hold after every optimizer step, ``bake`` is
exact and keeps the ``Parameter`` objects, a failed ``constrain`` leaves the model
untouched, ``state_dict`` round-trips, mask templates select what they promise, and the
pull-back gradient of ``Clamp`` behaves as documented.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from torchconstrain import (
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

# ---------------------------------------------------------------------------------------
# Shared strategies and helpers
# ---------------------------------------------------------------------------------------

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(min_value=0, max_value=2**31 - 1)
small = st.integers(min_value=1, max_value=6)
kinds = st.sampled_from(["linear", "conv"])
optimizer_names = st.sampled_from(["sgd", "adam", "adamw"])
learning_rates = st.floats(min_value=1e-3, max_value=10.0, allow_nan=False, allow_infinity=False)
loss_kinds = st.sampled_from(["linear", "huber", "tanh"])


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-2)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)


def make_model(kind: str, sizes: tuple[int, int, int], seed: int) -> nn.Sequential:
    """Two layers with a Tanh between them; layer names are ``0`` and ``2``."""
    torch.manual_seed(seed)
    a, h, o = sizes
    if kind == "linear":
        return nn.Sequential(nn.Linear(a, h), nn.Tanh(), nn.Linear(h, o))
    return nn.Sequential(nn.Conv2d(a, h, 3, padding=1), nn.Tanh(), nn.Conv2d(h, o, 3))


def make_input(kind: str, sizes: tuple[int, int, int], gen: torch.Generator, batch: int = 3):
    if kind == "linear":
        return torch.randn(batch, sizes[0], generator=gen)
    return torch.randn(batch, sizes[0], 5, 5, generator=gen)


def random_loss(out: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A loss with bounded gradients (no NaN even at lr=10), pointing somewhere random."""
    target = torch.randn(out.shape, generator=gen)
    if kind == "linear":
        return (out * target).mean()
    if kind == "huber":
        return F.huber_loss(out, target)
    return (torch.tanh(out) * target).sum()


def channel_view(bound: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Reshape a 1-D (per-output-channel) bound so that it broadcasts against ``tensor``."""
    if bound.dim() != 1 or tensor.dim() == 1:
        return bound
    return bound.reshape(-1, *([1] * (tensor.dim() - 1)))


def draw_bounds(data, tensor: torch.Tensor, gen: torch.Generator, *, contain_zero: bool):
    """Bounds with ``lo <= hi`` for ``tensor``: Python floats, 1-D float32 tensors with one
    box per output channel, or tensors with the tensor's shape (one box per entry)."""
    shape = data.draw(st.sampled_from(["scalar", "channel", "entry"]), label="bound kind")
    if shape == "scalar":
        if contain_zero:
            return -data.draw(st.floats(0.0, 1.0), label="-lo"), data.draw(st.floats(0.0, 1.0), label="hi")
        lo = data.draw(st.floats(-1.0, 1.0), label="lo")
        return lo, lo + data.draw(st.floats(0.0, 1.0), label="width")
    size = (tensor.shape[0],) if shape == "channel" else tuple(tensor.shape)
    if contain_zero:
        return -torch.rand(size, generator=gen) * 0.5, torch.rand(size, generator=gen) * 0.5
    lo = torch.randn(size, generator=gen) * 0.3
    return lo, lo + torch.rand(size, generator=gen) * 0.4


def as_bound_tensor(bound) -> torch.Tensor:
    return torch.as_tensor(bound, dtype=torch.get_default_dtype())


def assert_inside(value: torch.Tensor, lo, hi) -> None:
    lo_t = channel_view(as_bound_tensor(lo), value)
    hi_t = channel_view(as_bound_tensor(hi), value)
    assert bool((value >= lo_t).all()), f"below the box: min {value.min().item()}"
    assert bool((value <= hi_t).all()), f"above the box: max {value.max().item()}"


def module_at(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    module_name, _, tensor_name = fqn.rpartition(".")
    return model.get_submodule(module_name), tensor_name


def effective(model: nn.Module, fqn: str) -> torch.Tensor:
    module, name = module_at(model, fqn)
    with torch.no_grad():
        return getattr(module, name).detach().clone()


def original(model: nn.Module, fqn: str) -> torch.Tensor:
    module, name = module_at(model, fqn)
    return module.parametrizations[name].original


def random_mask(shape, gen: torch.Generator, keep: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) < keep


# ---------------------------------------------------------------------------------------
# 1. Constraints hold after every optimizer step
# ---------------------------------------------------------------------------------------


@FAST
@given(
    data=st.data(),
    kind=kinds,
    sizes=st.tuples(small, small, small),
    seed=seeds,
    opt_name=optimizer_names,
    lr=learning_rates,
    loss_kind=loss_kinds,
    steps=st.integers(1, 4),
    keep=st.floats(0.0, 1.0),
    constrain_biases=st.booleans(),
)
def test_constraints_hold_after_every_optimizer_step(
    data, kind, sizes, seed, opt_name, lr, loss_kind, steps, keep, constrain_biases
):
    model = make_model(kind, sizes, seed)
    gen = torch.Generator().manual_seed(seed)
    first, second = model[0], model[2]

    clamps = {"0.weight": draw_bounds(data, first.weight, gen, contain_zero=False)}
    masks = {"2.weight": random_mask(second.weight.shape, gen, keep)}
    if constrain_biases:
        clamps["0.bias"] = draw_bounds(data, first.bias, gen, contain_zero=False)
        masks["2.bias"] = random_mask(second.bias.shape, gen, keep)
    rules = {fqn: Clamp(lo, hi) for fqn, (lo, hi) in clamps.items()}
    rules.update({fqn: FixedMask(mask) for fqn, mask in masks.items()})
    constrain(model, rules)
    optimizer = make_optimizer(opt_name, model.parameters(), lr)

    def assert_feasible():
        report = check(model)
        assert sorted(report.names()) == sorted(rules)
        for fqn, (lo, hi) in clamps.items():
            assert_inside(effective(model, fqn), lo, hi)
        for fqn, mask in masks.items():
            value = effective(model, fqn)
            assert bool((value[~mask] == 0).all()), "a masked effective entry is not 0"

    assert_feasible()
    for _ in range(steps):
        optimizer.zero_grad()
        random_loss(model(make_input(kind, sizes, gen)), loss_kind, gen).backward()
        for fqn, mask in masks.items():
            grad = original(model, fqn).grad
            assert grad is not None
            assert bool((grad[~mask] == 0).all()), "masked stored entries received gradient"
        optimizer.step()
        assert_feasible()


# ---------------------------------------------------------------------------------------
# 2. Stacks of Clamp and FixedMask hold in either order
# ---------------------------------------------------------------------------------------


@FAST
@given(
    data=st.data(),
    kind=kinds,
    sizes=st.tuples(small, small, small),
    seed=seeds,
    opt_name=optimizer_names,
    lr=learning_rates,
    loss_kind=loss_kinds,
    steps=st.integers(1, 4),
    order=st.sampled_from(["clamp_first", "mask_first"]),
    separate_rules=st.booleans(),
    keep=st.floats(0.0, 1.0),
)
def test_clamp_and_mask_stacks_hold_in_either_order(
    data, kind, sizes, seed, opt_name, lr, loss_kind, steps, order, separate_rules, keep
):
    model = make_model(kind, sizes, seed)
    gen = torch.Generator().manual_seed(seed)
    layer = model[0]
    lo, hi = draw_bounds(data, layer.weight, gen, contain_zero=True)
    mask = random_mask(layer.weight.shape, gen, keep)
    stack = [Clamp(lo, hi), FixedMask(mask)]
    if order == "mask_first":
        stack.reverse()
    if separate_rules:
        # Two rules matching the same tensor stack in rule order.
        second_key = data.draw(st.sampled_from(["0", "re:0\\.weight", "0.*ght"]), label="second key")
        rules = [("0.weight", stack[0]), (second_key, stack[1])]
    else:
        rules = {"0.weight": stack}
    constrain(model, rules)
    chain = list(layer.parametrizations.weight)
    assert [type(c) for c in chain] == [type(c) for c in stack]

    optimizer = make_optimizer(opt_name, model.parameters(), lr)
    for _ in range(steps):
        optimizer.zero_grad()
        random_loss(model(make_input(kind, sizes, gen)), loss_kind, gen).backward()
        grad = layer.parametrizations.weight.original.grad
        assert bool((grad[~mask] == 0).all())
        optimizer.step()
        check(model)
        value = effective(model, "0.weight")
        assert_inside(value, lo, hi)
        assert bool((value[~mask] == 0).all())


# ---------------------------------------------------------------------------------------
# 3. bake is exact and keeps the Parameter objects
# ---------------------------------------------------------------------------------------


def _bake_rule(choice: str, tensor: torch.Tensor, gen: torch.Generator):
    out = tensor.shape[0]
    lo = -torch.rand(out, generator=gen) * 0.3
    hi = torch.rand(out, generator=gen) * 0.3
    mask = random_mask(tensor.shape, gen, 0.6)
    if choice == "clamp":
        return Clamp(lo, hi)
    if choice == "clamp_scalar":
        return Clamp(-0.1, 0.2)
    if choice == "mask":
        return FixedMask(mask)
    if choice == "magnitude":
        return FixedMask.magnitude(sparsity=0.5)
    if choice == "clamp_mask":
        return [Clamp(lo, hi), FixedMask(mask)]
    if choice == "mask_clamp":
        return [FixedMask(mask), Clamp(lo, hi)]
    # Documented: with hard=True the baked value is exactly the forward value.
    return LearnableMask(hard=True, init=0.6)


bake_choices = st.sampled_from(
    ["clamp", "clamp_scalar", "mask", "magnitude", "clamp_mask", "mask_clamp", "hard_learnable"]
)


@FAST
@given(
    layer_kind=kinds,
    sizes=st.tuples(small, small),
    seed=seeds,
    targets=st.sampled_from([("weight",), ("bias",), ("weight", "bias")]),
    choice=bake_choices,
    lr=st.floats(1e-3, 1.0),
    steps=st.integers(0, 3),
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bake_is_exact_and_keeps_parameters(layer_kind, sizes, seed, targets, choice, lr, steps):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if layer_kind == "linear":
        cls, make = nn.Linear, lambda: nn.Linear(*sizes)
        x = torch.randn(4, sizes[0], generator=gen)
    else:
        cls, make = nn.Conv2d, lambda: nn.Conv2d(sizes[0], sizes[1], 3, padding=1)
        x = torch.randn(2, sizes[0], 5, 5, generator=gen)
    layer = make()
    fresh_keys = list(make().state_dict())
    ids = {name: id(p) for name, p in layer.named_parameters()}
    # Built BEFORE constrain: it must keep stepping the same Parameter objects.
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)

    rules = {name: _bake_rule(choice, getattr(layer, name), gen) for name in targets}
    constrain(layer, rules)
    if choice == "hard_learnable":
        with torch.no_grad():
            for name in targets:
                layer.parametrizations[name][0].scores.normal_(generator=gen)
    for _ in range(steps):
        optimizer.zero_grad()
        random_loss(layer(x), "linear", gen).backward()
        optimizer.step()

    layer.eval()
    with torch.no_grad():
        before = layer(x)
    bake(layer)
    with torch.no_grad():
        after = layer(x)

    assert torch.equal(before, after), "bake changed the model's outputs"
    assert type(layer) is cls
    assert not parametrize.is_parametrized(layer)
    assert not hasattr(layer, "parametrizations")
    assert list(layer.state_dict()) == fresh_keys
    assert {name: id(p) for name, p in layer.named_parameters()} == ids
    assert all(isinstance(p, nn.Parameter) for p in layer.parameters())

    # The optimizer made before constrain still steps the baked weight.
    optimizer.zero_grad()
    random_loss(layer(x), "linear", gen).backward()
    old = {name: p.detach().clone() for name, p in layer.named_parameters()}
    expected = {name: p.detach().add(p.grad, alpha=-lr) for name, p in layer.named_parameters()}
    optimizer.step()
    for name, p in layer.named_parameters():
        assert torch.equal(p.detach(), expected[name])
        if bool(p.grad.ne(0).any()):
            assert not torch.equal(p.detach(), old[name]), f"the optimizer no longer moves {name}"


@FEW
@given(
    kind=kinds,
    sizes=st.tuples(small, small, small),
    seed=seeds,
    targets=st.lists(
        st.sampled_from(["0.weight", "0.bias", "2.weight", "2.bias"]), min_size=1, max_size=4, unique=True
    ),
    one_call=st.booleans(),
)
def test_bake_restores_parameter_order(kind, sizes, seed, targets, one_call):
    """Whatever subset of a module's tensors is constrained, in one call or several, bake
    gives back the parameter and state_dict order of the plain model."""
    model = make_model(kind, sizes, seed)
    fresh = make_model(kind, sizes, seed)
    fresh_keys = list(fresh.state_dict())
    fresh_names = [name for name, _ in fresh.named_parameters()]
    if one_call:
        constrain(model, {fqn: Clamp(-0.1, 0.1) for fqn in targets})
    else:
        for fqn in targets:
            constrain(model, {fqn: Clamp(-0.1, 0.1)})
    bake(model)
    assert list(model.state_dict()) == fresh_keys
    assert [name for name, _ in model.named_parameters()] == fresh_names
    # And the values are the clamped plain ones.
    for fqn in fresh_names:
        expected = fresh.get_parameter(fqn).detach()
        if fqn in targets:
            expected = expected.clamp(-0.1, 0.1)
        assert torch.equal(model.get_parameter(fqn).detach(), expected)


# ---------------------------------------------------------------------------------------
# 4. A failed constrain leaves the model exactly as it was
# ---------------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    return {
        "keys": list(model.state_dict()),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(name, id(p)) for name, p in model.named_parameters()],
        "classes": [(name, type(m)) for name, m in model.named_modules()],
        "parametrized": [(name, hasattr(m, "parametrizations")) for name, m in model.named_modules()],
        "chains": [
            (name, tensor, len(m.parametrizations[tensor]))
            for name, m in model.named_modules()
            if parametrize.is_parametrized(m)
            for tensor in m.parametrizations
        ],
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert after["keys"] == before["keys"]
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype, key
        assert torch.equal(after["state"][key], value), f"{key} changed"
    assert after["params"] == before["params"]
    assert after["classes"] == before["classes"]
    assert after["parametrized"] == before["parametrized"]
    assert after["chains"] == before["chains"]


FAILURES = [
    "wrong_mask_shape",
    "contradiction",
    "contradiction_with_existing",
    "no_match",
    "bad_value",
    "bad_factory",
    "nm_not_divisible",
    "bound_shape",
    "already_constrained",
]


def failing_rules(scenario: str, model: nn.Module, kind: str):
    """(rules, existing, expected exception); the first rule is always valid."""
    w2 = model[2].weight
    valid = ("0.weight", [Clamp(-0.5, 0.5), FixedMask.magnitude(sparsity=0.3)])
    if scenario == "wrong_mask_shape":
        bad_shape = (w2.shape[0] + 1, *w2.shape[1:])
        return [valid, ("2.weight", FixedMask(torch.ones(bad_shape)))], "error", ValueError
    if scenario == "contradiction":
        # Two rules on the same tensor: a mask forcing zeros and a box excluding zero.
        layer_type = nn.Linear if kind == "linear" else nn.Conv2d
        return (
            [valid, ("2.weight", Clamp(0.1, 1.0)), (layer_type, FixedMask.magnitude(sparsity=0.5))],
            "stack",
            ValueError,
        )
    if scenario == "contradiction_with_existing":
        return [valid, ("2.weight", FixedMask.magnitude(sparsity=0.5))], "stack", ValueError
    if scenario == "no_match":
        return [valid, ("2.bias", Clamp(-1, 1)), ("*.nothing_here", Clamp(-1, 1))], "stack", ValueError
    if scenario == "bad_value":
        return [valid, ("2.weight", "clamp please")], "stack", TypeError
    if scenario == "bad_factory":
        return [valid, ("2.weight", lambda fqn, tensor: 3.0)], "stack", TypeError
    if scenario == "nm_not_divisible":
        m = w2.shape[1] + 1  # a group size that cannot divide dim 1
        return [valid, ("2.weight", FixedMask.n_m(1, m))], "stack", ValueError
    if scenario == "bound_shape":
        bad = torch.zeros(w2.shape[0] + 1)
        return [valid, ("2.weight", Clamp(bad - 1, bad + 1))], "stack", ValueError
    assert scenario == "already_constrained"
    return [valid, ("2.weight", Clamp(-1, 1))], "error", ValueError


@FAST
@given(
    kind=kinds,
    sizes=st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(2, 6)),
    seed=seeds,
    scenario=st.sampled_from(FAILURES),
    preconstrained=st.booleans(),
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_failed_constrain_leaves_model_unchanged(kind, sizes, seed, scenario, preconstrained):
    model = make_model(kind, sizes, seed)
    gen = torch.Generator().manual_seed(seed)
    if scenario == "contradiction_with_existing":
        constrain(model, {"2.weight": Clamp(0.1, 1.0)})
    elif scenario == "already_constrained" or preconstrained:
        constrain(model, {"2.weight": Clamp(-0.3, 0.3)})
    x = make_input(kind, sizes, gen)
    with torch.no_grad():
        out_before = model(x)
    before = snapshot(model)

    rules, existing, error = failing_rules(scenario, model, kind)
    with pytest.raises(error):
        constrain(model, rules, existing=existing)

    assert_same_snapshot(before, snapshot(model))
    assert not parametrize.is_parametrized(model[0])
    with torch.no_grad():
        assert torch.equal(model(x), out_before)
    # And the model is still usable: the valid rule alone now applies cleanly.
    constrain(model, [rules[0]])
    check(model)


# ---------------------------------------------------------------------------------------
# 5. state_dict round trip between identically constrained models
# ---------------------------------------------------------------------------------------


@FEW
@given(
    kind=kinds,
    sizes=st.tuples(st.integers(2, 5), st.integers(2, 5), st.integers(2, 5)),
    seeds_=st.tuples(seeds, seeds).filter(lambda s: s[0] != s[1]),
    per=st.sampled_from(["element", "channel"]),
    hard=st.booleans(),
    sparsity=st.floats(0.1, 0.9),
    per_channel_bounds=st.booleans(),
    steps=st.integers(1, 3),
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_state_dict_round_trip(kind, sizes, seeds_, per, hard, sparsity, per_channel_bounds, steps):
    a, h, o = sizes

    def build(seed):
        torch.manual_seed(seed)
        if kind == "linear":
            model = nn.Sequential(nn.Linear(a, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, o))
        else:
            model = nn.Sequential(
                nn.Conv2d(a, h, 3, padding=1), nn.Tanh(),
                nn.Conv2d(h, h, 3, padding=1), nn.Tanh(),
                nn.Conv2d(h, o, 3),
            )
        bound = torch.linspace(0.05, 0.3, h) if per_channel_bounds else 0.2
        constrain(model, {
            "0.weight": Clamp(-bound, bound),
            "2.weight": FixedMask.magnitude(sparsity=sparsity),
            "4.weight": LearnableMask(per=per, hard=hard, init=0.6, strength=0.1),
        })
        return model

    gen = torch.Generator().manual_seed(seeds_[0])
    first = build(seeds_[0])
    optimizer = torch.optim.Adam(first.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        out = first(make_input(kind, sizes, gen))
        (random_loss(out, "huber", gen) + penalty(first)).backward()
        optimizer.step()

    second = build(seeds_[1])
    assert list(second.state_dict()) == list(first.state_dict())
    result = second.load_state_dict(first.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key
    check(second)
    first.eval()
    second.eval()
    x = make_input(kind, sizes, gen)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
        assert torch.equal(penalty(first), penalty(second))


# ---------------------------------------------------------------------------------------
# 6. Mask templates select what they promise
# ---------------------------------------------------------------------------------------


def _weight_layer(kind: str, sizes, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(sizes[0], sizes[1])
    return nn.Conv2d(sizes[0], sizes[1], 3)


@FAST
@given(
    kind=kinds,
    sizes=st.tuples(small, small),
    seed=seeds,
    sparsity=st.floats(0.0, 0.99),
    ties=st.booleans(),
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_magnitude_mask_prunes_exact_count_of_smallest(kind, sizes, seed, sparsity, ties):
    layer = _weight_layer(kind, sizes, seed)
    if ties:  # a handful of distinct magnitudes: the count must still be exact
        with torch.no_grad():
            layer.weight.copy_(torch.round(layer.weight * 4 / layer.weight.abs().max().clamp(min=1e-6)))
    w = layer.weight.detach().clone()
    constrain(layer, {"weight": FixedMask.magnitude(sparsity=sparsity)})
    mask = layer.parametrizations.weight[0].mask
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert int((~mask).sum()) == round(sparsity * w.numel())
    if bool((~mask).any()) and bool(mask.any()):
        assert w.abs()[~mask].max() <= w.abs()[mask].min()
    assert torch.equal(layer.weight.detach(), torch.where(mask, w, 0.0))


@FAST
@given(
    kind=kinds,
    sizes=st.tuples(small, small),
    seed=seeds,
    sparsity=st.floats(0.0, 0.99),
    dim=st.integers(-2, 1),
    p=st.sampled_from([1, 2]),
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_structured_mask_prunes_whole_slices(kind, sizes, seed, sparsity, dim, p):
    layer = _weight_layer(kind, sizes, seed)
    w = layer.weight.detach().clone()
    constrain(layer, {"weight": FixedMask.structured(sparsity=sparsity, dim=dim, p=p)})
    mask = layer.parametrizations.weight[0].mask
    d = dim % w.dim()
    moved = mask.movedim(d, 0).reshape(w.shape[d], -1)
    kept_slices = moved.all(dim=1)
    # Every slice along dim is either wholly kept or wholly masked.
    assert torch.equal(moved.any(dim=1), kept_slices)
    assert int((~kept_slices).sum()) == round(sparsity * w.shape[d])
    norms = torch.linalg.vector_norm(w.movedim(d, 0).reshape(w.shape[d], -1), ord=p, dim=1)
    if bool((~kept_slices).any()) and bool(kept_slices.any()):
        assert norms[~kept_slices].max() <= norms[kept_slices].min()


@FAST
@given(
    kind=kinds,
    out=small,
    groups=st.integers(1, 3),
    seed=seeds,
    nm=st.sampled_from([(2, 4), (1, 4), (1, 2), (3, 4)]),
)
def test_n_m_mask_keeps_n_of_every_m(kind, out, groups, seed, nm):
    n, m = nm
    # Linear weight (out, groups*m), Conv2d weight (out, groups*m, 3, 3): dim 1 is the input.
    layer = _weight_layer(kind, (groups * m, out), seed)
    w = layer.weight.detach().clone()
    constrain(layer, {"weight": FixedMask.n_m(n, m)})
    mask = layer.parametrizations.weight[0].mask
    assert mask.shape == w.shape
    mask_groups = mask.movedim(1, -1).reshape(*mask.movedim(1, -1).shape[:-1], groups, m)
    w_groups = w.abs().movedim(1, -1).reshape(mask_groups.shape)
    assert bool((mask_groups.sum(-1) == n).all()), "a group does not keep exactly n entries"
    # The kept entries of each group are its largest ones.
    kept_min = torch.where(mask_groups, w_groups, torch.inf).amin(-1)
    masked_max = torch.where(mask_groups, -torch.inf, w_groups).amax(-1)
    assert bool((masked_max <= kept_min).all())


@FAST
@given(
    kind=kinds,
    sizes=st.tuples(small, small, small),
    seed=seeds,
    sparsity=st.floats(0.0, 0.99),
    scale=st.floats(0.01, 100.0),
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_global_magnitude_uses_one_threshold(kind, sizes, seed, sparsity, scale):
    model = make_model(kind, sizes, seed)
    with torch.no_grad():
        model[2].weight.mul_(scale)  # very different scales per tensor
    ws = {fqn: effective(model, fqn) for fqn in ("0.weight", "2.weight")}
    layer_type = nn.Linear if kind == "linear" else nn.Conv2d
    constrain(model, {layer_type: FixedMask.global_magnitude(sparsity=sparsity)})
    masks = {fqn: module_at(model, fqn)[0].parametrizations.weight[0].mask for fqn in ws}
    total = sum(w.numel() for w in ws.values())
    assert sum(int((~mk).sum()) for mk in masks.values()) == round(sparsity * total)
    masked = torch.cat([ws[f].abs()[~masks[f]] for f in ws])
    kept = torch.cat([ws[f].abs()[masks[f]] for f in ws])
    if masked.numel() and kept.numel():
        assert masked.max() <= kept.min()
    for fqn in ws:
        assert torch.equal(effective(model, fqn), torch.where(masks[fqn], ws[fqn], 0.0))


# ---------------------------------------------------------------------------------------
# 7. Clamp's pull-back gradient
# ---------------------------------------------------------------------------------------


@FAST
@given(
    sizes=st.tuples(small, small),
    lo=st.floats(-1.0, 0.5),
    width=st.floats(0.5, 1.0),
    distance=st.floats(0.5, 5.0),
    side=st.sampled_from(["above", "below"]),
)
def test_pull_back_returns_outside_weights_and_clamp_gradient_stays_stuck(sizes, lo, width, distance, side):
    hi = lo + width
    target = (lo + hi) / 2
    far = hi + distance if side == "above" else lo - distance
    results = {}
    for gradient in ("pull_back", "clamp"):
        layer = nn.Linear(*sizes)
        constrain(layer, {"weight": Clamp(lo, hi, gradient=gradient)})
        stored = layer.parametrizations.weight.original
        stored.data.fill_(far)
        optimizer = torch.optim.SGD([stored], lr=1.0)
        for _ in range(30):
            optimizer.zero_grad()
            # Minimum at a point inside the box: the loss pulls inwards.
            (0.5 * (layer.weight - target).pow(2).sum()).backward()
            optimizer.step()
        results[gradient] = stored.detach().clone()
        check(layer)
    assert_inside(results["pull_back"], lo, hi)
    assert torch.equal(results["clamp"], torch.full_like(results["clamp"], far))


@FAST
@given(
    kind=kinds,
    sizes=st.tuples(small, small),
    seed=seeds,
    lr=st.floats(1e-3, 10.0),
    steps=st.integers(1, 5),
    data=st.data(),
)
def test_pull_back_never_pushes_outside_weights_further_out(kind, sizes, seed, lr, steps, data):
    layer = _weight_layer(kind, sizes, seed)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = draw_bounds(data, layer.weight, gen, contain_zero=False)
    constrain(layer, {"weight": Clamp(lo, hi)})
    stored = layer.parametrizations.weight.original
    lo_t = channel_view(as_bound_tensor(lo), stored)
    hi_t = channel_view(as_bound_tensor(hi), stored)
    with torch.no_grad():
        # Scatter stored values far outside the box on both sides.
        offset = torch.rand(stored.shape, generator=gen) * 3 + 0.1
        side = torch.randint(0, 3, stored.shape, generator=gen)
        stored.copy_(torch.where(side == 0, hi_t + offset, torch.where(side == 1, lo_t - offset, stored)))
    optimizer = torch.optim.SGD([stored], lr=lr)
    for _ in range(steps):
        x = torch.randn(3, sizes[0], *(() if kind == "linear" else (5, 5)), generator=gen)
        before = stored.detach().clone()
        optimizer.zero_grad()
        random_loss(layer(x), "linear", gen).backward()
        optimizer.step()
        after = stored.detach()
        above, below = before > hi_t, before < lo_t
        assert bool((after[above] <= before[above]).all()), "pushed further above the box"
        assert bool((after[below] >= before[below]).all()), "pushed further below the box"
        check(layer)


# ---------------------------------------------------------------------------------------
# Extra: random masks and the global RNG
# ---------------------------------------------------------------------------------------


@FEW
@given(seed=seeds, sizes=st.tuples(small, small), sparsity=st.floats(0.0, 0.99), mask_seed=st.none() | seeds)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_random_mask_is_reproducible_and_keeps_global_rng_reproducible(seed, sizes, sparsity, mask_seed):
    """Under one torch.manual_seed, constrain with FixedMask.random gives the same mask and
    leaves the global RNG in the same state; with its own seed it does not touch the
    global RNG at all, and it always masks round(sparsity * n) entries."""
    masks, draws = [], []
    for _ in range(2):
        torch.manual_seed(seed)
        layer = nn.Linear(*sizes)
        state = torch.get_rng_state()
        constrain(layer, {"weight": FixedMask.random(sparsity=sparsity, seed=mask_seed)})
        if mask_seed is not None:
            assert torch.equal(torch.get_rng_state(), state), "a seeded mask consumed the global RNG"
        masks.append(layer.parametrizations.weight[0].mask.clone())
        draws.append(torch.randn(8))
    assert torch.equal(masks[0], masks[1])
    assert torch.equal(draws[0], draws[1]), "constrain made the global RNG non-reproducible"
    assert int((~masks[0]).sum()) == round(sparsity * masks[0].numel())


# ---------------------------------------------------------------------------------------
# Every parametrization under random training, composed with masks, baked
# ---------------------------------------------------------------------------------------

CONSTRAINTS = {
    "NonNeg": lambda: NonNeg(),
    "Clamp": lambda: Clamp(-0.2, 0.3),
    "MaxNorm": lambda: MaxNorm(0.5),
    "MaxNorm dim 1": lambda: MaxNorm(0.3, dim=1),
    "UnitNorm": lambda: UnitNorm(),
    "FakeQuant": lambda: FakeQuant(4),
    "FakeQuant affine per tensor": lambda: FakeQuant(3, symmetric=False, per_channel=False),
}
OPTIMIZERS = {
    "SGD": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-2),
    "Adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "AdamW": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1),
}
MASKS = {
    "none": lambda: [],
    "magnitude": lambda: [FixedMask.magnitude(sparsity=0.5)],
    "2:4": lambda: [FixedMask.n_m(2, 4)],
    "learnable hard": lambda: [LearnableMask(hard=True)],
}


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(CONSTRAINTS)),
    mask=st.sampled_from(sorted(MASKS)),
    optimizer=st.sampled_from(sorted(OPTIMIZERS)),
    lr=st.floats(1e-3, 10.0),
    out_features=st.integers(2, 6),
    in_groups=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_constraint_holds_under_training_composes_with_masks_and_bakes(
    name, mask, optimizer, lr, out_features, in_groups, seed
):
    torch.manual_seed(seed)
    layer = nn.Linear(4 * in_groups, out_features)
    try:
        constrain(layer, {"weight": MASKS[mask]() + [CONSTRAINTS[name]()]})
    except ValueError as error:  # a mask that can empty a whole row is refused with UnitNorm
        assert name == "UnitNorm" and mask in ("magnitude", "learnable hard"), str(error)
        assert "UnitNorm(dim=0) from rule 0 (weight) cannot follow" in str(error)
        return
    first = layer.parametrizations.weight[0]
    zeros = ~first.mask if isinstance(first, FixedMask) else None
    opt = OPTIMIZERS[optimizer](layer.parameters(), lr)
    for _ in range(4):
        opt.zero_grad()
        layer(torch.randn(3, 4 * in_groups)).pow(2).mean().backward()
        opt.step()
        check(layer)
        if zeros is not None:
            assert torch.equal(layer.weight[zeros], torch.zeros(int(zeros.sum())))
    layer.eval()
    x = torch.randn(5, 4 * in_groups)
    before = layer(x)
    constraint = layer.parametrizations.weight[-1]
    bake(layer)
    assert type(layer) is nn.Linear
    if mask != "learnable hard":  # hard gates that sit exactly at the threshold may flip
        assert torch.equal(layer(x), before)
    assert constraint.violation(layer.weight.detach()) is None


# ---------------------------------------------------------------------------------------
# Stacks of two and three constraints in any order: refused, or they hold after every step
# ---------------------------------------------------------------------------------------


def _stack_member(name: str, weight: torch.Tensor, gen: torch.Generator):
    """A template of kind ``name`` for ``weight`` (bounds, masks and dims drawn from ``gen``)."""
    rand = lambda: float(torch.rand((), generator=gen))  # noqa: E731
    dim = int(torch.randint(0, 2, (), generator=gen))
    if name == "Clamp around zero":
        return Clamp(-0.05 - rand(), 0.05 + rand())
    if name == "Clamp symmetric":
        bound = 0.02 + rand() / 2
        return Clamp(-bound, bound)
    if name == "Clamp per channel":
        return Clamp(-torch.rand(weight.shape[0], generator=gen) - 0.01, torch.rand(weight.shape[0], generator=gen) + 0.01)
    if name == "Clamp away from zero":
        low = 0.01 + rand() / 10
        return Clamp(low, low + rand())
    if name == "NonNeg":
        return NonNeg()
    if name == "MaxNorm":
        return MaxNorm(0.1 + 2 * rand(), dim=dim)
    if name == "UnitNorm":
        return UnitNorm(dim=dim)
    if name == "FakeQuant":
        bits = int(torch.randint(2, 9, (), generator=gen))
        return FakeQuant(bits, per_channel=rand() < 0.7, symmetric=rand() < 0.6, dim=dim)
    if name == "FixedMask":
        return FixedMask(random_mask(weight.shape, gen, 0.3 + rand() * 0.7))
    if name == "FixedMask structured":
        return FixedMask.structured(sparsity=0.5, dim=dim)
    return LearnableMask(per="channel" if rand() < 0.5 else "element", dim=dim, hard=rand() < 0.5, init=0.6, strength=1.0)


STACK_MEMBERS = [
    "Clamp around zero", "Clamp symmetric", "Clamp per channel", "Clamp away from zero", "NonNeg",
    "MaxNorm", "UnitNorm", "FakeQuant", "FixedMask", "FixedMask structured", "LearnableMask",
]


# Every ordered pair and triple, shuffled once: ``sampled_from`` favours the first entries,
# which would otherwise all start with a Clamp.
PAIRS = list(itertools.permutations(STACK_MEMBERS, 2))
TRIPLES = list(itertools.permutations(STACK_MEMBERS, 3))
random.Random(0).shuffle(PAIRS)
random.Random(0).shuffle(TRIPLES)
stacks = st.sampled_from(PAIRS) | st.sampled_from(TRIPLES)


def _norms_along(value: torch.Tensor, dim: int) -> torch.Tensor:
    return value.transpose(0, dim).flatten(1).double().norm(dim=1)


def _assert_on_grid(value: torch.Tensor, quant: FakeQuant) -> None:
    """Every slice on a grid through 0 with ``2**bits - 1`` steps (or one fewer: a tie at an
    end) across its range, or ``2 * (2**(bits-1) - 1)`` symmetric steps."""
    slices = value.transpose(0, quant.dim).flatten(1) if quant.per_channel else value.reshape(1, -1)
    slices = slices.double()
    if quant.symmetric:
        steps = [2 ** (quant.bits - 1) - 1]
        spans = slices.abs().amax(dim=1, keepdim=True)
    else:
        steps = [2**quant.bits - 1, 2**quant.bits - 2]
        spans = slices.amax(dim=1, keepdim=True).clamp_min(0) - slices.amin(dim=1, keepdim=True).clamp_max(0)
    for row, span in zip(slices, spans):
        if span.item() == 0:
            continue
        fits = [((row / (span / n)) - (row / (span / n)).round()).abs().max().item() <= 1e-3 for n in steps]
        assert any(fits), f"{quant}: a slice is off its grid"


def _assert_holds(constraint, value: torch.Tensor) -> None:
    """Whether ``value`` satisfies ``constraint``, tested directly (not through ``violation``)."""
    if isinstance(constraint, Clamp):
        assert bool((value >= constraint.bound("min")).all() and (value <= constraint.bound("max")).all()), f"{constraint}: outside the box"
    elif isinstance(constraint, FixedMask):
        assert bool((value[~constraint.mask] == 0).all()), "a masked entry is not zero"
    elif isinstance(constraint, MaxNorm):
        assert bool((_norms_along(value, constraint.dim) <= constraint.max_value * (1 + 1e-5)).all()), f"{constraint}"
    elif isinstance(constraint, UnitNorm):
        assert bool(((_norms_along(value, constraint.dim) - 1).abs() <= 1e-5).all()), f"{constraint}"
    elif isinstance(constraint, FakeQuant):
        _assert_on_grid(value, constraint)
    elif isinstance(constraint, LearnableMask) and constraint.hard:
        closed = (constraint.gate() <= constraint.threshold).expand_as(value)
        assert bool((value[closed] == 0).all()), "an entry whose hard gate is closed is not zero"


def _plain_checkpoint(weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Weights a plain checkpoint could hold: some slices all negative, some far larger or
    far smaller than usual."""
    value = torch.randn(weight.shape, generator=gen)
    flat = value.view(value.shape[0], -1)
    flat[0] = -flat[0].abs()
    if flat.shape[0] > 1:
        flat[1] *= 1e3
    if flat.shape[0] > 2:
        flat[2] *= 1e-3
    return value


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    kind=kinds,
    sizes=st.tuples(st.integers(2, 5), st.integers(2, 5), small),
    seed=seeds,
    opt_name=optimizer_names,
    lr=learning_rates,
    loss_kind=loss_kinds,
    steps=st.integers(1, 4),
    load=st.booleans(),
)
def test_every_accepted_stack_holds_after_every_step(data, kind, sizes, seed, opt_name, lr, loss_kind, steps, load):
    model = make_model(kind, sizes, seed)
    gen = torch.Generator().manual_seed(seed)
    layer = model[0]
    names = data.draw(stacks, label="stack")
    stack = [_stack_member(name, layer.weight, gen) for name in names]
    before = snapshot(model)
    try:
        constrain(model, {"0.weight": stack})
    except ValueError as error:
        assert_same_snapshot(before, snapshot(model))
        assert str(error).startswith("0.weight: ") and ("cannot follow" in str(error) or "contradict" in str(error))
        return
    chain = list(layer.parametrizations.weight)
    if load:  # a plain checkpoint goes through right_inverse into the stored original
        model.load_state_dict({"0.weight": _plain_checkpoint(layer.weight, gen)}, strict=False)

    def assert_holds():
        check(model)
        value = effective(model, "0.weight")
        for constraint in chain:
            _assert_holds(constraint, value)

    assert_holds()
    optimizer = make_optimizer(opt_name, model.parameters(), lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = random_loss(model(make_input(kind, sizes, gen)), loss_kind, gen) + penalty(model)
        loss.backward()
        optimizer.step()
        assert_holds()
