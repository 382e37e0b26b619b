r"""Model rewrites that turn channel masks into really smaller models.

Today: torchvision's MobileNetV3 (``mobilenet_v3_small``/``large`` and models built from
their ``InvertedResidual`` blocks), built from the architecture-neutral pieces of
:mod:`torchconstrain.surgery.slicing` (slicing convs, BatchNorms and linears, folding BN).
"""

from torchconstrain.surgery.measure import count_macs, count_params, measure_latency
from torchconstrain.surgery.mobilenetv3 import (
    Block,
    RoleKey,
    ShrinkReport,
    block_rules,
    channel_plan,
    find_blocks,
    mask_blocks,
    resize,
    role,
    shrink,
)
from torchconstrain.surgery.slicing import fold_batchnorm

__all__ = [
    "Block", "RoleKey", "ShrinkReport", "block_rules", "channel_plan", "count_macs", "count_params", "find_blocks",
    "fold_batchnorm", "mask_blocks", "measure_latency", "resize", "role", "shrink",
]
