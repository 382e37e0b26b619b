"""Pruning any model through Torch-Pruning's dependency graph: masked equals shrunk, budgets met, mixing refused."""

import sys

import pytest
import torch
import torchvision
from conftest import assert_unchanged, randomize_batchnorm, snapshot
from torch import nn

from torchconstrain import LearnableMask, bake, check, penalty
from torchconstrain.surgery import count_macs, graph

tp = pytest.importorskip("torch_pruning")

SMALL = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomized(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so removed channels would show."""
    return randomize_batchnorm(model, seed).eval()


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomized(torchvision.models.resnet18(weights=None, num_classes=10))


def outputs(model: nn.Module, x: torch.Tensor = SMALL) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def train(model: nn.Module, steps: int = 3, lr: float = 0.05) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(SMALL), torch.tensor([1, 2])) + penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        check(model)
    model.eval()


def test_resnet18_pruned_to_half_its_macs_with_a_learnable_budget():
    model = resnet18()
    dense = count_macs(model, SMALL)
    masks = graph.mask_groups(model, SMALL, macs=0.5, learnable=True, hard=True)
    assert all("budget=surgery.mask_groups macs" in c for row in masks.report for c in row["constraints"])
    assert len(masks.masked) == 12  # the stem + four residual streams + each block's inner channels; not fc's outputs
    leader = masks.budget.masks[0]
    train(model)
    assert leader.multiplier.item() > 0  # the budget pushed: the gates started above it
    promised = masks.budget.allocation()
    masked = outputs(model)
    report = masks.shrink(model)
    torch.testing.assert_close(outputs(model), masked, rtol=1e-5, atol=1e-5)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    achieved = count_macs(model, SMALL)
    assert achieved == pytest.approx(promised.achieved, rel=1e-9)  # the exact cost the allocator used
    assert 0.45 * dense <= achieved <= 0.5 * dense
    assert report.targets["macs"] == (0.5, pytest.approx(achieved / dense))
    assert report.macs == (dense, achieved)
    assert "macs    target 0.500, achieved" in str(report)
    assert model.fc.out_features == 10


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_fixed_masks_keep_each_groups_most_important_channels_and_shrink_exactly(sparsity):
    model = resnet18()
    masks = graph.mask_groups(model, SMALL, sparsity=sparsity, minimum=1)
    check(model)
    masked = outputs(model)
    channels = {g.name: g.channels for g in masks.groups}
    report = masks.shrink(model)
    torch.testing.assert_close(outputs(model), masked, rtol=1e-5, atol=1e-5)
    for name, full in channels.items():
        kept = report.channels.get(name, (full, full))[1]
        assert kept == max(full - round(sparsity * full), 1)
    assert report.targets["sparsity"][1] == pytest.approx(sparsity, abs=0.01)
    if sparsity:  # the writers show the zeros too: the conv whose outputs root the stem's group
        assert model.conv1.out_channels == report.channels["conv1"][1]


def test_fixed_mac_budget_on_resnet50_matches_torch_prunings_own_pruning_of_the_same_channels():
    torch.manual_seed(0)
    model = randomized(torchvision.models.resnet50(weights=None, num_classes=10))
    reference = torchvision.models.resnet50(weights=None, num_classes=10)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    masks = graph.mask_groups(model, SMALL, macs=0.4)
    keeps = masks.allocation.keep
    masked = outputs(model)
    masks.shrink(model)
    torch.testing.assert_close(outputs(model), masked, rtol=1e-5, atol=1e-5)
    assert count_macs(model, SMALL) <= 0.4 * count_macs(reference, SMALL)
    # Torch-Pruning alone, told to remove the same channels from the unmasked model: the same shapes
    dg = tp.DependencyGraph().build_dependency(reference, example_inputs=SMALL, verbose=False)
    names = dict(reference.named_modules())
    for name, keep in keeps.items():
        layer = names[name]
        dg.get_pruning_group(layer, dg.get_pruner_of_module(layer).prune_out_channels,
                             (~keep).nonzero().flatten().tolist()).prune()
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert ours == {k: v.shape for k, v in reference.state_dict().items()}


def randomize_gates(model: nn.Module) -> None:
    """Gates as training might leave them: random (followers share their leader's scores)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mask in model.modules():
            if isinstance(mask, LearnableMask) and mask.gate_index is not None:
                mask.scores.normal_(generator=generator)


def test_regnet_leaves_grouped_conv_groups_whole_and_meets_each_groups_learnable_budget():
    torch.manual_seed(0)
    model = randomized(torchvision.models.regnet_y_400mf(weights=None, num_classes=10))
    masks = graph.mask_groups(model, SMALL, sparsity=0.5, learnable=True, hard=True)
    grouped = [g for g in masks.groups if g.grouped is not None]
    assert grouped and all(g.name not in masks.masked for g in grouped)
    assert "groups=" in grouped[0].grouped
    randomize_gates(model)
    masked = outputs(model)
    report = masks.shrink(model)
    torch.testing.assert_close(outputs(model), masked, rtol=1e-5, atol=1e-5)
    assert set(report.channels) <= set(masks.masked)
    for name, (before, after) in report.channels.items():
        assert after == before - round(0.5 * before)  # exactly the budget, whatever the gates were


def convnext() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.convnext_tiny(weights=None, num_classes=10).eval()


def test_convnext_streams_through_layernorm_are_refused_skipped_or_pruned_approximately():
    model = convnext()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"pass through a layer that mixes their channels.*through LayerNorm features\."):
        graph.mask_groups(model, SMALL, macs=0.6)
    assert_unchanged(model, before)
    skipped = graph.mask_groups(model, SMALL, macs=0.6, mixing="skip")  # the MLP hidden channels only
    refused = [g for g in skipped.groups if g.mixing is not None]
    assert refused and not {g.name for g in refused} & set(skipped.masked)
    masked = outputs(model)
    report = skipped.shrink(model)
    torch.testing.assert_close(outputs(model), masked, rtol=1e-5, atol=1e-5)
    assert report.targets["macs"][1] <= 0.6
    approximate = graph.mask_groups(model, SMALL, sparsity=0.5, mixing="approximate")  # the streams too
    assert {g.name for g in refused} <= set(approximate.masked)
    with pytest.raises(ValueError, match="passes through LayerNorm"):
        graph.shrink(model, SMALL)  # the default refuses to remove them
    report = graph.shrink(model, SMALL, mixing="approximate")
    assert outputs(model).shape == (2, 10) and report.macs[1] < report.macs[0]
    assert {g.name for g in refused} <= set(report.channels)


def test_timm_efficientnet_with_learnable_budgets_shrinks_exactly_stem_and_squeeze_channels_included():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomized(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10))
    masks = graph.mask_groups(model, SMALL, sparsity=0.25, learnable=True, hard=True)
    randomize_gates(model)
    masked = outputs(model)
    report = masks.shrink(model)
    torch.testing.assert_close(outputs(model), masked, rtol=1e-5, atol=1e-5)
    assert report.targets["sparsity"][1] == pytest.approx(0.25, abs=0.02)
    assert model.conv_stem.out_channels == 24  # the stem shrinks too: 32 - 8
    assert model.blocks[1][0].se.conv_reduce.out_channels == 3  # and the squeeze channels: 4 - 1


def test_timm_ghostnet_with_skip_leaves_the_groups_the_graph_maps_wrongly_whole_and_shrinks_the_rest_exactly():
    # Removing some of GhostNet's groups through Torch-Pruning (shortcut and squeeze-excite
    # ones) moves the outputs by 6e-6 to 0.5 of their largest value; the old fixed tolerance
    # (1e-4) let the smaller moves through.
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomized(timm.create_model("ghostnet_100", pretrained=False, num_classes=10))
    example, other = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64)
    masks = graph.mask_groups(model, example, sparsity=0.5, mixing="skip")
    masked = outputs(model, other)
    with pytest.warns(UserWarning, match=r"left groups .*blocks\.7\.0\.shortcut\.2.* whole"):
        report = masks.shrink(model)
    assert "blocks.7.0.shortcut.2" not in report.channels and "conv_head" in report.channels
    assert report.params[1] < 0.6 * report.params[0]
    torch.testing.assert_close(outputs(model, other), masked, rtol=1e-5, atol=1e-6)


class MeanCentered(nn.Module):
    """A channel-mixing step that the graph sees as an elementwise op."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = self.a(x)
        return self.b(y - y.mean(dim=1, keepdim=True)).mean(dim=(2, 3))




class FixedSplit(nn.Module):
    """Splits its channels at a size it keeps (as timm's MixedConv2d does): pruning the
    conv before it leaves that size behind."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        left, right = self.a(x).split([4, 4], dim=1)
        return (self.b(left) + self.c(right)).mean(dim=(2, 3))


def test_shrink_restores_the_model_when_the_pruned_model_cannot_run():
    torch.manual_seed(0)
    model = FixedSplit().eval()
    masks = graph.mask_groups(model, SMALL, sparsity=0.5)
    before = outputs(model)
    with pytest.raises(ValueError, match=r"the pruned model cannot run the example \(RuntimeError.*left baked and unpruned"):
        masks.shrink(model)
    assert model.a.out_channels == 8
    torch.testing.assert_close(outputs(model), before)


def test_shrink_restores_the_model_when_removing_channels_would_change_the_outputs():
    torch.manual_seed(0)
    model = MeanCentered().eval()
    masks = graph.mask_groups(model, SMALL, sparsity=0.5)
    before = outputs(model)
    with pytest.raises(ValueError, match="changed the outputs by .* The model is left baked and unpruned"):
        masks.shrink(model)
    assert model.a.out_channels == 8 and model.b.in_channels == 8
    torch.testing.assert_close(outputs(model), before)


class SlightlyMixed(nn.Module):
    """Group ``a`` is exact; group ``b`` mixes its channels through a small mean the graph
    does not see (the outputs move by about 2e-5 of their largest value)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = self.b(self.a(x))
        return self.c(y + 1e-3 * y.mean(dim=1, keepdim=True)).mean(dim=(2, 3))


def slightly_mixed_and_masked() -> tuple[nn.Module, graph.GraphMasks, torch.Tensor]:
    torch.manual_seed(0)
    model = SlightlyMixed().eval()
    masks = graph.mask_groups(model, SMALL, sparsity=0.5)
    return model, masks, outputs(model)


def test_shrink_refuses_a_change_above_rounding_and_names_the_group_that_makes_it():
    model, masks, before = slightly_mixed_and_masked()
    with pytest.raises(ValueError, match=r"changed the outputs by .* rounding error, measured against float64.*"
                                         r"The group b fails when removed alone; graph.shrink\(model, example, mixing='skip'\) leaves such "):
        masks.shrink(model)
    assert (model.a.out_channels, model.b.out_channels) == (8, 8)
    torch.testing.assert_close(outputs(model), before)
    with pytest.warns(UserWarning, match="left group b whole"):  # the remedy the message names
        graph.shrink(model, SMALL, mixing="skip")
    assert (model.a.out_channels, model.b.out_channels) == (4, 8)


def test_shrink_with_skip_leaves_the_groups_that_change_the_outputs_whole_and_removes_the_others():
    model, masks, before = slightly_mixed_and_masked()
    with pytest.warns(UserWarning, match="left group b whole"):
        report = graph.shrink(model, SMALL, mixing="skip")
    assert report.channels == {"a": (8, 4)} and (model.a.out_channels, model.b.out_channels) == (4, 8)
    torch.testing.assert_close(outputs(model), before, rtol=1e-6, atol=1e-7)


def test_a_fixed_tolerance_accepts_the_change_it_allows():
    model, masks, before = slightly_mixed_and_masked()
    graph.shrink(model, SMALL, rtol=1e-4, atol=1e-4)
    assert (model.a.out_channels, model.b.out_channels) == (4, 4)
    difference = (outputs(model) - before).abs().max().item()
    assert 1e-6 < difference < 1e-4


class Float32Only(SlightlyMixed):
    def forward(self, x):
        if x.dtype != torch.float32:
            raise TypeError("float32 only")
        return super().forward(x)


def test_a_model_that_cannot_run_in_float64_is_compared_with_the_fixed_tolerance():
    torch.manual_seed(0)
    model = Float32Only().eval()
    masks = graph.mask_groups(model, SMALL, sparsity=0.5)
    before = outputs(model)
    with pytest.warns(UserWarning, match=r"a float64 copy of the model cannot run \(TypeError: float32 only\)"):
        masks.shrink(model)  # within the default rtol=atol=1e-4
    assert (model.a.out_channels, model.b.out_channels) == (4, 4)
    torch.testing.assert_close(outputs(model), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", [MeanCentered, FixedSplit])
def test_a_refused_shrink_keeps_the_models_own_modules_and_parameters_so_its_optimizer_still_trains_it(model):
    # The model was restored from a deep copy: every module and Parameter a new object, the
    # optimizer (and any reference held) left on the pruned ones.
    torch.manual_seed(0)
    model = model().eval()
    masks = graph.mask_groups(model, SMALL, sparsity=0.5)
    bake(model)
    modules, before = list(model.modules()), snapshot(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="left baked and unpruned"):
        masks.shrink(model)
    assert_unchanged(model, before)  # the same Parameter objects, values and classes
    assert all(a is b for a, b in zip(model.modules(), modules))
    weight = model.a.weight.detach().clone()
    model(SMALL).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.a.weight, weight)


class SoftmaxOverChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.b(self.a(x).softmax(dim=1)).mean(dim=(2, 3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "fixed masks need sparsity= or macs="),
        ({"sparsity": 0.5, "macs": 0.5}, "not both"),
        ({"sparsity": 1.0}, r"expected sparsity in \[0, 1\). Got 1.0"),
        ({"macs": 0.0}, r"share of MACs to keep, in \(0, 1\]. Got 0.0"),
        ({"macs": 0.5, "mixing": "ignore"}, "expected mixing in"),
        ({"macs": 0.5, "minimum": 2.0}, "expected minimum"),
        ({"macs": 0.2, "minimum": 0.5}, r"minimums alone cost"),
        ({"macs": 0.5, "learnable": True, "minimum": 0.9}, r"minimums alone cost"),
        ({"sparsity": 0.5, "importance": "taylor"}, "unknown importance 'taylor'"),
        ({"sparsity": 0.5, "importance": lambda name, group: torch.ones(3)}, "has 3 scores, expected"),
        ({"sparsity": 0.5, "ignored": ["head"]}, "no layer 'head' to ignore"),
    ],
)
def test_bad_arguments_are_refused_before_the_model_changes(kwargs, message):
    model = resnet18()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        graph.mask_groups(model, SMALL, **kwargs)
    assert_unchanged(model, before)


def test_a_softmax_over_channels_is_refused_by_name():
    model = SoftmaxOverChannels().eval()
    with pytest.raises(ValueError, match="through SoftmaxBackward0"):
        graph.mask_groups(model, SMALL, sparsity=0.5)


def test_missing_torch_pruning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r"pip install 'torchconstrain\[graph\]'"):
        graph.mask_groups(resnet18(), SMALL, sparsity=0.5)


def test_a_mac_budget_counts_the_depthwise_convs_a_group_passes_through():
    # MobileNetV3's depthwise convs are sliced with their group: the allocator's promise is the shrunk model's MACs.
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    example = torch.zeros(1, 3, 64, 64)
    dense = count_macs(model, example)
    masks = graph.mask_groups(model, example, macs=0.3, mixing="skip")
    group = next(g for g in masks.groups if any(layer.name == "features.2.block.0.0" for layer in g.writers))
    assert [layer.name for layer in group.through] == ["features.2.block.1.0"]
    report = masks.shrink(model)
    assert report.macs[1] == masks.allocation.achieved
    assert 0.29 < report.macs[1] / dense <= 0.3


@pytest.mark.parametrize("learnable", [False, True])
def test_a_groups_minimum_binds_fixed_masks_and_learnable_sparsity_budgets(learnable):
    # Learnable masks with sparsity= kept 10% of each group, whatever minimum= asked.
    x = torch.randn(1, 3, 32, 32)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    masks = graph.mask_groups(model, x, sparsity=0.9, learnable=learnable, minimum=0.5)
    report = masks.shrink(model)
    assert min(after / before for before, after in report.channels.values()) == 0.5


class LogitsAndFeatures(nn.Module):
    """Returns the classifier's logits and the features it read: the features' channels are outputs too."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.conv, self.bn, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16, 10)

    def forward(self, x):
        features = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        logits = self.fc(features)
        return {"out": logits, "features": features} if self.as_dict else (logits, features)


@pytest.mark.parametrize("as_dict, where", [(False, r"output \[1\]"), (True, r"output \['features'\]")])
@pytest.mark.parametrize("mixing", ["error", "approximate"])
def test_shrink_compares_every_output_and_refuses_a_changed_shape(as_dict, where, mixing):
    # Only the first output was compared: the returned features lost half their channels unseen.
    torch.manual_seed(0)
    model = randomized(LogitsAndFeatures(as_dict))
    graph.mask_groups(model, SMALL, sparsity=0.5)
    with pytest.raises(ValueError, match=rf"changed the shape of {where} from \(2, 16\) to \(2, 8\).*left baked and unpruned"):
        graph.shrink(model, SMALL, mixing=mixing)
    assert model.conv.out_channels == 16 and model.fc.in_features == 16
    report = graph.shrink(model, SMALL, ignored=["conv"])  # its channels are an output: kept
    assert report.channels == {}


class TwoHeads(nn.Module):
    """A dict of two outputs; the second mixes the channels the first ignores."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = self.a(x)
        return {"out": self.b(y).mean(dim=(2, 3)), "aux": self.c(y - y.mean(dim=1, keepdim=True)).mean(dim=(2, 3))}


def test_shrink_compares_the_values_of_every_output_of_a_dict():
    torch.manual_seed(0)
    model = TwoHeads().eval()
    masks = graph.mask_groups(model, SMALL, sparsity=0.5)
    with pytest.raises(ValueError, match=r"changed output \['aux'\] by .* left baked and unpruned"):
        masks.shrink(model)
    assert model.a.out_channels == 8
    report = graph.shrink(model, SMALL, mixing="approximate")  # changed values, same shapes: pruned anyway
    assert report.channels == {"a": (8, 4)}


def conv_bn_relu(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out), nn.ReLU())


class Chunked(nn.Module):
    """Half the channels through a conv, half past it: the graph maps the group beyond the conv's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = conv_bn_relu(3, 16), conv_bn_relu(8, 8), nn.Linear(16, 5)

    def forward(self, x):
        left, right = self.a(x).chunk(2, dim=1)
        return self.fc(torch.cat([self.b(left), right], dim=1).mean(dim=(2, 3)))


class ConcatenatedWithItself(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = conv_bn_relu(3, 16), conv_bn_relu(16, 8), nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([self.a(x)] * 2, dim=1)
        return self.fc(self.b(y[:, :16] + y[:, 16:]).mean(dim=(2, 3)))


def shufflenet() -> nn.Module:
    return torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10)


@pytest.mark.parametrize(
    "model, message",
    [
        (Chunked, r"maps the 16 channels of group a\.0 onto channel 15 of b\.0, which has 8: Torch-Pruning could not "
                  r"trace .* ignored=\['a\.0'\]"),
        (ConcatenatedWithItself, r"maps the 32 channels of group a\.0 onto channel 31 of a\.0, which has 16"),
        (shufflenet, r"Torch-Pruning could not trace ShuffleNetV2 \(ZeroDivisionError: .*cannot be pruned through "
                     "the dependency graph"),
    ],
)
def test_a_model_the_dependency_graph_cannot_follow_is_refused_before_it_changes(model, message):
    # An IndexError or ZeroDivisionError from inside the graph escaped, naming nothing.
    torch.manual_seed(0)
    model = model().eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        graph.mask_groups(model, SMALL, sparsity=0.5, mixing="skip")
    assert_unchanged(model, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_group_the_graph_cannot_follow_can_be_left_whole():
    torch.manual_seed(0)
    model = randomized(ConcatenatedWithItself())
    masks = graph.mask_groups(model, SMALL, sparsity=0.5, ignored=["a.0"])
    masked = outputs(model)
    report = masks.shrink(model)
    torch.testing.assert_close(outputs(model), masked, rtol=1e-5, atol=1e-5)
    assert report.channels == {"b.0": (8, 4)}


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.b(self.a(x)).mean(dim=(2, 3))


def test_a_layer_whose_freed_output_shares_an_id_with_the_models_output_is_not_an_output_layer():
    # The mean's output took the id of a's freed output, so a was taken for an output layer and left whole.
    torch.manual_seed(0)
    model = TwoConvs().eval()
    masks = graph.mask_groups(model, SMALL, sparsity=0.5)
    assert masks.masked == ["a"]
    masked = outputs(model)
    assert masks.shrink(model).channels == {"a": (8, 4)}
    torch.testing.assert_close(outputs(model), masked, rtol=1e-5, atol=1e-5)


class TiedConvs(nn.Module):
    """b and c share one weight; their outputs are summed (one group: cut alike) or concatenated (two groups)."""

    def __init__(self, concatenated: bool) -> None:
        super().__init__()
        self.concatenated = concatenated
        self.a, self.b, self.c = conv_bn_relu(3, 16), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)
        self.c.weight = self.b.weight
        self.fc = nn.Linear(32 if concatenated else 16, 5)

    def forward(self, x):
        y = self.a(x)
        both = torch.cat([self.b(y), self.c(y)], dim=1) if self.concatenated else self.b(y) + self.c(y)
        return self.fc(both.mean(dim=(2, 3)))


def test_tied_weights_cut_alike_are_tied_again():
    # Each slot got its own pruned copy: the weights were silently untied.
    torch.manual_seed(0)
    model = randomized(TiedConvs(concatenated=False))
    masks = graph.mask_groups(model, SMALL, sparsity=0.5)
    masked = outputs(model)
    report = masks.shrink(model)
    assert report.channels == {"a.0": (16, 8), "b": (16, 8)}
    assert model.b.weight is model.c.weight and model.b.weight.shape == (8, 8, 1, 1)
    torch.testing.assert_close(outputs(model), masked, rtol=1e-5, atol=1e-5)


def test_tied_weights_pruning_would_cut_differently_are_refused():
    torch.manual_seed(0)
    model = randomized(TiedConvs(concatenated=True))
    masks = graph.mask_groups(model, SMALL, sparsity=0.5)
    bake(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"b\.weight and c\.weight are one tied Parameter, which pruning would cut into "
                                         "different ones.*left baked and unpruned"):
        masks.shrink(model)
    assert_unchanged(model, before)
    assert model.b.weight is model.c.weight


def test_shrink_keeps_frozen_layers_frozen():
    # Torch-Pruning's new Parameters all require gradients: a BatchNorm frozen for
    # fine-tuning, or a frozen stem, trained again after the shrink.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    for parameter in [model[0].weight, model[1].weight, model[1].bias]:
        parameter.requires_grad_(False)
    graph.mask_groups(model, SMALL, sparsity=0.5)
    report = graph.shrink(model, SMALL)
    assert model[0].out_channels == 8 and report.params[1] < report.params[0]
    assert [p.requires_grad for p in (model[0].weight, model[0].bias, model[1].weight, model[1].bias)] == [
        False, True, False, False]
    assert model[3].weight.requires_grad
