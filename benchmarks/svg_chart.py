"""A tiny line-chart writer: plain SVG text, no plotting library (docs render it as an image).

    line_chart({"lru": [(1, 0.2), (2, 0.5)], ...}, title=..., xlabel=..., ylabel=...) -> str

Dashed series (names in ``dashed``) are reference lines such as chance levels or a second
variant of a series drawn in the same colour (``colors``: name -> CSS colour).
"""
from __future__ import annotations

from html import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22"]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
               ylim: tuple[float, float] | None = (0.0, 1.0), dashed=(), colors: dict | None = None,
               width: int = 660, height: int = 340, integer_x: bool = True) -> str:
    points = [p for pts in series.values() for p in pts if p[1] == p[1]]   # drop NaN
    xs = [x for x, _ in points] or [0, 1]
    ys = [y for _, y in points] or [0, 1]
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = ylim if ylim is not None else (min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1)
    left, right, top, bottom = 60, 210, 34, 48
    pw, ph = width - left - right, height - top - bottom
    sx = lambda x: left + (x - x0) / (x1 - x0) * pw              # noqa: E731
    sy = lambda y: top + (1 - (y - y0) / (y1 - y0)) * ph          # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left + pw / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for y in _ticks(y0, y1):
        out.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{left + pw}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    xt = sorted(set(xs)) if integer_x and len(set(xs)) <= 12 else _ticks(x0, x1)
    for x in xt:
        label = f"{x:g}" if integer_x else f"{x:.2f}"
        out.append(f'<text x="{sx(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{label}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text x="16" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + ph / 2})">{escape(ylabel)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour = (colors or {}).get(name, PALETTE[i % len(PALETTE)])
        pts = [(x, y) for x, y in pts if y == y]
        dash = ' stroke-dasharray="5,4"' if name in dashed else ""
        if pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
            if not dash:
                out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        ly = top + 14 + 18 * i
        out.append(f'<line x1="{left + pw + 10}" y1="{ly - 4}" x2="{left + pw + 30}" y2="{ly - 4}" '
                   f'stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{left + pw + 35}" y="{ly}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
