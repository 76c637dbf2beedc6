# %% [markdown]
# {{badge}}
#
# # 03 · An LRU cache of experts
#
# Mixtral's experts do not fit on a T4, so most of them wait in host memory and are copied to
# the GPU when a token needs them. Each copy of a 16-bit expert moves 352 MB over PCIe: the
# copies, not the arithmetic, set the speed. The paper keeps the `k` most recently used experts
# of every layer on the GPU (an LRU cache, section 3.1). This notebook builds that cache by hand,
# compares it with other eviction policies including the offline optimum, and then checks that
# the real engine does what the simulator predicts.
#
# ## Objectives
# - Write an LRU expert cache in ten lines and check it against `moe_colab.simulate_cache`.
# - Compare LRU, LFU, FIFO and Belady's offline optimum across cache sizes.
# - Run the offloading engine itself and match its `offload_stats()` with the simulation.
# - Watch hits and misses over time, and change the cache size and prefetch count live.
#
# ## What you need
# - Any CPU (one to two minutes with `tiny`); optionally a GPU and `USE_REAL_MIXTRAL = True`.
# - Notebooks 01 (routing traces) and 02 (locality) explain why a cache can work at all.

# %%
USE_REAL_MIXTRAL = False   # True: Mixtral-8x7B-Instruct, only if a GPU is present (else `tiny` on CPU)

# %% tags=["setup"]

# %% [markdown]
# ## 1. A routing trace to replay

# %%
import inspect

import torch
from transformers import AutoTokenizer

import moe_colab
import moe_colab.analysis.simulate
from moe_colab import simulate_cache
from moe_colab.checkpoint import resolve

tokenizer = AutoTokenizer.from_pretrained(resolve(rt.model))
model = moe_colab.load_model(rt.model, **rt.load_kwargs())
cfg = model.config
E, K, L = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers

text = inspect.getsource(moe_colab.analysis.simulate.simulate_prefetch)
n = min(256, cfg.max_position_embeddings)
ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=n).input_ids[0]    # <= n tokens
trace = moe_colab.record_routing(model, ids, tokenizer=tokenizer)
print(trace)

# %% [markdown]
# ## 2. An LRU cache in ten lines
# One cache per layer, `k` slots. For each token, the experts already cached are hits (and
# become the most recently used); each missing expert is loaded, evicting the least recently used
# expert the token does not need. An `OrderedDict` keeps the order: oldest first.
# (Like the engine, we handle a token's experts in ascending id order.)

# %%
from collections import OrderedDict


def lru_hits(requests, k):
    """requests: for each token, the experts it needs at one layer. Returns the number of hits."""
    cache, hits = OrderedDict(), 0
    for needed in requests:
        needed = sorted(needed)
        for e in needed:                      # hits first: they become the most recent
            if e in cache:
                hits += 1
                cache.move_to_end(e)
        for e in needed:                      # then load the misses
            if e not in cache:
                if len(cache) == k:
                    cache.popitem(last=False)   # the least recent (never one this token needs)
                cache[e] = True
    return hits


for k in range(K, E + 1):
    ours = [lru_hits(trace.experts[l].tolist(), k) for l in range(L)]
    assert ours == simulate_cache(trace, k, "lru")["per_layer"]["hits"], f"k={k}: the hand-made LRU disagrees"
print(f"the ten-line LRU matches simulate_cache for every layer and every cache size {K}..{E}")

# %% [markdown]
# Why can `popitem(last=False)` never evict an expert the current token needs? Its hits were
# just moved to the end, and with `k >= top_k` there is always an older expert in front of them.
# (With `k < top_k` the engine reuses slots in waves; `simulate_cache` handles that too.)

# %% [markdown]
# ## 3. Policies: LRU, LFU, FIFO and the optimum
# - **LRU** evicts the least recently used expert (the paper's choice).
# - **LFU** evicts the least frequently used one so far.
# - **FIFO** evicts the one loaded first, whatever happened since.
# - **Belady** evicts the expert whose next use is farthest in the future. It needs to know the
#   future, so no real system can run it, but no policy can do better: it is the ceiling.

# %%
from moe_colab.analysis.simulate import POLICIES, hit_ratio_table
from moe_colab.notebook.widgets import hit_ratio_figure

table = hit_ratio_table(trace)             # {policy: [hit ratio for k = 1..E]}
print("k   " + "".join(f"{p:>8s}" for p in POLICIES))
for k in range(1, E + 1):
    print(f"{k:<4d}" + "".join(f"{table[p][k - 1]:8.3f}" for p in POLICIES))
for k in range(K, E + 1):
    assert table["belady"][k - 1] >= max(table[p][k - 1] for p in POLICIES) - 1e-9
hit_ratio_figure(trace)

# %% [markdown]
# ## 4. The real engine, measured
# Now the engine itself: `load_model(..., experts_on_device=k, prefetch=0)` keeps `k` experts
# per layer on the device with LRU eviction, and `offload_stats()` counts its hits and misses.
# We generate text one token at a time (`record_routing` with `max_new_tokens` uses
# `generate`, starting from a one-token prompt so that every step routes a single token), record
# which experts it used, and replay that very trace through the simulator. They must agree.

# %%
k = 4
engine = moe_colab.load_model(rt.model, **rt.load_kwargs(experts_on_device=k, prefetch=0))
engine.reset_offload_stats()
run = moe_colab.record_routing(engine, ids[:1], max_new_tokens=63, tokenizer=tokenizer)
stats = engine.offload_stats()
sim = simulate_cache(run, k, "lru")
print(f"engine:    {stats['hits']} hits, {stats['misses']} misses, hit ratio "
      f"{stats['hits'] / (stats['hits'] + stats['misses']):.3f}, {stats['bytes_to_device'] / 2**20:.1f} MiB copied")
print(f"simulator: {sim['hits']} hits, {sim['misses']} misses, hit ratio {sim['hit_ratio']:.3f}")
assert (stats["hits"], stats["misses"]) == (sim["hits"], sim["misses"]), "engine and simulator disagree"
print("the engine's LRU cache did exactly what the simulator predicts")

# %% [markdown]
# Every miss is one host-to-device copy of one expert: `bytes_to_device` divided by the misses
# is the size of one expert on the device. For the real Mixtral in 16-bit that is 352 MB; at
# ~12 GB/s over a T4's PCIe that is ~29 ms per miss, and a token uses 64 experts.

# %%
print(f"bytes per miss: {stats['bytes_to_device'] / max(stats['misses'], 1) / 2**20:.3f} MiB")
del engine

# %% [markdown]
# ## 5. The cache over time
# One cell per token (column) and layer (row): green when every expert the token needed was
# cached, orange when some were, red when none were. The first tokens miss everywhere (the
# cache starts empty); then runs of green follow the runs of reused experts from notebook 02.
# Hover over a cell to see which expert hit or missed.

# %%
from moe_colab.notebook.widgets import cache_timeline

cache_timeline(trace, cache_size=4, policy="lru")

# %% [markdown]
# ## 6. Try it: cache size, policy and prefetch
# Move the sliders; the hit ratio and the timeline follow. Prefetch (loading the next layer's
# guessed experts early) is notebook 04's topic: here it is simulated in front of LRU with the
# guesses `guess_experts` makes from real hidden states.

# %%
from moe_colab.analysis.prefetch_recall import guess_experts
from moe_colab.notebook.widgets import cache_explorer

guesses = guess_experts(model, ids, count=E)     # [layers, tokens, E], best guess first
cache_explorer(trace, cache_size=4, guesses=guesses)

# %% [markdown]
# ## Summary
# - An LRU expert cache is ten lines; ours matches `simulate_cache`, and the engine's own
#   counters match the simulator exactly on a real generation.
# - Belady's optimum bounds every policy: the gap between it and LRU is all a cleverer eviction
#   rule could win. Even the optimum stays below 100 % with `k < E`, which is why the paper adds
#   speculative loading.
# - Each miss is one expert copy; the hit ratio translates directly into bytes over PCIe.
#
# ## Exercises
# 1. Change `lru_hits` into LFU (evict the expert used least often so far) and compare it with
#    `simulate_cache(trace, k, "lfu")`. Why can they disagree on ties?
# 2. At which cache size does LRU reach 90 % of Belady's hit ratio?
# 3. Rerun section 4 with `k = 2`. How many more MiB does the engine copy?
#
# ## What's next
# **04 Speculative loading** guesses the next layer's experts early, so that even misses can be
# loaded while the current layer computes: {{badge 04_speculative_loading}}
