"""Grouped bar charts as PNG with Pillow, which every pdbox install with vLLM has.

matplotlib is not among pdbox's packages; a benchmark's `--plot` needs only
bars with their values and a legend, which Pillow draws in a few lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Colour-blind-safe (Okabe-Ito), one per setup in run order.
COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
           "#000000"]
PANEL_W, PANEL_H = 560, 300
MARGIN_L, MARGIN_B, MARGIN_T = 60, 70, 34


@dataclass(frozen=True)
class Panel:
    title: str
    categories: list[str]  # x labels: one cluster of bars each
    series: list[tuple[str, list[float | None]]]  # (setup, one value per category)


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def draw(panels: Sequence[Sequence[Panel]], file: str, title: str) -> None:
    """`panels` is rows of panels (a row per phase, a panel per unit)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = max(1, len(panels))
    cols = max(1, max((len(r) for r in panels), default=1))
    img = Image.new("RGB", (cols * PANEL_W, rows * PANEL_H + 40), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=12)
    small = ImageFont.load_default(size=10)
    d.text((10, 10), title, fill="black", font=ImageFont.load_default(size=15))
    for ri, row in enumerate(panels):
        for ci, panel in enumerate(row):
            _panel(d, panel, ci * PANEL_W, 40 + ri * PANEL_H, font, small)
    img.save(file, "PNG")


def _panel(draw: Any, p: Panel, x0: int, y0: int, font: Any, small: Any) -> None:
    """One panel; `draw` is a PIL ImageDraw (Pillow is imported only when drawing)."""
    draw.text((x0 + MARGIN_L, y0 + 6), p.title, fill="black", font=font)
    top = max([v for _, vs in p.series for v in vs if v is not None] or [1.0]) or 1.0
    plot_w = PANEL_W - MARGIN_L - 20
    plot_h = PANEL_H - MARGIN_T - MARGIN_B
    base_y = y0 + MARGIN_T + plot_h
    draw.line([(x0 + MARGIN_L, y0 + MARGIN_T), (x0 + MARGIN_L, base_y),
               (x0 + MARGIN_L + plot_w, base_y)], fill="black")
    draw.text((x0 + 4, y0 + MARGIN_T - 6), _fmt(top), fill="black", font=small)
    n_cat, n_ser = max(1, len(p.categories)), max(1, len(p.series))
    cluster = plot_w / n_cat
    bar = cluster * 0.8 / n_ser
    for k, cat in enumerate(p.categories):
        cx = x0 + MARGIN_L + k * cluster + cluster * 0.1
        for s, (_, values) in enumerate(p.series):
            v = values[k] if k < len(values) else None
            if v is None:
                continue
            h = plot_h * v / top
            bx = cx + s * bar
            draw.rectangle([bx, base_y - h, bx + bar - 2, base_y],
                           fill=COLOURS[s % len(COLOURS)])
            draw.text((bx, base_y - h - 11), _fmt(v), fill="black", font=small)
        draw.text((cx, base_y + 4), cat[:22], fill="black", font=small)
    lx = x0 + MARGIN_L
    for s, (label, _) in enumerate(p.series):
        y = base_y + 22 + 12 * (s // 3)
        x = lx + (s % 3) * 160
        draw.rectangle([x, y + 2, x + 8, y + 10], fill=COLOURS[s % len(COLOURS)])
        draw.text((x + 12, y), label[:24], fill="black", font=small)
