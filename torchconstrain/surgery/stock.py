r"""The whole-model layout torchvision's MobileNetV2/V3 and EfficientNets share: ``features`` holds the
stem, the blocks (alone or in stage ``Sequential``\ s) and the last conv; ``classifier`` holds one or
two linear layers with activations and dropout between them, after global average pooling."""

from __future__ import annotations

from torch import nn

from torchconstrain.surgery.pattern import Block, Network, Slot, sequence_unit

__all__ = ["ELEMENTWISE", "features_network", "head_slots"]

ELEMENTWISE = (nn.Dropout, nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)


def features_network(model: nn.Module, blocks: list[Block]) -> Network:
    r"""The :class:`Network` of a model laid out as ``features`` (stem, blocks, last conv) and ``classifier``.

    Raises:
        ValueError: something else sits between the stem and the last conv.
    """
    features = model.features
    known = {id(block.module) for block in blocks}
    inner = _flat(list(features)[1:-1])
    strangers = [type(module).__name__ for module in inner if id(module) not in known]
    if strangers or len(inner) != len(blocks):
        raise ValueError(f"{type(model).__name__}.features: expected the stem, blocks and the last conv. "
                         f"Got {', '.join(strangers) or 'blocks outside features'} between them.")
    last = len(features) - 1
    return Network(sequence_unit(features[0], "features.0"), blocks, sequence_unit(features[last], f"features.{last}"),
                   head_slots(model))


def _flat(modules: list[nn.Module]) -> list[nn.Module]:
    """``modules`` with every ``Sequential`` replaced by its modules, recursively."""
    return [inner for module in modules
            for inner in (_flat(list(module)) if isinstance(module, nn.Sequential) else [module])]


def head_slots(model: nn.Module) -> list[Slot]:
    r"""The linear layers of ``model.classifier`` (a ``Linear``, or a ``Sequential`` of one or two
    with element-wise layers between them).

    Raises:
        ValueError: any other classifier.
    """
    classifier = model.classifier
    if isinstance(classifier, nn.Linear):
        return [Slot(model, "classifier", "classifier")]
    layers = list(classifier) if isinstance(classifier, nn.Sequential) else [classifier]
    linears = [Slot(classifier, str(index), f"classifier.{index}") for index, layer in enumerate(layers)
               if isinstance(layer, nn.Linear)]
    others = [type(layer).__name__ for layer in layers if not isinstance(layer, (nn.Linear, *ELEMENTWISE))]
    if others or len(linears) not in (1, 2):
        raise ValueError(f"{type(model).__name__}.classifier: expected one or two Linear layers with activations "
                         f"and dropout between them. Got {', '.join(type(layer).__name__ for layer in layers)}.")
    return linears
