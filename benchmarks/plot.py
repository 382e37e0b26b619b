r"""A PNG of the benchmark: each variant's time relative to plain, one panel per section."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import TITLES, ratios
from benchmarks.timing import Result


def plot(results: list[Result], path: Path, machine_line: str) -> None:
    r"""Draw horizontal bars of time / plain for every case and variant into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = list(dict.fromkeys(r.section for r in results))
    ratio = ratios(results)
    heights = [len({r.key for r in results if r.section == s}) for s in sections]
    figure, axes = plt.subplots(len(sections), 1, figsize=(11, 1.2 + 0.55 * sum(heights) + 1.2 * len(sections)),
                                gridspec_kw={"height_ratios": heights}, squeeze=False)
    for axis, section in zip(axes[:, 0], sections):
        _panel(axis, [r for r in results if r.section == section], ratio)
        axis.set_title(TITLES.get(section, section), fontsize=10, loc="left")
    figure.suptitle(machine_line, fontsize=8, y=0.995)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _panel(axis, results: list[Result], ratio: dict[int, float]) -> None:
    keys = list(dict.fromkeys(r.key for r in results))
    variants = [v for v in dict.fromkeys(r.variant for r in results) if v != "plain"]
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        values = {r.key: ratio[id(r)] for r in results if r.variant == variant}
        rows = [k for k, key in enumerate(keys) if key in values]
        axis.barh([row + i * width for row in rows], [values[keys[row]] for row in rows], height=width,
                  label=variant)
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_xscale("log")
    ticks = [t for t in (0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10, 20) if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
    axis.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    axis.minorticks_off()
    axis.set_yticks([k + 0.4 - width / 2 for k in range(len(keys))], [f"{case} · {task}" for _, case, task in keys],
                    fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("time relative to plain (log scale; 1x = plain, lower is faster)", fontsize=8)
    axis.legend(fontsize=7, loc="best", ncol=2)
