"""Views of expert routing and of the expert cache: plotly figures, each with a static picture.

    routing_heatmap(trace, tokens)       tokens x layers, one thin row per rank (top-1, top-2, ...)
                                         so every chosen expert shows; hover: token text, experts,
                                         router weights
    expert_load_figure(trace)            layers x experts: share of tokens routed to each expert
    category_figure(counts, names)       token kinds x experts, one layer at a time
    cache_timeline(trace, k, policy)     hit or miss of every expert use, per layer per token
    cache_explorer(trace, tokens)        sliders for cache size and prefetch count, policy menu,
                                         a live "hit ratio: 0.53" readout and the timeline
    show(fig)                            any plotly figure of Scatter or Bar traces, the same way

A trace is a ``moe_colab.RoutingTrace`` (``experts`` and ``weights``: [layers, tokens, top_k]).
Hit/miss events come from ``moe_colab.analysis.simulate.hit_mask`` (the one cache simulator); this file
only draws.

How a figure reaches the page. ``Shown`` is what a cell displays: its output holds the figure as
plotly JSON (``application/vnd.plotly.v1+json``: JupyterLab's plotly extension draws it with the
plotly.js it loaded once, never 5 MB per figure), a static SVG (``moe_colab.notebook.svg``: what
GitHub, nbviewer, the book and a notebook reopened without a kernel show) and a line of text. On
Colab it adds plotly's HTML, which loads plotly.js once per page from plotly's CDN. A live view
(``LiveView``, in a kernel) is ipywidgets controls above such a figure, held in an ``Output``
widget whose outputs the controls replace. Nothing here ever waits for a frontend.

Figures fit the page width (no fixed pixel widths: nothing is clipped in JupyterLab's default
layout); long traces fit by narrowing the cells, and plotly's zoom keeps the layer labels on the
axis. Colours come from the Okabe-Ito palette (safe for colour-blind readers).

Every control carries a stable CSS class (``moe-cache-size``, ``moe-prefetch``, ``moe-policy``,
``moe-hit-ratio``, ``moe-routing-heatmap``, ``moe-cache-timeline``) so a browser test can find it.

Reference: Eliseev & Mazur, arXiv 2312.17238, Figure 1 (routing) and Figure 2 (cache hit ratio).
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch

from . import svg as S
from .runtime import in_colab, widgets_available

POLICIES = ("lru", "lfu", "fifo", "belady")
PALETTE = S.PALETTE
# all hits, some misses, all misses: blue, yellow, vermillion (Okabe-Ito; distinct in every
# common colour vision deficiency, and ordered light-dark-dark so greyscale still separates hits)
HIT_MISS_COLOURS = ("#0072B2", "#F0E442", "#D55E00")
ORDINAL = ("1st", "2nd", "3rd") + tuple(f"{i}th" for i in range(4, 65))


# -- what a cell displays ---------------------------------------------------------------------
class Shown:
    """A plotly figure with its static picture. Displaying it writes plotly JSON (drawn by
    JupyterLab's plotly extension), ``image/svg+xml`` (everywhere else) and text."""

    def __init__(self, figure: go.Figure, svg: str | None = None, text: str | None = None):
        if not figure.layout.colorway:
            figure.update_layout(colorway=list(S.LINES))      # the colours of the static picture
        title = figure.layout.title.text
        if title and "<br>" not in title and len(title) > 72:   # plotly never wraps a title: no clipping
            figure.update_layout(title_text=_wrap(title), margin_t=max(figure.layout.margin.t or 0, 80))
        self.figure = figure
        self.svg = svg if svg is not None else S.figure_svg(figure)
        self.text = text or (figure.layout.title.text or "figure")

    def _repr_mimebundle_(self, include=None, exclude=None):
        fig = json.loads(self.figure.to_json())
        bundle = {"application/vnd.plotly.v1+json": {**fig, "config": {"responsive": True}},
                  "text/plain": f"<{self.text}>"}
        if self.svg:
            bundle["image/svg+xml"] = self.svg
        if in_colab():                      # Colab has no plotly mimetype renderer
            bundle["text/html"] = self.figure.to_html(include_plotlyjs="cdn", full_html=False)
        return bundle

    def __repr__(self) -> str:
        return f"<{self.text}>"


def _wrap(title: str, width: int = 72) -> str:
    """Break a long title into lines of at most about ``width`` characters, at ", " or "; "."""
    lines, line = [], ""
    for part in title.replace("; ", ";\0").replace(", ", ",\0").split("\0"):
        if line and len(line) + 1 + len(part) > width:
            lines.append(line)
            line = part
        else:
            line = f"{line} {part}" if line else part
    return "<br>".join(lines + [line])


def show(fig: go.Figure, svg: str | None = None) -> Shown:
    """Display a plotly figure with a static picture (made from the figure when not given)."""
    return Shown(fig, svg)


class _ViewBox(widgets.VBox):
    """The box of a LiveView; its output also carries the current static picture, so a notebook
    saved with its outputs (but no widget state) shows the figure."""

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        shown = getattr(self, "_shown", None)
        if shown is not None and shown.svg:
            bundle["image/svg+xml"] = shown.svg
        return bundle


class LiveView:
    """Controls (ipywidgets) above a figure, in one box (``.box``). The figure lives in an
    ``Output`` widget whose ``outputs`` are set directly to the ``Shown``'s output (plotly JSON,
    SVG, text): no output capture, so nothing waits on a frontend, and JupyterLab draws it with its
    plotly extension as it draws any output."""

    css = "moe-live-view"

    def __init__(self, controls=(), shown: Shown | None = None):
        self.output = widgets.Output()
        self.output.add_class(f"{self.css}-figure")
        self.box = _ViewBox(list(controls) + [self.output])
        self.box.add_class(self.css)
        self.shown = None
        if shown is not None:
            self.show(shown)

    def show(self, shown: Shown) -> None:
        self.shown = self.box._shown = shown
        self.output.outputs = ({"output_type": "display_data", "data": shown._repr_mimebundle_(),
                                "metadata": {}},)

    def _ipython_display_(self):
        from IPython.display import display
        display(self.box)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.shown.text if self.shown else ''}>"


# -- reading a trace -------------------------------------------------------------------------
def _arrays(trace) -> tuple[np.ndarray, np.ndarray]:
    """experts int [L, T, K] and weights float [L, T, K] as numpy arrays."""
    experts = np.asarray(_to_numpy(trace.experts), dtype=np.int64)
    weights = getattr(trace, "weights", None)
    weights = np.full(experts.shape, np.nan) if weights is None else np.asarray(_to_numpy(weights), dtype=float)
    if experts.ndim != 3:
        raise ValueError(f"trace.experts must be [layers, tokens, top_k], got shape {tuple(experts.shape)}")
    if weights.shape != experts.shape:
        raise ValueError(f"trace.weights has shape {tuple(weights.shape)}, trace.experts {tuple(experts.shape)}")
    return experts, weights


def _to_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def token_labels(trace, tokens=None) -> list[str]:
    """Readable text for each token: ``tokens`` if given, else the trace's own, else positions."""
    n = _arrays(trace)[0].shape[1]
    if tokens is None:
        tokens = getattr(trace, "tokens", None)
    if tokens is None:
        return [f"#{i}" for i in range(n)]
    tokens = [str(t) for t in _to_numpy(tokens)]
    if len(tokens) != n:
        raise ValueError(f"got {len(tokens)} token labels for a trace of {n} tokens")
    # SentencePiece marks a leading space with "▁", byte-level BPE with "Ġ" (and a newline "Ċ").
    marks = {"▁": " ", "Ġ": " ", "Ċ": "↵", "ĉ": "⇥", "\n": "↵", "\t": "⇥"}
    return ["".join(marks.get(c, c) for c in t) or "∅" for t in tokens]


def _token_axis(labels: list[str]) -> dict:
    """x axis of a tokens figure: every label while they fit (<= 60 tokens), else positions."""
    T = len(labels)
    if T <= 60:
        return dict(title="token", tickmode="array", tickvals=list(range(T)), ticktext=labels, tickangle=-60)
    return dict(title="token (hover for its text; drag to zoom)")


def _discrete_colorscale(n: int) -> list:
    """A step colourscale with ``n`` flat bands, one per expert id (z in [-0.5, n - 0.5])."""
    scale = []
    for i in range(n):
        c = PALETTE[i % len(PALETTE)]
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def _layer_rows(L: int, K: int) -> tuple[list[int], list[str], list[str]]:
    """Row layout of a [layers x top_k] heatmap: tick positions and labels (one per layer, at
    its first row), and the per-row labels of the static picture."""
    ticks = [l * K for l in range(L)]
    return ticks, [f"layer {l}" for l in range(L)], [f"L{l}" if r == 0 else "" for l in range(L) for r in range(K)]


# -- figures (static; the widgets wrap them) ---------------------------------------------------
def routing_figure(trace, tokens=None, title: str | None = None) -> go.Figure:
    """Tokens x layers; each layer has one thin row per rank (its top-1 expert, then top-2, ...),
    coloured by expert id: every chosen expert is visible."""
    experts, weights = _arrays(trace)                       # [L, T, K]
    L, T, K = experts.shape
    E = trace.num_experts
    labels = token_labels(trace, tokens)
    choice = np.empty((L, T), dtype=object)                 # "e3 0.61, e5 0.39" per cell
    for l in range(L):
        for t in range(T):
            choice[l, t] = ", ".join(f"e{e} {w:.2f}" for e, w in zip(experts[l, t], weights[l, t]))
    text = np.array([html.escape(s, quote=False) for s in labels], dtype=object)
    z = experts.transpose(0, 2, 1).reshape(L * K, T)         # row l*K + r: rank r of layer l
    rank = np.array([ORDINAL[r] for l in range(L) for r in range(K)], dtype=object)
    custom = np.stack([np.broadcast_to(text, (L * K, T)), np.repeat(choice, K, axis=0),
                       np.broadcast_to(rank[:, None], (L * K, T))], axis=-1)
    ticks, tick_text, _ = _layer_rows(L, K)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(T)), y=list(range(L * K)), customdata=custom,
        zmin=-0.5, zmax=E - 0.5, colorscale=_discrete_colorscale(E), xgap=1 if T <= 120 else 0, ygap=0,
        colorbar=dict(title="expert", tickvals=list(range(E)) if E <= 16 else None, thickness=14, len=1.0),
        hovertemplate="token %{x}: '%{customdata[0]}'<br>%{customdata[2]} choice<br>experts (weight): "
                      "%{customdata[1]}<extra></extra>"))
    for l in range(1, L):                                   # a white line between layers
        fig.add_hline(y=l * K - 0.5, line=dict(color="white", width=2))
    fig.update_layout(
        title=title or f"Experts chosen by each token at each layer ({L} layers x top-{K} rows, {E} experts)",
        xaxis=_token_axis(list(text)),
        yaxis=dict(title="layer", autorange="reversed", tickmode="array", tickvals=[t + (K - 1) / 2 for t in ticks],
                   ticktext=tick_text), height=max(260, 9 * L * K + 170),
        margin=dict(l=70, r=10, t=50, b=90))
    return fig


def routing_svg(trace, tokens=None) -> str:
    experts, _ = _arrays(trace)
    L, T, K = experts.shape
    E = trace.num_experts
    rows = [[PALETTE[e % len(PALETTE)] for e in experts[l, :, r]] for l in range(L) for r in range(K)]
    _, _, row_labels = _layer_rows(L, K)
    return S.grid_svg(rows, row_labels, title=f"Experts chosen per token and layer (one row per rank, top-{K})",
                      col_labels=token_labels(trace, tokens), row_gap_every=K, xlabel="token",
                      legend=[(PALETTE[e % len(PALETTE)], f"expert {e}") for e in range(min(E, 24))])


def expert_load_figure(trace, title: str | None = None) -> go.Figure:
    """Share of each layer's token-expert assignments that went to each expert (uniform = 1/E)."""
    load = _load(trace)
    L, E = load.shape
    fig = go.Figure(go.Heatmap(
        z=load, x=list(range(E)), y=list(range(L)), colorscale="Blues", zmin=0,
        colorbar=dict(title="share", thickness=14), texttemplate="%{z:.2f}" if E <= 16 else None,
        hovertemplate="layer %{y}, expert %{x}: %{z:.1%} of assignments<extra></extra>"))
    fig.update_layout(title=title or f"Expert load per layer (uniform would be {1 / E:.2f})",
                      xaxis=dict(title="expert", dtick=1 if E <= 16 else None),
                      yaxis=dict(title="layer", autorange="reversed"),
                      height=max(240, 22 * L + 140), margin=dict(l=60, r=10, t=50, b=50))
    return fig


def _load(trace) -> np.ndarray:
    experts, _ = _arrays(trace)
    L, T, K = experts.shape
    E = trace.num_experts
    return np.stack([np.bincount(experts[l].ravel(), minlength=E) for l in range(L)]) / (T * K)   # [L, E]


def expert_load_view(trace) -> Shown:
    load = _load(trace)
    L, E = load.shape
    hi = float(load.max())
    svg = S.grid_svg([[S.ramp(v, 0, hi) for v in row] for row in load], [f"layer {l}" for l in range(L)],
                     title=f"Expert load per layer (uniform would be {1 / E:.2f}; darker = busier)",
                     col_labels=[f"e{e}" for e in range(E)], xlabel="expert", width=600)
    return Shown(expert_load_figure(trace), svg)


def category_figure(counts, names, title: str | None = None) -> go.Figure:
    """Which experts each kind of token uses: counts [layers, categories, experts] (from
    ``moe_colab.analysis.locality.category_expert_counts``), one layer at a time behind plotly buttons
    (they work without a kernel). Each row is normalised to the category's share per expert."""
    counts = np.asarray(_to_numpy(counts), dtype=float)
    L, C, E = counts.shape
    keep = [c for c in range(C) if counts[0, c].sum() > 0]        # categories present in the text
    rows = counts[:, keep] / counts[:, keep].sum(-1, keepdims=True)    # [L, C', E]
    labels = [f"{names[c]} ({int(counts[0, c].sum() / max(counts[0].sum(), 1) * 100)}%)" for c in keep]
    fig = go.Figure([go.Heatmap(z=rows[l], x=list(range(E)), y=labels, visible=l == L - 1, zmin=0,
                                colorscale="Blues", texttemplate="%{z:.2f}" if E <= 16 else None,
                                colorbar=dict(thickness=14),
                                hovertemplate="%{y}, expert %{x}: %{z:.1%} of its uses<extra></extra>")
                     for l in range(L)])
    buttons = [dict(label=f"layer {l}", method="update",
                    args=[{"visible": [i == l for i in range(L)]}]) for l in range(L)]
    fig.update_layout(title=title or "Share of each token kind's expert uses (rows sum to 1)",
                      updatemenus=[dict(buttons=buttons, active=L - 1, x=1.0, y=1.15)],
                      xaxis=dict(title="expert", dtick=1 if E <= 16 else None), height=max(280, 30 * len(keep) + 140),
                      margin=dict(l=140, r=10, t=70, b=50))
    return fig


def category_view(counts, names, layer: int | None = None) -> Shown:
    counts_np = np.asarray(_to_numpy(counts), dtype=float)
    L, C, E = counts_np.shape
    layer = L - 1 if layer is None else layer
    keep = [c for c in range(C) if counts_np[0, c].sum() > 0]
    rows = counts_np[layer, keep] / np.maximum(counts_np[layer, keep].sum(-1, keepdims=True), 1)
    svg = S.grid_svg([[S.ramp(v, 0, 1) for v in row] for row in rows], [names[c] for c in keep],
                     title=f"Layer {layer}: share of each token kind's expert uses (darker = more)",
                     col_labels=[f"e{e}" for e in range(E)], xlabel="expert", width=600)
    return Shown(category_figure(counts, names), svg)


def cache_figure(trace, events: "CacheEvents", tokens=None, title: str | None = None) -> go.Figure:
    """One cell per (layer, token): blue = every needed expert was cached, yellow = some were,
    vermillion = none was."""
    experts, _ = _arrays(trace)
    L, T, K = experts.shape
    misses = K - events.hit_counts                           # [L, T] in 0..K
    labels = token_labels(trace, tokens)
    text = np.array([html.escape(s, quote=False) for s in labels], dtype=object)
    custom = np.stack([np.broadcast_to(text, (L, T)), events.describe(experts)], axis=-1)
    scale = []                                               # flat bands: 0 misses, some, all K
    for m in range(K + 1):
        c = _miss_colour(m, K)
        scale += [[m / (K + 1), c], [(m + 1) / (K + 1), c]]
    fig = go.Figure(go.Heatmap(
        z=misses, x=list(range(T)), y=list(range(L)), customdata=custom, zmin=-0.5, zmax=K + 0.5,
        colorscale=scale, xgap=1 if T <= 120 else 0, ygap=1,
        colorbar=dict(title="misses", tickvals=list(range(K + 1)), thickness=14),
        hovertemplate="token %{x}: '%{customdata[0]}'<br>layer %{y}<br>%{customdata[1]}<extra></extra>"))
    fig.update_layout(
        title=title or events.title(), xaxis=_token_axis(list(text)),
        yaxis=dict(title="layer", autorange="reversed", dtick=1 if L <= 32 else None),
        height=max(240, 16 * L + 170), margin=dict(l=60, r=10, t=50, b=90))
    return fig


def _miss_colour(misses: int, K: int) -> str:
    return HIT_MISS_COLOURS[0] if misses == 0 else HIT_MISS_COLOURS[2] if misses == K else HIT_MISS_COLOURS[1]


def cache_svg(trace, events: "CacheEvents", tokens=None) -> str:
    experts, _ = _arrays(trace)
    L, T, K = experts.shape
    misses = K - events.hit_counts
    rows = [[_miss_colour(int(m), K) for m in misses[l]] for l in range(L)]
    return S.grid_svg(rows, [f"layer {l}" for l in range(L)], title=events.title(),
                      col_labels=token_labels(trace, tokens), xlabel="token",
                      legend=[(HIT_MISS_COLOURS[0], "all hits"), (HIT_MISS_COLOURS[1], "some misses"),
                              (HIT_MISS_COLOURS[2], "all misses")])


def hit_ratio_figure(trace, policies=POLICIES, prefetch: int = 0, guesses=None) -> go.Figure:
    """Hit ratio against cache size, one line per policy (plus LRU with prefetch when guesses
    are given)."""
    E = trace.num_experts
    sizes = list(range(1, E + 1))
    fig = go.Figure()
    for policy in policies:
        fig.add_trace(go.Scatter(x=sizes, y=[cache_events(trace, k, policy).hit_ratio for k in sizes],
                                 mode="lines+markers", name=policy))
    if guesses is not None and prefetch:
        fig.add_trace(go.Scatter(x=sizes, y=[cache_events(trace, k, "lru", prefetch, guesses).hit_ratio
                                             for k in sizes], mode="lines+markers", name=f"lru + prefetch {prefetch}"))
    fig.update_layout(title="Hit ratio vs experts cached per layer", xaxis=dict(title="cache size", dtick=1),
                      yaxis=dict(title="hit ratio", range=[0, 1.02]), height=380,
                      colorway=list(S.LINES), margin=dict(l=60, r=10, t=50, b=50))
    return fig


def hit_ratio_view(trace, policies=POLICIES, prefetch: int = 0, guesses=None) -> Shown:
    return Shown(hit_ratio_figure(trace, policies, prefetch, guesses))


def text_table(trace, tokens=None, events: "CacheEvents | None" = None, max_tokens: int = 40) -> str:
    """Plain text: one row per token, one column per layer, the top-k experts (``*``: a miss)."""
    experts, _ = _arrays(trace)
    L, T, K = experts.shape
    labels = token_labels(trace, tokens)
    width = max([5] + [len(s) for s in labels[:max_tokens]])
    cell = 3 * K + 1
    rows = [f"{'token':>{width}} | " + " ".join(f"{'L' + str(l):<{cell}s}" for l in range(L))]
    for t in range(min(T, max_tokens)):
        cells = []
        for l in range(L):
            c = "/".join(f"{e}" for e in experts[l, t])
            if events is not None and events.hit_counts[l, t] < K:
                c += "*"
            cells.append(f"{c:<{cell}s}")
        rows.append(f"{labels[t]:>{width}} | " + " ".join(cells))
    if T > max_tokens:
        rows.append(f"... {T - max_tokens} more tokens")
    return "\n".join(rows)


# -- cache events: from the simulator ----------------------------------------------------------
@dataclass
class CacheEvents:
    """Hit or miss of every expert use of a trace, for one cache configuration."""

    policy: str
    cache_size: int
    prefetch: int
    hits: np.ndarray                # bool [L, T, K], aligned with trace.experts

    @property
    def hit_counts(self) -> np.ndarray:
        return self.hits.sum(-1)    # int [L, T]: how many of the token's experts were cached

    @property
    def hit_ratio(self) -> float:
        return float(self.hits.mean()) if self.hits.size else 0.0

    def describe(self, experts: np.ndarray) -> np.ndarray:
        """Hover text per (layer, token) cell: "e3 hit, e5 MISS"."""
        L, T, _ = experts.shape
        out = np.empty((L, T), dtype=object)
        for l in range(L):
            for t in range(T):
                out[l, t] = ", ".join(f"e{e} {'hit' if h else 'MISS'}" for e, h in zip(experts[l, t], self.hits[l, t]))
        return out

    def title(self) -> str:
        pf = f" + prefetch {self.prefetch}" if self.prefetch else ""
        return f"{self.policy.upper()}{pf}, cache of {self.cache_size} per layer: hit ratio {self.hit_ratio:.2f}"


def cache_events(trace, cache_size: int, policy: str = "lru", prefetch: int = 0, guesses=None) -> CacheEvents:
    """The simulator's per-use hits (``moe_colab.analysis.simulate.hit_mask``): ``policy`` alone, or LRU
    with ``prefetch`` of ``guesses`` [layers, tokens, n] (e.g. prefetch_recall.guess_experts)."""
    from ..analysis.simulate import hit_mask

    if prefetch and guesses is None:
        raise ValueError("prefetch > 0 needs guesses [layers, tokens, n] (see moe_colab.analysis.prefetch_recall.guess_experts)")
    hits = hit_mask(trace, cache_size, policy, guesses=guesses, prefetch=prefetch)
    return CacheEvents(policy, cache_size, min(prefetch, cache_size), np.asarray(_to_numpy(hits), dtype=bool))


# -- widgets ---------------------------------------------------------------------------------
def _interactive(interactive: bool | None) -> bool:
    return widgets_available() if interactive is None else bool(interactive)


def routing_heatmap(trace, tokens=None, *, interactive: bool | None = None):
    """The routing heatmap (a ``Shown``: interactive plotly in JupyterLab, SVG elsewhere)."""
    return Shown(routing_figure(trace, tokens), routing_svg(trace, tokens))


def cache_timeline(trace, cache_size: int = 4, policy: str = "lru", tokens=None, *, prefetch: int = 0,
                   guesses=None, interactive: bool | None = None):
    """Hit or miss per layer per token for one cache configuration."""
    events = cache_events(trace, cache_size, policy, prefetch, guesses)
    return Shown(cache_figure(trace, events, tokens), cache_svg(trace, events, tokens))


def cache_explorer(trace, tokens=None, *, cache_size: int = 4, policy: str = "lru", prefetch: int = 0,
                   guesses=None, policies=POLICIES, interactive: bool | None = None):
    """Sliders for cache size and prefetch count and a policy menu; the "hit ratio" readout and
    the cache timeline follow them. Prefetch needs ``guesses`` (then the policy is LRU, as in the
    engine). Without a kernel: the timeline of the starting settings (what the widget first shows)."""
    if policy not in policies:
        raise ValueError(f"policy {policy!r} is not one of {tuple(policies)}")
    if not _interactive(interactive):
        return cache_timeline(trace, cache_size, policy, tokens, prefetch=prefetch, guesses=guesses, interactive=False)
    return CacheExplorer(trace, tokens, cache_size, policy, prefetch, guesses, policies)


class CacheExplorer(LiveView):
    """[cache size slider, prefetch slider, policy menu], the hit ratio readout, the timeline.
    Its parts: ``.cache_size``, ``.prefetch``, ``.policy``, ``.readout``, ``.box`` (the controls,
    CSS class ``moe-cache-explorer``), ``.events``, ``.shown`` (the figure: ``.shown.figure``)."""

    css = "moe-cache-explorer"

    def __init__(self, trace, tokens, cache_size, policy, prefetch, guesses, policies):
        E = trace.num_experts
        self.trace, self.tokens, self.guesses = trace, tokens, guesses
        max_prefetch = 0 if guesses is None else min(E, torch.as_tensor(guesses).shape[-1])
        style = {"description_width": "80px"}
        narrow = widgets.Layout(width="300px")
        self.cache_size = widgets.IntSlider(value=min(max(cache_size, 1), E), min=1, max=E, layout=narrow,
                                            description="cache size", continuous_update=False, style=style)
        self.prefetch = widgets.IntSlider(value=min(prefetch, max_prefetch), min=0, max=max(max_prefetch, 1),
                                          description="prefetch", continuous_update=False, style=style,
                                          disabled=max_prefetch == 0, layout=narrow)
        self.policy = widgets.Dropdown(options=list(policies), value=policy, description="policy", style=style,
                                       layout=widgets.Layout(width="200px"))
        self.readout = widgets.HTML()
        for w, cls in ((self.cache_size, "moe-cache-size"), (self.prefetch, "moe-prefetch"),
                       (self.policy, "moe-policy"), (self.readout, "moe-hit-ratio")):
            w.add_class(cls)
        controls = widgets.HBox([self.cache_size, self.prefetch, self.policy],
                                layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__([controls, self.readout])
        self._update()
        for w in (self.cache_size, self.prefetch, self.policy):
            w.observe(self._update, names="value")

    @property
    def hit_ratio(self) -> float:
        return self.events.hit_ratio

    def _events(self) -> CacheEvents:
        p = self.prefetch.value
        self.policy.disabled = p > 0          # prefetch is simulated in front of LRU only
        policy = "lru" if p else self.policy.value
        return cache_events(self.trace, self.cache_size.value, policy, p, self.guesses)

    def _update(self, change=None) -> None:
        self.events = self._events()
        self.readout.value = f"<b>hit ratio: {self.events.hit_ratio:.2f}</b> ({self.events.title()})"
        self.show(Shown(cache_figure(self.trace, self.events, self.tokens),
                        cache_svg(self.trace, self.events, self.tokens)))
