r"""The demo's settings and the packaged default rules file."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

__all__ = ["DemoConfig", "default_rules_path", "require_extras"]

DEVICES = ("cpu", "cuda")
#: Modules the demo needs beyond torchconstrain's own requirements: the ``demo`` extra.
EXTRAS = ("sklearn", "matplotlib", "tqdm")
#: Modules its last stage, the ExecuTorch programs, needs (the ``deploy`` extra, part of ``demo``).
DEPLOY_EXTRAS = ("executorch",)
PACKAGED_RULES = "packaged torchconstrain/data/demo_rules.yaml"


def require_extras(*, deploy: bool = True) -> None:
    r"""Raise ``ModuleNotFoundError`` naming the modules of :data:`EXTRAS` (and, with ``deploy``,
    :data:`DEPLOY_EXTRAS`) that are not installed."""
    names = EXTRAS + (DEPLOY_EXTRAS if deploy else ())
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"the demo needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            "pip install 'torchconstrain[demo]'."
        )


def default_rules_path() -> Path:
    r"""Return the path of the packaged rules file, ``torchconstrain/data/demo_rules.yaml``.

    Example:
        >>> from torchconstrain.demo.config import default_rules_path
        >>> default_rules_path().name
        'demo_rules.yaml'
    """
    return Path(str(resources.files("torchconstrain") / "data" / "demo_rules.yaml"))


@dataclass(frozen=True)
class DemoConfig:
    r"""What the demo does; the defaults are the command line's.

    Args:
        epochs: training epochs, the same for the plain and the constrained model.
        batch_size: training batch size.
        lr: peak learning rate of the weights (AdamW, one-cycle schedule).
        weight_decay: AdamW weight decay of the weights.
        mask_lr: peak learning rate of the learnable mask scores (their own param group,
            no weight decay): high enough that gates cross the threshold within the run.
        mask_temperature: the learnable gates' temperature at the end of training,
            annealed geometrically from 1 (:class:`~torchconstrain.TemperatureSchedule`):
            sharper gates, so fewer sit near the threshold.
        hard_epochs: the last epochs train with hard gates (``LearnableMask.hard``: the
            binary gate in the forward, straight-through gradient), so the weights adapt to
            exactly the network that ``bake`` leaves.
        seed: seeds the split, the initial weights and the batch order.
        device: ``"cpu"`` or ``"cuda"`` for training; latency is always batch-1 CPU.
        threads: torch CPU threads while the demo runs (restored afterwards). One by
            default: the same numbers on every machine (float sums depend on the thread
            count), and no collapse when other processes share the cores (with two
            OpenMP threads on a busy two-core machine a step can take 100 times longer).
        rules: a YAML or JSON rules file (default: the packaged ``demo_rules.yaml``).
        out: the report folder.
        limit_batches: stop each epoch after this many batches (``None``: all); for tests.
        latency_time: seconds of latency timing per model (``torch.utils.benchmark``).
        progress: show a tqdm bar per epoch on stderr.
        deploy: the last stage: export the shrunk, folded model to ExecuTorch programs,
            fp32 and int8, and measure them in ExecuTorch's runtime.
        calibration_images: training images that calibrate the int8 program's activations.

    Example:
        >>> from torchconstrain.demo import DemoConfig
        >>> DemoConfig(epochs=3).rules_path.name
        'demo_rules.yaml'
        >>> DemoConfig(epochs=0).validate()
        Traceback (most recent call last):
        ...
        ValueError: epochs: expected an integer >= 1. Got 0.
    """

    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    mask_lr: float = 0.2
    mask_temperature: float = 0.5
    hard_epochs: int = 3
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    rules: str | os.PathLike | None = None
    out: str | os.PathLike = "torchconstrain-demo"
    limit_batches: int | None = None
    latency_time: float = 1.0
    progress: bool = True
    deploy: bool = True
    calibration_images: int = 256

    @property
    def rules_path(self) -> Path:
        r"""The rules file this run reads."""
        return default_rules_path() if self.rules is None else Path(self.rules)

    def validate(self) -> None:
        r"""Raise ``ValueError`` naming the first bad setting, before any work is done."""
        for name in ("epochs", "batch_size", "threads", "calibration_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1. Got {value!r}.")
        for name in ("seed", "hard_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0. Got {value!r}.")
        if self.limit_batches is not None and (not isinstance(self.limit_batches, int) or self.limit_batches < 1):
            raise ValueError(f"limit_batches: expected None or an integer >= 1. Got {self.limit_batches!r}.")
        for name in ("lr", "mask_lr", "mask_temperature", "latency_time"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a number > 0. Got {getattr(self, name)!r}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: expected a number >= 0. Got {self.weight_decay!r}.")
        self._validate_device()
        if not self.rules_path.is_file():
            raise ValueError(f"rules: no such file: {self.rules_path}.")

    def _validate_device(self) -> None:
        import torch

        if self.device not in DEVICES:
            raise ValueError(f"device: expected one of {', '.join(DEVICES)}. Got {self.device!r}.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' was asked for, but torch.cuda.is_available() is False.")

    def to_dict(self) -> dict:
        r"""The settings that decide the numbers, as JSON-ready values (the rules file as a string)."""
        settings = asdict(self)
        settings["rules"] = PACKAGED_RULES if self.rules is None else str(self.rules)
        del settings["out"], settings["progress"]
        return settings
