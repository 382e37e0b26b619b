r"""Model rewrites that turn channel masks into really smaller models.

Today: torchvision's MobileNetV3 (``mobilenet_v3_small``/``large`` and models built from
their ``InvertedResidual`` blocks), built from the architecture-neutral pieces of
:mod:`torchconstrain.surgery.slicing` (slicing convs, BatchNorms and linears, folding BN);
any other model through Torch-Pruning's dependency graph (:mod:`torchconstrain.surgery.graph`,
the ``graph`` extra, imported on use). :mod:`torchconstrain.surgery.budget` chooses which
channels to keep for a share of the MACs or of the channels.
"""

from torchconstrain.surgery import budget, graph
from torchconstrain.surgery.budget import Allocation, ChannelGroup, GateBudget, allocate
from torchconstrain.surgery.measure import count_macs, count_params, layer_macs, measure_latency
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
    "Allocation", "Block", "ChannelGroup", "GateBudget", "RoleKey", "ShrinkReport", "allocate", "block_rules", "budget",
    "channel_plan", "count_macs", "count_params", "find_blocks", "fold_batchnorm", "graph", "layer_macs", "mask_blocks",
    "measure_latency", "resize", "role", "shrink",
]
