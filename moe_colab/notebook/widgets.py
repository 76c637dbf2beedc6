"""Interactive views of expert routing and of the expert cache (ipywidgets + plotly).

    routing_heatmap(trace, tokens)       tokens x layers; colour = the top-1 expert of each cell,
                                         hover = the token text, all top-k experts, router weights
    expert_load_figure(trace)            layers x experts: share of tokens routed to each expert
    category_figure(counts, names)       token kinds x experts, one layer at a time
    cache_timeline(trace, k, policy)     hit or miss of every expert use, per layer per token
    cache_explorer(trace, tokens)        sliders for cache size and prefetch count, policy menu,
                                         a live "hit ratio: 0.53" readout and the timeline

A trace is a ``moe_colab.RoutingTrace`` (``experts`` and ``weights``: [layers, tokens, top_k]).
Hit/miss events come from ``moe_colab.analysis.simulate.hit_mask`` (the one cache simulator); this file
only draws.

Inside a Jupyter or Colab kernel these return live widgets (plotly FigureWidget needs anywidget;
Colab also needs ``moe_colab.notebook.runtime.enable_colab_widgets()`` once). In plain Python, or with
``MOE_COLAB_STATIC=1``, they return static plotly Figures instead, and ``text_table`` gives a
plain-text view; nothing here ever waits for a frontend.

Every control carries a stable CSS class (``moe-cache-size``, ``moe-prefetch``, ``moe-policy``,
``moe-hit-ratio``, ``moe-routing-heatmap``, ``moe-cache-timeline``) so a browser test can find it.

Reference: Eliseev & Mazur, arXiv 2312.17238, Figure 1 (routing) and Figure 2 (cache hit ratio).
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch

from .runtime import widgets_available

POLICIES = ("lru", "lfu", "fifo", "belady")
PALETTE = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2",
           "#FF9DA6", "#9D755D", "#BAB0AC", "#1B9E77", "#7570B3", "#E7298A", "#66A61E",
           "#D95F02", "#A6761D")
HIT_MISS_COLOURS = ("#54A24B", "#F2B447", "#E45756")   # all hits, some misses, all misses


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


def _width(tokens: int) -> int | None:
    """Wide enough for every token label (the page scrolls sideways); None: fit the page."""
    return min(14 * tokens + 260, 6000) if tokens > 50 else None


def _discrete_colorscale(n: int) -> list:
    """A step colourscale with ``n`` flat bands, one per expert id (z in [-0.5, n - 0.5])."""
    scale = []
    for i in range(n):
        c = PALETTE[i % len(PALETTE)]
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


# -- figures (static; the widgets wrap them) ---------------------------------------------------
def routing_figure(trace, tokens=None, title: str | None = None) -> go.Figure:
    experts, weights = _arrays(trace)                       # [L, T, K]
    L, T, K = experts.shape
    E = trace.num_experts
    labels = token_labels(trace, tokens)
    choice = np.empty((L, T), dtype=object)                 # "e3 0.61, e5 0.39" per cell
    for l in range(L):
        for t in range(T):
            choice[l, t] = ", ".join(f"e{e} {w:.2f}" for e, w in zip(experts[l, t], weights[l, t]))
    text = np.array([html.escape(s, quote=False) for s in labels], dtype=object)
    custom = np.stack([np.broadcast_to(text, (L, T)), choice], axis=-1)   # [L, T, 2]
    fig = go.Figure(go.Heatmap(
        z=experts[:, :, 0], x=list(range(T)), y=list(range(L)), customdata=custom,
        zmin=-0.5, zmax=E - 0.5, colorscale=_discrete_colorscale(E), xgap=1, ygap=1,
        colorbar=dict(title="top-1 expert", tickvals=list(range(E))),
        hovertemplate="token %{x}: '%{customdata[0]}'<br>layer %{y}<br>experts (weight): "
                      "%{customdata[1]}<extra></extra>"))
    fig.update_layout(
        title=title or f"Top-1 expert of each token at each layer ({L} layers, {E} experts, top-{K})",
        xaxis=dict(title="token", tickmode="array", tickvals=list(range(T)), ticktext=list(text), tickangle=-60),
        yaxis=dict(title="layer", autorange="reversed"), height=max(260, 22 * L + 160),
        width=_width(T), margin=dict(l=60, r=20, t=50, b=90))
    return fig


def expert_load_figure(trace, title: str | None = None) -> go.Figure:
    """Share of each layer's token-expert assignments that went to each expert (uniform = 1/E)."""
    experts, _ = _arrays(trace)
    L, T, K = experts.shape
    E = trace.num_experts
    load = np.stack([np.bincount(experts[l].ravel(), minlength=E) for l in range(L)]) / (T * K)   # [L, E]
    fig = go.Figure(go.Heatmap(
        z=load, x=list(range(E)), y=list(range(L)), colorscale="Blues", zmin=0,
        colorbar=dict(title="share"), texttemplate="%{z:.2f}",
        hovertemplate="layer %{y}, expert %{x}: %{z:.1%} of assignments<extra></extra>"))
    fig.update_layout(title=title or f"Expert load per layer (uniform would be {1 / E:.2f})",
                      xaxis=dict(title="expert", dtick=1), yaxis=dict(title="layer", autorange="reversed"),
                      height=max(240, 22 * L + 140), margin=dict(l=60, r=20, t=50, b=50))
    return fig


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
                                colorscale="Blues", texttemplate="%{z:.2f}",
                                hovertemplate="%{y}, expert %{x}: %{z:.1%} of its uses<extra></extra>")
                     for l in range(L)])
    buttons = [dict(label=f"layer {l}", method="update",
                    args=[{"visible": [i == l for i in range(L)]}]) for l in range(L)]
    fig.update_layout(title=title or "Share of each token kind's expert uses (rows sum to 1)",
                      updatemenus=[dict(buttons=buttons, active=L - 1, x=1.0, y=1.15)],
                      xaxis=dict(title="expert", dtick=1), height=max(280, 30 * len(keep) + 140),
                      margin=dict(l=140, r=20, t=70, b=50))
    return fig


def cache_figure(trace, events: "CacheEvents", tokens=None, title: str | None = None) -> go.Figure:
    """One cell per (layer, token): green = every needed expert was cached, red = none was."""
    experts, _ = _arrays(trace)
    L, T, K = experts.shape
    misses = K - events.hit_counts                           # [L, T] in 0..K
    labels = token_labels(trace, tokens)
    text = np.array([html.escape(s, quote=False) for s in labels], dtype=object)
    custom = np.stack([np.broadcast_to(text, (L, T)), events.describe(experts)], axis=-1)
    scale = [[0, HIT_MISS_COLOURS[0]], [0.5, HIT_MISS_COLOURS[1]], [1, HIT_MISS_COLOURS[2]]]
    fig = go.Figure(go.Heatmap(
        z=misses, x=list(range(T)), y=list(range(L)), customdata=custom, zmin=0, zmax=K,
        colorscale=scale, xgap=1, ygap=1, colorbar=dict(title="misses", tickvals=list(range(K + 1))),
        hovertemplate="token %{x}: '%{customdata[0]}'<br>layer %{y}<br>%{customdata[1]}<extra></extra>"))
    fig.update_layout(
        title=title or events.title(),
        xaxis=dict(title="token", tickmode="array", tickvals=list(range(T)), ticktext=list(text), tickangle=-60),
        yaxis=dict(title="layer", autorange="reversed"), height=max(260, 22 * L + 160),
        width=_width(T), margin=dict(l=60, r=20, t=50, b=90))
    return fig


def hit_ratio_figure(trace, policies=POLICIES, prefetch: int = 0, guesses=None) -> go.Figure:
    """Hit ratio against cache size, one line per policy (plus LRU with prefetch when guesses
    are given): the static summary of cache_explorer."""
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
                      yaxis=dict(title="hit ratio", range=[0, 1.02]), height=360, margin=dict(l=60, r=20, t=50, b=50))
    return fig


def text_table(trace, tokens=None, events: "CacheEvents | None" = None, max_tokens: int = 40) -> str:
    """Plain text: one row per token, one column per layer, the top-1 expert (``*``: a miss)."""
    experts, _ = _arrays(trace)
    L, T, K = experts.shape
    labels = token_labels(trace, tokens)
    width = max([5] + [len(s) for s in labels[:max_tokens]])
    rows = [f"{'token':>{width}} | " + " ".join(f"L{l:<3d}" for l in range(L))]
    for t in range(min(T, max_tokens)):
        cells = [f"e{experts[l, t, 0]}" + ("*" if events is not None and events.hit_counts[l, t] < K else "")
                 for l in range(L)]
        rows.append(f"{labels[t]:>{width}} | " + " ".join(f"{c:<4s}" for c in cells))
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
    """The routing heatmap: a live FigureWidget in a kernel, a static Figure elsewhere."""
    fig = routing_figure(trace, tokens)
    if not _interactive(interactive):
        return fig
    box = widgets.VBox([go.FigureWidget(fig)])
    box.add_class("moe-routing-heatmap")
    return box


def cache_timeline(trace, cache_size: int = 4, policy: str = "lru", tokens=None, *, prefetch: int = 0,
                   guesses=None, interactive: bool | None = None):
    """Hit or miss per layer per token for one cache configuration."""
    fig = cache_figure(trace, cache_events(trace, cache_size, policy, prefetch, guesses), tokens)
    if not _interactive(interactive):
        return fig
    box = widgets.VBox([go.FigureWidget(fig)])
    box.add_class("moe-cache-timeline")
    return box


def cache_explorer(trace, tokens=None, *, cache_size: int = 4, policy: str = "lru", prefetch: int = 0,
                   guesses=None, policies=POLICIES, interactive: bool | None = None):
    """Sliders for cache size and prefetch count and a policy menu; the "hit ratio" readout and
    the cache timeline follow them. Prefetch needs ``guesses`` (then the policy is LRU, as in the
    engine). Static mode returns ``hit_ratio_figure`` instead."""
    if policy not in policies:
        raise ValueError(f"policy {policy!r} is not one of {tuple(policies)}")
    if not _interactive(interactive):
        return hit_ratio_figure(trace, policies, prefetch, guesses)
    return CacheExplorer(trace, tokens, cache_size, policy, prefetch, guesses, policies)


class CacheExplorer(widgets.VBox):
    """[cache size slider, prefetch slider, policy menu], the hit ratio readout, the timeline.
    Its parts: ``.cache_size``, ``.prefetch``, ``.policy``, ``.readout``, ``.figure``, ``.events``."""

    def __init__(self, trace, tokens, cache_size, policy, prefetch, guesses, policies):
        E = trace.num_experts
        self.trace, self.tokens, self.guesses = trace, tokens, guesses
        max_prefetch = 0 if guesses is None else min(E, torch.as_tensor(guesses).shape[-1])
        style = {"description_width": "80px"}
        self.cache_size = widgets.IntSlider(value=min(max(cache_size, 1), E), min=1, max=E,
                                            description="cache size", continuous_update=False, style=style)
        self.prefetch = widgets.IntSlider(value=min(prefetch, max_prefetch), min=0, max=max(max_prefetch, 1),
                                          description="prefetch", continuous_update=False, style=style,
                                          disabled=max_prefetch == 0)
        self.policy = widgets.Dropdown(options=list(policies), value=policy, description="policy", style=style)
        self.readout = widgets.HTML()
        for w, cls in ((self.cache_size, "moe-cache-size"), (self.prefetch, "moe-prefetch"),
                       (self.policy, "moe-policy"), (self.readout, "moe-hit-ratio")):
            w.add_class(cls)
        self.events = self._events()
        self.figure = go.FigureWidget(cache_figure(trace, self.events, tokens))
        self._show()
        super().__init__([widgets.HBox([self.cache_size, self.prefetch, self.policy]), self.readout, self.figure])
        self.add_class("moe-cache-explorer")
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

    def _show(self) -> None:
        self.readout.value = f"<b>hit ratio: {self.events.hit_ratio:.2f}</b> ({self.events.title()})"

    def _update(self, change=None) -> None:
        self.events = self._events()
        self._show()
        fig = cache_figure(self.trace, self.events, self.tokens)
        with self.figure.batch_update():
            self.figure.data[0].z = fig.data[0].z
            self.figure.data[0].customdata = fig.data[0].customdata
            self.figure.layout.title.text = fig.layout.title.text
