r"""Train a constrained MobileNetV3-Small with DistributedDataParallel, then bake it.

    torchrun --nproc_per_node=2 -m torchconstrain.examples.train_ddp --steps 100

Every rank builds the same model (same seed) and constrains it with the same rules
before wrapping it in DDP and building the optimizer. DDP averages the gradients of the
stored originals and scores, so the replicas, and their constraints, stay identical.
Rank 0 bakes the model and saves a plain state_dict that loads into a stock
torchvision model. Runs on CPUs (gloo) or one GPU per rank (nccl).
"""

import argparse
import os

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchconstrain import Clamp, FixedMask, LearnableMask, bake, check, constrain, penalty

RULES = {
    nn.Conv2d: Clamp(-1.0, 1.0),
    "features.*.block.0.0.weight": FixedMask.random(sparsity=0.5, seed=0),
    "classifier.3": LearnableMask(strength=0.05),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help="image side of the generated data")
    parser.add_argument("--out", default="baked.pt", help="where rank 0 saves the baked state_dict")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")

    torch.manual_seed(0)  # the same initial weights and random masks on every rank
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    constrain(model, RULES)  # before DDP and before the optimizer
    model.to(device)
    ddp = DistributedDataParallel(model, device_ids=[device] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    data = torch.Generator().manual_seed(rank)  # each rank its own batches
    for step in range(1, args.steps + 1):
        images = torch.randn(8, 3, args.size, args.size, generator=data).to(device)
        labels = torch.randint(0, 10, (8,), generator=data).to(device)
        loss = nn.functional.cross_entropy(ddp(images), labels) + penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        check(model)
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    if rank == 0:
        print(bake(model))
        torch.save(model.state_dict(), args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
