"""The results of a benchmark run: a table with ratios to the first setup, JSON, a plot.

Rows are (group, setup, figures): the group is a phase for phased workloads
("" otherwise). Each figure's ratio is the setup's value divided by the
first setup's in the same group: below 1 is better for latencies, above 1
for goodput and tokens/s (each column says which).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    better: str = ""  # lower | higher | "" (no ratio)
    kind: str = ""  # the plot's panel ("latency s", "tokens/s"); "" is not plotted


@dataclass(frozen=True)
class Row:
    group: str
    label: str
    figures: dict[str, Any]


class PlotUnavailable(Exception):
    """--plot without Pillow; str() is the sentence to show."""


def ratio(value: Any, ref: Any) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(ref, (int, float)) or not ref:
        return None
    return round(value / ref, 3)


def with_ratios(rows: Sequence[Row], columns: Sequence[Column]) -> list[dict[str, Any]]:
    """Each row's figures and their ratios to the group's first row."""
    first: dict[str, Row] = {}
    for r in rows:
        first.setdefault(r.group, r)
    out = []
    for r in rows:
        ref = first[r.group]
        ratios = {c.key: ratio(r.figures.get(c.key), ref.figures.get(c.key))
                  for c in columns if c.better}
        out.append({"group": r.group, "setup": r.label, "reference": ref.label,
                    "figures": {c.key: r.figures.get(c.key) for c in columns},
                    "ratios": ratios})
    return out


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        a = abs(v)
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    """Plain text: one line per row, each figure with its ratio to the first setup."""
    data = with_ratios(rows, columns)
    grouped = any(r.group for r in rows)
    head = (["phase"] if grouped else []) + ["setup"] + [c.title for c in columns]
    lines: list[list[str]] = []
    for d in data:
        cells = ([d["group"]] if grouped else []) + [d["setup"]]
        for c in columns:
            cell = fmt(d["figures"].get(c.key))
            rt = d["ratios"].get(c.key)
            if rt is not None and d["setup"] != d["reference"]:
                cell += f" ({rt:.2f}×)"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
    text = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    text += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in lines]
    return "\n".join(line.rstrip() for line in text)


def columns_json(columns: Sequence[Column]) -> list[dict[str, str]]:
    return [asdict(c) for c in columns]


def write_json(result: dict[str, Any], dest: str) -> None:
    """`dest` "-" prints to stdout; otherwise a file."""
    text = json.dumps(result, indent=2, default=str)
    if dest == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(dest).write_text(text + "\n")


def check_plot() -> None:
    try:
        import PIL  # noqa: F401  (vLLM depends on Pillow, so a box that benchmarks has it)
    except ImportError:
        raise PlotUnavailable("--plot needs Pillow, which is not installed; install it "
                              "with `pip install pillow` or drop --plot") from None


def plot(rows: Sequence[Row], columns: Sequence[Column], file: str, title: str) -> None:
    """Bars per setup, one panel per column kind (latencies, rates), a row per phase."""
    check_plot()
    from pdbox.bench.bars import Panel, draw

    kinds = list(dict.fromkeys(c.kind for c in columns if c.kind))
    groups = list(dict.fromkeys(r.group for r in rows))
    panels = []
    for group in groups:
        grows = [r for r in rows if r.group == group]
        row = []
        for kind in kinds:
            cols = [c for c in columns if c.kind == kind]
            series = [(r.label, [_num(r.figures.get(c.key)) for c in cols]) for r in grows]
            row.append(Panel(f"{group + ': ' if group else ''}{kind}", [c.title for c in cols],
                             series))
        panels.append(row)
    draw(panels, file, title)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
