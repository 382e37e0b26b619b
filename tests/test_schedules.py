"""PruningSchedule and TemperatureSchedule follow their formulas, keep pruned entries pruned and resume exactly."""

import copy

import pytest
import torch
from conftest import TiedNet
from torch import nn

from torchconstrain import (
    Clamp,
    FixedMask,
    LearnableMask,
    PruningSchedule,
    TemperatureSchedule,
    UnitNorm,
    bake,
    check,
    constrain,
    surgery,
)


def cubic(step, initial, final, start, end):
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1 - progress) ** 3


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_pruning_schedule_follows_the_cubic_formula(scope):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 40))
    constrain(model, {nn.Linear: FixedMask.magnitude(sparsity=0.0)})
    schedule = PruningSchedule(model, final_sparsity=0.9, initial_sparsity=0.1, start=2, end=12, every=3, scope=scope)
    total = 20 * 20 + 20 * 40
    last_target = 0.0
    for step in range(1, 16):
        schedule.step()
        assert schedule.sparsity() == pytest.approx(cubic(step, 0.1, 0.9, 2, 12))
        if step in (2, 5, 8, 11, 12):
            last_target = schedule.sparsity()
        zeros = sum(int((m.weight == 0).sum()) for m in model)
        if scope == "global":
            assert zeros == round(last_target * total)
        else:
            assert zeros == round(last_target * 400) + round(last_target * 800)
    assert schedule.sparsity() == 0.9


def test_pruned_entries_stay_pruned_while_training():
    model = nn.Sequential(nn.Linear(10, 10))
    constrain(model, {nn.Linear: FixedMask.magnitude(sparsity=0.0)})
    schedule = PruningSchedule(model, final_sparsity=0.8, end=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    previous = torch.zeros(10, 10, dtype=torch.bool)
    for _ in range(8):
        optimizer.zero_grad()
        model(torch.randn(4, 10)).square().sum().backward()
        optimizer.step()
        schedule.step()
        zeros = model[0].weight == 0
        assert torch.all(zeros[previous])
        previous = zeros


def test_pruning_schedule_resumes_exactly_from_a_checkpoint():
    def run(steps, model, schedule, optimizer, seed):
        torch.manual_seed(seed)
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(4, 12)).square().sum().backward()
            optimizer.step()
            schedule.step()

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 12))
        constrain(model, {nn.Linear: [FixedMask.magnitude(sparsity=0.0), LearnableMask()]})
        return model, PruningSchedule(model, final_sparsity=0.7, end=10, every=2)

    straight, schedule = build()
    optimizer = torch.optim.SGD(straight.parameters(), lr=0.1)
    run(4, straight, schedule, optimizer, seed=1)
    checkpoint = copy.deepcopy((straight.state_dict(), schedule.state_dict(), optimizer.state_dict()))
    run(8, straight, schedule, optimizer, seed=2)

    resumed, schedule2 = build()
    optimizer2 = torch.optim.SGD(resumed.parameters(), lr=0.1)
    resumed.load_state_dict(checkpoint[0])
    schedule2.load_state_dict(checkpoint[1])
    optimizer2.load_state_dict(checkpoint[2])
    run(8, resumed, schedule2, optimizer2, seed=2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert schedule2.last_step == 12


def test_temperature_schedule_anneals_and_resumes():
    model = nn.Linear(4, 4)
    constrain(model, {"weight": LearnableMask()})
    schedule = TemperatureSchedule(model, initial_temperature=2.0, final_temperature=0.5, steps=4)
    temperature = model.parametrizations.weight[0].temperature
    assert temperature.item() == 2.0
    for step in range(1, 7):
        schedule.step()
        assert temperature.item() == pytest.approx(2.0 * 0.25 ** min(step / 4, 1))
    fresh = nn.Linear(4, 4)
    constrain(fresh, {"weight": LearnableMask()})
    fresh.load_state_dict(model.state_dict())
    other = TemperatureSchedule(fresh, final_temperature=0.1, steps=9)
    other.load_state_dict(schedule.state_dict())
    assert other.temperature() == schedule.temperature()
    assert fresh.parametrizations.weight[0].temperature.item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"final_temperature": float("inf")}, ValueError, "final_temperature to be a finite number > 0. Got inf"),
        ({"final_temperature": float("nan")}, ValueError, "final_temperature to be a finite number > 0. Got nan"),
        ({"final_temperature": 1e-50}, ValueError, "final_temperature to be a finite number > 0 in float32 .*which is 0 there"),
        ({"initial_temperature": 1e39}, ValueError, "initial_temperature .* in float32 .*which is inf there"),
        ({"final_temperature": "0.1"}, TypeError, "TemperatureSchedule: expected final_temperature to be a number. Got str"),
        ({"steps": 2.0}, TypeError, "TemperatureSchedule: expected steps to be an integer. Got float"),
        ({"steps": 0}, ValueError, "expected steps to be an integer >= 1. Got 0"),
    ],
)
def test_temperature_schedule_refuses_temperatures_the_masks_cannot_hold(settings, error, message):
    model = nn.Linear(4, 4)
    constrain(model, {"weight": LearnableMask()})
    with pytest.raises(error, match=message):
        TemperatureSchedule(model, **{"final_temperature": 0.1, "steps": 3, **settings})
    assert model.parametrizations.weight[0].temperature.item() == 1.0


def test_schedules_refuse_bad_settings_and_unconstrained_models():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="PruningSchedule: no tensor with a FixedMask in the model"):
        PruningSchedule(model, final_sparsity=0.5, end=10)
    constrain(model, {"weight": FixedMask.magnitude(sparsity=0.0)})
    with pytest.raises(ValueError, match="0 <= start < end. Got start=5, end=5"):
        PruningSchedule(model, final_sparsity=0.5, start=5, end=5)
    with pytest.raises(ValueError, match=r"final_sparsity: expected sparsity in \[0, 1\). Got 1.5"):
        PruningSchedule(model, final_sparsity=1.5, end=5)
    with pytest.raises(ValueError, match="no tensor with a LearnableMask"):
        TemperatureSchedule(model, final_temperature=0.1, steps=3)
    with pytest.raises(TypeError, match="PruningSchedule: expected end to be an integer. Got str: '5'"):
        PruningSchedule(model, final_sparsity=0.5, end="5")
    with pytest.raises(ValueError, match="PruningSchedule: expected every to be an integer >= 1. Got 0"):
        PruningSchedule(model, final_sparsity=0.5, end=5, every=0)
    with pytest.raises(ValueError, match="PruningSchedule: unknown scope 'layer'"):
        PruningSchedule(model, final_sparsity=0.5, end=5, scope="layer")
    schedule = PruningSchedule(model, final_sparsity=0.5, end=5)
    with pytest.raises(ValueError, match=r"missing keys \['end', 'every'"):
        schedule.load_state_dict({"last_step": 3})


def test_a_global_pruning_schedule_counts_a_tied_parameter_once():
    torch.manual_seed(0)
    model = TiedNet()
    constrain(model, {"*.weight": FixedMask.magnitude(sparsity=0.0)})
    schedule = PruningSchedule(model, final_sparsity=0.5, end=2, scope="global")
    assert len(schedule.targets) == 2  # emb.weight (= head.weight) and body.weight
    schedule.step()
    schedule.step()
    zeros = int((model.emb.weight == 0).sum()) + int((model.body.weight == 0).sum())
    assert zeros == round(0.5 * (12 * 6 + 6 * 6))


def test_a_stack_that_a_grown_mask_could_break_is_refused_before_any_mask_changes():
    layer = nn.Linear(16, 8)
    constrain(layer, {"weight": [FixedMask(torch.arange(16).remainder(2).eq(0).expand(8, 16)), UnitNorm()]})  # every row kept
    mask = layer.parametrizations.weight[0].mask.clone()
    with pytest.raises(ValueError, match=r"PruningSchedule: weight: UnitNorm\(dim=0\) from constrain cannot follow "
                       r"FixedMask.* from PruningSchedule, which grows it: .*keeps every nonzero slice nonzero"):
        PruningSchedule(layer, final_sparsity=0.8, end=1)
    assert torch.equal(layer.parametrizations.weight[0].mask, mask)
    plain = nn.Linear(16, 8)
    constrain(plain, {"weight": [FixedMask.magnitude(sparsity=0.0), Clamp(-0.1, 0.1)]})  # needs no slice: fine
    schedule = PruningSchedule(plain, final_sparsity=0.5, end=1)
    schedule.step()
    check(plain)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_pruning_schedule_masks_exactly_its_target_when_zeros_tie(scope):
    # Masked entries are zeros, like the tensor's own exact zeros: ranked as equals, the
    # new mask could keep an entry the old one masked and prune a live one in its place.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight.view(-1)[::2] = 0.0  # half the entries are exact zeros
    keep = torch.ones(2048, dtype=torch.bool)
    keep[torch.randperm(1024)[:205] * 2] = False  # 10% masked, scattered among the zeros
    constrain(model, {nn.Linear: FixedMask(keep.view(32, 64))})
    schedule = PruningSchedule(model, final_sparsity=0.4, initial_sparsity=0.1, end=4, scope=scope)
    for _ in range(5):
        masked = int((~model[0].parametrizations.weight[0].mask).sum())
        assert masked == round(schedule.sparsity() * 2048)
        schedule.step()


def test_temperature_schedule_refuses_a_temperature_the_cast_buffer_cannot_hold():
    model = nn.Linear(4, 4)
    constrain(model, {"weight": LearnableMask()})
    model.half()  # the temperature buffer is float16 now: 1e-8 is 0 there
    schedule = TemperatureSchedule(model, final_temperature=1e-8, steps=2)
    schedule.step()  # 1e-4 holds
    held = model.parametrizations.weight[0].temperature.clone()
    with pytest.raises(ValueError, match=r"weight: the temperature of step 2, 1e-08, is 0 in torch.float16"):
        schedule.step()
    assert schedule.last_step == 1
    assert torch.equal(model.parametrizations.weight[0].temperature, held)


@pytest.mark.parametrize("bad, error, message", [
    ({"final_sparsity": 1.5}, ValueError, "final_sparsity"),
    ({"initial_sparsity": 0.9}, ValueError, r"expected initial_sparsity <= final_sparsity \(masks only grow\)"),
    ({"every": 0}, ValueError, "every to be an integer >= 1"),
    ({"scope": "layer"}, ValueError, "scope"),
    ({"last_step": -1}, ValueError, "last_step to be an integer >= 0"),
    ({"end": "10"}, TypeError, "end to be an integer"),
])
def test_load_state_dict_checks_settings_as_the_constructor_does_and_changes_nothing_when_it_refuses(bad, error, message):
    model = nn.Sequential(nn.Linear(8, 8))
    constrain(model, {nn.Linear: FixedMask.magnitude(sparsity=0.0)})
    schedule = PruningSchedule(model, final_sparsity=0.5, end=10)
    schedule.step()
    before = schedule.state_dict()
    with pytest.raises(error, match=message):
        schedule.load_state_dict({**before, **bad})
    assert schedule.state_dict() == before


def test_a_pruning_schedule_that_would_shrink_its_masks_is_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    constrain(model, {nn.Linear: FixedMask.magnitude(sparsity=0.0)})
    with pytest.raises(ValueError, match="masks only grow"):
        PruningSchedule(model, final_sparsity=0.2, initial_sparsity=0.6, end=10)


def test_a_temperature_checkpoint_the_masks_cannot_hold_is_refused_and_changes_nothing():
    model = nn.Linear(4, 4)
    constrain(model, {"weight": LearnableMask()})
    model.half()
    schedule = TemperatureSchedule(model, final_temperature=0.01, steps=4)
    before = schedule.state_dict()
    with pytest.raises(ValueError, match="is 0 in torch.float16"):
        schedule.load_state_dict({**before, "final_temperature": 1e-9, "last_step": 4})
    assert schedule.state_dict() == before


def test_a_temperature_schedule_starts_from_the_masks_own_temperature():
    # It started from 1.0 whatever the masks had: building it moved gates of a mask made
    # with temperature=0.2 from 0.98 to 0.69, silently.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    constrain(model, {"0": LearnableMask(temperature=0.2)})
    gates = model[0].parametrizations.weight[0].gate().clone()
    schedule = TemperatureSchedule(model, final_temperature=0.02, steps=2)
    assert torch.equal(model[0].parametrizations.weight[0].gate(), gates)
    schedule.step()
    torch.testing.assert_close(model[0].parametrizations.weight[0].temperature, torch.tensor(0.2 * 0.1**0.5))
    constrain(model, {"1": LearnableMask(temperature=0.5)})
    with pytest.raises(ValueError, match=r"the masks have different temperatures \(0.weight 0.0632456, 1.weight 0.5\).*"
                                         "pass initial_temperature="):
        TemperatureSchedule(model, final_temperature=0.02, steps=2)
    TemperatureSchedule(model, final_temperature=0.02, steps=2, initial_temperature=1.0)


@pytest.mark.parametrize("dim", [0, 1])
def test_a_structured_mask_grows_by_whole_slices(dim):
    # Every FixedMask was grown entry by entry: a structured mask ended 50% sparse with no
    # channel removed.
    torch.manual_seed(0)
    layer = nn.Linear(12, 16)
    constrain(layer, {"weight": FixedMask.structured(sparsity=0.25, dim=dim)})
    first = layer.parametrizations.weight[0].mask.clone()
    schedule = PruningSchedule(layer, final_sparsity=0.5, end=3, initial_sparsity=0.25)
    for _ in range(3):
        schedule.step()
    mask = layer.parametrizations.weight[0].mask
    slices = mask.all(dim=1 - dim)
    assert torch.equal(mask, slices.unsqueeze(1 - dim).expand_as(mask))  # whole slices, kept or masked
    assert int((~slices).sum()) == round(0.5 * layer.weight.shape[dim])
    assert not (mask & ~first).any()  # masks only grow
    norms = layer.weight.detach().norm(dim=1 - dim)
    masked_now = ~slices & first.all(dim=1 - dim)  # masked by the schedule, not at the start
    assert norms[slices].min() >= layer.parametrizations.weight.original.detach().norm(dim=1 - dim)[masked_now].max()


@pytest.mark.parametrize("rules, scope, message", [
    ({"weight": FixedMask.n_m(2, 4)}, "tensor", r"weight: its FixedMask was chosen by n_m\(2:4, dim=1\); .* no schedule can raise"),
    ({"weight": FixedMask.structured(sparsity=0.25)}, "global", r"ranked by their own norms, tensor by tensor: pass scope='tensor'"),
])
def test_masks_a_schedule_cannot_grow_alike_are_refused(rules, scope, message):
    layer = nn.Linear(8, 8)
    constrain(layer, rules)
    mask = layer.parametrizations.weight[0].mask.clone()
    with pytest.raises(ValueError, match=message):
        PruningSchedule(layer, final_sparsity=0.75, end=2, scope=scope)
    assert torch.equal(layer.parametrizations.weight[0].mask, mask)


def test_surgery_channel_masks_are_not_grown_entry_by_entry():
    # With key=None the schedule grew mask_blocks' channel masks entry by entry: 50% zeros,
    # and shrink removed only the 25% whole channels.
    import torchvision

    model = torchvision.models.mobilenet_v3_small(weights=None)
    surgery.mask_blocks(model, sparsity=0.25)
    with pytest.raises(ValueError, match=r"features.2.block.0.0.weight: its FixedMask was chosen by surgery, as whole "
                                         r"channels of a channel group; .* surgery.mask_blocks"):
        PruningSchedule(model, final_sparsity=0.5, end=1)
    constrain(model, {"classifier.0": FixedMask.magnitude(sparsity=0.0)})
    PruningSchedule(model, final_sparsity=0.5, end=1, key="classifier.0").step()  # a key for the others: fine


def test_a_schedule_whose_constraints_were_baked_refuses_to_step():
    # After bake the schedules stepped on: sparsity() said 0.8 while nothing changed.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    constrain(model, {"0": FixedMask.magnitude(sparsity=0.0), "1": LearnableMask()})
    pruning = PruningSchedule(model, final_sparsity=0.8, end=4)
    annealing = TemperatureSchedule(model, final_temperature=0.1, steps=4)
    pruning.step(), annealing.step()
    bake(model, "1")
    pruning.step()
    with pytest.raises(ValueError, match=r"TemperatureSchedule: the LearnableMask of 1.weight is no longer in the "
                                         r"model \(baked, shrunk or removed\), so stepping would change nothing"):
        annealing.step()
    bake(model)
    with pytest.raises(ValueError, match=r"PruningSchedule: the FixedMask of 0.weight is no longer in the model"):
        pruning.step()
    assert pruning.last_step == 2 and annealing.last_step == 1


def test_a_resumed_schedule_is_checked_as_a_new_one_against_its_masks():
    # load_state_dict took scope="global" for a structured mask, which the constructor
    # refuses: slice norms were then ranked against entry magnitudes.
    model = nn.Sequential(nn.Linear(8, 16))
    constrain(model, {"0.weight": FixedMask.structured(sparsity=0.25)})
    schedule = PruningSchedule(model, final_sparsity=0.75, end=4, initial_sparsity=0.25)
    before = schedule.state_dict()
    with pytest.raises(ValueError, match=r"pass scope='tensor'"):
        schedule.load_state_dict({**before, "scope": "global"})
    assert schedule.state_dict() == before


def test_a_structured_mask_replaced_by_another_pattern_is_not_grown_by_slices():
    model = nn.Sequential(nn.Linear(8, 16))
    constrain(model, {"0.weight": FixedMask.structured(sparsity=0.25)})
    model[0].parametrizations.weight[0].mask = torch.rand(16, 8, generator=torch.Generator().manual_seed(0)) > 0.3
    with pytest.raises(ValueError, match=r"0.weight: its FixedMask was chosen by structured.*, but it no longer masks "
                                         r"whole slices along dim 0"):
        PruningSchedule(model, final_sparsity=0.5, end=1)
