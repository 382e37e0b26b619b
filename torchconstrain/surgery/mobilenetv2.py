r"""Where the inverted residual pattern's layers are in torchvision's MobileNetV2.

An ``InvertedResidual`` block is ``conv = [expand], depthwise, project conv, project BN``
(expand and depthwise are ``Conv2dNormActivation``); ``MobileNetV2.features`` is the stem,
the blocks and the last conv; its classifier is ``Dropout, Linear``. No squeeze-excitation.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2

from torchconstrain.surgery.pattern import Block, Network, pair_unit, sequence_unit
from torchconstrain.surgery.stock import features_network

__all__ = ["BLOCKS", "FAMILY", "MODELS", "network", "parse"]

FAMILY = "MobileNetV2 inverted residual"
BLOCKS = (InvertedResidual,)
MODELS = (MobileNetV2,)


def parse(name: str, module: InvertedResidual) -> Block:
    r"""The roles of one ``InvertedResidual`` block (``name``: its name in the model)."""
    layers = list(getattr(module, "conv", []))
    if len(layers) not in (3, 4) or not all(isinstance(layer, nn.Sequential) for layer in layers[:-2]):
        raise ValueError(f"expected [expand], depthwise, project conv, project BatchNorm layers. Got {layers!r}.")
    prefix = f"{name}.conv" if name else "conv"
    expand = sequence_unit(layers[0], f"{prefix}.0") if len(layers) == 4 else None
    depthwise = sequence_unit(layers[-3], f"{prefix}.{len(layers) - 3}")
    project = pair_unit(module.conv, len(layers) - 2, prefix)
    return Block(name, module, expand, depthwise, None, project, bool(module.use_res_connect))


def network(model: MobileNetV2, blocks: list[Block]) -> Network:
    r"""The whole model: ``features[0]`` the stem, ``features[-1]`` the last conv."""
    return features_network(model, blocks)
