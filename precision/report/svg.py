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
               bands: tuple[Band, ...] = (), hlines: tuple[tuple[float, str], ...] = (), width: int = 960, height: int = 300) -> str:
    left, right, top, bottom = 70, 20, 28, 58
    legend_rows = math.ceil((len(series) + len(bands)) / 2)
    plot_w, plot_h = width - left - right, height - top - bottom
    height += 18 * legend_rows
    values = [v for s in series for v in s.values if _usable(v, log)]
    values += [v for b in bands for v in (*b.low, *b.high) if _usable(v, log)]
    values += [v for v, _ in hlines if _usable(v, log)]
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
    for value, label in hlines:
        y = y_at(value)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="hline"/>'
                   f'<text x="{left + plot_w - 4}" y="{y - 4:.1f}" text-anchor="end" class="tick">{escape(label)}</text>')
    legend = []  # (swatch svg at x, y) builders, laid out below the plot in two columns
    for k, band in enumerate(bands):
        upper = [(x_at(i), y_at(h)) for i, (lo_v, h) in enumerate(zip(band.low, band.high)) if _usable(lo_v, log) and _usable(h, log)]
        lower = [(x_at(i), y_at(lo_v)) for i, (lo_v, h) in enumerate(zip(band.low, band.high)) if _usable(lo_v, log) and _usable(h, log)]
        if upper:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in upper + lower[::-1])
            color = PALETTE[(len(series) + k) % len(PALETTE)]
            out.append(f'<polygon points="{points}" fill="{color}" fill-opacity="0.15" stroke="none"><title>{escape(band.name)}</title></polygon>')
            legend.append(lambda x, y, color=color, name=band.name: f'<rect x="{x}" y="{y - 8}" width="14" height="10" fill="{color}" fill-opacity="0.3"/>'
                          f'<text x="{x + 18}" y="{y + 1}" class="legend">{escape(name)}</text>')
    bottom_y = top + plot_h
    for k, s in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        # Exact zeros have no place on a log axis: they are drawn on the axis as hollow markers.
        points = [(x_at(i), y_at(v) if _usable(v, log) else bottom_y, v, x_labels[i]) for i, v in enumerate(s.values)
                  if _usable(v, log) or (log and v == 0.0)]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, y, v, label in points:
            fill = color if v != 0.0 else "#fff"
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{fill}" stroke="{color}"><title>{escape(s.name)} at {escape(label)}: '
                       f'{"exactly 0 (drawn on the axis)" if v == 0.0 else format(v, ".3e")}</title></circle>')
        legend.append(lambda x, y, color=color, dash=dash, name=s.name: f'<line x1="{x}" x2="{x + 14}" y1="{y - 3}" y2="{y - 3}" stroke="{color}" stroke-width="2"{dash}/>'
                      f'<text x="{x + 18}" y="{y + 1}" class="legend">{escape(name)}</text>')
    for k, item in enumerate(legend):
        out.append(item(left + (k % 2) * (plot_w // 2), top + plot_h + 58 + 18 * (k // 2)))
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(categories: list[str], values: list[float], *, title: str, y_label: str, width: int = 220, height: int = 160,
              as_percent: bool = True) -> str:
    """Vertical bars on a linear axis from 0 to max(1, values) (shares) or to the largest value."""
    left, top, bottom = 34, 32, 28
    plot_w, plot_h = width - left - 8, height - top - bottom
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top_value = 1.0 if as_percent else (max(finite) if finite else 1.0) or 1.0
    out = [f'<svg class="chart small" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="4" y="14" class="chart-title">{escape(title)}</text>']
    slot = plot_w / max(len(categories), 1)
    for i, (category, value) in enumerate(zip(categories, values)):
        v = value if value is not None and math.isfinite(value) else 0.0
        h = plot_h * min(v / top_value, 1.0)
        x = left + i * slot + slot * 0.15
        label = f"{v:.0%}" if as_percent else f"{v:.3g}"
        out.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" fill="{PALETTE[0]}"><title>{escape(category)}: {label}</title></rect>')
        out.append(f'<text x="{x + slot * 0.35:.1f}" y="{top + plot_h - h - 3:.1f}" text-anchor="middle" class="tick">{label}</text>')
        out.append(f'<text x="{x + slot * 0.35:.1f}" y="{top + plot_h + 14}" text-anchor="middle" class="tick">{escape(category)}</text>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" class="grid"/>')
    out.append(f'<text x="10" y="{top + plot_h / 2:.1f}" transform="rotate(-90 10 {top + plot_h / 2:.1f})" text-anchor="middle" class="axis">{escape(y_label)}</text>')
    out.append("</svg>")
    return "\n".join(out)
