r"""Where the inverted residual pattern's layers are in torchvision's MNASNet.

An ``_InvertedResidual`` block is ``layers = expand conv, BN, ReLU, depthwise conv, BN,
ReLU, project conv, BN``. ``MNASNet.layers`` is one flat ``Sequential``: the stem (conv, BN,
ReLU), a depthwise separable block (depthwise conv, BN, ReLU, project conv, BN: the pattern
without an expand conv, named after its first layer), stacks of blocks, the last conv (conv,
BN, ReLU); its classifier is ``Dropout, Linear``.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.mnasnet import MNASNet, _InvertedResidual

from torchconstrain.surgery.pattern import Block, Network, pair_unit
from torchconstrain.surgery.stock import head_slots

__all__ = ["BLOCKS", "FAMILY", "MODELS", "network", "parse"]

FAMILY = "MNASNet inverted residual"
BLOCKS = (_InvertedResidual,)
MODELS = (MNASNet,)
_BLOCK_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU) * 2 + (nn.Conv2d, nn.BatchNorm2d)


def parse(name: str, module: _InvertedResidual) -> Block:
    r"""The roles of one ``_InvertedResidual`` block (``name``: its name in the model)."""
    layers = getattr(module, "layers", [])
    _expect_types(layers, _BLOCK_LAYERS, "expand conv, BN, ReLU, depthwise conv, BN, ReLU, project conv, BN")
    prefix = f"{name}.layers" if name else "layers"
    return Block(name, module, pair_unit(layers, 0, prefix), pair_unit(layers, 3, prefix), None,
                 pair_unit(layers, 6, prefix), bool(module.apply_residual))


def network(model: MNASNet, blocks: list[Block]) -> Network:
    r"""The whole model, its separable block first among ``blocks``."""
    layers = model.layers
    head = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU) * 2 + (nn.Conv2d, nn.BatchNorm2d)
    tail = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)
    stacks = list(layers)[len(head):len(layers) - len(tail)]
    _expect_types(list(layers)[:len(head)] + list(layers)[len(layers) - len(tail):], head + tail,
                  "stem, depthwise separable block, stacks of blocks, last conv")
    if not all(isinstance(stack, nn.Sequential) and all(isinstance(b, _InvertedResidual) for b in stack)
               for stack in stacks):
        raise ValueError("MNASNet.layers: expected stacks of _InvertedResidual blocks between the separable block "
                         "and the last conv.")
    separable = Block("layers.3", None, None, pair_unit(layers, 3, "layers"), None, pair_unit(layers, 6, "layers"), False)
    return Network(pair_unit(layers, 0, "layers"), [separable, *blocks], pair_unit(layers, len(layers) - 3, "layers"),
                   head_slots(model))


def _expect_types(layers, types: tuple, what: str) -> None:
    got = tuple(type(layer) for layer in layers)
    if len(got) != len(types) or not all(isinstance(layer, kind) for layer, kind in zip(layers, types)):
        raise ValueError(f"expected {what}. Got {', '.join(t.__name__ for t in got) or 'nothing'}.")
