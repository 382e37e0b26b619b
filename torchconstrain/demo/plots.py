r"""The demo's PNG plots: curves, sparsity and channels, weight histograms.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``, saved
through Agg), so the demo never touches pyplot's backend or figure list: a notebook
that calls it keeps its own.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib.style
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, NullFormatter
from torch import Tensor

__all__ = ["write"]

PLAIN, CONSTRAINED, BEFORE, GREEN, RED = "#4C72B0", "#DD8452", "#9AA5B1", "#55A868", "#C44E52"
PALETTE = ["#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#CCB974", "#64B5CD", "#4C72B0"]
DPI = 110


def write(out: Path, metrics: dict, before: dict[str, Tensor], after: dict[str, Tensor]) -> list[Path]:
    r"""Write ``curves.png``, ``sparsity.png`` and ``weights.png`` into ``out``; return their paths."""
    paths = []
    with matplotlib.style.context("seaborn-v0_8-whitegrid"):
        for name, draw in (("curves", _curves), ("sparsity", _sparsity), ("weights", _weights)):
            figure = draw(metrics, before, after)
            paths.append(out / f"{name}.png")
            figure.savefig(paths[-1], dpi=DPI, bbox_inches="tight")
    return paths


def kind(constraints: list[str]) -> str:
    r"""A constraint stack's description without shapes, to group tensors that got the same rule.

    Example:
        >>> from torchconstrain.demo.plots import kind
        >>> kind(["FixedMask(shape=(8, 4), sparsity=0.500)"])
        'FixedMask(sparsity=0.500)'
    """
    return " > ".join(re.sub(r"shape=\([^)]*\),?\s*", "", text) for text in constraints)


def _groups(metrics: dict) -> dict[str, list[str]]:
    """Constraint kind -> tensor names, in model order of each kind's first tensor."""
    groups = {}
    for row in metrics["constraints"]:
        groups.setdefault(kind(row["constraints"]), []).append(row["tensor"])
    return groups


def _curves(metrics: dict, before, after) -> Figure:
    plain, constrained = metrics["history"]["plain"], metrics["history"]["constrained"]
    gates = [row.get("gates_kept") for row in constrained]
    panels = 3 if any(g is not None for g in gates) else 2
    figure = Figure(figsize=(4.6 * panels, 3.9), layout="constrained")
    axes = figure.subplots(1, panels)
    epochs = [row["epoch"] for row in plain]
    _loss_panel(axes[0], epochs, plain, constrained)
    _accuracy_panel(axes[1], epochs, plain, constrained, metrics["stages"])
    if panels == 3:
        _gates_panel(axes[2], epochs, gates, metrics)
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle("MobileNetV3-Small on 8x8 digits: plain vs constrained training", fontsize=13)
    return figure


def _gates_panel(axis, epochs, gates, metrics: dict) -> None:
    hard = min(metrics["settings"]["hard_epochs"], len(epochs))
    if hard:
        axis.axvspan(epochs[-1] - hard + 0.5, epochs[-1] + 0.5, color=BEFORE, alpha=0.25, lw=0,
                     label="hard (binary) gates")
    axis.plot(epochs, [100 * g for g in gates], "o-", color=CONSTRAINED, ms=4, label="gates above threshold")
    text = f"{gates[-1]:.0%} kept"
    if metrics["blocks"]:
        before = sum(block["before"] for block in metrics["blocks"].values())
        after = sum(block["after"] for block in metrics["blocks"].values())
        text += f"\n{after:,} of {before:,} channels"
    axis.annotate(text, (epochs[-1], 100 * gates[-1]), textcoords="offset points", xytext=(0, -12), ha="right",
                  va="top", fontsize=10, color=CONSTRAINED)
    axis.set(title="Pruning: learnable gates kept", xlabel="epoch", ylabel="gates kept (%)", ylim=(0, 105),
             xlim=(0.5, epochs[-1] + 0.5))
    axis.legend(loc="upper right", frameon=True)


def _loss_panel(axis, epochs, plain, constrained) -> None:
    axis.plot(epochs, [r["train_loss"] for r in plain], "o-", color=PLAIN, ms=4, label="plain")
    axis.plot(epochs, [r["train_loss"] for r in constrained], "o-", color=CONSTRAINED, ms=4, label="constrained")
    if any(r["penalty"] for r in constrained):
        axis.plot(epochs, [r["train_loss"] + r["penalty"] for r in constrained], "--", color=CONSTRAINED,
                  label="constrained + penalty")
    _log_scale(axis)
    axis.set(title="Training loss", xlabel="epoch", ylabel="cross-entropy (log scale)")
    axis.legend(frameon=True)


def _accuracy_panel(axis, epochs, plain, constrained, stages) -> None:
    final = {name: 100 * stages[name]["test_accuracy"] for name in stages}
    axis.plot(epochs, [100 * r["test_accuracy"] for r in plain], "o-", color=PLAIN, ms=4,
              label=f"plain ({final['plain']:.1f}%)")
    axis.plot(epochs, [100 * r["test_accuracy"] for r in constrained], "o-", color=CONSTRAINED, ms=4,
              label=f"constrained ({final['constrained']:.1f}%)")
    last = epochs[-1]
    axis.plot([last + 0.3], [final["baked"]], "D", color=GREEN, ms=7, label=f"baked ({final['baked']:.1f}%)")
    axis.plot([last + 0.6], [final["shrunk"]], "*", color=RED, ms=12, label=f"shrunk + folded ({final['shrunk']:.1f}%)")
    if "executorch_int8" in final:
        axis.plot([last + 0.9], [final["executorch_int8"]], "P", color=PALETTE[2], ms=9,
                  label=f"ExecuTorch int8 ({final['executorch_int8']:.1f}%)")
    lowest = min(100 * r["test_accuracy"] for r in plain + constrained)
    axis.set(title="Test accuracy", xlabel="epoch", ylabel="accuracy (%)", ylim=(10 * (lowest // 10) - 2, 101),
             xlim=(0.5, last + 1.2))
    axis.legend(loc="lower right", frameon=True, title="final")


def _sparsity(metrics: dict, before, after) -> Figure:
    rows, blocks = metrics["constraints"], metrics["blocks"]
    height = max(3.5, 0.22 * len(rows) + 1.5)
    figure = Figure(figsize=(14 if blocks else 8, height), layout="constrained")
    axes = figure.subplots(1, 2 if blocks else 1, squeeze=False, width_ratios=[3, 2] if blocks else [1])
    _sparsity_panel(axes[0][0], metrics)
    if blocks:
        _channels_panel(axes[0][1], blocks)
    figure.suptitle("Where the zeros are, after bake", fontsize=13)
    return figure


def _sparsity_panel(axis, metrics: dict) -> None:
    rows = metrics["constraints"]
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(_groups(metrics))}
    labels = [row["tensor"].removesuffix(".weight") for row in rows]
    values = [100 * (row["sparsity_after_bake"] or 0.0) for row in rows]
    kinds = [kind(row["constraints"]) for row in rows]
    axis.barh(range(len(rows)), values, color=[colors[k] for k in kinds], height=0.7)
    for i, value in enumerate(values):
        axis.text(value + 0.8, i, f"{value:.0f}%", va="center", fontsize=7, color="#555555")
    axis.set_yticks(range(len(rows)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set(title="Zero entries per constrained tensor", xlabel="zero entries after bake (%)", xlim=(0, 105))
    handles = [Patch(color=color, label=_short(name, 70)) for name, color in colors.items()]
    axis.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2, fontsize=8, frameon=False,
                title="constraints")


def _channels_panel(axis, blocks: dict) -> None:
    names = list(blocks)
    axis.barh(range(len(names)), [blocks[n]["before"] for n in names], color=BEFORE, height=0.7, label="before")
    axis.barh(range(len(names)), [blocks[n]["after"] for n in names], color=GREEN, height=0.7,
              label="after surgery.shrink")
    for i, name in enumerate(names):
        share = blocks[name]["after"] / blocks[name]["before"]
        axis.text(blocks[name]["before"] + 6, i, f"{blocks[name]['after']}/{blocks[name]['before']} ({share:.0%})",
                  va="center", fontsize=8)
    axis.set_yticks(range(len(names)), names, fontsize=9)
    axis.invert_yaxis()
    axis.set_xlim(0, 1.3 * max(b["before"] for b in blocks.values()))
    axis.set(title="Expanded channels per block", xlabel="channels")
    axis.legend(loc="upper right", frameon=True)


def _weights(metrics: dict, before: dict[str, Tensor], after: dict[str, Tensor]) -> Figure:
    groups = _groups(metrics)
    columns = min(2, len(groups)) or 1
    lines = -(-max(len(groups), 1) // columns)
    figure = Figure(figsize=(6.2 * columns, 3.6 * lines), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False)
    for axis, (name, tensors) in zip(axes.flat, groups.items()):
        _histogram(axis, name, torch.cat([before[t].flatten() for t in tensors]),
                   torch.cat([after[t].flatten() for t in tensors]), tensors)
    for axis in list(axes.flat)[len(groups):]:
        axis.axis("off")
    figure.suptitle("Effective weights of the constrained tensors, grouped by constraints", fontsize=13)
    return figure


def _histogram(axis, name: str, before: Tensor, after: Tensor, tensors: list[str]) -> None:
    low = min(before.min().item(), after.min().item())
    high = max(before.max().item(), after.max().item())
    bins = torch.linspace(low, high if high > low else low + 1, min(80, max(20, int(before.numel() ** 0.5)))).numpy()
    axis.hist(before.numpy(), bins=bins, color=BEFORE, alpha=0.7,
              label=f"before training ({_zeros(before):.0%} zeros)")
    axis.hist(after.numpy(), bins=bins, histtype="step", color=CONSTRAINED, lw=1.6,
              label=f"after training + bake ({_zeros(after):.0%} zeros)")
    for i, bound in enumerate(_clamp_bounds(name)):
        axis.axvline(bound, color="#333333", ls=":", lw=1.2, label="Clamp bounds" if i == 0 else None)
    _log_scale(axis)
    where = tensors[0] if len(tensors) == 1 else f"{len(tensors)} tensors, {tensors[0]} ... {tensors[-1]}"
    axis.set_title(_short(name, 70) + "\n" + where.replace(".weight", ""), fontsize=9)
    axis.set(xlabel="weight value", ylabel="entries (log scale)")
    axis.legend(fontsize=8, frameon=True)


def _zeros(values: Tensor) -> float:
    return (values == 0).float().mean().item()


def _clamp_bounds(name: str) -> list[float]:
    bounds = re.findall(r"Clamp\(min=([-+\d.e]+), max=([-+\d.e]+)\)", name)
    return [float(value) for pair in bounds for value in pair]


def _log_scale(axis) -> None:
    axis.set_yscale("log")
    axis.yaxis.set_minor_formatter(NullFormatter())


def _short(text: str, width: int) -> str:
    return textwrap.fill(text, width=width)
