r"""Where the numbers were taken: library versions, CPU or GPU name, threads, platform."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch
import torchvision

import torchconstrain


def cpu_name() -> str:
    r"""The CPU model from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_commit() -> str | None:
    r"""The git commit of the torchconstrain checkout, ``+dirty`` if its package files are edited."""
    root = Path(torchconstrain.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def info(device: torch.device, threads: int) -> dict:
    r"""A JSON-ready description of the machine and software."""
    data = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torchconstrain": torchconstrain.__version__,
        "torchconstrain_commit": library_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        data["cuda"] = torch.version.cuda
    return data


def summary(data: dict) -> str:
    r"""One line for the top of the markdown report."""
    threads = f"{data['threads']} thread{'s' if data['threads'] != 1 else ''}"
    return (
        f"{data['device_name']} ({data['device']}, {threads}) · torch {data['torch']} · "
        f"torchvision {data['torchvision']} · torchconstrain {data['torchconstrain']}"
        f"{' (' + data['torchconstrain_commit'] + ')' if data['torchconstrain_commit'] else ''} · "
        f"Python {data['python']} · {data['platform']}"
    )
