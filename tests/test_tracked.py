"""Tracked parameters: writes through .data show in the version counter; bake makes them plain."""

import copy
import io

import torch
from torch import nn

from torchconstrain import FixedMask, LearnableMask, bake, constrain
from torchconstrain._tracked import Tracked, TrackedValue, track, track_value, untrack


def test_writes_through_data_move_the_version_counter():
    p = nn.Parameter(torch.zeros(4))
    track(p)
    version = p._version
    p.data.copy_(torch.ones(4))
    assert p._version > version and torch.equal(p, torch.ones(4))
    version = p._version
    p.data = torch.full((4,), 2.0)  # assignment replaces the storage, perhaps at the old address
    assert p._version > version and torch.equal(p, torch.full((4,), 2.0))
    assert not p.data.requires_grad and p.requires_grad


def test_a_tracked_parameter_is_a_parameter_everywhere_a_user_looks():
    layer = nn.Linear(3, 2)
    track(layer.weight)
    assert isinstance(layer.weight, nn.Parameter) and type(layer.weight) is Tracked
    assert layer.weight in set(layer.parameters())
    assert type(copy.deepcopy(layer).weight) is Tracked
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False).weight) is nn.Parameter  # plain after a pickle
    untrack(layer.weight)
    assert type(layer.weight) is nn.Parameter


def test_only_plain_parameters_are_tracked():
    buffer, subclass = torch.zeros(2), type("Sub", (nn.Parameter,), {})(torch.zeros(2))
    for tensor in (buffer, subclass, None):
        track(tensor)
    assert type(buffer) is torch.Tensor and type(subclass).__name__ == "Sub"


def test_constrain_tracks_originals_and_constraint_parameters_and_bake_untracks():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    constrain(model, {"0.weight": FixedMask.magnitude(sparsity=0.5), "1.weight": LearnableMask()})
    tracked = [model[0].parametrizations.weight.original, model[1].parametrizations.weight.original,
               model[1].parametrizations.weight[0].scores]
    assert all(type(t) is Tracked for t in tracked)
    assert type(model[0].bias) is nn.Parameter  # unconstrained tensors stay as they were
    bake(model)
    assert type(model[0].weight) is nn.Parameter and type(model[1].weight) is nn.Parameter


def test_a_tracked_value_moves_its_version_on_writes_that_bypass_it_and_is_otherwise_a_plain_tensor():
    value = torch.arange(4.0)
    track_value(value)
    assert type(value) is TrackedValue
    for write in (lambda: value.data.add_(1), lambda: setattr(value, "data", torch.zeros(4)), lambda: value.numpy()):
        version = value._version
        write()
        assert value._version > version
    assert type(value + 1) is torch.Tensor and type(copy.deepcopy(value)) is torch.Tensor
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=True)) is torch.Tensor
    assert repr(value) == repr(value.clone())
    parameter = nn.Parameter(torch.zeros(2))
    track_value(parameter)  # only plain tensors
    assert type(parameter) is nn.Parameter
