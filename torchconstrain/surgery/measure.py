r"""Size and speed of a model: parameters, multiply-accumulates, batch-1 CPU latency."""

from __future__ import annotations

import torch
import torch.utils.benchmark as benchmark
from torch import nn

__all__ = ["count_params", "count_macs", "layer_macs", "measure_latency"]


def count_params(model: nn.Module) -> int:
    r"""Return the number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    r"""Return the multiply-accumulates of convolutions and linear layers for one forward of ``example``."""
    return sum(layer_macs(model, example).values())


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    r"""Return the multiply-accumulates of each convolution and linear layer, by module name, for one
    forward of ``example`` (a layer called twice counts twice)."""
    names = {module: name for name, module in model.named_modules()}
    totals: dict[str, int] = {}

    def conv_hook(module: nn.Conv2d, inputs, output) -> None:
        kernel = module.weight.shape[2] * module.weight.shape[3]
        totals[names[module]] = totals.get(names[module], 0) + output.numel() * (module.in_channels // module.groups) * kernel

    def linear_hook(module: nn.Linear, inputs, output) -> None:
        totals[names[module]] = totals.get(names[module], 0) + output.numel() * module.in_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    model.eval()  # a forward in train mode would update BatchNorm's running statistics
    try:
        with torch.inference_mode():
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return totals


def measure_latency(model: nn.Module, example: torch.Tensor, *, min_run_time: float = 1.0) -> float:
    r"""Return the median seconds of one inference of ``example`` (eval mode, ``inference_mode``)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(3):  # warm-up
                model(example)
            timer = benchmark.Timer("model(example)", globals={"model": model, "example": example})
            return timer.blocked_autorange(min_run_time=min_run_time).median
    finally:
        model.train(was_training)
