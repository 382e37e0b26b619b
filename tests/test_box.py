"""Clamp: the box holds, bounds are buffers, the gradient modes, bad bounds are refused."""

import math

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

from torchconstrain import CheckpointMismatch, Clamp, check, constrain, set_fast_path


def test_clamp_holds_and_bounds_are_buffers():
    layer = nn.Linear(5, 4)
    constrain(layer, {"weight": Clamp(-0.1, 0.2)})
    assert layer.weight.min() >= -0.1 and layer.weight.max() <= 0.2
    keys = set(layer.state_dict())
    assert {"parametrizations.weight.0.min", "parametrizations.weight.0.max"} <= keys


def test_clamp_per_output_channel_bounds_broadcast_along_dim0():
    conv = nn.Conv2d(2, 3, 3)
    upper = torch.tensor([0.01, 0.02, 0.03])
    constrain(conv, {"weight": Clamp(-upper, upper)})
    per_channel_max = conv.weight.abs().amax(dim=(1, 2, 3))
    assert torch.all(per_channel_max <= upper + 0)


def test_clamp_one_sided_bound():
    layer = nn.Linear(4, 4)
    constrain(layer, {"weight": Clamp(min=0)})
    assert layer.weight.min() >= 0
    assert "min=0, max=None" in repr(layer.parametrizations.weight[0])


@pytest.mark.parametrize("low, high", [(0.0, None), (None, 1.0), (-math.inf, 0.5)])
def test_an_absent_bound_is_a_none_buffer_out_of_state_dict_and_buffers(low, high):
    layer = nn.Linear(4, 4)
    stored = layer.weight.detach().clone()
    constrain(layer, {"weight": Clamp(low, high)})
    clamp = layer.parametrizations.weight[0]
    absent = {name for name, bound in (("min", low), ("max", high)) if bound is None or math.isinf(bound)}
    assert {name for name in ("min", "max") if getattr(clamp, name) is None} == absent
    assert {key.rpartition(".")[2] for key in clamp.state_dict()} == {"min", "max"} - absent
    assert len(list(clamp.buffers())) == 2 - len(absent)
    with torch.no_grad():
        expected = stored.clamp(low, high)
    assert torch.equal(layer.weight, expected)
    assert torch.equal(layer.parametrizations.weight.original, expected)  # stored clamped, as before
    layer.weight.sum().backward()  # inside the box: the gradient passes
    assert torch.equal(layer.parametrizations.weight.original.grad, torch.ones_like(stored))


def test_a_checkpoint_holding_infinities_for_absent_bounds_loads_and_others_are_refused():
    layer = nn.Linear(4, 4)
    constrain(layer, {"weight": Clamp(min=0)})
    state = layer.state_dict()
    legacy = {**state, "parametrizations.weight.0.max": torch.tensor(math.inf)}  # how absent bounds were saved
    layer.load_state_dict(legacy)
    assert layer.parametrizations.weight[0].max is None
    before = snapshot(layer)
    with pytest.raises(CheckpointMismatch, match=r"weight: the checkpoint has constraint state .*'0.max'"):
        layer.load_state_dict({**state, "parametrizations.weight.0.max": torch.tensor(0.5)})
    assert_unchanged(layer, before)


def test_clamp_follows_dtype_and_device_moves():
    layer = nn.Linear(3, 3)
    constrain(layer, {"weight": Clamp(-0.5, 0.5)})
    layer.double()
    assert layer.parametrizations.weight[0].min.dtype == torch.float64
    assert layer.weight.dtype == torch.float64


@pytest.mark.parametrize("low, high", [(1.0, 0.0), (torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]))])
def test_clamp_refuses_min_above_max(low, high):
    with pytest.raises(ValueError, match="expected min <= max"):
        Clamp(low, high)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: Clamp(math.nan, 1.0), ValueError, "Clamp: min contains NaN"),
        (lambda: Clamp(None, torch.tensor([0.0, math.nan])), ValueError, "Clamp: max contains NaN"),
        (lambda: Clamp(min=math.inf), ValueError, "Clamp: min is inf, which would make every entry inf. Expected a finite min, or None"),
        (lambda: Clamp(max=-math.inf), ValueError, "Clamp: max is -inf, which would make every entry -inf"),
        (lambda: Clamp(torch.tensor([0.0, math.inf, math.inf])), ValueError, "min is inf at 2 entries"),
        (lambda: Clamp("0", 1.0), TypeError, "expected min to be a number"),
        (lambda: Clamp(0, [1.0]), TypeError, "expected max to be a number, a tensor or None. Got list"),
        (lambda: Clamp(True, 1.0), TypeError, "expected min to be a number, a tensor or None. Got bool"),
        (lambda: Clamp(torch.tensor([True]), None), TypeError, "expected min to be a real tensor. Got a torch.bool tensor"),
        (lambda: Clamp(0, 1, gradient="sign"), ValueError, "unknown gradient 'sign'.*pull_back"),
        (lambda: Clamp(0, 1, gradient=None), TypeError, "Clamp: expected gradient to be one of 'pull_back'.*Got NoneType"),
        (lambda: Clamp(max=10**400), ValueError, "Clamp: expected max to be a number float64 holds. Got an integer of 401 digits"),
    ],
)
def test_clamp_refuses_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_infinite_bounds_on_the_open_side_mean_no_bound():
    layer = nn.Linear(4, 4)
    constrain(layer, {"weight": Clamp(-math.inf, 0.5)})
    assert repr(layer.parametrizations.weight[0]) == "Clamp(min=None, max=0.5)"
    assert torch.equal(layer.weight, layer.parametrizations.weight.original.clamp_max(0.5))
    for no_bound in [(), (None, math.inf), (-math.inf, math.inf)]:  # a Clamp that would change nothing
        with pytest.raises(ValueError, match=r"Clamp: expected a finite bound. Got min=.*which would leave every entry as it is"):
            Clamp(*no_bound)
    assert repr(Clamp(torch.tensor([-math.inf, 0.0]), math.inf)) == "Clamp(min=tensor(2,)[-inf..0], max=None)"


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("low, high", [(-0.1, 0.1), (1e-50, None), (None, -1e-300), (0.3, 0.30000000000000004)])
def test_float64_bounds_are_exact_in_float64_as_torch_clamp_has_them(low, high, fast, grad):
    torch.manual_seed(0)
    layer = nn.Linear(64, 16, dtype=torch.float64)
    stored = layer.weight.detach().clone()
    constrain(layer, {"weight": Clamp(low, high)})
    expected = torch.clamp(stored, low, high)  # torch.clamp on float64 with Python floats: exact
    with set_fast_path(fast), torch.set_grad_enabled(grad):
        assert torch.equal(layer.weight, expected)
    constraint = layer.parametrizations.weight[0]
    assert (constraint.min is None) if low is None else constraint.min.item() == low
    assert (constraint.max is None) if high is None else constraint.max.item() == high
    check(layer)


def test_float64_tensor_bounds_stay_float64_and_float32_weights_take_the_nearest_float32_bound():
    bound = torch.tensor([0.1, 0.2, 1e-50], dtype=torch.float64)
    wide = nn.Linear(8, 3, dtype=torch.float64)
    constrain(wide, {"weight": Clamp(-bound, bound)})
    assert torch.equal(wide.weight.abs().amax(dim=1), torch.minimum(wide.parametrizations.weight.original.abs().amax(dim=1), bound))
    narrow = nn.Linear(8, 3)
    constrain(narrow, {"weight": Clamp(-0.1, 0.1)})
    assert narrow.parametrizations.weight[0].max.item() == torch.tensor(0.1).item()  # rounded once, to nearest
    assert bool((narrow.weight <= 0.1).all())


def test_a_finite_bound_beyond_the_dtype_is_refused_where_it_would_become_infinite():
    half = nn.Linear(4, 4).half()
    before = snapshot(half)
    with pytest.raises(ValueError, match=r"weight: Clamp min=100000 is beyond the range of torch.float16: it rounds to inf"):
        constrain(half, {"weight": Clamp(min=1e5)})
    assert_unchanged(half, before)
    constrain(half, {"weight": Clamp(max=1e5)})  # an upper bound above every float16 is no bound
    assert torch.equal(half.weight, half.parametrizations.weight.original)


def test_clamp_bound_of_wrong_length_names_the_tensor():
    with pytest.raises(ValueError, match=r"weight: Clamp max of shape \(5,\) does not fit .*\(3, 4\)"):
        constrain(nn.Linear(4, 3), {"weight": Clamp(None, torch.ones(5))})


def _grad_of_stored(gradient: str, stored: float, pull: float) -> float:
    """Gradient on a stored value with loss ``pull * effective``."""
    layer = nn.Linear(1, 1, bias=False)
    constrain(layer, {"weight": Clamp(-1, 1, gradient=gradient)})
    with torch.no_grad():
        layer.parametrizations.weight.original.fill_(stored)
    (pull * layer.weight.sum()).backward()
    return layer.parametrizations.weight.original.grad.item()


@pytest.mark.parametrize(
    "gradient, stored, pull, expected",
    [
        ("pull_back", 5.0, 1.0, 1.0),  # above the box, descent moves it down: passes
        ("pull_back", 5.0, -1.0, 0.0),  # above the box, descent would push it up: blocked
        ("pull_back", -5.0, -1.0, -1.0),
        ("pull_back", -5.0, 1.0, 0.0),
        ("pull_back", 0.5, -1.0, -1.0),  # inside: always passes
        ("pull_back", 0.5, math.inf, math.inf),  # ...infinite gradients too
        ("straight_through", 5.0, -1.0, -1.0),
        ("clamp", 5.0, 1.0, 0.0),
        ("clamp", 0.5, 1.0, 1.0),
    ],
)
def test_clamp_gradient_modes(gradient, stored, pull, expected):
    assert _grad_of_stored(gradient, stored, pull) == expected


def test_pull_back_treats_each_entry_of_a_tensor_on_its_own():
    layer = nn.Linear(4, 1, bias=False)
    constrain(layer, {"weight": Clamp(-1, 1)})
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.tensor([[0.5, 5.0, -5.0, 5.0]]))
    upstream = torch.tensor([[math.inf, 1.0, 1.0, -1.0]])
    (layer.weight * upstream).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad.tolist() == [[math.inf, 1.0, 0.0, 0.0]]


def test_clamp_weight_stuck_outside_comes_back_with_default_gradient():
    for gradient, comes_back in (("pull_back", True), ("clamp", False)):
        layer = nn.Linear(1, 1, bias=False)
        constrain(layer, {"weight": Clamp(-1, 1, gradient=gradient)})
        with torch.no_grad():
            layer.parametrizations.weight.original.fill_(50.0)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.25)
        for _ in range(300):  # the loss wants the weight at 0.3
            optimizer.zero_grad()
            ((layer.weight - 0.3) ** 2).sum().backward()
            optimizer.step()
        stored = layer.parametrizations.weight.original.item()
        assert (abs(stored - 0.3) < 1e-3) == comes_back, (gradient, stored)


def test_clamp_assignment_stores_clamped_value():
    layer = nn.Linear(2, 2)
    constrain(layer, {"weight": Clamp(-1, 1)})
    layer.weight = torch.full((2, 2), 3.0)
    assert torch.equal(layer.parametrizations.weight.original, torch.ones(2, 2))


def test_clamp_follows_in_place_edits_of_scalar_bounds():
    layer = nn.Linear(4, 4)
    constrain(layer, {"weight": Clamp(-1, 1)})
    assert layer.weight.abs().max() > 0.1
    layer.parametrizations.weight[0].max.fill_(0.1)
    layer.parametrizations.weight[0].min.fill_(-0.1)
    assert layer.weight.abs().max() <= 0.1


def test_non_floating_tensor_is_refused():
    module = nn.Module()
    module.count = nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ValueError, match="count: rule 0 .* floating-point tensors. Got torch.int64"):
        constrain(module, {"count": Clamp(0, 1)})


def _saved_by_clamp(layer):
    """The tensors the weight's clamp saves for its backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer.weight
    return saved


_BITS = {  # each float dtype's integer of the same width
    torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
}


def _next_up(value: float, dtype: torch.dtype) -> float:
    """The next number of ``dtype`` above ``value`` (a number of ``dtype``, >= +0.0)."""
    bits = torch.tensor([value], dtype=dtype).view(_BITS[dtype]) + 1
    return bits.view(dtype).item()


@pytest.mark.parametrize("dtype", list(_BITS))
@pytest.mark.parametrize("low, high", [(-0.1, 0.1), (-1 / 3, None), (None, 2 / 3), (0.0, 0.0)])
def test_the_pull_back_saves_nothing_exactly_when_every_entry_is_inside(dtype, low, high):
    # Inside means the clamp changes no entry; the entries tried sit on the bound as the
    # dtype rounds it and on the next number of the dtype beyond it.
    layer = nn.Linear(3, 4).to(dtype)
    constrain(layer, {"weight": Clamp(low, high)})
    original = layer.parametrizations.weight.original
    rounded = float(torch.tensor(high if high is not None else low, dtype=dtype))
    cases = {"on the bound": (rounded, True), "a NaN": (math.nan, False)}
    if high is not None:
        cases["just above"] = (_next_up(rounded, dtype), False)
        cases["infinite"] = (math.inf, False)
    else:
        cases["below"] = (rounded - 1.0, False)
    for name, (entry, inside) in cases.items():
        with torch.no_grad():
            original.copy_(layer.parametrizations.weight[0](original)).view(-1)[1] = entry
            with set_fast_path(False):
                assert torch.equal(original, layer.weight) == inside, name
        assert (_saved_by_clamp(layer) == []) == inside, name


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_bound_per_channel_of_a_tensor_without_channels_constrains_it():
    layer = nn.Linear(4, 0)
    constrain(layer, {"weight": Clamp(min=torch.empty(0), max=1.0)})
    assert repr(layer.parametrizations.weight[0]) == "Clamp(min=tensor(0, 1)[], max=1)"
    check(layer)


def test_a_bound_per_channel_and_one_per_entry_are_ordered_once_laid_out():
    # Before bind, a 1-D min broadcasts along the last dim: (4,) against (4, 3) was refused
    # as not broadcasting, and on a square weight a valid box as min > max.
    layer = nn.Linear(3, 4)
    constrain(layer, {"weight": Clamp(min=torch.tensor([-1.0, -1.0, 2.0, -1.0]), max=torch.full((4, 3), 3.0))})
    check(layer)
    square = nn.Linear(3, 3)
    constrain(square, {"weight": Clamp(min=torch.tensor([0.0, 0.0, 2.0]), max=torch.tensor([[1.0, 1.0, 1.0]] * 2 + [[3.0, 3.0, 3.0]]))})
    assert bool((square.weight[2] >= 2).all() and (square.weight[2] <= 3).all())
    with pytest.raises(ValueError, match=r"weight: Clamp: expected min <= max"):
        constrain(nn.Linear(3, 3), {"weight": Clamp(min=torch.tensor([0.0, 0.0, 2.0]), max=torch.ones(3, 3))})


def test_a_bound_with_dims_on_a_0d_tensor_is_refused_saying_what_fits():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.tensor(0.5))

    with pytest.raises(ValueError, match=r"weight: Clamp min of shape \(1,\) does not fit a 0-D tensor \(no channels\)\. Expected a number or a 0-D tensor"):
        constrain(Scale(), {"weight": Clamp(min=torch.tensor([-1.0]))})
