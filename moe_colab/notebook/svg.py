"""Static pictures of the notebooks' figures, drawn as plain SVG (no browser, no kaleido).

Every figure a notebook shows also carries one of these in its output (``image/svg+xml``), so a
notebook saved with its outputs shows the figure on GitHub, in nbviewer, in the book and in
JupyterLab without a kernel, where the live plotly view or widget cannot render.

    grid_svg(colours, row_labels, ...)     a heatmap of flat colours (routing, hit/miss)
    lines_svg(x, series, ...)              line charts (hit ratio, recall)
    gantt_svg(bars, lanes, ...)            a timeline: bars on lanes against time

Pictures scale to the width of the page (``viewBox``, ``width="100%"``), so nothing is clipped.
Colours: the Okabe-Ito palette (Okabe & Ito 2008), distinguishable with the common forms of
colour blindness.
"""
from __future__ import annotations

import html

# Okabe & Ito, "Color Universal Design" (2008): eight colours safe for colour-blind readers.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
# More categories (e.g. 64 experts): Paul Tol's "muted" and "light" schemes after Okabe-Ito.
EXTRA = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255",
         "#AA4499", "#77AADD", "#EE8866", "#EEDD88", "#FFAABB", "#99DDFF", "#BBCC33", "#AAAAAA")
PALETTE = OKABE_ITO + EXTRA
# Lines and bars on white: the darker Okabe-Ito colours first, yellow last.
LINES = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
FONT = "font-family='DejaVu Sans, Arial, sans-serif'"


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def _open(width: int, height: int, title: str | None) -> list[str]:
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='100%' "
           f"style='max-width:{width}px' {FONT} font-size='12'>",
           f"<rect width='{width}' height='{height}' fill='white'/>"]
    if title:
        out.append(f"<text x='{width / 2:.0f}' y='18' text-anchor='middle' font-size='14'>{esc(title)}</text>")
    return out


def _legend(items, x: float, y: float, width: float) -> tuple[list[str], float]:
    """Swatches with labels, wrapped to ``width``; returns (elements, height used)."""
    out, cx, cy = [], x, y
    for colour, label in items:
        w = 22 + 7 * len(str(label))
        if cx + w > x + width and cx > x:
            cx, cy = x, cy + 18
        out.append(f"<rect x='{cx:.1f}' y='{cy:.1f}' width='12' height='12' fill='{colour}' stroke='#333' "
                   f"stroke-width='0.5'/><text x='{cx + 16:.1f}' y='{cy + 10:.1f}'>{esc(label)}</text>")
        cx += w
    return out, cy - y + 18


def grid_svg(colours, row_labels, *, title=None, col_labels=None, legend=(), row_gap_every: int = 0,
             width: int = 900, xlabel: str | None = None) -> str:
    """A grid of flat colours: ``colours[r][c]`` is a colour string (None: blank). Rows are labelled
    on the left; column labels (optional) are thinned out to stay readable. ``row_gap_every``
    leaves a gap after every n rows (e.g. the top-k rows of one layer)."""
    R = len(colours)
    C = len(colours[0]) if R else 0
    left = 12 + 7 * max([len(str(s)) for s in row_labels] + [4])
    top = 30 if title else 8
    cell_w = max(1.0, min(18.0, (width - left - 12) / max(C, 1)))
    cell_h = 12 if R > 24 else 16
    gaps = (R - 1) // row_gap_every if row_gap_every else 0
    grid_h = R * cell_h + gaps * 4
    leg, leg_h = _legend(legend, left, top + grid_h + 34, width - left - 12)
    height = top + grid_h + 34 + (leg_h if legend else 0) + 6
    out = _open(width, height, title)
    y = top
    for r in range(R):
        if row_gap_every and r and r % row_gap_every == 0:
            y += 4
        label = row_labels[r]
        if label:
            out.append(f"<text x='{left - 6}' y='{y + cell_h - 3}' text-anchor='end'>{esc(label)}</text>")
        for c in range(C):
            col = colours[r][c]
            if col:
                out.append(f"<rect x='{left + c * cell_w:.2f}' y='{y}' width='{max(cell_w - (0.6 if cell_w > 3 else 0), 0.6):.2f}' "
                           f"height='{cell_h - 1}' fill='{col}'/>")
        y += cell_h
    if col_labels is not None and C:
        step = max(1, round(40 / cell_w))
        for c in range(0, C, step):
            out.append(f"<text x='{left + (c + 0.5) * cell_w:.1f}' y='{y + 14}' text-anchor='middle' "
                       f"font-size='10'>{esc(col_labels[c])}</text>")
    if xlabel:
        out.append(f"<text x='{left + C * cell_w / 2:.0f}' y='{y + 28}' text-anchor='middle'>{esc(xlabel)}</text>")
    out += leg
    out.append("</svg>")
    return "".join(out)


def _nice_step(span: float, n: int = 5) -> float:
    import math
    if span <= 0:
        return 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def _axis_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    import math
    step = _nice_step(hi - lo, n)
    start = math.ceil(lo / step - 1e-9) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:.2f}".rstrip("0").rstrip(".")


def lines_svg(x, series: dict, *, title=None, xlabel="", ylabel="", yrange=None, hlines=(), width: int = 700,
              height: int = 360, dashed=()) -> str:
    """Lines through points: ``series`` {name: [y per x]}; ``hlines`` [(y, label)] dashed guides."""
    left, right, top, bottom = 60, 20, 32 if title else 10, 50
    names = list(series)
    leg, leg_h = _legend([(LINES[i % len(LINES)], n) for i, n in enumerate(names)], left, height,
                         width - left - right)
    H = height + leg_h
    ys = [v for n in names for v in series[n] if v is not None and v == v]
    lo, hi = yrange if yrange else (min(ys + [h for h, _ in hlines]), max(ys + [h for h, _ in hlines]))
    if hi == lo:
        hi = lo + 1
    x0, x1 = min(x), max(x)
    pw, ph = width - left - right, height - top - bottom
    px = lambda v: left + (v - x0) / ((x1 - x0) or 1) * pw            # noqa: E731
    py = lambda v: top + (1 - (v - lo) / (hi - lo)) * ph               # noqa: E731
    out = _open(width, H, title)
    out.append(f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#888'/>")
    for t in _axis_ticks(lo, hi):
        out.append(f"<line x1='{left}' x2='{left + pw}' y1='{py(t):.1f}' y2='{py(t):.1f}' stroke='#eee'/>"
                   f"<text x='{left - 6}' y='{py(t) + 4:.1f}' text-anchor='end' font-size='11'>{_fmt(t)}</text>")
    for t in _axis_ticks(x0, x1, min(10, max(len(x) - 1, 1))):
        out.append(f"<text x='{px(t):.1f}' y='{top + ph + 16}' text-anchor='middle' font-size='11'>{_fmt(t)}</text>")
    for h, label in hlines:
        out.append(f"<line x1='{left}' x2='{left + pw}' y1='{py(h):.1f}' y2='{py(h):.1f}' stroke='#555' "
                   f"stroke-dasharray='5,4'/><text x='{left + pw - 4}' y='{py(h) - 4:.1f}' text-anchor='end' "
                   f"font-size='11' fill='#333'>{esc(label)}</text>")
    for i, n in enumerate(names):
        pts = [(px(a), py(b)) for a, b in zip(x, series[n]) if b is not None and b == b]
        colour = LINES[i % len(LINES)]
        dash = " stroke-dasharray='6,4'" if n in dashed else ""
        out.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2'{dash} points='"
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + "'/>")
        out += [f"<circle cx='{a:.1f}' cy='{b:.1f}' r='3' fill='{colour}'/>" for a, b in pts]
    out.append(f"<text x='{left + pw / 2}' y='{top + ph + 34}' text-anchor='middle'>{esc(xlabel)}</text>")
    out.append(f"<text transform='translate(14 {top + ph / 2}) rotate(-90)' text-anchor='middle'>{esc(ylabel)}</text>")
    out += leg
    out.append("</svg>")
    return "".join(out)


def gantt_svg(bars, lanes, *, title=None, xlabel="time (ms)", legend=(), width: int = 900, lane_h: int = 14,
              group_gap_every: int = 0) -> str:
    """Bars on lanes: ``bars`` [(lane index, start, end, colour)], ``lanes`` the lane labels, top
    to bottom. Labels sit in a fixed left column; time runs left to right."""
    left = 14 + 7 * max([len(str(s)) for s in lanes] + [4])
    top, right = 30 if title else 8, 16
    gaps = (len(lanes) - 1) // group_gap_every if group_gap_every else 0
    plot_h = len(lanes) * lane_h + gaps * 5
    t1 = max([b[2] for b in bars] + [1e-9])
    pw = width - left - right
    px = lambda t: left + t / t1 * pw                                    # noqa: E731
    leg, leg_h = _legend(legend, left, top + plot_h + 36, pw)
    height = top + plot_h + 36 + (leg_h if legend else 0) + 6
    out = _open(width, height, title)
    lane_y = []
    y = top
    for i, label in enumerate(lanes):
        if group_gap_every and i and i % group_gap_every == 0:
            y += 5
        lane_y.append(y)
        if (i // max(group_gap_every, 1)) % 2 == 0:
            out.append(f"<rect x='{left}' y='{y}' width='{pw}' height='{lane_h}' fill='#f4f4f4'/>")
        out.append(f"<text x='{left - 6}' y='{y + lane_h - 3}' text-anchor='end' font-size='11'>{esc(label)}</text>")
        y += lane_h
    for t in _axis_ticks(0, t1, 8):
        out.append(f"<line x1='{px(t):.1f}' x2='{px(t):.1f}' y1='{top}' y2='{top + plot_h}' stroke='#ddd'/>"
                   f"<text x='{px(t):.1f}' y='{top + plot_h + 14}' text-anchor='middle' font-size='11'>{_fmt(t)}</text>")
    for lane, start, end, colour in bars:
        w = max(px(end) - px(start), 0.8)
        out.append(f"<rect x='{px(start):.2f}' y='{lane_y[lane] + 1}' width='{w:.2f}' height='{lane_h - 2}' "
                   f"fill='{colour}'/>")
    out.append(f"<text x='{left + pw / 2}' y='{top + plot_h + 30}' text-anchor='middle'>{esc(xlabel)}</text>")
    out += leg
    out.append("</svg>")
    return "".join(out)


def bars_svg(labels, series: dict, *, title=None, ylabel="", hlines=(), width: int = 800, height: int = 380) -> str:
    """Grouped vertical bars: ``series`` {name: [value per label]}; ``hlines`` [(y, label)]."""
    left, right, top, bottom = 60, 20, 32 if title else 10, 110
    names = list(series)
    leg, leg_h = _legend([(LINES[i % len(LINES)], n) for i, n in enumerate(names)], left, height,
                         width - left - right)
    vals = [v for n in names for v in series[n]] + [h for h, _ in hlines] + [0]
    hi = max(vals) * 1.05 or 1
    pw, ph = width - left - right, height - top - bottom
    py = lambda v: top + (1 - v / hi) * ph                              # noqa: E731
    out = _open(width, height + leg_h, title)
    for t in _axis_ticks(0, hi):
        out.append(f"<line x1='{left}' x2='{left + pw}' y1='{py(t):.1f}' y2='{py(t):.1f}' stroke='#eee'/>"
                   f"<text x='{left - 6}' y='{py(t) + 4:.1f}' text-anchor='end' font-size='11'>{_fmt(t)}</text>")
    slot = pw / max(len(labels), 1)
    bw = slot * 0.8 / max(len(names), 1)
    for j, label in enumerate(labels):
        for i, n in enumerate(names):
            v = series[n][j]
            x = left + j * slot + slot * 0.1 + i * bw
            out.append(f"<rect x='{x:.1f}' y='{py(v):.1f}' width='{bw:.1f}' height='{py(0) - py(v):.1f}' "
                       f"fill='{LINES[i % len(LINES)]}'/>")
        cx = left + (j + 0.5) * slot
        out.append(f"<text transform='translate({cx:.1f} {top + ph + 10}) rotate(-50)' text-anchor='end' "
                   f"font-size='11'>{esc(label)}</text>")
    for h, label in hlines:
        out.append(f"<line x1='{left}' x2='{left + pw}' y1='{py(h):.1f}' y2='{py(h):.1f}' stroke='#555' "
                   f"stroke-dasharray='5,4'/><text x='{left + pw - 4}' y='{py(h) - 4:.1f}' text-anchor='end' "
                   f"font-size='11'>{esc(label)}</text>")
    out.append(f"<text transform='translate(14 {top + ph / 2}) rotate(-90)' text-anchor='middle'>{esc(ylabel)}</text>")
    out += leg
    out.append("</svg>")
    return "".join(out)


def ramp(value: float, lo: float = 0.0, hi: float = 1.0) -> str:
    """A light-to-dark blue for a continuous value (sequential, readable by colour-blind readers)."""
    stops = ((247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107))
    f = 0.0 if hi <= lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)
    pos = f * (len(stops) - 1)
    i = min(int(pos), len(stops) - 2)
    w = pos - i
    r, g, b = (round(a + (c - a) * w) for a, c in zip(stops[i], stops[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def figure_svg(fig) -> str | None:
    """A static picture of a plotly figure made of Scatter or Bar traces (the notebooks' own line
    and bar charts); None for anything else."""
    data = list(fig.data)
    if not data:
        return None
    title = fig.layout.title.text
    hlines = [(s.y0, (s.name or "")) for s in (fig.layout.shapes or ()) if s.type == "line" and s.y0 == s.y1]
    notes = [a.text for a in (fig.layout.annotations or ())]
    hlines = [(y, notes[i] if i < len(notes) and not label else label) for i, (y, label) in enumerate(hlines)]
    if all(d.type == "scatter" for d in data):
        x = list(data[0].x)
        series = {d.name or f"trace {i}": [None if v is None else float(v) for v in d.y] for i, d in enumerate(data)}
        yr = fig.layout.yaxis.range
        dashed = [d.name for d in data if d.line and d.line.dash]
        return lines_svg(x, series, title=title, xlabel=fig.layout.xaxis.title.text or "",
                         ylabel=fig.layout.yaxis.title.text or "", yrange=tuple(yr) if yr else None,
                         hlines=hlines, dashed=dashed)
    if all(d.type == "bar" for d in data):
        return bars_svg(list(data[0].x), {d.name or f"trace {i}": [float(v) for v in d.y] for i, d in enumerate(data)},
                        title=title, ylabel=fig.layout.yaxis.title.text or "", hlines=hlines)
    return None
