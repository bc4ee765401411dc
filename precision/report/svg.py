"""Inline SVG charts built from numbers, with no JavaScript and no external assets.

Why hand-written SVG rather than matplotlib: the report must be one self-contained, printable file, and these
charts are simple (lines over layers on a log axis); a plotting library would add a large dependency and
emit SVG we could not style with the report's CSS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f6fb2", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#5c940d")


@dataclass(frozen=True)
class Series:
    name: str
    values: tuple[float | None, ...]
    dashed: bool = False


@dataclass(frozen=True)
class Band:
    name: str
    low: tuple[float | None, ...]
    high: tuple[float | None, ...]


def _usable(v: float | None, log: bool) -> bool:
    return v is not None and math.isfinite(v) and (v > 0 or not log)


def line_chart(x_labels: list[str], series: list[Series], *, y_label: str, title: str, log: bool = True,
               bands: tuple[Band, ...] = (), width: int = 720, height: int = 300) -> str:
    left, right, top, bottom = 70, 170, 28, 58
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for s in series for v in s.values if _usable(v, log)]
    values += [v for b in bands for v in (*b.low, *b.high) if _usable(v, log)]
    if not values or not x_labels:
        return f'<svg class="chart" role="img" width="{width}" height="40"><text x="10" y="25">{escape(title)}: no finite values to plot</text></svg>'
    lo, hi = min(values), max(values)
    if log:
        lo_t, hi_t = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        hi_t = max(hi_t, lo_t + 1)
        to_unit = lambda v: (math.log10(v) - lo_t) / (hi_t - lo_t)  # noqa: E731
        ticks = [(10.0**e, f"1e{e}") for e in range(lo_t, hi_t + 1)]
    else:
        lo, hi = min(lo, 0.0), hi if hi > lo else lo + 1.0
        to_unit = lambda v: (v - lo) / (hi - lo)  # noqa: E731
        ticks = [(lo + (hi - lo) * i / 4, f"{lo + (hi - lo) * i / 4:.3g}") for i in range(5)]
    n = len(x_labels)
    x_at = lambda i: left + (plot_w * (i / (n - 1)) if n > 1 else plot_w / 2)  # noqa: E731
    y_at = lambda v: top + plot_h * (1 - to_unit(v))  # noqa: E731
    out = [f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{left}" y="16" class="chart-title">{escape(title)}</text>']
    for value, label in ticks:
        y = y_at(value)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{escape(label)}</text>')
    step = max(1, math.ceil(n / 16))
    for i, label in enumerate(x_labels):
        if i % step == 0 or i == n - 1:
            out.append(f'<text x="{x_at(i):.1f}" y="{top + plot_h + 14}" text-anchor="end" transform="rotate(-35 {x_at(i):.1f} {top + plot_h + 14})" class="tick">{escape(label)}</text>')
    out.append(f'<text x="14" y="{top + plot_h / 2:.1f}" transform="rotate(-90 14 {top + plot_h / 2:.1f})" text-anchor="middle" class="axis">{escape(y_label)}</text>')
    legend_y = top + 6
    for k, band in enumerate(bands):
        upper = [(x_at(i), y_at(h)) for i, (lo_v, h) in enumerate(zip(band.low, band.high)) if _usable(lo_v, log) and _usable(h, log)]
        lower = [(x_at(i), y_at(lo_v)) for i, (lo_v, h) in enumerate(zip(band.low, band.high)) if _usable(lo_v, log) and _usable(h, log)]
        if upper:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in upper + lower[::-1])
            color = PALETTE[(len(series) + k) % len(PALETTE)]
            out.append(f'<polygon points="{points}" fill="{color}" fill-opacity="0.15" stroke="none"><title>{escape(band.name)}</title></polygon>')
            out.append(f'<rect x="{left + plot_w + 12}" y="{legend_y - 8}" width="14" height="10" fill="{color}" fill-opacity="0.3"/>'
                       f'<text x="{left + plot_w + 30}" y="{legend_y + 1}" class="legend">{escape(band.name)}</text>')
            legend_y += 16
    for k, s in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        points = [(x_at(i), y_at(v), v, x_labels[i]) for i, v in enumerate(s.values) if _usable(v, log)]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, y, v, label in points:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>{escape(s.name)} at {escape(label)}: {v:.3e}</title></circle>')
        out.append(f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 26}" y1="{legend_y - 3}" y2="{legend_y - 3}" stroke="{color}" stroke-width="2"{dash}/>'
                   f'<text x="{left + plot_w + 30}" y="{legend_y + 1}" class="legend">{escape(s.name)}</text>')
        legend_y += 16
    out.append("</svg>")
    return "\n".join(out)
