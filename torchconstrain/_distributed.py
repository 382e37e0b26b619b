r"""What torchconstrain needs to know about distributed models.

Under :func:`torch.distributed.fsdp.fully_shard`, parameters (stored originals, learnable
mask scores) are sharded ``DTensor`` objects outside the forward, while buffers (masks,
bounds) stay whole on every rank: ``check``, ``penalty`` and ``bake`` handle the shards.
Under ``DistributedDataParallel``, buffers are written from one rank's at each forward
without a trace in their version counters (:func:`buffers_written_unseen`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def buffers_written_unseen() -> bool:
    r"""Whether a ``DistributedDataParallel`` forward that syncs buffers is running.

    Such a forward (``broadcast_buffers=True``, the default) first writes every rank's
    buffers (masks, bounds, temperatures) from one rank's, restoring their version counters
    afterwards (``torch.autograd._unsafe_preserve_version_counter``): nothing is kept or
    reused there, and each call that answers yes moves :func:`buffer_writes_seen`, which
    values kept for reuse (an effective tensor, a bound read as a float) are keyed on, so
    that those of tensors this forward did not read are not reused after it either. Only
    a forward that reads a constrained tensor asks, so a syncing forward that reads none
    (and a sync after the forward, by a buffer comm hook) goes unseen.
    """
    global _writes_seen
    ddp = DistributedDataParallel._active_ddp_module  # set during its forward (torch >= 2.0)
    if ddp is None or not ddp.will_sync_module_buffers():
        return False
    _writes_seen += 1
    return True


_writes_seen = 0


def buffer_writes_seen() -> int:
    r"""A number that :func:`buffers_written_unseen` moves each time it answers yes."""
    return _writes_seen


def is_sharded(tensor: Tensor) -> bool:
    r"""Whether ``tensor`` is a ``DTensor`` (a shard of a tensor spread over ranks).

    No tensor is one unless ``torch.distributed.tensor`` was imported, which this does not do.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def whole(term: Tensor) -> Tensor:
    r"""A scalar computed from sharded tensors as a plain tensor (differentiable)."""
    return term.full_tensor() if is_sharded(term) else term


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    kind = getattr(fsdp, "FSDPModule", None)
    return [] if kind is None else [m for m in model.modules() if isinstance(m, kind)]


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
