import copy
import math
import zlib

import pytest
import torch
import torchvision
from conftest import assert_unchanged, randomize_batchnorm, snapshot, train_gates
from torch import nn

from torchconstrain import bake, check, surgery

EXAMPLE = torch.zeros(1, 3, 64, 64)


def build(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(getattr(torchvision.models, arch)(weights=None, **kwargs), seed + 1).eval()


def random_importance(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return lambda name, group: torch.rand(group.channels, generator=generator)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def kept(channels: int, sparsity: float) -> int:
    return max(channels - round(sparsity * channels), 1)


def assert_shrinks_to_the_masked_model(model, x, sparsity, groups="all", seed=3):
    full = {g.name: g.channels for g in surgery.channel_groups(model, groups, example=EXAMPLE)}
    surgery.mask_blocks(model, groups=groups, sparsity=sparsity, importance=random_importance(seed))
    check(model)
    masked = outputs(model, x)
    report = surgery.shrink(model, example=EXAMPLE, measure=False)
    torch.testing.assert_close(outputs(model, x), masked, rtol=1e-5, atol=1e-5)
    assert report.channels == {name: (c, kept(c, sparsity)) for name, c in full.items() if kept(c, sparsity) != c}
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    return report


@pytest.mark.parametrize("arch", ["mobilenet_v2", "efficientnet_b0", "mnasnet1_0"])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.9])
def test_every_channel_group_shrinks_to_the_masked_model(arch, sparsity):
    report = assert_shrinks_to_the_masked_model(build(arch), torch.randn(2, 3, 64, 64), sparsity)
    if sparsity:
        assert report.params[1] < report.params[0] and report.macs[1] < report.macs[0]


def test_efficientnet_v2_fused_blocks_shrink_to_the_masked_model():
    model = build("efficientnet_v2_s")
    fused = [b for b in surgery.find_blocks(model) if isinstance(b.module, torchvision.models.efficientnet.FusedMBConv)]
    assert fused[0].expand is None and fused[0].depthwise is None and fused[0].residual  # one kxk conv
    assert fused[-1].expand.conv.kernel_size == (3, 3) and fused[-1].depthwise is None
    assert_shrinks_to_the_masked_model(model, torch.randn(2, 3, 64, 64), 0.5)


@pytest.mark.parametrize("kind", ["expanded", "squeeze", "stem", "stream", "last"])
def test_each_group_kind_alone_shrinks_only_its_groups(kind):
    model = build("efficientnet_b0")
    assert_shrinks_to_the_masked_model(model, torch.randn(2, 3, 64, 64), 0.5, groups=kind)


def test_hidden_units_need_a_hidden_layer():
    model = build("mobilenet_v2")
    assert surgery.channel_groups(model, "hidden", example=EXAMPLE) == []
    assert {g.kind for g in surgery.channel_groups(model, example=EXAMPLE)} == {"expanded", "stem", "stream", "last"}


def test_shrunk_efficientnet_matches_in_train_mode_with_stochastic_depth():
    model = build("efficientnet_b0", stochastic_depth_prob=0.5, dropout=0.0).train()
    surgery.mask_blocks(model, groups="all", sparsity=0.5, importance=random_importance(4))
    x = torch.randn(4, 3, 64, 64)
    draws = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        draws.append(outputs(model, x))
    assert not torch.allclose(draws[0], draws[1])  # stochastic depth did drop branches
    surgery.shrink(model, example=EXAMPLE, measure=False)
    assert model.training
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.testing.assert_close(outputs(model, x), draws[seed], rtol=1e-5, atol=1e-5)


def test_learnable_masks_on_every_group_train_bake_and_shrink_exactly():
    model = build("efficientnet_b0", num_classes=10).train()
    surgery.mask_blocks(model, groups="all", learnable=True, strength=1.0)
    scores = [p for name, p in model.named_parameters() if name.endswith("scores")]
    assert len(scores) == len(surgery.channel_groups(model, example=EXAMPLE))  # one gate per group
    train_gates(model, 3)
    model.eval()
    baked = copy.deepcopy(model)
    bake(baked)
    x = torch.randn(2, 3, 64, 64)
    report = surgery.shrink(model, example=EXAMPLE, measure=False)
    torch.testing.assert_close(outputs(model, x), outputs(baked, x), rtol=1e-5, atol=1e-5)
    assert report.macs[1] < report.macs[0]


@pytest.mark.parametrize("arch", ["efficientnet_b1", "mnasnet0_5", "mnasnet0_75", "mnasnet1_3"])
def test_other_sizes_shrink_to_the_masked_model(arch):
    assert_shrinks_to_the_masked_model(build(arch), torch.randn(1, 3, 32, 32), 0.5)


@pytest.mark.parametrize("arch", ["efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5",
                                  "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_m", "efficientnet_v2_l"])
def test_the_biggest_sizes_have_consistent_groups_that_resize(arch):
    with torch.device("meta"):  # shapes only: these sizes differ from b0, b1 and v2_s in widths and depths
        model = getattr(torchvision.models, arch)(weights=None).eval()
    plan = {name: kept(channels, 0.5) for name, channels in surgery.channel_plan(model).items()}
    surgery.resize(model, plan)
    assert surgery.channel_plan(model) == plan
    assert outputs(model, torch.randn(1, 3, 32, 32, device="meta")).shape == (1, 1000)


@pytest.mark.parametrize("arch, blocks", [("mobilenet_v2", 17), ("efficientnet_b0", 16), ("efficientnet_v2_s", 40),
                                          ("mnasnet0_5", 17)])
def test_roles_pick_layers_by_function(arch, blocks):
    model = getattr(torchvision.models, arch)(weights=None)
    found = surgery.find_blocks(model)
    assert len(found) == blocks
    convs = dict(model.named_modules())
    depthwise = {f"{name}.weight" for name, m in convs.items()
                 if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1}
    assert surgery.role(model, "depthwise").names == depthwise
    for name in ("expand", "project", "se_fc1", "se_fc2"):
        names = surgery.role(model, name).names
        assert len(names) == sum(1 for b in found if name in b.weights())
        assert all(isinstance(convs[n.rsplit(".", 1)[0]], nn.Conv2d) for n in names)
    assert len(surgery.role(model, "se").names) == 2 * len(surgery.role(model, "se_fc1").names)


def test_mnasnet_separable_block_belongs_to_the_stem_group():
    model = build("mnasnet0_5")
    stem = surgery.channel_groups(model, "stem", example=EXAMPLE)[0]
    assert stem.name == "layers.0:out" and surgery.find_blocks(model)[0].name == "layers.3"
    assert_shrinks_to_the_masked_model(model, torch.randn(2, 3, 64, 64), 0.5, groups="stem")
    assert model.layers[3].groups == model.layers[0].out_channels == model.layers[6].in_channels == 8


def test_a_changed_model_is_refused_with_a_clear_error_and_left_unchanged():
    model = build("efficientnet_b0")
    model.features[3] = nn.Sequential(model.features[3], nn.Identity())  # not a stage of blocks any more
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"EfficientNet.features: expected the stem, blocks and the last conv. Got Identity"):
        surgery.mask_blocks(model, sparsity=0.5)
    with pytest.raises(ValueError, match="expected the stem, blocks and the last conv"):
        surgery.shrink(model, measure=False)
    assert_unchanged(model, before)
    model = build("mobilenet_v2")
    model.classifier = nn.Sequential(nn.Linear(1280, 10), nn.LayerNorm(10))
    with pytest.raises(ValueError, match="MobileNetV2.classifier: expected one or two Linear layers .* Got Linear, LayerNorm"):
        surgery.channel_plan(model)


def test_a_subclass_with_its_own_forward_has_only_block_groups():
    class Features(torchvision.models.MobileNetV2):
        def forward(self, x):
            return self.features(x)

    torch.manual_seed(0)
    model = randomize_batchnorm(Features()).eval()
    assert {g.kind for g in surgery.channel_groups(model, example=EXAMPLE)} == {"expanded"}
    with pytest.raises(ValueError, match="the stem groups need a whole torchvision model"):
        surgery.mask_blocks(model, groups="stem", sparsity=0.5)
    assert_shrinks_to_the_masked_model(model, torch.randn(2, 3, 32, 32), 0.5)


def torch_pruning_group(graph, module: nn.Module, names: dict) -> set:
    group = graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, idxs=[0])
    return {(names[dep.target.module], "in" if "in_channels" in dep.handler.__name__ else "out")
            for dep, _ in group if isinstance(dep.target.module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "efficientnet_b0", "mnasnet0_5"])
def test_every_group_is_the_group_torch_pruning_finds(arch):
    tp = pytest.importorskip("torch_pruning")
    model = getattr(torchvision.models, arch)(weights=None).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    names = {module: name for name, module in model.named_modules()}
    for group in surgery.find_groups(model):
        ours = {(slot.fqn, "out") for slot in (*group.rows, *group.depthwise, *group.bns)}
        ours |= {(slot.fqn, "in") for slot in group.readers}
        assert ours == torch_pruning_group(graph, group.rows[0].module, names), group.name


def leader_budget(model: nn.Module):
    """The GateBudget the learnable masks of ``model`` share, and the mask holding its multiplier."""
    leader = next(m for m in model.modules() if "multiplier" in getattr(m, "_buffers", {}))
    return leader.budget, leader


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "mobilenet_v2", "efficientnet_b0"])
def test_a_learnable_mac_budget_is_met_exactly_at_bake_and_shrinks_to_the_baked_model(arch):
    model = build(arch).train()
    dense = surgery.count_macs(model, EXAMPLE)
    report = surgery.mask_blocks(model, groups="all", macs=0.5, learnable=True, rate=0.1, example=EXAMPLE)
    budget, leader = leader_budget(model)
    assert budget.rate == 0.1
    described = {c for row in report for c in row["constraints"]}  # as they are once the budget is attached
    assert described and all("budget=surgery.mask_blocks macs" in c and "strength" not in c for c in described)
    assert {m.budget for m in model.modules() if getattr(m, "budget", None) is not None} == {budget}  # one budget
    assert len(budget.masks) == len(surgery.channel_groups(model, example=EXAMPLE))  # a member per group
    train_gates(model, 3)
    assert leader.multiplier.item() > 0  # the gates started above the budget: the multiplier pushed them down
    model.eval()
    promised = budget.allocation()
    baked = copy.deepcopy(model)
    bake(baked)
    x = torch.randn(2, 3, 64, 64)
    report = surgery.shrink(model, example=EXAMPLE, measure=False)
    torch.testing.assert_close(outputs(model, x), outputs(baked, x), rtol=1e-5, atol=1e-5)
    achieved = surgery.count_macs(model, EXAMPLE)
    assert achieved == pytest.approx(promised.achieved, rel=1e-9)  # the exact cost the budget allocated with
    assert promised.total == pytest.approx(dense, rel=1e-9)
    assert 0.49 * dense <= achieved <= 0.5 * dense
    assert report.macs == (dense, achieved)
    assert report.targets == {"macs": (0.5, pytest.approx(achieved / dense))}
    assert "macs    target 0.500, achieved" in str(report)


def test_hard_gates_under_a_mac_budget_follow_every_step_exactly():
    model = build("mobilenet_v3_small").train()
    surgery.mask_blocks(model, groups="all", macs=0.5, learnable=True, hard=True, example=EXAMPLE)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(3):
        train_gates(model, 1)  # Adam moves the scores in place: the allocation the forwards share must follow
        model.eval()
        fresh = copy.deepcopy(model)  # a copy computes its allocation anew
        torch.testing.assert_close(outputs(model, x), outputs(fresh, x), rtol=0, atol=0)
        budget, _ = leader_budget(model)
        with torch.no_grad():
            for group, mask in zip(budget.groups, budget.masks):  # each hard gate is the allocation's
                open_gates = mask(torch.ones_like(mask.gate())).flatten() != 0
                assert torch.equal(open_gates, budget.allocation().keep[group.name].to(open_gates.device))
        model.train()


def seeded_importance(seed: int):
    """Random scores per group, the same for a group however often they are asked for."""
    return lambda name, group: torch.rand(group.channels, generator=torch.Generator().manual_seed(seed + zlib.crc32(name.encode())))


def kept_columns(model: nn.Module, group) -> torch.Tensor:
    with torch.no_grad():
        return model.get_submodule(group.readers[0].fqn).weight.abs().transpose(0, 1).flatten(1).sum(1) != 0


@pytest.mark.parametrize("groups", ["expanded", "all"])
def test_a_fixed_mac_budget_keeps_the_most_important_channels_within_the_budget(groups):
    model = build("mobilenet_v3_large")
    dense = surgery.count_macs(model, EXAMPLE)
    costs = surgery.channel_groups(model, groups, importance=seeded_importance(5), example=EXAMPLE)
    surgery.mask_blocks(model, groups=groups, macs=0.6, importance=seeded_importance(5), example=EXAMPLE)
    check(model)
    for group, cost in zip(surgery.find_groups(model, groups), costs):
        keep = kept_columns(model, group)
        assert keep.sum() >= cost.minimum
        if not keep.all():  # every kept channel at least as important as every masked one
            assert cost.importance[keep].min() >= cost.importance[~keep].max(), group.name
    x = torch.randn(2, 3, 64, 64)
    masked = outputs(model, x)
    report = surgery.shrink(model, example=EXAMPLE, measure=False, targets={"macs": 0.6})
    torch.testing.assert_close(outputs(model, x), masked, rtol=1e-5, atol=1e-5)
    achieved = surgery.count_macs(model, EXAMPLE)
    assert achieved <= 0.6 * dense
    assert 0.6 * dense - achieved < max(cost.macs for cost in costs)  # no more channel would have fit
    assert report.targets == {"macs": (0.6, achieved / dense)}
    kinds = {cost.name: cost.kind for cost in costs}
    assert set(report.channels) <= set(kinds)  # only the budget's groups shrink
    assert ({kinds[name] for name in report.channels} == {"expanded"}) == (groups == "expanded")


@pytest.mark.parametrize("minimum", [None, 0.25, 3], ids=["default", "share", "count"])
def test_a_mac_budget_keeps_every_group_s_minimum(minimum):
    # With one channel as the only floor, macs=0.5 over every group cut the stem and three
    # streams of mobilenet_v3_small to 1 channel: a budget spends channels where they cost
    # the most MACs, the early high-resolution layers.
    model = build("mobilenet_v3_small")
    options = {} if minimum is None else {"minimum": minimum}
    surgery.mask_blocks(model, groups="all", macs=0.5, example=torch.zeros(1, 3, 224, 224), **options)
    share = 0.1 if minimum is None else minimum
    for group in surgery.find_groups(model, "all"):
        fewest = math.ceil(share * group.channels) if isinstance(share, float) else min(share, group.channels)
        assert kept_columns(model, group).sum() >= fewest, group.name


def test_a_mac_budget_over_fewer_groups_cannot_go_as_low_and_says_how_low_it_can():
    model = build("mobilenet_v3_large")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"surgery.mask_blocks macs: keeping 0.1 of the cost .* minimums alone cost "
                                         r"[\d,]+ \((0\.\d+) of it\)") as error:
        surgery.mask_blocks(model, groups="expanded", macs=0.1, example=EXAMPLE)
    assert_unchanged(model, before)
    floor = float(str(error.value).split(" of it)")[0].rsplit("(", 1)[1])
    surgery.mask_blocks(model, groups="all", macs=floor, learnable=True, example=EXAMPLE)  # more groups: reachable
    surgery.mask_blocks(build("mobilenet_v3_large"), groups="expanded", macs=floor + 1e-3, example=EXAMPLE)


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 0.5, "macs": 0.5}, r"pass sparsity= \(a share of each group's channels\) or macs= .* not both"),
    ({"sparsity": 0.5, "macs": 0.5, "learnable": True}, "not both"),
    ({"macs": 0.0}, r"expected macs, the share of the model's MACs to keep, in \(0, 1\]. Got 0.0"),
    ({"macs": 1.5, "learnable": True}, r"in \(0, 1\]. Got 1.5"),
    ({"macs": True}, r"in \(0, 1\]. Got True"),
    ({"macs": "half"}, r"in \(0, 1\]. Got 'half'"),
    ({"macs": 0.5, "groups": "hidden"}, "has no channel group of the kinds asked for"),
    ({"macs": 0.5, "importance": lambda name, group: -torch.ones(group.channels)}, "non-negative importance"),
    ({"macs": 0.5, "learnable": True, "rate": -1.0}, r"surgery.mask_blocks: expected rate to be .*0.* Got -1.0"),
    ({"sparsity": 0.5, "learnable": True, "rate": float("nan")}, "Got nan"),
    ({"macs": 0.5, "minimum": 1.5}, r"surgery.mask_blocks: expected minimum, a share in \[0, 1\] or a count >= 0. Got 1.5"),
    ({"sparsity": 0.5, "minimum": "10%"}, r"expected minimum, .* Got '10%'"),
])
def test_bad_mac_budgets_are_refused_before_the_model_changes(options, message):
    model = build("mobilenet_v2")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        surgery.mask_blocks(model, example=EXAMPLE, **options)
    assert_unchanged(model, before)


def test_an_example_that_is_not_a_tensor_is_refused_naming_the_call():
    # A list of one image raised "'list' object has no attribute 'to'".
    model = build("mobilenet_v3_small")
    before = snapshot(model)
    for call in (lambda: surgery.mask_blocks(model, groups="all", macs=0.5, example=[EXAMPLE]),
                 lambda: surgery.shrink(model, example=[EXAMPLE], measure=False)):
        with pytest.raises(TypeError, match=r"surgery\.(mask_blocks|shrink): expected example to be an input batch, "
                                            r"a tensor .* Got list"):
            call()
    assert_unchanged(model, before)


@pytest.mark.parametrize("targets, message", [
    ({"sparsity": 0.5}, r"expected targets as \{'macs': share\}"),
    ({"macs": 0}, r"expected targets\['macs'\], the share of MACs to keep, in \(0, 1\]. Got 0"),
    ([0.5], "expected targets as"),
])
def test_shrink_refuses_bad_targets_before_baking(targets, message):
    model = build("mobilenet_v2")
    surgery.mask_blocks(model, macs=0.5, learnable=True, example=EXAMPLE)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        surgery.shrink(model, example=EXAMPLE, measure=False, targets=targets)
    assert_unchanged(model, before)


def test_shrink_with_an_example_the_model_cannot_run_changes_nothing():
    model = build("mobilenet_v3_small")
    surgery.mask_blocks(model, sparsity=0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"surgery.shrink: the model cannot run the example, a Tensor of shape \(1, 1, 64, 64\)"):
        surgery.shrink(model, example=torch.zeros(1, 1, 64, 64), measure=False)
    assert_unchanged(model, before)


class _Tagged(nn.Conv2d):
    """A subclass that computes as a Conv2d."""


class _Standardized(nn.Conv2d):
    """Each output channel's weight standardized (timm's StdConv2d): every stored entry counts."""

    def forward(self, x):
        weight = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, weight, self.bias)


def _with_expand_conv(model, block, kind):
    conv = model.features[block].block[0][0]
    new = kind(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    new.load_state_dict(conv.state_dict())
    model.features[block].block[0][0] = new
    return new


def test_shrink_keeps_the_layers_a_model_has_with_their_classes_and_hooks():
    # Layers were replaced by new plain ones: a Conv2d subclass lost its class and the
    # hooks on the layers were dropped.
    model = randomize_batchnorm(build("mobilenet_v3_small")).eval()
    doubled = _with_expand_conv(model, 2, _Tagged)
    seen = []
    doubled.register_forward_hook(lambda module, inputs, output: seen.append(output.shape[1]))
    surgery.mask_blocks(model, sparsity=0.5)
    bake(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    seen.clear()
    report = surgery.shrink(model, example=EXAMPLE, measure=False)
    assert model.features[2].block[0][0] is doubled and report.channels["features.2"] == (72, 36)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert seen[-1] == 36


@pytest.mark.parametrize("change, message", [
    ("buffer", r"\(Conv2d\): it also holds scale, which slicing would leave at the old sizes"),
    ("standardized", r"\(_Standardized\): its class overrides forward"),  # shrunk by stored zeros, it changed outputs
])
def test_a_layer_the_surgery_cannot_resize_is_refused_before_masking(change, message):
    model = build("mobilenet_v3_small")
    if change == "buffer":
        model.features[2].block[0][0].register_buffer("scale", torch.ones(72))
    else:
        _with_expand_conv(model, 2, _Standardized)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"surgery: (block|group) \S+ cannot be resized: layer features.2.block.0.0 "
                                         + message):
        surgery.mask_blocks(model, sparsity=0.5)
    assert_unchanged(model, before)


def test_measuring_and_shrinking_keep_each_modules_own_mode():
    # Fine-tuning with frozen BatchNorms: the model trains, its BatchNorms stay in eval mode.
    model = build("mobilenet_v3_small").train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.eval()
    surgery.mask_blocks(model, sparsity=0.5)
    surgery.count_macs(model, EXAMPLE)
    surgery.shrink(model, example=EXAMPLE, measure=False)
    assert model.training and not any(norm.training for norm in model.modules() if isinstance(norm, nn.BatchNorm2d))


def test_a_float64_model_shrinks_into_float64_layers():
    model = build("mobilenet_v3_small").double()
    surgery.mask_blocks(model, sparsity=0.5)
    bake(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = outputs(model, x)
    surgery.shrink(model, example=EXAMPLE.double(), measure=False)
    assert {p.dtype for p in model.state_dict().values() if p.is_floating_point()} == {torch.float64}
    torch.testing.assert_close(outputs(model, x), expected)


def test_bn_importance_counts_a_batchnorm_without_affine_parameters_as_gamma_one():
    model = build("mobilenet_v3_small")
    block = model.features[2].block[1]
    block[1] = nn.BatchNorm2d(block[1].num_features, affine=False).eval()
    surgery.mask_blocks(model, groups="expanded", sparsity=0.5, importance="bn")  # raised AttributeError
    x = torch.randn(2, 3, 64, 64)
    masked = outputs(model, x)
    surgery.shrink(model, measure=False)
    torch.testing.assert_close(outputs(model, x), masked, rtol=1e-5, atol=1e-6)



def test_the_surgery_on_a_folded_model_says_to_use_the_model_before_folding():
    model = build("mobilenet_v3_small").eval()
    surgery.fold_batchnorm(model)
    with pytest.raises(ValueError, match=r"has no BatchNorm2d after its conv \(folded by surgery.fold_batchnorm\? "
                                         r"the surgery needs the model before folding: save channel_plan\(model\) first\)"):
        surgery.channel_plan(model)
