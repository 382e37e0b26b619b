r"""Where the inverted residual pattern's layers are in torchvision's EfficientNet and EfficientNetV2.

An ``MBConv`` block is ``block = [expand], depthwise, squeeze-excitation, project``; a
``FusedMBConv`` block is ``block = expand (a kxk conv), project`` or, without expansion,
a single kxk conv, which the pattern sees as a project conv alone. Every conv is a
``Conv2dNormActivation``. A residual block drops its whole branch at random in train mode
(stochastic depth), which acts on samples, not channels. ``EfficientNet.features`` is the
stem, stages of blocks and the last conv; its classifier is ``Dropout, Linear``.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.efficientnet import EfficientNet, FusedMBConv, MBConv
from torchvision.ops import SqueezeExcitation

from torchconstrain.surgery.pattern import Block, Network, sequence_unit
from torchconstrain.surgery.stock import features_network

__all__ = ["BLOCKS", "FAMILY", "MODELS", "network", "parse"]

FAMILY = "EfficientNet MBConv"
BLOCKS = (MBConv, FusedMBConv)
MODELS = (EfficientNet,)


def parse(name: str, module: MBConv | FusedMBConv) -> Block:
    r"""The roles of one ``MBConv`` or ``FusedMBConv`` block (``name``: its name in the model)."""
    layers = list(getattr(module, "block", []))
    prefix = f"{name}.block" if name else "block"
    residual = bool(module.use_res_connect)
    if isinstance(module, FusedMBConv):
        if len(layers) not in (1, 2) or not all(isinstance(layer, nn.Sequential) for layer in layers):
            raise ValueError(f"expected [fused expand], project layers. Got {layers!r}.")
        units = [sequence_unit(layer, f"{prefix}.{index}") for index, layer in enumerate(layers)]
        return Block(name, module, units[0] if len(units) == 2 else None, None, None, units[-1], residual)
    kinds = [SqueezeExcitation if isinstance(layer, SqueezeExcitation) else nn.Sequential for layer in layers]
    if kinds not in ([nn.Sequential, SqueezeExcitation, nn.Sequential],
                     [nn.Sequential, nn.Sequential, SqueezeExcitation, nn.Sequential]) or \
            not all(isinstance(layer, kind) for layer, kind in zip(layers, kinds)):
        raise ValueError(f"expected [expand], depthwise, squeeze-excitation, project layers. Got {layers!r}.")
    units = {index: sequence_unit(layer, f"{prefix}.{index}") for index, layer in enumerate(layers)
             if kinds[index] is nn.Sequential}
    se = len(layers) - 2
    expand = units[0] if len(layers) == 4 else None
    return Block(name, module, expand, units[se - 1], layers[se], units[se + 1], residual, f"{prefix}.{se}")


def network(model: EfficientNet, blocks: list[Block]) -> Network:
    r"""The whole model: ``features[0]`` the stem, ``features[-1]`` the last conv."""
    return features_network(model, blocks)
