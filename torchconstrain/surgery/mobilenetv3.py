r"""Where the inverted residual pattern's layers are in torchvision's MobileNetV3.

An ``InvertedResidual`` block is ``block = [expand], depthwise, [squeeze-excitation],
project``, each conv a ``Conv2dNormActivation``; ``MobileNetV3.features`` is the stem, the
blocks and the last conv; its classifier is ``Linear, Hardswish, Dropout, Linear``.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidual, MobileNetV3
from torchvision.ops import SqueezeExcitation

from torchconstrain.surgery.pattern import Block, Network, sequence_unit
from torchconstrain.surgery.stock import features_network

__all__ = ["BLOCKS", "FAMILY", "MODELS", "network", "parse"]

FAMILY = "MobileNetV3 inverted residual"
BLOCKS = (InvertedResidual,)
MODELS = (MobileNetV3,)


def parse(name: str, module: InvertedResidual) -> Block:
    r"""The roles of one ``InvertedResidual`` block (``name``: its name in the model)."""
    layers = list(getattr(module, "block", []))
    if not 2 <= len(layers) <= 4 or not all(isinstance(layer, (nn.Sequential, SqueezeExcitation)) for layer in layers):
        raise ValueError(f"expected [expand], depthwise, [squeeze-excitation], project layers. Got {layers!r}.")
    prefix = f"{name}.block" if name else "block"
    units = {index: sequence_unit(layer, f"{prefix}.{index}") for index, layer in enumerate(layers)
             if isinstance(layer, nn.Sequential)}
    convs = list(units)
    se = [index for index, layer in enumerate(layers) if isinstance(layer, SqueezeExcitation)]
    if len(convs) not in (2, 3) or len(se) > 1 or (se and not convs[-2] < se[0] < convs[-1]):
        raise ValueError(f"expected [expand], depthwise, [squeeze-excitation], project layers. Got {layers!r}.")
    return Block(name, module, units[convs[0]] if len(convs) == 3 else None, units[convs[-2]],
                 layers[se[0]] if se else None, units[convs[-1]], bool(module.use_res_connect),
                 f"{prefix}.{se[0]}" if se else None)


def network(model: MobileNetV3, blocks: list[Block]) -> Network:
    r"""The whole model: ``features[0]`` the stem, ``features[-1]`` the last conv."""
    return features_network(model, blocks)
