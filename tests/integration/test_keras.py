"""Keras 3's weight constraints (on its torch backend) as the peer of MaxNorm, UnitNorm and NonNeg.

Keras projects a kernel after each optimizer step; torchconstrain computes the same
projection in the forward. The effective weight of a torch layer must be the projection
Keras computes for the same weights in its own layout (Dense kernels are ``(in, out)``,
Conv2D kernels ``(kh, kw, in, out)``, embeddings ``(vocab, dim)``), up to the ``1e-7``
Keras adds to every norm. torch's own ``nn.Embedding(max_norm=)`` renormalizes the rows it
looks up, which ``MaxNorm`` on an embedding matches.
"""

import os
import sys

import pytest
import torch
from torch import nn

from torchconstrain import MaxNorm, NonNeg, UnitNorm, constrain

if "keras" not in sys.modules:  # the backend is chosen at import
    os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("keras runs on another backend here", allow_module_level=True)

KERAS_EPSILON = dict(rtol=1e-6, atol=1e-7)  # Keras divides by (1e-7 + norm)


def spread_norms(weight: torch.Tensor) -> None:
    """Scale the output slices of ``weight`` to norms from 0.2 to 5: some inside a ball of 1, some outside."""
    with torch.no_grad():
        scales = torch.linspace(0.2, 5.0, weight.shape[0]).view(-1, *[1] * (weight.dim() - 1))
        weight.mul_(scales / weight.flatten(1).norm(dim=1).view_as(scales))


def constrained(module: nn.Module, constraint) -> nn.Module:
    """``module`` constrained, its stored weight put back to what it was (as training leaves a
    stored weight outside the feasible set), so the forward's projection is what is compared."""
    weight = module.weight.detach().clone()
    constrain(module, {"weight": constraint})
    with torch.no_grad():
        module.parametrizations.weight.original.copy_(weight)
    return module


def keras_projection(constraint, kernel: torch.Tensor) -> torch.Tensor:
    projected = constraint(keras.ops.convert_to_tensor(kernel.detach().contiguous()))
    assert isinstance(projected, torch.Tensor)  # the torch backend computes in torch
    return projected.detach().cpu()


def linear() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(6, 9)
    spread_norms(layer.weight)
    return layer


def test_max_norm_on_a_linear_layer_is_keras_max_norm_on_its_dense_kernel():
    layer = linear()
    expected = keras_projection(keras.constraints.MaxNorm(1.0, axis=0), layer.weight.T)  # Dense kernel: (in, out)
    weight = layer.weight.detach().clone()
    constrained(layer, MaxNorm(1.0))
    torch.testing.assert_close(layer.weight.detach().T, expected, **KERAS_EPSILON)
    inside = weight.norm(dim=1) <= 1.0
    assert 0 < inside.sum() < len(inside)
    assert torch.equal(layer.weight[inside], weight[inside])  # without Keras' epsilon: bitwise


def test_max_norm_on_a_conv_is_keras_max_norm_on_its_conv2d_kernel_per_filter():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    spread_norms(conv.weight)
    kernel = conv.weight.permute(2, 3, 1, 0)  # Conv2D kernel: (kh, kw, in, out)
    expected = keras_projection(keras.constraints.MaxNorm(1.0, axis=[0, 1, 2]), kernel)
    constrained(conv, MaxNorm(1.0))
    torch.testing.assert_close(conv.weight.detach().permute(2, 3, 1, 0), expected, **KERAS_EPSILON)


def test_unit_norm_on_a_linear_layer_is_keras_unit_norm_on_its_dense_kernel():
    layer = linear()
    expected = keras_projection(keras.constraints.UnitNorm(axis=0), layer.weight.T)
    constrained(layer, UnitNorm())
    torch.testing.assert_close(layer.weight.detach().T, expected, **KERAS_EPSILON)


def test_non_neg_is_keras_non_neg_exactly():
    layer = linear()
    expected = keras_projection(keras.constraints.NonNeg(), layer.weight)
    constrained(layer, NonNeg())
    assert torch.equal(layer.weight.detach(), expected)


def test_max_norm_on_an_embedding_is_keras_max_norm_over_each_tokens_row_and_torchs_max_norm():
    torch.manual_seed(0)
    table = nn.Embedding(10, 4)
    spread_norms(table.weight)
    tokens = torch.arange(10)
    expected = keras_projection(keras.constraints.MaxNorm(1.0, axis=1), table.weight)  # (vocab, dim): axis 1
    renormed = nn.Embedding(10, 4, max_norm=1.0, _weight=table.weight.detach().clone())
    constrained(table, MaxNorm(1.0))
    torch.testing.assert_close(table(tokens).detach(), expected, **KERAS_EPSILON)
    with torch.no_grad():
        torch.testing.assert_close(table(tokens), renormed(tokens), rtol=1e-6, atol=1e-6)
