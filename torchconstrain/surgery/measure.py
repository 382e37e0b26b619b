r"""Size and speed of a model: parameters, multiply-accumulates, batch-1 CPU latency."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.utils.benchmark as benchmark
from torch import nn

__all__ = ["count_macs", "count_params", "evaluating", "layer_macs", "measure_latency"]


def count_params(model: nn.Module) -> int:
    r"""Return the number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    r"""Return the multiply-accumulates of convolutions and linear layers for one forward of ``example``."""
    return sum(layer_macs(model, example).values())


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    r"""Return the multiply-accumulates of each convolution and linear layer for one forward of ``example``.

    A layer called twice counts twice; a layer the forward does not call is missing.
    """
    macs: dict[nn.Module, int] = {}

    def conv_hook(module: nn.Conv2d, inputs, output) -> None:
        kernel = module.weight.shape[2] * module.weight.shape[3]
        macs[module] = macs.get(module, 0) + output.numel() * (module.in_channels // module.groups) * kernel

    def linear_hook(module: nn.Linear, inputs, output) -> None:
        macs[module] = macs.get(module, 0) + output.numel() * module.in_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with evaluating(model), torch.inference_mode():  # train mode would update BatchNorm's statistics
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return macs


@contextmanager
def evaluating(model: nn.Module):
    r"""Put ``model`` in eval mode for the block, then give every submodule back its own mode
    (``model.train(was_training)`` would put BatchNorms frozen in eval mode back in training)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def measure_latency(model: nn.Module, example: torch.Tensor, *, min_run_time: float = 1.0) -> float:
    r"""Return the median seconds of one inference of ``example`` (eval mode, ``inference_mode``)."""
    with evaluating(model), torch.inference_mode():
        for _ in range(3):  # warm-up
            model(example)
        timer = benchmark.Timer("model(example)", globals={"model": model, "example": example})
        return timer.blocked_autorange(min_run_time=min_run_time).median
