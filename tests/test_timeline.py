"""The token timeline of notebook 07: its schedule (the CPU bandwidth model and the measured
GPU path) on hand-made records, and a real record from the engine's event log on a small
checkpoint, checked against offload_stats()."""
from __future__ import annotations

import pytest
import torch

from moe_colab.notebook import timeline as T


def rows(*events):
    """Hand-made EventLog rows: (kind, layer, expert, nbytes, host_start_ms, host_end_ms)."""
    return [dict(seq=i, kind=k, layer=l, expert=e, nbytes=n, stream="copy" if k in T.COPY_KINDS else "compute",
                 host_start_ms=a, host_end_ms=b) for i, (k, l, e, n, a, b) in enumerate(events)]


def record(events, forward_ms=None, **kw):
    r = rows(*events)
    end = r[-1]["host_end_ms"] if r else 0.0
    base = dict(forward_ms=end if forward_ms is None else forward_ms, lead_ms=0.0, num_layers=2, device="cpu",
                expert_nbytes=1_000_000, cache_size=2, swap=False, num_experts=4)
    return T.TokenRecord(r, **{**base, **kw})


# sync (0.1 ms), a miss of 1 MB, its compute (0.5 ms), then layer 1: sync, a hit
MISS = record([("sync", 0, None, 0, 0.0, 0.1), ("load", 0, 3, 1_000_000, 0.1, 0.1),
               ("compute", 0, 3, 0, 0.1, 0.6), ("sync", 1, None, 0, 0.6, 0.7), ("compute", 1, 1, 0, 0.7, 1.2)])


def test_a_miss_waits_for_its_copy_at_the_modelled_bandwidth():
    bars, total = T.schedule(MISS, bandwidth_gbps=1.0)          # 1 MB at 1 GB/s: 1 ms
    copy = next(b for b in bars if b.kind == "load")
    wait = next(b for b in bars if b.kind == "wait")
    assert copy.end - copy.start == pytest.approx(1.0)
    assert wait.start == pytest.approx(0.1) and wait.end == pytest.approx(1.1)
    assert total == pytest.approx(0.1 + 1.0 + 0.5 + 0.1 + 0.5)
    fast_bars, fast = T.schedule(MISS, bandwidth_gbps=1000.0)
    assert fast == pytest.approx(1.2, abs=0.01)                  # the copy hides: compute alone
    s = T.summary(MISS, bars, total)
    assert s["waiting_ms"] == pytest.approx(1.0) and s["copies"] == 1 and s["bytes"] == 1_000_000


def test_a_prefetch_issued_early_hides_behind_compute():
    early = record([("sync", 0, None, 0, 0.0, 0.1), ("prefetch", 1, 2, 1_000_000, 0.1, 0.1),
                    ("compute", 0, 0, 0, 0.1, 2.1), ("sync", 1, None, 0, 2.1, 2.2), ("compute", 1, 2, 0, 2.2, 2.7)])
    bars, total = T.schedule(early, bandwidth_gbps=1.0)
    assert not [b for b in bars if b.kind == "wait"] and total == pytest.approx(2.7)
    prefetch = next(b for b in bars if b.kind == "prefetch")
    assert prefetch.lane == "copy" and prefetch.layer == 1 and prefetch.end <= 2.2


def test_write_backs_have_their_own_lane_and_do_not_delay_loads():
    swap = record([("sync", 0, None, 0, 0.0, 0.1), ("writeback", 0, 5, 1_000_000, 0.1, 0.1),
                   ("load", 0, 3, 1_000_000, 0.1, 0.1), ("compute", 0, 3, 0, 0.1, 0.6)], swap=True)
    bars, _ = T.schedule(swap, bandwidth_gbps=1.0)
    back, load = (next(b for b in bars if b.kind == k) for k in ("writeback", "load"))
    assert back.lane == "write-back" and load.start == pytest.approx(back.start)    # in parallel (full duplex)
    assert "L0 write-back" in T.timeline_figure(swap, bars, 2.0, 1.0).data[0].y or \
        any("write-back" in y for d in T.timeline_figure(swap, bars, 2.0, 1.0).data for y in d.y)


def test_measured_times_are_drawn_as_recorded():
    rec = record([("sync", 0, None, 0, 0.0, 0.1), ("compute", 0, 1, 0, 0.1, 0.2)])
    with pytest.raises(ValueError, match="bandwidth"):
        T.schedule(rec)
    for r, (a, b) in zip(rec.rows, [(0.0, 0.05), (0.3, 0.9)]):
        r["start_ms"], r["end_ms"] = a, b
    bars, total = T.schedule(rec)
    assert [(b.start, b.end) for b in bars] == [(0.0, 0.05), (0.3, 0.9)] and total == 0.9
    assert "measured with CUDA events" in T.timeline_view(rec).figure.layout.title.text
    assert "modelled" in T.timeline_view(rec, 12.0).figure.layout.title.text


@pytest.fixture(scope="module")
def small_engine_record(tmp_path_factory):
    import moe_colab
    from conftest import write_checkpoint
    from moe_colab.engine.events import EventLog
    path = write_checkpoint(tmp_path_factory.mktemp("tl"), layers=3, experts=6, top_k=2, vocab=128, seed=4)
    model = moe_colab.load_model(path, device="cpu", dtype=torch.float32, experts_on_device=2, prefetch=2,
                                 swap=True, progress=False, events=EventLog())
    return model, T.record_token(model, torch.arange(3, 20), warmup_tokens=3)


def test_a_recorded_token_agrees_with_the_counters(small_engine_record):
    model, rec = small_engine_record
    s = rec.stats
    assert rec.count("load") == s["misses"] and rec.count("prefetch") == s["prefetches"]
    assert rec.count("compute") == s["hits"] + s["misses"] == 3 * 2
    assert rec.count("writeback") * rec.expert_nbytes == s["bytes_to_host"]
    assert rec.count("sync") == 3 + 1          # one per layer, and layer 0's "after" guess (guess_from="auto")
    assert not rec.measured and rec.swap and rec.cache_size == 2
    bars, total = T.schedule(rec, 12.0)
    assert total >= rec.forward_ms - sum(r["host_end_ms"] - r["host_start_ms"] for r in rec.rows
                                         if r["kind"] in T.COPY_KINDS) - 1e-6
    assert T.timeline_view(rec, 12.0).svg.startswith("<svg")


def test_the_timeline_explorer_follows_its_bandwidth_slider(small_engine_record):
    _, rec = small_engine_record
    x = T.token_timeline(rec, bandwidth_gbps=100.0, interactive=True)
    assert isinstance(x, T.TimelineExplorer) and x.cache_size.disabled       # one record: no reload
    fast = x.summary["token_ms"]
    x.bandwidth.value = 10 ** -0.5                                            # the slowest setting
    assert x.summary["token_ms"] >= fast and "token time:" in x.readout.value
    assert {"moe-bandwidth", "moe-token-time"} <= {c for w in (x.bandwidth, x.readout) for c in w._dom_classes}
    static = T.token_timeline(rec, interactive=False)
    assert static.svg and "copies at 12 GB/s" in static.figure.layout.title.text
