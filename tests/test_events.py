"""The engine's event log: one record per sync, expert computation and copy, in issue order,
agreeing with the cache's own counters (the timeline of notebook 07 is drawn from it)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import moe_colab
from moe_colab.engine.events import EventLog


@pytest.mark.parametrize("swap", [False, True], ids=["copy", "swap"])
def test_event_log_agrees_with_counters(small_checkpoint, swap):
    log = EventLog()
    model = moe_colab.load_model(small_checkpoint, device="cpu", dtype=torch.float32, experts_on_device=2,
                                 prefetch=1, swap=swap, progress=False, events=log)
    plain = moe_colab.load_model(small_checkpoint, device="cpu", dtype=torch.float32, experts_on_device=2,
                                 prefetch=1, swap=swap, progress=False)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, plain.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                           pad_token_id=0))              # watching changes nothing
    s = model.offload_stats()
    kinds = Counter(e.kind for e in log.events)
    assert kinds["compute"] == s["hits"] + s["misses"]
    assert kinds["load"] == s["misses"] and kinds["prefetch"] == s["prefetches"]
    assert kinds["writeback"] * model.moe_cache.store.nbytes == s["bytes_to_host"]
    assert (kinds["writeback"] > 0) == swap
    copies = sum(e.nbytes for e in log.events if e.kind in ("load", "prefetch"))
    assert copies == s["bytes_to_device"]
    assert [e.seq for e in log.events] == list(range(len(log.events)))
    layers = model.config.num_hidden_layers
    assert kinds["sync"] >= layers * 9                                  # a prompt + 8 tokens, every layer
    # Every computed expert of a layer was resident: a load or prefetch of it came first, or a
    # hit (then no copy is needed); a load is never recorded after the compute it feeds.
    for i, e in enumerate(log.events):
        if e.kind == "load":
            assert any(f.kind == "compute" and f.layer == e.layer and f.expert == e.expert
                       for f in log.events[i + 1:]), e
    rows = log.to_rows()
    assert all(r["host_end_ms"] >= r["host_start_ms"] >= 0 for r in rows)
    assert log.elapsed_ms() is None                                     # no CUDA events on a CPU
