r"""The demo's data and model: scikit-learn's 8x8 digits and a MobileNetV3-Small for small images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn

__all__ = ["BN_MOMENTUM", "NUM_CLASSES", "Digits", "load_digits", "make_model"]

NUM_CLASSES = 10
BN_MOMENTUM = 0.3


@dataclass
class Digits:
    r"""Train and test images ``(N, 3, size, size)``, normalized, with their labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def to(self, device: str | torch.device) -> "Digits":
        r"""Return a copy with every tensor on ``device``."""
        return Digits(*(tensor.to(device) for tensor in (self.train_x, self.train_y, self.test_x, self.test_y)))


def load_digits(*, seed: int = 0, size: int = 32, test_share: float = 0.2) -> Digits:
    r"""Load scikit-learn's 1,797 handwritten digits and split them, stratified, by ``seed``.

    The 8x8 grey images (values 0 to 16) are upsampled bilinearly to ``size`` x ``size``,
    repeated over 3 channels and normalized with the training set's mean and standard
    deviation. The data ship with scikit-learn: nothing is downloaded.

    Example:
        >>> from torchconstrain.demo.data import load_digits
        >>> digits = load_digits(seed=0)
        >>> tuple(digits.train_x.shape), tuple(digits.test_x.shape)
        ((1437, 3, 32, 32), (360, 3, 32, 32))
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train, test = train_test_split(range(len(labels)), test_size=test_share, random_state=seed, stratify=bunch.target)
    train, test = torch.tensor(train), torch.tensor(test)
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return Digits(images[train], labels[train], images[test], labels[test])


def make_model(seed: int) -> nn.Module:
    r"""Build ``mobilenet_v3_small(weights=None, num_classes=10)`` for 32x32 inputs, seeded.

    Two changes for a short training on small images, neither touching a module name or
    a shape: the stem conv's stride becomes 1, so a 32x32 image is still 2x2 after the
    blocks' four stride-2 stages instead of vanishing to 1x1; and every BatchNorm's
    momentum goes from torchvision's 0.01 to 0.3, so the running statistics follow the
    weights within an epoch of 23 steps (with 0.01 the eval-mode model predicts one class
    for the whole demo; with 0.1 it does for the first epochs).

    Example:
        >>> from torchconstrain.demo.data import make_model
        >>> model = make_model(0)
        >>> model.features[0][0].stride, model.features[1].block[0][1].momentum
        ((1, 1), 0.3)
    """
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES)
    model.features[0][0].stride = (1, 1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = BN_MOMENTUM
    return model
