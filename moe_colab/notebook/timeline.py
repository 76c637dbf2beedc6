"""One decoded token, layer by layer: a timeline (Gantt chart) from the engine's own event log.

    rec = record_token(model, input_ids)       # model loaded with events=EventLog()
    bars, total_ms = schedule(rec, bandwidth_gbps=12)
    token_timeline(rec)                        # the figure; in a kernel with a bandwidth slider

What is drawn comes from ``moe_colab.engine.events.EventLog``: every host sync, every expert's
compute, every demand copy ("load"), every speculative copy ("prefetch") and every swap-mode
write-back, in the order the engine issued them, with the layer and expert of each.

Where the times come from:
  * on a GPU (``measured``): the CUDA events the log recorded on the compute and copy streams;
  * on a CPU there is no copy engine to time (a "copy" is a synchronous memcpy), so the timeline
    is a MODEL: the host's own measured durations for syncs, expert compute and the work between
    events (attention, norms, routers), and copies of ``nbytes / bandwidth`` on a host-to-device
    copy lane that runs beside the host, as a GPU's copy engine would; swap-mode write-backs run
    on their own device-to-host lane (the engine gives them their own stream: PCIe is full
    duplex). An expert whose copy has not landed makes compute wait ("waiting for a copy"). The
    figure's title says which of the two it shows.

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.2 (speculative loading overlaps copies
with computation) and Table 2.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch

from . import svg as S

KINDS = ("other", "sync", "compute", "wait", "load", "prefetch", "writeback")
LABELS = {"other": "attention & the rest", "sync": "host sync (router's choice)", "compute": "expert compute",
          "wait": "waiting for a copy", "load": "copy: miss (load)", "prefetch": "copy: prefetch",
          "writeback": "copy: swap write-back"}
COLOURS = {"other": "#BBBBBB", "sync": "#000000", "compute": "#0072B2", "wait": "#F0E442", "load": "#D55E00",
           "prefetch": "#009E73", "writeback": "#CC79A7"}
COPY_KINDS = ("load", "prefetch", "writeback")


@dataclass
class TokenRecord:
    """The events of one decoded token (``EventLog.to_rows()``) and the forward's host time."""
    rows: list[dict]
    forward_ms: float                 # host time of the whole forward pass
    lead_ms: float                    # from the forward's start to the first event
    num_layers: int
    device: str
    expert_nbytes: int
    cache_size: int
    swap: bool
    num_experts: int
    stats: dict = field(default_factory=dict)   # offload_stats() of this token alone

    @property
    def measured(self) -> bool:
        return bool(self.rows) and "start_ms" in self.rows[0]

    def count(self, kind: str) -> int:
        return sum(r["kind"] == kind for r in self.rows)

    def bytes_copied(self, kinds=("load", "prefetch")) -> int:
        return sum(r["nbytes"] for r in self.rows if r["kind"] in kinds)


@torch.no_grad()
def record_token(model, input_ids, *, warmup_tokens: int = 8) -> TokenRecord:
    """Read the prompt, decode ``warmup_tokens`` greedily (the cache settles), then record the
    events of one more decoded token. The model must have been loaded with ``events=EventLog()``."""
    log = model.moe_cache.events
    if not hasattr(log, "to_rows"):
        raise ValueError("load the model with moe_colab.load_model(..., events=EventLog()) to record its events")
    import inspect
    ids = input_ids.reshape(1, -1).to(model.device)
    # transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` before)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True)
    past, nxt = out[name], out.logits[:, -1:].argmax(-1)
    for _ in range(warmup_tokens):
        out = model(input_ids=nxt, use_cache=True, **{name: past})
        past, nxt = out[name], out.logits[:, -1:].argmax(-1)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    log.clear()
    model.reset_offload_stats()
    start = time.perf_counter()
    model(input_ids=nxt, use_cache=True, **{name: past})
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    forward_ms = (time.perf_counter() - start) * 1e3
    rows = log.to_rows()
    lead = (log.events[0].host_start - start) * 1e3 if log.events else 0.0
    cache = model.moe_cache
    return TokenRecord(rows, forward_ms, lead, len(cache.layers), model.device.type, cache.store.nbytes,
                       cache.experts_on_device, cache.store.swap, cache.store.num_experts, model.offload_stats())


@dataclass
class Bar:
    kind: str
    layer: int
    expert: int | None
    start: float
    end: float
    nbytes: int = 0

    @property
    def lane(self) -> str:
        return "write-back" if self.kind == "writeback" else "copy" if self.kind in COPY_KINDS else "compute"


def schedule(rec: TokenRecord, bandwidth_gbps: float | None = None) -> tuple[list[Bar], float]:
    """(bars, token time in ms). ``bandwidth_gbps`` None on a GPU: the measured CUDA times. Else
    the model described in the module docstring, with host-to-device copies at that rate (GB/s,
    1e9 bytes per second)."""
    if bandwidth_gbps is None:
        if not rec.measured:
            raise ValueError("these events carry no device times (recorded on a CPU): give bandwidth_gbps")
        bars = [Bar(r["kind"], r["layer"], r["expert"], r["start_ms"], r["end_ms"], r["nbytes"]) for r in rec.rows]
        return bars, max([b.end for b in bars] + [0.0])
    if bandwidth_gbps <= 0:
        raise ValueError(f"bandwidth_gbps must be positive, got {bandwidth_gbps}")
    per_ms = bandwidth_gbps * 1e9 / 1e3                # bytes per millisecond
    bars: list[Bar] = []
    t = rec.lead_ms
    if rec.lead_ms > 0:
        bars.append(Bar("other", 0, None, 0.0, rec.lead_ms))
    copy_free, back_free, ready = 0.0, 0.0, {}
    prev_end = rec.rows[0]["host_start_ms"] if rec.rows else 0.0
    layer = 0
    for r in rec.rows:
        gap = r["host_start_ms"] - prev_end            # host work between two events (attention, ...)
        prev_end = r["host_end_ms"]
        if r["kind"] in ("sync", "compute"):
            layer = r["layer"]
        if gap > 1e-6:
            bars.append(Bar("other", layer, None, t, t + gap))
            t += gap
        kind, l, e = r["kind"], r["layer"], r["expert"]
        if kind == "writeback":                        # its own device-to-host lane
            start = max(t, back_free)
            back_free = start + r["nbytes"] / per_ms
            bars.append(Bar(kind, l, e, start, back_free, r["nbytes"]))
            continue
        if kind in COPY_KINDS:                         # issued now, runs on the copy lane
            start = max(t, copy_free)
            end = start + r["nbytes"] / per_ms
            copy_free = end
            bars.append(Bar(kind, l, e, start, end, r["nbytes"]))
            ready[(l, e)] = end
            continue
        took = r["host_end_ms"] - r["host_start_ms"]
        if kind == "compute":
            land = ready.get((l, e), 0.0)
            if land > t:
                bars.append(Bar("wait", l, e, t, land))
                t = land
        bars.append(Bar(kind, l, e, t, t + took))
        t += took
    tail = max(rec.forward_ms - rec.lead_ms - (prev_end - (rec.rows[0]["host_start_ms"] if rec.rows else 0.0)), 0.0)
    if tail > 1e-6:
        bars.append(Bar("other", layer, None, t, t + tail))
        t += tail
    return bars, max(t, copy_free, back_free)


def summary(rec: TokenRecord, bars: list[Bar], total_ms: float) -> dict:
    waited = sum(b.end - b.start for b in bars if b.kind == "wait")
    copy_ms = sum(b.end - b.start for b in bars if b.lane == "copy")
    return {"token_ms": total_ms, "tokens_per_s": 1e3 / total_ms if total_ms else float("inf"),
            "waiting_ms": waited, "copy_ms": copy_ms, "copies": sum(b.lane == "copy" for b in bars),
            "writebacks": sum(b.lane == "write-back" for b in bars),
            "bytes": sum(b.nbytes for b in bars if b.kind in ("load", "prefetch"))}


def _lanes(L: int, writeback: bool = False) -> list[str]:
    kinds = ("compute", "copy", "write-back") if writeback else ("compute", "copy")
    return [f"L{l} {lane}" for l in range(L) for lane in kinds]


def timeline_figure(rec: TokenRecord, bars: list[Bar], total_ms: float, bandwidth_gbps: float | None) -> go.Figure:
    lanes = _lanes(rec.num_layers, any(b.kind == "writeback" for b in bars))
    fig = go.Figure()
    for kind in KINDS:
        mine = [b for b in bars if b.kind == kind]
        if not mine:
            continue
        fig.add_trace(go.Bar(
            orientation="h", base=[b.start for b in mine], x=[max(b.end - b.start, 1e-4) for b in mine],
            y=[f"L{b.layer} {b.lane}" for b in mine], name=LABELS[kind], marker_color=COLOURS[kind],
            customdata=[[b.layer, "" if b.expert is None else f"expert {b.expert}", b.nbytes / 2**20, b.end - b.start]
                        for b in mine],
            hovertemplate=f"{LABELS[kind]}<br>layer %{{customdata[0]}} %{{customdata[1]}}<br>"
                          "%{base:.3f} -> +%{customdata[3]:.3f} ms<br>%{customdata[2]:.2f} MiB<extra></extra>"))
    fig.update_layout(
        title=_title(rec, total_ms, bandwidth_gbps), barmode="overlay", bargap=0.15,
        xaxis=dict(title="time within the token (ms)", range=[0, total_ms * 1.01]),
        yaxis=dict(categoryorder="array", categoryarray=lanes, autorange="reversed", tickfont=dict(size=10)),
        height=max(300, 13 * len(lanes) + 190), margin=dict(l=90, r=10, t=60, b=50),
        legend=dict(orientation="h", y=-0.08 - 6 / max(len(lanes), 1), x=0))
    return fig


def _title(rec: TokenRecord, total_ms: float, bandwidth_gbps: float | None) -> str:
    how = ("measured with CUDA events" if bandwidth_gbps is None else
           f"modelled: this {rec.device.upper()}'s host times, copies at {bandwidth_gbps:.3g} GB/s")
    return (f"One decoded token: {total_ms:.2f} ms ({1e3 / total_ms:.1f} tokens/s), {rec.cache_size} slots per layer"
            f"{', swap' if rec.swap else ''}; {how}")


def timeline_svg(rec: TokenRecord, bars: list[Bar], total_ms: float, bandwidth_gbps: float | None) -> str:
    back = any(b.kind == "writeback" for b in bars)
    lanes = _lanes(rec.num_layers, back)
    index = {name: i for i, name in enumerate(lanes)}
    return S.gantt_svg([(index[f"L{b.layer} {b.lane}"], b.start, b.end, COLOURS[b.kind]) for b in bars], lanes,
                       title=_title(rec, total_ms, bandwidth_gbps), xlabel="time within the token (ms)",
                       legend=[(COLOURS[k], LABELS[k]) for k in KINDS if any(b.kind == k for b in bars)],
                       group_gap_every=3 if back else 2, lane_h=12 if rec.num_layers > 8 else 14)


def timeline_view(rec: TokenRecord, bandwidth_gbps: float | None = None):
    from .widgets import Shown
    bars, total = schedule(rec, bandwidth_gbps)
    return Shown(timeline_figure(rec, bars, total, bandwidth_gbps), timeline_svg(rec, bars, total, bandwidth_gbps))


def token_timeline(record, *, bandwidth_gbps: float = 12.0, cache_size: int | None = None,
                   measured: bool = False, interactive: bool | None = None):
    """The timeline of one token. ``record``: a TokenRecord, or a function cache_size ->
    TokenRecord (then a slots-per-layer slider appears). ``measured=True`` draws the CUDA event
    times of a GPU record; otherwise the model at ``bandwidth_gbps``. In a kernel: sliders for
    bandwidth (and slots), a readout (CSS class ``moe-token-time``) and the figure; elsewhere the
    figure of the starting settings."""
    from .widgets import _interactive
    get = record if callable(record) else (lambda k: record)
    rec = get(cache_size)
    if measured or not _interactive(interactive):
        return timeline_view(rec, None if measured else bandwidth_gbps)
    return TimelineExplorer(get, rec, bandwidth_gbps, callable(record))


def _explorer_base():
    from .widgets import LiveView
    return LiveView


class TimelineExplorer(_explorer_base()):
    """Sliders: copy bandwidth (GB/s) and, when the record is a function, slots per layer; a
    readout of the token time and the timeline. Parts: ``.bandwidth``, ``.cache_size``,
    ``.readout``, ``.record``, ``.summary``, ``.box`` (CSS class ``moe-timeline``)."""

    css = "moe-timeline"

    def __init__(self, get, rec: TokenRecord, bandwidth_gbps, resizable: bool):
        import ipywidgets as widgets
        self.get, self.record = get, rec
        style = {"description_width": "110px"}
        self.bandwidth = widgets.FloatLogSlider(value=bandwidth_gbps or 12.0, base=10, min=-0.5, max=2.5, step=0.05,
                                                description="bandwidth GB/s", continuous_update=False, style=style,
                                                readout_format=".3g", layout=widgets.Layout(width="360px"))
        E = rec.num_experts
        self.cache_size = widgets.IntSlider(value=rec.cache_size, min=1, max=E, description="slots per layer",
                                            continuous_update=False, disabled=not resizable, style=style,
                                            layout=widgets.Layout(width="320px"))
        self.readout = widgets.HTML()
        for w, cls in ((self.bandwidth, "moe-bandwidth"), (self.cache_size, "moe-timeline-cache"),
                       (self.readout, "moe-token-time")):
            w.add_class(cls)
        controls = widgets.HBox([self.bandwidth, self.cache_size], layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__([controls, self.readout])
        self._update()
        self.bandwidth.observe(self._update, names="value")
        self.cache_size.observe(self._resize, names="value")

    def _resize(self, change=None) -> None:
        self.record = self.get(self.cache_size.value)
        self._update()

    def _update(self, change=None) -> None:
        bw = self.bandwidth.value
        bars, total = schedule(self.record, bw)
        self.summary = summary(self.record, bars, total)
        s = self.summary
        self.readout.value = (f"<b>token time: {s['token_ms']:.2f} ms</b> ({s['tokens_per_s']:.1f} tokens/s); "
                              f"{s['copies']} copies in, {s['bytes'] / 2**20:.2f} MiB; {s['writebacks']} "
                              f"write-backs; waiting for copies {s['waiting_ms']:.2f} ms")
        self.show(timeline_view(self.record, bw))
