import pytest
import torch
from conftest import assert_unchanged, randomize_batchnorm, snapshot
from torch import nn
from torchvision.ops import Conv2dNormActivation

from torchconstrain import FixedMask, constrain
from torchconstrain.surgery.slicing import (
    conv_of,
    fold_batchnorm,
    input_l1,
    not_resizable,
    resize_like,
    slice_outputs,
    sliced_bn,
    sliced_conv,
    sliced_linear,
)

ROWS, COLUMNS = torch.tensor([0, 3, 4]), torch.tensor([1, 2, 5])


def zero_all_but(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    dropped = torch.ones(x.shape[1], dtype=torch.bool)
    dropped[kept] = False
    x = x.clone()
    x[:, dropped] = 0
    return x


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sliced_conv_computes_the_kept_outputs_from_the_kept_inputs(bias, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=bias, dtype=dtype).eval()
    x = torch.randn(2, 6, 9, 9, dtype=dtype)
    new = sliced_conv(conv, rows=ROWS, columns=COLUMNS)
    torch.testing.assert_close(new(x[:, COLUMNS]), conv(zero_all_but(x, COLUMNS))[:, ROWS])
    assert (new.in_channels, new.out_channels, new.weight.dtype, new.training) == (3, 3, dtype, False)
    assert conv.weight.shape == (5, 6, 3, 3)  # the original is left as it is


def test_a_sliced_depthwise_conv_stays_depthwise():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    x = torch.randn(2, 6, 5, 5)
    new = sliced_conv(conv, rows=COLUMNS, depthwise=True)
    assert (new.in_channels, new.out_channels, new.groups) == (3, 3, 3)
    torch.testing.assert_close(new(x[:, COLUMNS]), conv(x)[:, COLUMNS])


@pytest.mark.parametrize("bias", [True, False])
def test_a_sliced_linear_computes_the_kept_outputs_from_the_kept_inputs(bias):
    torch.manual_seed(0)
    linear = nn.Linear(6, 5, bias=bias)
    x = torch.randn(4, 6)
    new = sliced_linear(linear, rows=ROWS, columns=COLUMNS)
    torch.testing.assert_close(new(x[:, COLUMNS]), linear(zero_all_but(x, COLUMNS))[:, ROWS])
    assert (new.in_features, new.out_features) == (3, 3)


@pytest.mark.parametrize("training", [True, False])
def test_a_sliced_batchnorm_keeps_its_channels_statistics_and_mode(training):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.normal_()
        bn.num_batches_tracked += 3
    bn.train(training)
    new = sliced_bn(bn, COLUMNS)
    assert new.training == training and new.num_batches_tracked.item() == 3
    torch.testing.assert_close(new.running_var, bn.running_var[COLUMNS])
    x = torch.randn(4, 6, 3, 3)
    torch.testing.assert_close(new.eval()(x[:, COLUMNS]), bn.eval()(x)[:, COLUMNS])


def test_slicing_the_outputs_of_a_conv_bn_sequence_keeps_their_activations():
    torch.manual_seed(0)
    layer = Conv2dNormActivation(4, 6, kernel_size=3).eval()
    layer[1].running_mean.normal_()
    x = torch.randn(2, 4, 7, 7)
    expected = layer(x)[:, ROWS]
    slice_outputs(layer, ROWS)
    torch.testing.assert_close(layer(x), expected)
    assert isinstance(layer[2], nn.ReLU)


def test_conv_of_names_what_it_got_instead_of_a_conv_sequence():
    layer = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="expected a conv/BN/activation sequence starting with a Conv2d. Got Seq"):
        conv_of(layer)
    assert conv_of(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))) is not None


def test_input_l1_sums_every_weight_reading_an_input_channel():
    conv = nn.Conv2d(3, 2, 3)
    torch.testing.assert_close(input_l1(conv), conv.weight.detach().abs().sum(dim=(0, 2, 3)))


def test_sliced_layers_keep_frozen_parameters_frozen():
    # Fresh parameters came back trainable: a shrunk model unfroze what fine-tuning froze.
    conv, bn, linear = nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.Linear(6, 3)
    for parameter in (conv.weight, bn.weight, bn.bias, linear.bias):
        parameter.requires_grad_(False)
    keep = torch.tensor([0, 2, 5])
    new_conv, new_bn = sliced_conv(conv, rows=keep), sliced_bn(bn, keep)
    new_linear = sliced_linear(linear, columns=keep)
    assert [new_conv.weight.requires_grad, new_conv.bias.requires_grad] == [False, True]
    assert [new_bn.weight.requires_grad, new_bn.bias.requires_grad] == [False, False]
    assert [new_linear.weight.requires_grad, new_linear.bias.requires_grad] == [True, False]


def test_a_sliced_channels_last_conv_stays_channels_last():
    conv = nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last)
    new = sliced_conv(conv, rows=torch.tensor([0, 2, 5]), columns=torch.tensor([1, 3]))
    assert new.weight.is_contiguous(memory_format=torch.channels_last) and not new.weight.is_contiguous()
    x = torch.randn(2, 2, 5, 5)
    expected = nn.functional.conv2d(x, conv.weight[[0, 2, 5]][:, [1, 3]], conv.bias[[0, 2, 5]])
    torch.testing.assert_close(new(x), expected)


class _Tagged(nn.Conv2d):
    """A subclass that computes as a Conv2d (a library's marker class, a method of its own)."""

    def describe(self) -> str:
        return f"tagged {self.out_channels}"


class _Doubled(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_slicing_resizes_the_layers_themselves_keeping_their_class_and_hooks():
    # Replaced by new plain layers, a Conv2d subclass lost its class and every forward
    # hook on the layers was dropped.
    torch.manual_seed(0)
    layer = nn.Sequential(_Tagged(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU()).eval()
    conv, bn = layer[0], layer[1]
    seen = []
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.shape[1]))
    x = torch.randn(2, 4, 7, 7)
    expected = layer(x)[:, ROWS]
    slice_outputs(layer, ROWS)
    assert layer[0] is conv and layer[1] is bn and conv.describe() == "tagged 3"
    assert (conv.out_channels, bn.num_features) == (len(ROWS), len(ROWS))
    torch.testing.assert_close(layer(x), expected)
    assert seen == [6, len(ROWS)]


def test_a_layer_computing_its_output_its_own_way_is_refused():
    # Which channels are unused is read from the stored weight: a subclass's forward (a
    # standardized weight) can use them all the same.
    assert "its class overrides forward" in not_resizable(_Doubled(4, 6, 3))
    with pytest.raises(ValueError, match="cannot resize _Doubled in place: its class overrides forward"):
        resize_like(_Doubled(4, 6, 3), sliced_conv(nn.Conv2d(4, 6, 3), rows=ROWS))


def test_a_layer_holding_more_than_slicing_resizes_is_refused():
    class Scaled(nn.Linear):
        def __init__(self):
            super().__init__(4, 3)
            self.scale = nn.Parameter(torch.ones(3))

    layer = Scaled()
    assert not_resizable(layer) == "it also holds scale, which slicing would leave at the old sizes"
    with pytest.raises(ValueError, match="surgery: cannot resize Scaled in place: it also holds scale"):
        resize_like(layer, sliced_linear(layer, rows=torch.tensor([0, 1])))
    assert layer.weight.shape == (3, 4)
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    assert "weight is under another library's parametrization" in not_resizable(normed)
    masked = nn.Linear(4, 3)
    constrain(masked, {"weight": FixedMask.magnitude(sparsity=0.5)})
    assert not_resizable(masked) is None  # baked before it is resized
    with pytest.raises(ValueError, match="its tensors are constrained"):
        resize_like(masked, sliced_linear(masked, rows=torch.tensor([0])))


class SharedConv(nn.Module):
    """One conv in two conv/BN sequences (``twice``), or in one and called again outside it."""

    def __init__(self, twice: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.p = nn.Sequential(self.conv, nn.BatchNorm2d(4))
        self.q = nn.Sequential(self.conv, nn.BatchNorm2d(4)) if twice else nn.Sequential(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.p(x) + self.q(x if len(self.q) == 2 else self.conv(x))


@pytest.mark.parametrize("twice, other", [(True, r"conv, q\.0"), (False, "conv")])
def test_fold_batchnorm_refuses_a_conv_used_elsewhere_before_changing_anything(twice, other):
    # The shared conv took both BatchNorms (folded twice): the outputs silently changed.
    torch.manual_seed(0)
    model = randomize_batchnorm(SharedConv(twice)).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"conv p\.0 is also used as {other}: folding its BatchNorm into it"):
        fold_batchnorm(model)
    assert_unchanged(model, before)


def test_fold_batchnorm_folds_a_sequence_reached_under_two_names_once():
    torch.manual_seed(0)
    layer = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model = nn.ModuleDict({"first": layer, "again": layer})  # one conv/BN sequence under two names: one fold
    x = torch.randn(2, 3, 6, 6)
    expected = layer(x)
    assert fold_batchnorm(model) == 1
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("trainable", [True, False])
def test_fold_batchnorm_gives_a_new_bias_the_weights_requires_grad(trainable):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    model[0].weight.requires_grad_(trainable)
    fold_batchnorm(model)
    assert model[0].bias.requires_grad == model[0].weight.requires_grad == trainable


def test_fold_batchnorm_folds_a_sequential_with_named_children():
    # Its slots were named by position ("0"), not by key ("conv"): every such conv was
    # refused as "also used as" itself (torchvision's densenet too).
    from collections import OrderedDict

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), act=nn.ReLU())).eval()
    model.bn.running_mean.normal_()
    x = torch.randn(1, 3, 8, 8)
    expected = model(x)
    assert fold_batchnorm(model) == 1 and isinstance(model.bn, nn.Identity)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", ["subclass", "conv hook", "bn hook", "weight_norm"])
def test_fold_batchnorm_refuses_a_pair_whose_outputs_it_cannot_keep(change):
    # Folded all the same: a weight-standardizing conv, hooks (the BatchNorm's went with it)
    # and an old-style weight_norm (a pre-hook) silently changed the outputs.
    model = nn.Sequential(_Doubled(3, 4, 3) if change == "subclass" else nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    if change == "conv hook":
        model[0].register_forward_hook(lambda module, inputs, output: output * 2)
    if change == "bn hook":
        model[1].register_forward_hook(lambda module, inputs, output: output + 1)
    if change == "weight_norm":
        nn.utils.weight_norm(model[0])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"surgery.fold_batchnorm: cannot fold [01]: .*Nothing was folded"):
        fold_batchnorm(model)
    assert_unchanged(model, before)
