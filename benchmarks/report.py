r"""The markdown report: one ratio table per section, then every measurement with its IQR.

Summary tables have one row per case and task. The ``plain`` column is the median time of
the unmodified module; every other column is that variant's median divided by plain's
median for the same case and task, measured in the same run (``1.25x`` = 25 % slower).
``–`` marks a variant that does not apply (``clamp_ after step`` outside training steps).
The detail table lists median and IQR (absolute and as a share of the median) of every
measurement over all its blocks (of every round and copy), the number of copies with the
range of their own medians relative to the merged one, the number of blocks and the calls
per block; ``*`` flags an IQR above 10 % of the median (a noisy measurement).
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.timing import Result

NOISY = 0.10

TITLES = {
    "layers": "Per layer (MobileNetV3-Small shapes, batch 8): time relative to plain",
    "models": "Whole models: time relative to plain",
    "surgery": "Surgery: batch-1 inference of shrunk models, time relative to the dense one",
    "peers": "Against Torch-Pruning at the same MACs: batch-1 inference, time relative to the dense model",
    "compiled": "torch.compile (inductor): constrained and compiled, time relative to plain compiled",
}


def format_time(seconds: float) -> str:
    r"""``1.23 ms``: three significant digits in ns, µs, ms or s."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{_three_digits(seconds / scale)} {unit}"
    return f"{_three_digits(seconds * 1e9)} ns"


def _three_digits(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def ratios(results: list[Result]) -> dict[int, float]:
    r"""Each result's median over plain's median for the same section, case and task."""
    plain = {r.key: r.median for r in results if r.variant == "plain"}
    return {id(r): r.median / plain[r.key] for r in results if r.key in plain}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]], right_from: int) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return [_row(header), _row(align)] + [_row(cells) for cells in rows]


def summary_table(results: list[Result], section: str) -> list[str]:
    r"""Rows: case and task. Columns: plain median, then each variant's ratio to plain."""
    chosen = [r for r in results if r.section == section]
    keys = list(dict.fromkeys(r.key for r in chosen))
    variants = _column_order(chosen, keys)
    ratio = ratios(chosen)
    cell = {(r.key, r.variant): r for r in chosen}
    rows = []
    for key in keys:
        cells = [key[1], key[2]]
        for variant in variants:
            r = cell.get((key, variant))
            if r is None:
                cells.append("–")
            elif variant == "plain":
                cells.append(format_time(r.median))
            else:
                cells.append(f"{ratio[id(r)]:.2f}x")
        rows.append(cells)
    return _table(["case", "task"] + variants, rows, right_from=2)


def _column_order(results: list[Result], keys: list[tuple]) -> list[str]:
    r"""Variants in run order, merging rows that skip some (``clamp_ after step`` comes after
    ``prune hooks`` and before ``baked`` even though the first rows lack it)."""
    position: dict[str, int] = {}
    for key in keys:
        names = [r.variant for r in results if r.key == key]
        for index, name in enumerate(names):
            position[name] = max(position.get(name, 0), index)
    return sorted(position, key=position.__getitem__)


def detail_table(results: list[Result]) -> list[str]:
    r"""Every measurement: median, IQR, IQR share of the median, ratio to plain, blocks."""
    ratio = ratios(results)
    rows = []
    for r in results:
        share = r.iqr / r.median if r.median else 0.0
        flag = " *" if share > NOISY else ""
        rows.append([
            r.section, r.case, r.task, r.variant, format_time(r.median), format_time(r.iqr),
            f"{share:.1%}{flag}", f"{ratio[id(r)]:.2f}x", _spread(r), str(len(r.block_times)),
            _calls(r.calls_per_block),
        ])
    header = ["section", "case", "task", "variant", "median", "IQR", "IQR/median", "vs plain", "copies",
              "blocks", "calls/block"]
    return _table(header, rows, right_from=4)


def _spread(result: Result) -> str:
    """``3: 0.98-1.03``: how many copies were timed and their medians relative to the merged one."""
    medians = result.copy_medians
    if len(medians) < 2:
        return str(len(medians) or 1)
    return f"{len(medians)}: {min(medians) / result.median:.2f}-{max(medians) / result.median:.2f}"


def _calls(numbers: list[int]) -> str:
    return "/".join(str(n) for n in dict.fromkeys(numbers))


def markdown(results: list[Result], machine_line: str, settings: str, notes: dict[str, str],
             appendix: Sequence[str] = ()) -> str:
    r"""The full report: title, machine line, settings, per section a summary table and its
    note (``notes[section]``: what the variants are), the ``appendix`` lines (sections that
    are not timings: :func:`benchmarks.memory.markdown`), then the detail table of the
    timings, if any."""
    lines = ["# torchconstrain benchmarks", "", machine_line, "", settings]
    for section in dict.fromkeys(r.section for r in results):
        lines += ["", f"## {TITLES.get(section, section)}", ""] + summary_table(results, section)
        if section in notes:
            lines += ["", notes[section]]
    lines += list(appendix)
    if results:
        lines += ["", "## Every measurement", ""] + detail_table(results)
    return "\n".join(lines) + "\n"
