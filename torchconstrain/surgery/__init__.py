r"""Model rewrites that turn channel masks into really smaller models.

The inverted residual family: torchvision's MobileNetV2, MobileNetV3, EfficientNet (B0-B7,
V2 S/M/L) and MNASNet, and models built from their blocks. One description of the pattern
(:mod:`~torchconstrain.surgery.pattern`: channel groups, masks, rewrites), one small
adapter per architecture that says where its layers are, and the architecture-neutral
pieces of :mod:`~torchconstrain.surgery.slicing` (slicing convs, BatchNorms and linears,
folding BN). Any other model goes through Torch-Pruning's dependency graph
(:mod:`~torchconstrain.surgery.graph`, the ``graph`` extra, imported on use);
:mod:`~torchconstrain.surgery.budget` chooses which channels to keep for a share of the MACs
or of the channels.
"""

from torchconstrain.surgery import budget, graph
from torchconstrain.surgery.budget import Allocation, ChannelGroup, GateBudget, allocate
from torchconstrain.surgery.family import (
    KINDS,
    Block,
    Group,
    GroupCost,
    RoleKey,
    ShrinkReport,
    block_rules,
    channel_groups,
    channel_plan,
    find_blocks,
    find_groups,
    mask_blocks,
    resize,
    role,
    shrink,
)
from torchconstrain.surgery.measure import count_macs, count_params, layer_macs, measure_latency
from torchconstrain.surgery.slicing import fold_batchnorm

__all__ = [
    "KINDS", "Allocation", "Block", "ChannelGroup", "GateBudget", "Group", "GroupCost", "RoleKey", "ShrinkReport",
    "allocate", "block_rules", "budget", "channel_groups", "channel_plan", "count_macs", "count_params", "find_blocks",
    "find_groups", "fold_batchnorm", "graph", "layer_macs", "mask_blocks",
    "measure_latency", "resize", "role", "shrink",
]
