"""Two processes on the gloo backend: DDP and FSDP2 training of constrained models."""

import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn

from torchconstrain import Clamp, FixedMask, LearnableMask, bake, check, constrain, penalty

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "torchconstrain" / "examples" / "train_ddp.py"
RULES = {
    "0": [Clamp(-0.2, 0.2), FixedMask.random(sparsity=0.5, seed=1)],
    "2": LearnableMask(strength=0.1),
    "4": FixedMask.magnitude(sparsity=0.5),
}


def constrained() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    constrain(model, RULES)
    return model


def train(model: nn.Module, forward, rank: int) -> None:
    optimizer = torch.optim.SGD(forward.parameters(), lr=0.5, momentum=0.9)
    data = torch.Generator().manual_seed(rank)  # each rank its own batches
    for _ in range(3):
        loss = forward(torch.randn(4, 8, generator=data)).square().mean() + penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        check(model)


def ddp_worker(rank: int, init: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = constrained()
    train(model, DistributedDataParallel(model), rank)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    bake(model)
    torch.save({"trained": state, "baked": model.state_dict()}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


class TwoHeads(nn.Module):
    """A model whose forward reads one of its two constrained heads."""

    def __init__(self) -> None:
        super().__init__()
        self.body = constrained()
        self.other = nn.Linear(8, 4)
        constrain(self.other, {"weight": [Clamp(-0.5, 0.5), FixedMask.random(sparsity=0.5, seed=2)]})

    def forward(self, x: torch.Tensor, head: str = "body") -> torch.Tensor:
        return self.body(x) if head == "body" else self.other(x)


def ddp_synced_buffers_worker(rank: int, init: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from torchconstrain import set_fast_path

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = TwoHeads()
    ddp = DistributedDataParallel(model)
    x, outputs = torch.ones(1, 8), {}
    with torch.no_grad():
        model(x), model(x, "other")  # evaluations of the local module: values kept, bounds read as floats
    if rank == 0:  # a change on one rank, for DDP's buffer sync to carry to the others
        with torch.no_grad():
            model.body[0].parametrizations.weight[0].max.fill_(0.01)
            model.body[0].parametrizations.weight[1].mask[:, 1:] = False
            model.body[2].parametrizations.weight[0].temperature.fill_(0.5)
            model.other.parametrizations.weight[0].max.fill_(0.02)
    with torch.no_grad():
        outputs["fast"] = ddp(x)  # syncs the buffers of both heads, reads the body
        with set_fast_path(False):
            outputs["plain"] = ddp(x)
        outputs["local"] = model(x)  # after the syncs, outside DDP's forward
        outputs["other"] = model(x, "other")  # a head those forwards did not read
    check(model)
    torch.save(outputs, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def fsdp_worker(rank: int, init: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = constrained()
    for layer in (model[0], model[2], model[4], model):
        fully_shard(layer)
    train(model, model, rank)
    refused = ""
    try:
        bake(model)
    except ValueError as error:
        refused = str(error)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    whole = constrained()
    whole.load_state_dict(full, strict=True)
    check(whole)
    bake(whole)
    torch.save({"trained": full, "baked": whole.state_dict(), "refused": refused}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def budgeted() -> nn.Module:
    """A model whose learnable masks carry budgets: one of its own, and one MAC budget shared by two masks."""
    from torchconstrain.surgery.budget import ChannelGroup, GateBudget

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    constrain(model, {"0": LearnableMask(per="channel", init=0.9), "2": LearnableMask(per="channel", init=0.9),
                      "4": LearnableMask(sparsity=0.5, rate=0.5, init=0.9)})
    masks = [model[0].parametrizations.weight[0], model[2].parametrizations.weight[0]]
    groups = [ChannelGroup("first", 16, torch.ones(16), macs=8.0), ChannelGroup("second", 16, torch.ones(16), macs=16.0)]
    GateBudget(list(zip(groups, masks)), keep=0.4, rate=0.5).attach()
    return model


def train_budgeted(model: nn.Module) -> list[torch.Tensor]:
    """Three SGD steps on the same batches on every rank; the multipliers after them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.Generator().manual_seed(0)
    for _ in range(3):
        loss = model(torch.randn(4, 8, generator=data)).square().mean() + penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [mask.multiplier.clone() for mask in model.modules() if "multiplier" in getattr(mask, "_buffers", {})]


def fsdp_budget_worker(rank: int, init: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = budgeted()
    for layer in (model[0], model[2], model[4], model):
        fully_shard(layer)
    torch.save({"multipliers": train_budgeted(model)}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def on_two_ranks(worker, tmp_path, timeout: float = 120) -> list[dict]:
    context = mp.start_processes(worker, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"{worker.__name__} did not finish in {timeout} s")
    return [torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(2)]


def assert_identical(first: dict, second: dict) -> None:
    assert list(first) == list(second)
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_ddp_replicas_stay_identical_and_bake_alike(tmp_path):
    results = on_two_ranks(ddp_worker, tmp_path)
    for kind in ("trained", "baked"):
        assert_identical(results[0][kind], results[1][kind])
    start = constrained().state_dict()
    assert not torch.equal(results[0]["trained"]["2.parametrizations.weight.0.scores"],
                           start["2.parametrizations.weight.0.scores"])
    assert list(results[0]["baked"]) == list(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16),
                                                          nn.ReLU(), nn.Linear(16, 4)).state_dict())


def test_ddp_buffer_syncs_reach_every_rank_s_effective_weights(tmp_path):
    # DDP writes rank 0's buffers into the other ranks at each forward with their version
    # counters restored: rank 1 reused weights kept before (the fast path) and a Clamp's
    # bound read as a float before (both paths), and broke its own constraint (check).
    first, second = on_two_ranks(ddp_synced_buffers_worker, tmp_path)
    assert_identical(first, second)
    assert torch.equal(first["fast"], first["plain"]) and torch.equal(first["local"], first["fast"])


def test_fsdp2_shards_train_check_and_bake_alike(tmp_path):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    results = on_two_ranks(fsdp_worker, tmp_path)
    for kind in ("trained", "baked"):
        assert_identical(results[0][kind], results[1][kind])
    assert "the model is sharded (FSDP2), and bake needs whole tensors" in results[0]["refused"]
    weight = results[0]["baked"]["0.weight"]
    assert (weight == 0).float().mean().item() >= 0.5 and weight.abs().max() <= 0.2


@pytest.mark.slow
def test_torchrun_example_trains_and_bakes_a_stock_model(tmp_path):
    out = tmp_path / "baked.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(EXAMPLE), "--steps", "2", "--size", "32", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2: loss" in done.stdout and "baked tensors" in done.stdout
    stock = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    stock.load_state_dict(torch.load(out), strict=True)


def test_fsdp2_budgets_steer_by_every_ranks_gates_as_one_process_does(tmp_path):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    results = on_two_ranks(fsdp_budget_worker, tmp_path)
    alone = train_budgeted(budgeted())
    assert len(alone) == 2 and all(m.item() != 0 for m in alone)
    for result in results:  # the same multipliers as unsharded: each rank saw the whole share, not its shard's
        torch.testing.assert_close(result["multipliers"], alone)
