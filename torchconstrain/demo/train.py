r"""The demo's training loop, the same for the plain and the constrained model."""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from torchconstrain.bake import check, penalty
from torchconstrain.constraints import LearnableMask
from torchconstrain.demo.config import DemoConfig
from torchconstrain.demo.data import Digits
from torchconstrain.optim import param_groups
from torchconstrain.schedules import TemperatureSchedule
from torchconstrain.surgery.measure import evaluating

__all__ = ["evaluate", "gates_kept", "make_optimizer", "train"]


def make_optimizer(model: nn.Module, config: DemoConfig) -> torch.optim.AdamW:
    r"""AdamW over :func:`~torchconstrain.param_groups`: the weights, and the learnable mask scores
    in a group of their own with ``config.mask_lr`` and no weight decay.

    Adam moves each score by about its learning rate per step whatever the scale of its
    gradient, so the small sparsity penalty can carry a gate across the threshold within
    a few epochs, unless the task loss pushes back.

    Example:
        >>> from torch import nn
        >>> from torchconstrain import LearnableMask, constrain
        >>> from torchconstrain.demo.config import DemoConfig
        >>> from torchconstrain.demo.train import make_optimizer
        >>> model = nn.Linear(4, 2)
        >>> _ = constrain(model, {"weight": LearnableMask(per="channel")})
        >>> optimizer = make_optimizer(model, DemoConfig(lr=1e-3, mask_lr=0.2))
        >>> [(len(g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
        [(2, 0.001, 0.0001), (1, 0.2, 0.0)]
    """
    groups = param_groups(model, scores={"lr": config.mask_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def gates_kept(model: nn.Module) -> float | None:
    r"""Return the share of learnable gates above their threshold (``None`` without learnable masks)."""
    masks = {id(m.scores): m for m in model.modules() if isinstance(m, LearnableMask) and m.scores is not None}
    if not masks:
        return None
    with torch.no_grad():
        kept = sum(int((m.gate() > m.threshold).sum()) for m in masks.values())
        total = sum(m.scores.numel() for m in masks.values())
    return kept / total


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 500) -> tuple[float, float]:
    r"""Return the mean cross-entropy and the accuracy of ``model`` on ``images``, in eval mode."""
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    with evaluating(model):
        logits = torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    loss = nn.functional.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(dim=1) == labels).float().mean().item()


def train(model: nn.Module, data: Digits, config: DemoConfig, *, name: str, constrained: bool) -> list[dict]:
    r"""Train ``model`` in place on ``data.train_*`` with loss ``cross_entropy + penalty(model)``.

    After every epoch the model is evaluated on the test set and, when ``constrained``,
    :func:`~torchconstrain.check` runs (it raises ``ConstraintViolation`` if a constraint
    does not hold).
    The batch order comes from a generator seeded with ``config.seed``, so the plain and
    the constrained model see the same batches. The learning rates follow a one-cycle
    schedule; learnable gates, if any, are annealed to ``config.mask_temperature`` and
    are hard (binary) for the last ``config.hard_epochs`` epochs. Seeds torch's global
    generator with ``config.seed`` (for dropout).

    Returns:
        One dict per epoch: ``train_loss`` (cross-entropy), ``penalty``, ``train_accuracy``,
        ``test_loss``, ``test_accuracy``, and for a constrained model ``checked_tensors``
        and ``gates_kept``.
    """
    torch.manual_seed(config.seed)  # dropout
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=config.batch_size, shuffle=True,
                        generator=generator, num_workers=0)
    batches = min(len(loader), config.limit_batches or len(loader))
    optimizer = make_optimizer(model, config)
    schedules = _schedules(model, optimizer, config, steps=config.epochs * batches)
    history = []
    for epoch in range(1, config.epochs + 1):
        if config.hard_epochs and epoch == max(1, config.epochs - config.hard_epochs + 1):
            _harden(model)
        with _bar(config, name, epoch, batches) as bar:
            row = _train_epoch(model, loader, optimizer, schedules, batches, bar)
            row["test_loss"], row["test_accuracy"] = evaluate(model, data.test_x, data.test_y)
            if constrained:
                row["checked_tensors"] = len(check(model))
                row["gates_kept"] = gates_kept(model)
            bar.set_postfix_str(_postfix(row))
        history.append({"epoch": epoch, **row})
    return history


def _harden(model: nn.Module) -> None:
    """Switch every learnable gate to its binary forward (straight-through gradient)."""
    for module in model.modules():
        if isinstance(module, LearnableMask):
            module.hard = True


def _has_gates(model: nn.Module) -> bool:
    return any(isinstance(module, LearnableMask) for module in model.modules())


def _schedules(model: nn.Module, optimizer: torch.optim.Optimizer, config: DemoConfig, *, steps: int) -> list:
    """One-cycle learning rates for every group; the gates' temperature, if the model has gates."""
    peaks = [group["lr"] for group in optimizer.param_groups]
    schedules = [torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=steps, pct_start=0.2)]
    if _has_gates(model):
        schedules.append(TemperatureSchedule(model, final_temperature=config.mask_temperature, steps=steps))
    return schedules


def _postfix(row: dict) -> str:
    text = f"loss {row['train_loss']:.3f}, test acc {row['test_accuracy']:.1%}"
    if row.get("gates_kept") is not None:
        text += f", gates kept {row['gates_kept']:.0%}"
    return text


def _bar(config: DemoConfig, name: str, epoch: int, batches: int):
    from tqdm import tqdm

    return tqdm(total=batches, desc=f"{name:<11} epoch {epoch:>2}/{config.epochs}", unit="batch", file=sys.stderr,
                disable=not config.progress, leave=True, dynamic_ncols=True)


def _train_epoch(model, loader, optimizer, schedules, batches: int, bar) -> dict:
    model.train()
    device = next(model.parameters()).device
    sums = {"train_loss": 0.0, "penalty": 0.0, "correct": 0, "seen": 0}
    for _, (images, labels) in zip(range(batches), loader):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        task, extra = nn.functional.cross_entropy(logits, labels), penalty(model)
        optimizer.zero_grad(set_to_none=True)
        (task + extra).backward()
        optimizer.step()
        for schedule in schedules:
            schedule.step()
        sums["train_loss"] += task.item() * len(labels)
        sums["penalty"] += extra.item() * len(labels)
        sums["correct"] += int((logits.argmax(dim=1) == labels).sum())
        sums["seen"] += len(labels)
        bar.update()
        bar.set_postfix(loss=f"{task.item():.3f}", refresh=False)
    seen = sums["seen"]
    return {"train_loss": sums["train_loss"] / seen, "penalty": sums["penalty"] / seen,
            "train_accuracy": sums["correct"] / seen}
