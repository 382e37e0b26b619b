import copy
import io

import pytest
import torch
import torchvision
from conftest import assert_unchanged, randomize_batchnorm, snapshot, train_gates
from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig

from torchconstrain import Clamp, LearnableMask, bake, check, constrain, surgery

ARCHS = ["mobilenet_v3_small", "mobilenet_v3_large"]


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    return randomize_batchnorm(model, seed + 1).eval()


def random_importance(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return lambda name, block: torch.rand(block.channels, generator=generator)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_shrunk_model_matches_masked_model(arch, sparsity):
    model = build(arch)
    surgery.mask_blocks(model, sparsity=sparsity, importance=random_importance(3))
    check(model)
    x = torch.randn(2, 3, 64, 64)
    masked = outputs(model, x)
    report = surgery.shrink(model, measure=False)
    torch.testing.assert_close(outputs(model, x), masked, rtol=1e-5, atol=1e-6)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    expanded = {b.name: b for b in surgery.find_blocks(model) if b.expand is not None}
    for name, block in expanded.items():
        full = report.channels.get(name, (block.channels,))[0]
        assert block.channels == max(full - round(sparsity * full), 1)
    if sparsity == 0.0:
        assert report.channels == {} and report.macs[0] == report.macs[1]
    else:
        assert report.params[1] < report.params[0] and report.macs[1] < report.macs[0]


def test_masked_channel_contributes_nothing_even_with_bn_shift():
    model = build("mobilenet_v3_small")
    surgery.mask_blocks(model, sparsity=0.5)
    block = surgery.find_blocks(model)[2]  # features.3: expand, depthwise, SE-free
    keep = block.project.conv.parametrizations.weight[0].mask[0, :, 0, 0]
    x = torch.randn(1, 3, 64, 64)
    captured = {}
    model.features[3].block[1].register_forward_hook(lambda m, i, out: captured.setdefault("dw", out))
    outputs(model, x)
    assert (captured["dw"][:, ~keep].abs().amax() > 0)  # BN shift + activation: nonzero constants
    assert torch.all(block.project.conv.weight[:, ~keep] == 0)  # ... that the project conv never reads


def test_fifty_percent_on_large_meets_the_mac_goal():
    model = build("mobilenet_v3_large")
    surgery.mask_blocks(model, sparsity=0.5)
    report = surgery.shrink(model, measure=False)
    assert report.macs[1] <= 0.6 * report.macs[0]


def test_shrink_after_training_learnable_masks():
    model = build("mobilenet_v3_small").train()
    surgery.mask_blocks(model, learnable=True, strength=1.0)
    project = model.features[4].block[3][0].parametrizations.weight[0]
    fc1 = model.features[4].block[2].fc1.parametrizations.weight[0]
    assert fc1.scores is project.scores  # one gate per block
    train_gates(model, 4)
    pruned = sum(int((b.project.conv.parametrizations.weight[0].gate() <= 0.5).sum())
                 for b in surgery.find_blocks(model) if b.expand is not None)
    assert pruned > 0
    model.eval()
    baked = copy.deepcopy(model)
    bake(baked)
    x = torch.randn(2, 3, 64, 64)
    surgery.shrink(model, measure=False)
    torch.testing.assert_close(outputs(model, x), outputs(baked, x), rtol=1e-5, atol=1e-6)
    assert sum(b.channels for b in surgery.find_blocks(model)) < sum(b.channels for b in surgery.find_blocks(baked))


def test_a_block_with_every_channel_masked_keeps_one():
    model = build("mobilenet_v3_small")
    surgery.mask_blocks(model, sparsity=0.5)
    block = surgery.find_blocks(model)[1]
    for fqn in block.weights().values():
        module = model.get_submodule(fqn.rsplit(".", 1)[0])
        module.parametrizations.weight[0].mask.fill_(False)
    x = torch.randn(2, 3, 64, 64)
    masked = outputs(model, x)
    report = surgery.shrink(model, measure=False)
    assert report.channels["features.2"] == (72, 1)
    assert surgery.find_blocks(model)[1].channels == 1
    torch.testing.assert_close(outputs(model, x), masked, rtol=1e-5, atol=1e-6)


def test_shrink_then_fold_batchnorm_keeps_outputs():
    model = build("mobilenet_v3_large")
    surgery.mask_blocks(model, sparsity=0.5)
    x = torch.randn(2, 3, 64, 64)
    masked = outputs(model, x)
    surgery.shrink(model, measure=False)
    folded = surgery.fold_batchnorm(model)
    assert folded == sum(isinstance(m, nn.Identity) for m in model.modules()) > 40
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(outputs(model, x), masked, rtol=1e-4, atol=1e-5)


def test_fold_refuses_a_batchnorm_without_running_statistics_before_folding_any():
    # It normalizes with each batch's statistics: no affine map to fold. The refusal came
    # as a TypeError after 33 of the 34 pairs had been folded.
    model = build("mobilenet_v3_small")
    model.features[12][1] = nn.BatchNorm2d(model.features[12][1].num_features, track_running_stats=False).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"BatchNorm features.12.1 has no running statistics"):
        surgery.fold_batchnorm(model)
    assert_unchanged(model, before)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 34


def test_shrink_keeps_frozen_parameters_frozen_and_the_default_example_takes_the_models_dtype():
    model = build("mobilenet_v3_small").double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(False)  # frozen for fine-tuning
    surgery.mask_blocks(model, groups="all", macs=0.5)  # MACs counted on a float64 example
    surgery.shrink(model, measure=False)
    frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen and not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())


def test_fold_refuses_parametrized_convs_and_changes_nothing():
    model = build("mobilenet_v3_small")
    constrain(model, {"features.0.0": Clamp(-1, 1)})
    with pytest.raises(ValueError, match="conv features.0.0 still has parametrizations; bake"):
        surgery.fold_batchnorm(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 34


def test_shrunk_model_saves_and_loads_back():
    model = build("mobilenet_v3_small")
    surgery.mask_blocks(model, sparsity=0.5)
    surgery.shrink(model, measure=False)
    buffer = io.BytesIO()
    torch.save({"plan": surgery.channel_plan(model), "state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)  # weights_only: no code is unpickled
    fresh = torchvision.models.mobilenet_v3_small(weights=None).eval()
    surgery.resize(fresh, checkpoint["plan"])
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(outputs(fresh, x), outputs(model, x))


def test_resize_refuses_impossible_plans_and_changes_nothing():
    model = build("mobilenet_v3_small")
    before = snapshot(model)
    with pytest.raises(ValueError, match="no block 'features.99'"):
        surgery.resize(model, {"features.2": 10, "features.99": 3})
    with pytest.raises(ValueError, match="block features.2 has 72 channels; cannot make 100"):
        surgery.resize(model, {"features.2": 100})
    with pytest.raises(ValueError, match="block features.1 has no expand conv"):
        surgery.resize(model, {"features.1": 8})
    assert_unchanged(model, before)


def test_roles_pick_layers_by_function():
    model = build("mobilenet_v3_small")
    depthwise = surgery.role(model, "depthwise")
    report = constrain(model, {depthwise: Clamp(-1, 1), surgery.role(model, "se"): Clamp(-2, 2)})
    assert report["features.1.block.0.0.weight"]["rules"] == "rule 0 (role depthwise)"
    assert report["features.4.block.2.fc2.weight"]["rules"] == "rule 1 (role se)"
    assert len(depthwise.names) == 11
    assert len(surgery.role(model, "expand").names) == 10  # block 1 has no expand conv
    with pytest.raises(ValueError, match="unknown role 'dw'. Expected one of expand, depthwise"):
        surgery.role(model, "dw")


def test_blocks_built_from_configs_are_supported():
    config = InvertedResidualConfig(16, 3, 64, 24, True, "HS", 1, 1, 1.0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), InvertedResidual(config, nn.BatchNorm2d)).eval()
    surgery.mask_blocks(model, sparsity=0.25)
    x = torch.randn(2, 3, 16, 16)
    masked = outputs(model, x)
    report = surgery.shrink(model, example=torch.randn(1, 3, 16, 16), measure=False)
    assert report.channels == {"1": (64, 48)}
    torch.testing.assert_close(outputs(model, x), masked, rtol=1e-5, atol=1e-6)


def test_unsupported_models_get_a_clear_error_and_stay_unchanged():
    resnet = torchvision.models.resnet18(weights=None)
    before = snapshot(resnet)
    with pytest.raises(ValueError, match="ResNet has no torchvision InvertedResidual block"):
        surgery.mask_blocks(resnet, sparsity=0.5)
    assert_unchanged(resnet, before)
    model = build("mobilenet_v3_small")
    model.features[3].block[1] = nn.Sequential(nn.Conv2d(88, 88, 3, padding=1))  # not depthwise, no BN
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"block features.3: not a MobileNetV3 inverted residual block: depthwise conv has groups=1"):
        surgery.mask_blocks(model, sparsity=0.5)
    with pytest.raises(ValueError, match="block features.3"):
        surgery.shrink(model, measure=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_learnable_sparsity_budget_is_met_exactly_in_every_block_and_reported(arch):
    model = build(arch)
    surgery.mask_blocks(model, sparsity=0.5, learnable=True, hard=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # whatever the gates learned
        for module in model.modules():
            if isinstance(module, LearnableMask):
                module.scores.normal_(generator=generator)
    x = torch.randn(2, 3, 64, 64)
    masked = outputs(model, x)
    report = surgery.shrink(model, measure=False)
    torch.testing.assert_close(outputs(model, x), masked, rtol=1e-5, atol=1e-6)
    assert report.channels and all(after == before - round(0.5 * before) for before, after in report.channels.values())
    target, achieved = report.targets["sparsity"]
    assert target == 0.5 and achieved == pytest.approx(0.5, abs=0.01)
    assert "sparsity target 0.500, achieved" in str(report)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, r"expected sparsity in \[0, 1\) for fixed masks. Got None"),
        ({"sparsity": 1.0}, r"expected sparsity in \[0, 1\)"),
        ({"sparsity": 1.0, "learnable": True}, r"expected sparsity in \[0, 1\) or None. Got 1.0"),
        ({"sparsity": 0.5, "importance": "gamma"}, "unknown importance 'gamma'"),
        ({"sparsity": 0.5, "importance": lambda name, block: torch.ones(3)}, "block features.2 has 3 scores, expected 72"),
    ],
)
def test_mask_blocks_refuses_bad_arguments(kwargs, message):
    model = build("mobilenet_v3_small")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        surgery.mask_blocks(model, **kwargs)
    assert_unchanged(model, before)


def test_counting_macs_leaves_batchnorm_statistics_alone():
    model = build("mobilenet_v3_small").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert surgery.count_macs(model, torch.randn(1, 3, 64, 64)) > 0
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_shrink_measures_latency_when_asked():
    model = build("mobilenet_v3_small")
    surgery.mask_blocks(model, sparsity=0.5)
    report = surgery.shrink(model, example=torch.randn(1, 3, 64, 64))
    assert report.latency[0] > 0 and report.latency[1] > 0
    assert "latency" in str(report) and "features.2" in str(report)


SMALL_EXAMPLE = torch.zeros(1, 3, 64, 64)


def kept(channels: int, sparsity: float) -> int:
    return max(channels - round(sparsity * channels), 1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_every_channel_group_shrinks_to_the_masked_model(arch, sparsity):
    model = build(arch)
    full = surgery.channel_plan(model)
    assert {group.kind for group in surgery.channel_groups(model, example=SMALL_EXAMPLE)} == set(surgery.KINDS)
    surgery.mask_blocks(model, groups="all", sparsity=sparsity, importance=random_importance(5))
    check(model)
    x = torch.randn(2, 3, 64, 64)
    masked = outputs(model, x)
    report = surgery.shrink(model, example=SMALL_EXAMPLE, measure=False)
    torch.testing.assert_close(outputs(model, x), masked, rtol=1e-5, atol=1e-6)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert surgery.channel_plan(model) == {name: kept(channels, sparsity) for name, channels in full.items()}
    assert report.channels == {name: (c, kept(c, sparsity)) for name, c in full.items() if kept(c, sparsity) != c}


@pytest.mark.parametrize("kind", ["expanded", "squeeze", "stem", "stream", "last", "hidden"])
def test_each_group_kind_alone_shrinks_only_its_groups(kind):
    model = build("mobilenet_v3_large")  # its stem stream runs through a residual block without expand conv
    names = [group.name for group in surgery.channel_groups(model, kind, example=SMALL_EXAMPLE)]
    assert names
    surgery.mask_blocks(model, groups=kind, sparsity=0.5, importance=random_importance(7))
    x = torch.randn(2, 3, 64, 64)
    masked = outputs(model, x)
    report = surgery.shrink(model, example=SMALL_EXAMPLE, measure=False)
    assert sorted(report.channels) == sorted(names)
    torch.testing.assert_close(outputs(model, x), masked, rtol=1e-5, atol=1e-6)


def test_a_stream_is_every_block_output_summed_into_it_and_every_layer_reading_it():
    model = build("mobilenet_v3_large")
    surgery.mask_blocks(model, groups="stream", sparsity=0.5)
    # features.4 starts a 40-channel stream; features.5 and .6 add to it; features.7 reads it last
    starts = model.features[4].block[-1][0].parametrizations.weight[0].mask[:, 0, 0, 0]
    for index in (5, 6):
        block = model.features[index].block
        assert torch.equal(block[-1][0].parametrizations.weight[0].mask[:, 0, 0, 0], starts)  # project rows
        assert torch.equal(block[0][0].parametrizations.weight[0].mask[0, :, 0, 0], starts)  # expand columns
    assert torch.equal(model.features[7].block[0][0].parametrizations.weight[0].mask[0, :, 0, 0], starts)
    assert int(starts.sum()) == 20


def test_learnable_masks_on_every_group_share_one_gate_per_group_and_shrink_exactly():
    model = build("mobilenet_v3_small").train()
    surgery.mask_blocks(model, groups="all", learnable=True, strength=1.0)
    gate = lambda module: module.parametrizations.weight[0]  # noqa: E731
    stream = [model.features[i].block[0][0] for i in (5, 6, 7)]  # the readers of features.4:out
    assert gate(stream[1]).scores is gate(stream[0]).scores is gate(stream[2]).scores
    assert gate(stream[1]).strength == 0.0 and gate(stream[0]).strength == 1.0
    train_gates(model, 4)
    model.eval()
    baked = copy.deepcopy(model)
    bake(baked)
    x = torch.randn(2, 3, 64, 64)
    report = surgery.shrink(model, example=SMALL_EXAMPLE, measure=False)
    torch.testing.assert_close(outputs(model, x), outputs(baked, x), rtol=1e-5, atol=1e-6)
    shrunk_kinds = {group.kind for group in surgery.channel_groups(model, example=SMALL_EXAMPLE)
                    if group.name in report.channels}
    assert {"stem", "stream", "last", "hidden", "squeeze", "expanded"} <= shrunk_kinds


def test_a_model_shrunk_in_every_group_saves_and_loads_back():
    model = build("mobilenet_v3_small")
    surgery.mask_blocks(model, groups="all", sparsity=0.5)
    surgery.shrink(model, example=SMALL_EXAMPLE, measure=False)
    buffer = io.BytesIO()
    torch.save({"plan": surgery.channel_plan(model), "state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    fresh = torchvision.models.mobilenet_v3_small(weights=None).eval()
    surgery.resize(fresh, checkpoint["plan"])
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(outputs(fresh, x), outputs(model, x))
    assert fresh.classifier[0].out_features == 512 and fresh.features[0][0].out_channels == 8


@pytest.mark.parametrize("kind", ["expanded", "squeeze", "stem", "stream", "last", "hidden"])
def test_macs_per_channel_are_what_removing_one_channel_saves(kind):
    model = build("mobilenet_v3_small")
    group = surgery.channel_groups(model, kind, example=SMALL_EXAMPLE)[-1]
    before = surgery.count_macs(model, SMALL_EXAMPLE)
    surgery.resize(model, {group.name: group.channels - 1})
    assert before - surgery.count_macs(model, SMALL_EXAMPLE) == pytest.approx(group.macs)
    assert group.importance.shape == (group.channels,) and group.minimum == 1


def test_group_importance_l1_sums_every_reader_and_bn_reads_gamma():
    model = build("mobilenet_v3_small")
    stream = next(g for g in surgery.channel_groups(model, "stream", importance="l1", example=SMALL_EXAMPLE)
                  if g.name == "features.4:out")
    readers = [model.features[i].block[0][0].weight for i in (5, 6, 7)]
    expected = sum(w.detach().abs().sum(dim=(0, 2, 3)) for w in readers)
    torch.testing.assert_close(stream.importance, expected)
    by_bn = next(g for g in surgery.channel_groups(model, "stream", importance="bn", example=SMALL_EXAMPLE)
                 if g.name == "features.4:out")
    gammas = [model.features[i].block[-1][1].weight for i in (4, 5, 6)]
    torch.testing.assert_close(by_bn.importance, sum(g.detach().abs() for g in gammas))


def test_stem_and_last_roles():
    model = build("mobilenet_v3_small")
    assert surgery.role(model, "stem").names == {"features.0.0.weight"}
    assert surgery.role(model, "last").names == {"features.12.0.weight"}


def test_group_arguments_are_checked_and_change_nothing():
    model = build("mobilenet_v3_small")
    before = snapshot(model)
    with pytest.raises(ValueError, match="expected groups to be 'all' or some of expanded, squeeze, stem"):
        surgery.mask_blocks(model, groups="residual", sparsity=0.5)
    with pytest.raises(ValueError, match="expected groups to be 'all' or some of"):
        surgery.mask_blocks(model, groups=[], sparsity=0.5)
    assert_unchanged(model, before)
    config = InvertedResidualConfig(16, 3, 64, 24, True, "HS", 1, 1, 1.0)
    blocks = nn.Sequential(nn.Conv2d(3, 16, 3), InvertedResidual(config, nn.BatchNorm2d))
    before = snapshot(blocks)
    with pytest.raises(ValueError, match="the stream groups need a whole torchvision model of the family"):
        surgery.mask_blocks(blocks, groups=["expanded", "stream"], sparsity=0.5)
    with pytest.raises(ValueError, match="role 'stem' needs a whole torchvision model"):
        surgery.role(blocks, "stem")
    assert_unchanged(blocks, before)
    assert [g.kind for g in surgery.channel_groups(blocks, example=torch.zeros(1, 3, 16, 16))] == ["expanded", "squeeze"]

