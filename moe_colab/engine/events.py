"""What the cache did, in order: a record for timelines (notebook 07) and profiles.

The engine takes an event log at build time (``Strategies(events=EventLog())``); by default it
gets ``NoEvents``, whose methods do nothing. Each record is one step of one layer:

    kind        "sync" (the host learns the router's choice), "compute" (one expert on the
                compute stream), "load" (a demand copy), "prefetch" (a speculative copy),
                "writeback" (swap mode: an evicted expert copied back to the host)
    layer, expert, nbytes (copies), stream ("compute" | "copy" | "writeback": its own stream)
    seq         the order in which the host issued it
    host_start, host_end   time.perf_counter() when the host began and finished issuing it (for
                "sync": how long the host waited)
    start, end  CUDA events on that stream (on a GPU); ``elapsed_ms()`` turns them into
                milliseconds from the first record once the device has finished

On a CPU there is nothing to time honestly (copies are synchronous memcpys): the order and the
byte counts are exact, and a timeline draws durations from a bandwidth model instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Event:
    seq: int
    kind: str
    layer: int
    expert: int | None = None
    nbytes: int = 0
    stream: str = "compute"
    host_start: float = 0.0
    host_end: float = 0.0
    start: object = field(default=None, repr=False)     # torch.cuda.Event or None
    end: object = field(default=None, repr=False)


class NoEvents:
    """The default: record nothing."""

    def begin(self, kind: str, layer: int, expert=None, nbytes: int = 0, stream=None):
        return None

    def finish(self, event, stream=None) -> None:
        pass


class EventLog(NoEvents):
    def __init__(self):
        self.events: list[Event] = []

    def begin(self, kind: str, layer: int, expert=None, nbytes: int = 0, stream=None):
        """Open a record; ``stream`` is the CUDA stream the work is queued on (None on CPU)."""
        lane = "compute" if kind in ("sync", "compute") else "writeback" if kind == "writeback" else "copy"
        e = Event(len(self.events), kind, layer, expert, nbytes, lane, host_start=time.perf_counter())
        if stream is not None:
            e.start, e.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e.start.record(stream)
        self.events.append(e)
        return e

    def finish(self, event, stream=None) -> None:
        if event is None:
            return
        event.host_end = time.perf_counter()
        if event.end is not None:
            event.end.record(stream)

    def clear(self) -> None:
        self.events.clear()

    def elapsed_ms(self) -> list[tuple[float, float]] | None:
        """(start, end) in ms from the first record, per event; None without CUDA events."""
        timed = [e for e in self.events if e.start is not None]
        if not timed or len(timed) != len(self.events):
            return None
        torch.cuda.synchronize()
        t0 = timed[0].start
        return [(t0.elapsed_time(e.start), t0.elapsed_time(e.end)) for e in self.events]

    def to_rows(self) -> list[dict]:
        """Plain dicts (seq, kind, layer, expert, nbytes, stream, host_start_ms, host_end_ms, and
        start_ms, end_ms on a GPU), times in ms from the first record."""
        times = self.elapsed_ms()
        h0 = self.events[0].host_start if self.events else 0.0
        rows = []
        for i, e in enumerate(self.events):
            row = dict(seq=e.seq, kind=e.kind, layer=e.layer, expert=e.expert, nbytes=e.nbytes, stream=e.stream,
                       host_start_ms=(e.host_start - h0) * 1e3, host_end_ms=(e.host_end - h0) * 1e3)
            if times is not None:
                row["start_ms"], row["end_ms"] = times[i]
            rows.append(row)
        return rows
