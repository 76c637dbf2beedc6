# %% [markdown]
# {{badge}}
#
# # 07 · Inside the engine: where the experts live, and one token in time
#
# Notebooks 03 and 04 counted hits, misses and prefetches. This one opens the engine that
# produced those counts: the device **slots** that hold experts, the **pinned host buffers**
# they are copied from, the **copy stream** that moves them, and then a timeline of one decoded
# token, layer by layer: the host learning the router's choice, experts computing, demand copies,
# speculative copies and swap-mode write-backs, drawn from the engine's own event log.
#
# ## Objectives
# - Read `model.moe_cache`: its slots per layer, the experts they hold, the host buffers and the
#   packed layout of one expert; rebuild the layout's offsets by hand.
# - Record the events of one decoded token with `moe_colab.engine.events.EventLog` and check them
#   against `offload_stats()`.
# - Draw the token as a Gantt chart; change the copy bandwidth and the number of slots and watch
#   copies hide behind compute, or stall it.
# - Predict tokens/s from bytes and bandwidth, then measure it.
#
# ## What you need
# - Any CPU (under a minute with `tiny`). On a CPU the copies are plain memory copies, so the
#   timeline is a **model**: this machine's measured compute, with copy times from a bandwidth
#   you choose. On a GPU with `USE_REAL_MIXTRAL = True` it is **measured** with CUDA events on
#   the compute and copy streams (Mixtral-8x7B-Instruct from the shared weights of notebook 00).
# - Notebooks 03 (the LRU cache) and 04 (speculative loading).

# %%
USE_REAL_MIXTRAL = False   # True: Mixtral-8x7B-Instruct, only if a GPU is present (else `tiny` on CPU)

# %% tags=["setup"]

# %% [markdown]
# ## 1. A model that records what it does
# `load_model(..., events=EventLog())` hands the engine an event log; without one the engine
# records nothing and pays nothing. On `tiny` we use the mode notebook 06's plan picks for
# Mixtral on a free T4, **swap mode** (an expert lives on the device or in host memory, and is
# copied back when evicted), with 3 of 8 experts per layer, fewer than the T4 plan's 5, so that
# one token has misses to watch. For the real model the planner decides.

# %%
import torch

import moe_colab
from moe_colab.engine.events import EventLog

torch.manual_seed(0)
tokenizer = rt.tokenizer()
log = EventLog()
if rt.real_mixtral:
    model = rt.load_model(events=log)                                   # the planner's slots and mode
else:
    model = rt.load_model(events=log, experts_on_device=3, swap=True)   # swap mode, as on a T4
cfg = model.config
E, K, L = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
cache, store = model.moe_cache, model.moe_cache.store
print(f"{L} layers x {E} experts, top-{K}; {cache.experts_on_device} slots per layer, "
      f"{'swap' if store.swap else 'copy'} mode, prefetch {model.offload_options.prefetch}, on {rt.device}")

# %% [markdown]
# ## 2. Where the experts live
#
# ![The expert cache: host buffers, device slots, one copy per miss](figures/cache_slots.svg)
#
# Per layer, `store.buffers[l]` is one `uint8` tensor in host memory with one row per expert
# (page-locked, "pinned", on a GPU machine, so a copy runs at full PCIe speed without the CPU),
# and `cache.layers[l].slots` are the device buffers of the same row size. `store.home[l][e]`
# says which host row holds a valid copy of expert `e`, or `None` while only the device has it.
# In swap mode a layer has fewer host rows than experts (`E - k + 1`, plus any
# `extra_host_rows` of the options), and `cache.spare` holds a few spare device slots that any
# layer's demand load may take, so it never waits for the write-back of the expert it evicts.
# Copies in run on `cache.copy_stream`, write-backs on `cache.writeback_stream` (both `None` on
# a CPU, where copies are plain memory copies).

# %%
l = 0
print(f"host buffer of layer {l}: {tuple(store.buffers[l].shape)} {store.buffers[l].dtype}, "
      f"pinned: {store.buffers[l].is_pinned()} (pinning needs CUDA), "
      f"{store.host_bytes / 2**20:.1f} MiB for all layers")
print(f"one expert = one row of {store.nbytes} bytes; copy stream: {cache.copy_stream}, "
      f"write-back stream: {cache.writeback_stream}")
print(f"host row of each expert of layer {l} (None: on the device only): {store.home[l]}")
for i, slot in enumerate(cache.layers[l].slots):
    print(f"  slot {i}: expert {slot.expert}, prefetched={slot.prefetched}, "
          f"{slot.buffer.numel()} bytes on {slot.buffer.device}")
print(f"spare slots shared by all layers: {len(cache.spare)}")
print(f"LRU order of layer {l} (least recent first): {cache.resident(l)}")

# the host rows per layer, by hand: E in copy mode; in swap mode E - k + 1, plus the extra rows
# of the options spread one per layer round-robin (never more than E)
k, extra = cache.experts_on_device, model.offload_options.extra_host_rows if store.swap else 0
rows = [min(E, (E - k + 1 if store.swap else E) + extra // L + (i < extra % L)) for i in range(L)]
assert [b.shape[0] for b in store.buffers] == rows and store.host_bytes == sum(rows) * store.nbytes
# just after loading, the experts 0..k-1 of each layer start on the device, without a host row
assert sum(h is None for h in store.home[l]) == (k if store.swap else 0)

# %% [markdown]
# ### 2.1 One expert's bytes, by hand
# Inside a row, each tensor of the expert (its `w1`, `w2`, `w3` matrices, or their low-bit codes,
# scales and zeros) sits at an offset rounded up to 64 bytes, so that every view is aligned. The
# layout is `store.format.layout`; we rebuild its offsets and total from the shapes alone.

# %%
layout = store.format.layout
offset, by_hand = 0, []
for spec in layout.specs:
    by_hand.append(offset)
    size = spec.nbytes
    print(f"  {spec.name:8s} {str(list(spec.shape)):16s} {str(spec.dtype):14s} at byte {offset:8d} ({size} bytes)")
    offset += -(-size // 64) * 64                  # round up to a multiple of 64
assert by_hand == [s.offset for s in layout.specs] and offset == layout.nbytes == store.nbytes
print(f"total {offset} bytes: one copy moves the whole expert")

# %% [markdown]
# ## 3. One decoded token, recorded
# `record_token` reads a prompt, decodes a few tokens (the cache settles), clears the log and
# decodes one more. Each record is one step of one layer: `sync` (the host waits to learn the
# router's choice), `compute` (one expert), `load` (a demand copy after a miss), `prefetch` (a
# guessed expert of the next layer), `writeback` (swap mode: an evicted expert copied back to its
# host row first).

# %%
from moe_colab.notebook.timeline import record_token

prompt = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n'
ids = tokenizer(prompt, return_tensors="pt").input_ids
rec = record_token(model, ids)
for row in rec.rows[:12]:
    print({k: row[k] for k in ("seq", "kind", "layer", "expert", "nbytes")})
print(f"... {len(rec.rows)} records in all")

kinds = {k: rec.count(k) for k in ("sync", "compute", "load", "prefetch", "writeback")}
s = rec.stats                                          # offload_stats() of this token alone
print("records per kind:", kinds)
print("offload_stats():", {k: s[k] for k in ("hits", "misses", "prefetches", "bytes_to_device", "bytes_to_host")})
assert kinds["load"] == s["misses"] and kinds["prefetch"] == s["prefetches"]
assert kinds["compute"] == s["hits"] + s["misses"] == L * K
assert (kinds["load"] + kinds["prefetch"]) * store.nbytes == s["bytes_to_device"]
assert kinds["writeback"] * store.nbytes == s["bytes_to_host"]
print("the event log and the counters agree")

# %% [markdown]
# Count the syncs: one per layer, plus one. That extra one is the `guess_from="auto"` rule of
# notebook 04: layer 0 guesses layer 1's experts from its output, which the host must wait for
# a second time.

# %% [markdown]
# ## 4. The token in time
#
# ![Speculative loading moves copies off the critical path](figures/prefetch_timeline.svg)
#
# Each layer gets two lanes: its compute lane (grey: attention and the rest of the layer, black:
# the host sync, blue: an expert computing, yellow: waiting for a copy) and its copy lane
# (vermillion: a demand copy, green: a prefetch) and, in swap mode, its write-back lane (purple:
# an evicted expert copied back to the host, on its own stream). A prefetch sits on the lane of
# the layer it is for; the engine issues it only while the copy stream is idle, so it never
# delays a demand copy.
#
# **Where the times come from.** On a GPU, `measured=True` draws the CUDA event times the log
# recorded. On a CPU there is no copy engine to time: the chart keeps this machine's measured
# compute and host times and the engine's exact order and byte counts, and gives each copy
# `bytes / bandwidth` on a copy lane that runs beside compute. That is a model, and the title says so.
# Move the sliders: the copy bandwidth (a T4's PCIe moves about 12 GB/s, pinned) and, on `tiny`,
# the slots per layer (the model is reloaded with that many).

# %%
from moe_colab.notebook.timeline import schedule, summary, token_timeline

records = {cache.experts_on_device: rec}


def record(slots):
    """The token's record with ``slots`` experts per layer (tiny: reload; the real model: as loaded)."""
    if slots is None or rt.real_mixtral:
        return rec
    if slots not in records:
        m = rt.load_model(events=EventLog(), experts_on_device=slots, swap=slots < E)
        records[slots] = record_token(m, ids)
    return records[slots]


token_timeline(rec if rt.real_mixtral else record, bandwidth_gbps=12.0, cache_size=cache.experts_on_device)

# %%
if rec.measured:                      # a GPU: the same token with its CUDA event times
    display(token_timeline(rec, measured=True))
for bw in (1, 12, 100):
    bars, total = schedule(rec, bw)
    sm = summary(rec, bars, total)
    print(f"{bw:4d} GB/s: token {sm['token_ms']:7.2f} ms ({sm['tokens_per_s']:6.1f} tokens/s), "
          f"waiting for copies {sm['waiting_ms']:6.2f} ms, copy lane busy {sm['copy_ms']:6.2f} ms")

# %% [markdown]
# Read the three lines: at 100 GB/s copies vanish behind compute; at 1 GB/s the compute lane waits
# for them. On `tiny`, each expert is under 1 MB, so even a slow link keeps up; a Mixtral expert
# at paper-2bit is about 67 MB, and on a T4 the copies, not the arithmetic, set the pace.

# %% [markdown]
# ## 5. Predict tokens per second, then measure
# A token must at least move its bytes over the link: `bytes per token / bandwidth` is a floor on
# its time (a ceiling on tokens/s) whatever the compute. Its compute alone is another floor. We
# decode 16 tokens, count the bytes moved, time them, and compare.

# %%
import time

model.reset_offload_stats()
name = "cache" if "cache" in __import__("inspect").signature(model.forward).parameters else "past_key_values"
with torch.no_grad():
    out = model(input_ids=ids.to(model.device), use_cache=True)
    past, nxt = out[name], out.logits[:, -1:].argmax(-1)
    model.reset_offload_stats()
    if rt.device == "cuda":
        torch.cuda.synchronize()
    start, n_new = time.perf_counter(), 16
    for _ in range(n_new):
        out = model(input_ids=nxt, use_cache=True, **{name: past})
        past, nxt = out[name], out.logits[:, -1:].argmax(-1)
    if rt.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
st = model.offload_stats()
bytes_per_token = st["bytes_to_device"] / n_new    # host -> device; write-backs go the other way, on their own stream
measured = n_new / seconds
print(f"{bytes_per_token / 1e6:.2f} MB copied per token; measured {measured:.1f} tokens/s on {rt.device}")
copy_bound = 12e9 / bytes_per_token
print(f"copy-bound at 12 GB/s: {copy_bound:.0f} tokens/s")

# %% [markdown]
# On `tiny` the copy bound is far above what the CPU computes: compute rules. For Mixtral on a T4
# it is the other way round: a few dozen paper-2bit experts missed per token at 67 MB each is
# over a gigabyte per token, about a tenth of a second at 12 GB/s, before any arithmetic; the
# paper's Table 2 measured 2.092 tokens/s with its full algorithm on a T4 at 2-bit.

# %% [markdown]
# ## Summary
# - Every expert is one row of bytes: on the host in a (pinned) buffer, on the device in one of
#   a few slots per layer; moving it is one copy, on its own stream.
# - The engine's event log records each sync, expert, copy, prefetch and write-back of a token,
#   and agrees with `offload_stats()`.
# - A token's time is the longer of its compute and its copies where they overlap, and their sum
#   where a layer waits: prefetching exists to make them overlap.
#
# ## Exercises
# 1. Predict the copy-bound tokens/s of section 5 at a T4's 12 GB/s from `bytes_per_token`
#    (the most tokens per second the link allows if compute were free). Write it in `answer_1`;
#    then compare it with `measured`. Which bound rules on this machine?
#
#    <details><summary>Hint 1</summary>
#
#    Tokens per second = bytes per second / bytes per token.
#    </details>
#    <details><summary>Solution 1</summary>
#
#    `12e9 / bytes_per_token`. On `tiny` on a CPU it is thousands of tokens/s against a measured
#    few dozen: compute rules. On the real Mixtral on a T4 the two are close: copies rule.
#    </details>
#
# 2. With the timeline's bandwidth slider (or `schedule(rec, bw)`), find the bandwidth below
#    which this token waits more than 1 ms for copies. Write it (GB/s) in `answer_2`.
#
#    <details><summary>Hint 2</summary>
#
#    `summary(rec, *schedule(rec, bw))["waiting_ms"]` falls as `bw` grows; try a few values, or
#    bisect between 0.1 and 100.
#    </details>
#    <details><summary>Solution 2</summary>
#
#    ```python
#    lo, hi = 0.01, 1000.0
#    for _ in range(40):
#        mid = (lo * hi) ** 0.5
#        if summary(rec, *schedule(rec, mid))["waiting_ms"] > 1.0: lo = mid
#        else: hi = mid
#    ```
#    `hi` is the answer: below it the copies of this token no longer hide behind its compute.
#    </details>
#
# 3. How many host syncs does one decoded token make? Write the count in `answer_3`, and say
#    why it is not the number of layers.
#
#    <details><summary>Hint 3</summary>
#
#    `rec.count("sync")`; look at the layer of each sync in `rec.rows`.
#    </details>
#    <details><summary>Solution 3</summary>
#
#    `L + 1` with prefetching on: each layer syncs once to learn its experts, and layer 0 syncs a
#    second time for the guess it makes from its output (`guess_from="auto"`, notebook 04).
#    </details>

# %%
from moe_colab.notebook.exercises import check


def waiting_threshold(rec, limit_ms=1.0):
    lo, hi = 0.01, 1000.0
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if summary(rec, *schedule(rec, mid))["waiting_ms"] > limit_ms else (lo, mid)
    return hi


answer_1 = None   # tokens/s allowed by 12 GB/s
answer_2 = None   # GB/s below which the token waits more than 1 ms
answer_3 = None   # host syncs per decoded token
check(answer_1, copy_bound, name="exercise 1")
check(answer_2, waiting_threshold(rec), rel=0.05, name="exercise 2")
check(answer_3, rec.count("sync"), rel=0, name="exercise 3")

# %% [markdown]
# ## What's next
# Back to the index: {{badge 00_index}}. Notebook 06 runs all of this on the real Mixtral-8x7B:
# {{badge 06_mixtral_on_a_t4}}
