r"""The demo's stages after training: bake, shrink and fold, export to ExecuTorch, and what each measures."""

from __future__ import annotations

import copy
import io

import torch
from torch import Tensor, nn

import torchconstrain.surgery as surgery
from torchconstrain.bake import bake
from torchconstrain.demo.data import Digits
from torchconstrain.demo.train import evaluate
from torchconstrain.deploy import Program, set_threads, threads, to_executorch
from torchconstrain.report import Report

__all__ = [
    "PROGRAM_TOLERANCE", "TOLERANCE", "baked_copy", "executorch_threads", "folded_copy", "latencies",
    "max_difference", "measure", "measure_program", "program_difference", "programs", "shrunk_copy",
    "state_dict_bytes", "stock_difference", "zero_share",
]

#: ``torch.allclose`` tolerances between the shrunk and folded model's logits and the baked model's.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def zero_share(model: nn.Module) -> float:
    r"""Return the share of exactly zero entries among the (effective) weights of every conv and linear layer.

    Example:
        >>> from torch import nn
        >>> from torchconstrain.demo.stages import zero_share
        >>> layer = nn.Linear(2, 2)
        >>> _ = nn.init.zeros_(layer.weight[0])
        >>> zero_share(nn.Sequential(layer))
        0.5
    """
    zeros = total = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                zeros += int((module.weight == 0).sum())
                total += module.weight.numel()
    return zeros / total if total else 0.0


def measure(model: nn.Module, data: Digits) -> dict:
    r"""Return the test accuracy and loss, weight sparsity, parameters and MACs of one 32x32 image.

    Leaves ``model`` in eval mode: counting MACs runs a forward, which in train mode would
    move BatchNorm's running statistics.
    """
    model.eval()
    loss, accuracy = evaluate(model, data.test_x, data.test_y)
    example = data.test_x[:1].to(next(model.parameters()).device)
    return {
        "test_accuracy": accuracy,
        "test_loss": loss,
        "sparsity": zero_share(model),
        "params": surgery.count_params(model),
        "macs": surgery.count_macs(model, example),
        "size_bytes": state_dict_bytes(model),
    }


def latencies(models: dict[str, nn.Module], example: Tensor, *, min_run_time: float, rounds: int = 5) -> dict:
    r"""Return each model's batch-1 CPU latency in seconds, on one thread, timed in interleaved rounds.

    Each round times every model (a CPU copy, eval mode), starting with a different one,
    with :func:`~torchconstrain.surgery.measure_latency` for ``min_run_time / rounds`` seconds;
    a model's latency is its fastest round's median, so that a burst of load on the machine
    during one round does not count. ``min_run_time`` is the timing per model, all rounds
    together. One thread: at batch 1 a model this small mostly
    waits on thread synchronization otherwise, and a phone runs it on one core anyway.
    """
    copies = {name: copy.deepcopy(model).cpu().eval() for name, model in models.items()}
    example = example[:1].cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {name: [] for name in copies}
        names = list(copies)
        for turn in range(rounds):
            for name in names[turn % len(names):] + names[:turn % len(names)]:  # each model leads a round in turn
                times[name].append(surgery.measure_latency(copies[name], example, min_run_time=min_run_time / rounds))
    finally:
        torch.set_num_threads(threads)
    return {name: min(values) for name, values in times.items()}


def baked_copy(model: nn.Module) -> tuple[nn.Module, Report]:
    r"""Return a baked deep copy of the constrained ``model`` (left as it is) and the bake report."""
    baked = copy.deepcopy(model).eval()
    return baked, bake(baked)


def shrunk_copy(baked: nn.Module, example: Tensor) -> tuple[nn.Module, surgery.ShrinkReport, int]:
    r"""Return a copy of ``baked`` without its unread block channels and with BatchNorm folded.

    Returns:
        ``(model, shrink report, number of folded BatchNorms)``.
    """
    shrunk = copy.deepcopy(baked).eval()
    report = surgery.shrink(shrunk, example=example, measure=False)
    return shrunk, report, surgery.fold_batchnorm(shrunk)


def folded_copy(baked: nn.Module) -> nn.Module:
    r"""Return a copy of ``baked`` with BatchNorm folded but no channel removed: what folding alone buys."""
    folded = copy.deepcopy(baked).eval()
    surgery.fold_batchnorm(folded)
    return folded


@torch.no_grad()
def max_difference(first: nn.Module, second: nn.Module, images: Tensor) -> tuple[float, bool]:
    r"""Return the largest ``|logit difference|`` of two models on ``images`` (eval mode) and
    whether they agree within :data:`TOLERANCE`."""
    first.eval(), second.eval()
    a, b = first(images), second(images)
    return (a - b).abs().max().item(), torch.allclose(a, b, **TOLERANCE)


@torch.no_grad()
def stock_difference(baked: nn.Module, images: Tensor) -> float:
    r"""Load ``baked``'s ``state_dict`` into a freshly built model (``strict=True``) and return
    the largest ``|logit difference|`` between the two: zero when baking left plain modules."""
    from torchconstrain.demo.data import make_model

    fresh = make_model(seed=1).to(next(baked.parameters()).device).eval()
    fresh.load_state_dict(baked.state_dict(), strict=True)
    return (fresh(images) - baked.eval()(images)).abs().max().item()


#: ``torch.allclose`` tolerances between the fp32 ExecuTorch program's logits and the eager model's:
#: float32 rounding (logits of a trained model reach tens, where one rounding step is about 2e-6).
PROGRAM_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def programs(model: nn.Module, data: Digits, *, calibration_images: int) -> dict[str, Program]:
    r"""Export the (shrunk, folded) ``model`` to ExecuTorch programs for batch-1 images: fp32, and
    int8 with activations calibrated on the first ``calibration_images`` training images."""
    example = data.test_x[:1].cpu()
    calibration = data.train_x[:calibration_images].cpu().split(64)
    return {
        "executorch_fp32": to_executorch(model, example),
        "executorch_int8": to_executorch(model, example, int8=True, calibration=calibration),
    }


def executorch_threads(count: int = 1) -> int:
    r"""Give ExecuTorch's thread pool ``count`` threads if no program ran yet in this process; return its size."""
    try:
        set_threads(count)
    except ValueError:  # a program ran already: the pool keeps its size, and the report says which
        pass
    return threads()


def measure_program(program: Program, data: Digits) -> dict:
    r"""Return a program's test accuracy and loss (one image at a time, as it was exported) and its size."""
    logits = torch.cat([program(image) for image in data.test_x.cpu().split(1)])
    labels = data.test_y.cpu()
    return {
        "test_accuracy": (logits.argmax(dim=1) == labels).float().mean().item(),
        "test_loss": nn.functional.cross_entropy(logits, labels).item(),
        "size_bytes": program.size,
        "int8": program.int8,
        "quantized_weights": len(program.moved),
    }


@torch.no_grad()
def program_difference(program: Program, model: nn.Module, images: Tensor) -> tuple[float, bool]:
    r"""Return the largest ``|logit difference|`` between ``program`` and the eager ``model`` (eval mode) on
    ``images``, and whether they agree within :data:`PROGRAM_TOLERANCE`."""
    model.eval()
    images = images.cpu()
    ours = torch.cat([program(image) for image in images.split(1)])
    eager = model(images)
    return (ours - eager).abs().max().item(), torch.allclose(ours, eager, **PROGRAM_TOLERANCE)


def state_dict_bytes(model: nn.Module) -> int:
    r"""Return the size of ``torch.save(model.state_dict())``: what the eager model's file weighs.

    Example:
        >>> from torch import nn
        >>> from torchconstrain.demo.stages import state_dict_bytes
        >>> state_dict_bytes(nn.Linear(256, 256)) > 256 * 256 * 4
        True
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
