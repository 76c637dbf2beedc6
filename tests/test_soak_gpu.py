"""Soak test on CUDA: 2,000 generated tokens from a mid-size random model, in copy and swap mode.

Per generated token it records torch.cuda.memory_allocated() and the cache counters. After a
warm-up, memory must be flat once the KV cache's own growth (exactly kv_cache_bytes per token) is
taken out, and the hit ratio per 200-token window must be stable: nothing leaks, nothing drifts.
The curves go to $MOE_COLAB_SOAK_OUT (default docs/soak.json); benchmarks/soak_report.py turns
them into docs/soak.md.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import moe_colab
from conftest import write_checkpoint
from moe_colab.memory import kv_cache_bytes

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOKENS, WINDOW, WARMUP = 2000, 200, 50
FLAT_BYTES = 8 * 2**20          # allowed spread of memory_allocated - KV cache after warm-up
OUT = Path(os.environ.get("MOE_COLAB_SOAK_OUT", Path(__file__).resolve().parents[1] / "docs" / "soak.json"))
MODEL = dict(layers=6, experts=8, top_k=2, heads=8, kv_heads=2, hidden=512, intermediate=1408, vocab=2048,
             seed=13)


class Recorder(BaseStreamer):
    """Called by generate() once for the prompt and once per new token."""

    def __init__(self, model):
        self.model, self.rows, self.prompt = model, [], True

    def put(self, value):
        if self.prompt:                      # the first call carries the prompt
            self.prompt = False
            return
        s = self.model.offload_stats()
        self.rows.append({"allocated": torch.cuda.memory_allocated(), "hits": s["hits"], "misses": s["misses"],
                          "prefetch_hits": s["prefetch_hits"], "t": time.perf_counter()})

    def end(self):
        pass


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("soak") / "ck", shard_size="200MB", **MODEL)


@pytest.mark.parametrize("swap", [False, True], ids=["copy", "swap"])
def test_soak_2000_tokens(ckpt, swap):
    model = moe_colab.load_model(ckpt, device="cuda", dtype=torch.float16, experts_on_device=4, prefetch=2,
                                 swap=swap, progress=False)
    torch.manual_seed(0)
    prompt = torch.randint(3, MODEL["vocab"], (1, 16), device="cuda")
    rec = Recorder(model)
    model.reset_offload_stats()
    model.generate(prompt, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=True, top_k=0,
                   temperature=1.0, pad_token_id=0, streamer=rec)
    rows = rec.rows
    assert len(rows) == TOKENS

    # Memory: what is allocated besides the KV cache of the tokens so far must not move.
    kv = [kv_cache_bytes(model.config, torch.float16, prompt.shape[1] + i) for i in range(len(rows))]
    residual = [r["allocated"] - k for r, k in zip(rows, kv)]
    spread = max(residual[WARMUP:]) - min(residual[WARMUP:])

    # Hit ratio per window of 200 tokens.
    windows = []
    for start in range(0, TOKENS, WINDOW):
        a, b = rows[start - 1] if start else {"hits": 0, "misses": 0}, rows[start + WINDOW - 1]
        hits, misses = b["hits"] - a["hits"], b["misses"] - a["misses"]
        windows.append(hits / (hits + misses))
    steady = windows[1:]
    seconds = rows[-1]["t"] - rows[WARMUP]["t"]
    result = {"mode": "swap" if swap else "copy", "device": torch.cuda.get_device_name(), "model": MODEL,
              "experts_on_device": 4, "prefetch": 2, "tokens": TOKENS, "window": WINDOW, "warmup": WARMUP,
              "allocated": [r["allocated"] for r in rows], "kv_bytes": kv, "residual_spread": spread,
              "hit_ratio_windows": windows, "tokens_per_s": (TOKENS - 1 - WARMUP) / seconds,
              "host_bytes": model.moe_cache.store.host_bytes, "cache_bytes": model.moe_cache.device_bytes}
    _save(result)
    assert spread <= FLAT_BYTES, f"memory moved by {spread / 2**20:.1f} MiB beyond the KV cache's growth"
    assert max(steady) - min(steady) < 0.2, f"hit ratio drifts across windows: {windows}"
    assert 0.0 < min(steady)


def _save(result: dict) -> None:
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    data[result["mode"]] = result
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data))
