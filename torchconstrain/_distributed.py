r"""What ``check``, ``penalty`` and ``bake`` need to know about FSDP2-sharded models.

Under :func:`torch.distributed.fsdp.fully_shard`, parameters (stored originals, learnable
mask scores) are sharded ``DTensor`` objects outside the forward, while buffers (masks,
bounds) stay whole on every rank.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor, nn


@functools.cache
def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_sharded(tensor: Tensor) -> bool:
    r"""Whether ``tensor`` is a ``DTensor`` (a shard of a tensor spread over ranks)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def whole(term: Tensor) -> Tensor:
    r"""A scalar computed from sharded tensors as a plain tensor (differentiable)."""
    return term.full_tensor() if is_sharded(term) else term


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    if not torch.distributed.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    r"""Gather every FSDP2 module's parameters for the block (a collective: every rank
    must enter it), then shard them again. Nothing happens for other models."""
    modules = _fsdp_modules(model)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
