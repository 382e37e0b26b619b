r"""A small table of per-tensor rows, returned by ``constrain``, ``check`` and ``bake``."""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["Report"]


class Report:
    r"""Rows keyed by tensor name, printable as a table.

    ``report["features.0.0.weight"]`` gives that tensor's row as a dict; iterating gives
    the rows in model order; ``str(report)`` is a plain-text table.

    Example:
        >>> from torchconstrain.report import Report
        >>> report = Report("demo", [{"tensor": "fc.weight", "sparsity": 0.5}])
        >>> report["fc.weight"]["sparsity"]
        0.5
        >>> print(report)
        demo
        tensor     sparsity
        ---------  --------
        fc.weight  0.500
    """

    def __init__(self, title: str, rows: list[dict]) -> None:
        self.title = title
        self.rows = rows

    def __getitem__(self, fqn: str) -> dict:
        for row in self.rows:
            if row["tensor"] == fqn:
                return row
        raise KeyError(f"{fqn!r} is not in this report. Tensors: {', '.join(self.names()) or 'none'}.")

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def names(self) -> list[str]:
        r"""Return the tensor names, in model order."""
        return [row["tensor"] for row in self.rows]

    def __str__(self) -> str:
        if not self.rows:
            return f"{self.title}\n(no constrained tensors)"
        columns = list(self.rows[0])
        cells = [[_format(row.get(col)) for col in columns] for row in self.rows]
        widths = [max(len(col), *(len(line[i]) for line in cells)) for i, col in enumerate(columns)]
        lines = [self.title, _join(columns, widths), _join(["-" * w for w in widths], widths)]
        lines += [_join(line, widths) for line in cells]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Report({self.title!r}, {len(self.rows)} rows)"


def _join(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return " > ".join(value)
    return str(value)
