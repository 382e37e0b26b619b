r"""Constraints, masks and learnable sparsity for PyTorch weights, living in the forward pass.

Every constraint is a :mod:`torch.nn.utils.parametrize` parametrization: the effective
weight is computed through it on every access, so it is always feasible and gradients
flow through it. :func:`constrain` applies rules to a model, :func:`check` proves the
constraints hold, :func:`penalty` sums their penalty terms and :func:`bake` leaves a
plain model with the final weights.
"""

from torchconstrain.api import constrain
from torchconstrain.bake import bake, check, penalty
from torchconstrain.constraints import (
    L1,
    L2,
    Clamp,
    Constraint,
    FakeQuant,
    FixedMask,
    LearnableMask,
    MaxNorm,
    NonNeg,
    SoftConstraint,
    UnitNorm,
)
from torchconstrain.fastpath import fast_path_enabled, set_fast_path
from torchconstrain.errors import CheckpointMismatch, ConstraintViolation
from torchconstrain.keys import match
from torchconstrain.optim import param_groups, unoptimized
from torchconstrain.report import Report
from torchconstrain.schedules import PruningSchedule, TemperatureSchedule

__all__ = [
    "CheckpointMismatch",
    "Clamp",
    "Constraint",
    "ConstraintViolation",
    "FakeQuant",
    "FixedMask",
    "L1",
    "L2",
    "LearnableMask",
    "MaxNorm",
    "NonNeg",
    "PruningSchedule",
    "Report",
    "SoftConstraint",
    "TemperatureSchedule",
    "UnitNorm",
    "bake",
    "check",
    "constrain",
    "fast_path_enabled",
    "match",
    "param_groups",
    "penalty",
    "set_fast_path",
    "unoptimized",
]

__version__ = "0.1.0"
