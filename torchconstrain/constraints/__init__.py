r"""Constraint classes: each one is a ``torch.nn.utils.parametrize`` parametrization."""

from torchconstrain.constraints.base import Constraint
from torchconstrain.constraints.box import Clamp
from torchconstrain.constraints.masks import FixedMask, LearnableMask

__all__ = ["Constraint", "Clamp", "FixedMask", "LearnableMask"]
