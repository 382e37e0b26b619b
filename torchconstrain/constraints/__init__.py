r"""Constraint classes: each one is a ``torch.nn.utils.parametrize`` parametrization,
except the soft ones (``L1``, ``L2``), which only add a penalty."""

from torchconstrain.constraints.base import Constraint
from torchconstrain.constraints.box import Clamp
from torchconstrain.constraints.masks import FixedMask, LearnableMask
from torchconstrain.constraints.norms import MaxNorm, NonNeg, UnitNorm
from torchconstrain.constraints.quant import FakeQuant
from torchconstrain.constraints.soft import L1, L2, SoftConstraint

__all__ = [
    "Constraint", "Clamp", "FixedMask", "LearnableMask", "NonNeg", "MaxNorm", "UnitNorm",
    "FakeQuant", "SoftConstraint", "L1", "L2",
]
