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
# - Any CPU (under a minute with `tiny`); optionally a GPU and `USE_REAL_MIXTRAL = True`
#   (Mixtral-8x7B-Instruct from the shared weights of notebook 00, cache sized by the planner).
# - Notebooks 01 (routing traces) and 02 (locality) explain why a cache can work at all.

# %%
USE_REAL_MIXTRAL = False   # True: Mixtral-8x7B-Instruct, only if a GPU is present (else `tiny` on CPU)

# %% tags=["setup"]

# %% [markdown]
# ## 1. A routing trace to replay

# %%
import inspect

import torch

import moe_colab
import moe_colab.analysis.simulate
from moe_colab import simulate_cache

tokenizer = rt.tokenizer()          # tokenizer files only
model = rt.load_model(prefetch=0)   # the notebook's one model: an LRU cache alone, no prefetch
cfg = model.config
E, K, L = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers

text = inspect.getsource(moe_colab.analysis.simulate.simulate_prefetch)
n = min(256, cfg.max_position_embeddings)
ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=n).input_ids[0]    # <= n tokens
trace = moe_colab.record_routing(model, ids, tokenizer=tokenizer)
print(trace)

# %% [markdown]
# ## 2. An LRU cache in ten lines
#
# ![The expert cache: host buffers, device slots, one copy per miss](figures/cache_slots.svg)
#
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
from moe_colab.notebook.widgets import hit_ratio_view

table = hit_ratio_table(trace)             # {policy: [hit ratio for k = 1..E]}
print("k   " + "".join(f"{p:>8s}" for p in POLICIES))
for k in range(1, E + 1):
    print(f"{k:<4d}" + "".join(f"{table[p][k - 1]:8.3f}" for p in POLICIES))
for k in range(K, E + 1):
    assert table["belady"][k - 1] >= max(table[p][k - 1] for p in POLICIES) - 1e-9
lfu_wins = [k for k in range(K, E) if table["lfu"][k - 1] > table["lru"][k - 1]]
print(f"cache sizes where LFU beats LRU: {lfu_wins or 'none'}")
hit_ratio_view(trace)

# %% [markdown]
# LRU is not the best online rule on every trace. Where LFU beats it (the line above), the load
# is uneven (notebook 01, section 4): a few experts are busy all along, and counting uses keeps
# them cached, while recency lets a burst of rarely used experts push them out. LRU wins where
# locality (notebook 02) matters more than load. The paper chose LRU for Mixtral, whose
# routers were trained for balanced load; on `tiny`, a small model trained briefly, the load is
# less even and LFU can edge ahead at small caches. Belady's line is the ceiling for both.

# %% [markdown]
# ## 4. The real engine, measured
# Now the engine itself: the model of section 1 was loaded with `prefetch=0`, so it keeps `k`
# experts per layer on the device with LRU eviction and nothing else, and `offload_stats()`
# counts its hits and misses.
# We generate text one token at a time (`record_routing` with `max_new_tokens` uses
# `generate`, starting from a one-token prompt so that every step routes a single token), record
# which experts it used, and replay that very trace through the simulator. They must agree.

# %%
engine = model                          # the one model: no second copy in memory
k = engine.moe_cache.experts_on_device  # 4 on tiny; the planner's choice on the real Mixtral
cold = not engine.moe_cache.store.swap  # copy mode: the cache can be emptied
if cold:
    engine.moe_cache.clear()            # start empty, as the simulator does
engine.reset_offload_stats()
run = moe_colab.record_routing(engine, ids[:1], max_new_tokens=63, tokenizer=tokenizer)
stats = engine.offload_stats()
sim = simulate_cache(run, k, "lru")
print(f"engine:    {stats['hits']} hits, {stats['misses']} misses, hit ratio "
      f"{stats['hits'] / (stats['hits'] + stats['misses']):.3f}, {stats['bytes_to_device'] / 2**20:.1f} MiB copied")
print(f"simulator: {sim['hits']} hits, {sim['misses']} misses, hit ratio {sim['hit_ratio']:.3f}")
if cold:
    assert (stats["hits"], stats["misses"]) == (sim["hits"], sim["misses"]), "engine and simulator disagree"
    print("the engine's LRU cache did exactly what the simulator predicts")
else:   # swap mode (the real Mixtral on a T4): every slot holds an expert, so the cache cannot start empty
    print("swap mode: the engine's cache started full, the simulator's empty; they differ by the first tokens")

# %% [markdown]
# Every miss is one host-to-device copy of one expert: `bytes_to_device` divided by the misses
# is the size of one expert on the device. For the real Mixtral in 16-bit that is 352 MB; at
# ~12 GB/s over a T4's PCIe that is ~29 ms per miss, and a token uses 64 experts.

# %%
print(f"bytes per miss: {stats['bytes_to_device'] / max(stats['misses'], 1) / 2**20:.3f} MiB")

# %% [markdown]
# ## 5. The cache over time, live
# One cell per token (column) and layer (row): blue when every expert the token needed was
# cached, yellow when some were, vermillion when none were. The first tokens miss everywhere
# (the cache starts empty); then runs of blue follow the runs of reused experts from notebook 02.
# Hover over a cell to see which expert hit or missed. Move the sliders: the hit ratio and the
# timeline follow. Prefetch (loading the next layer's guessed experts early) is notebook 04's
# topic: here it is simulated in front of LRU with the guesses `guess_experts` makes from real
# hidden states. (A notebook saved with its outputs shows the picture of the starting settings.)

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
#
#    <details><summary>Hint 1</summary>
#
#    Keep a `Counter` of uses; on eviction pick the cached expert with the fewest uses that the
#    token does not need. `simulate_cache` breaks ties by least recent use.
#    </details>
#    <details><summary>Solution 1</summary>
#
#    ```python
#    from collections import Counter
#    def lfu_hits(requests, k):
#        cache, uses, last, hits, clock = set(), Counter(), {}, 0, 0
#        for needed in requests:
#            needed = sorted(needed)
#            for e in [e for e in needed if e in cache] + [e for e in needed if e not in cache]:
#                if e in cache:                      # hits first, as the engine does
#                    hits += 1
#                elif len(cache) == k:               # evict the least used, ties: least recent
#                    cache.remove(min(cache - set(needed), key=lambda x: (uses[x], last[x])))
#                cache.add(e)
#                clock += 1; uses[e] += 1; last[e] = clock
#        return hits
#    ```
#    With `k >= top_k` this gives `simulate_cache`'s LFU hits layer by layer. Many experts tie on
#    their use count; the tie needs a rule (here and in the library: least recently used), and
#    any other (lowest id, oldest load) evicts different experts and gives different hits.
#    </details>
#
# 2. At which cache size does LRU first reach 90 % of Belady's hit ratio? Write it in `answer_2`.
#
#    <details><summary>Hint 2</summary>
#
#    `table["lru"][k - 1] / table["belady"][k - 1]` for `k` from `top_k` to `E`.
#    </details>
#    <details><summary>Solution 2</summary>
#
#    `next(k for k in range(K, E + 1) if table["lru"][k - 1] >= 0.9 * table["belady"][k - 1])`.
#    </details>
#
# 3. With `k = 2` slots instead of section 4's, how many more MiB would the engine copy on the
#    same generated tokens? Write the MiB in `answer_3`.
#
#    <details><summary>Hint 3</summary>
#
#    The engine matched the simulator exactly, so replay `run` with `simulate_cache(run, 2, "lru")`:
#    each extra miss copies one expert of `stats["bytes_to_device"] / stats["misses"]` bytes.
#    (On `tiny` you can also reload with `rt.load_model(experts_on_device=2, prefetch=0)`.)
#    </details>
#    <details><summary>Solution 3</summary>
#
#    `(simulate_cache(run, 2, "lru")["misses"] - stats["misses"]) * stats["bytes_to_device"] / stats["misses"] / 2**20`.
#    </details>

# %%
from moe_colab.notebook.exercises import check

answer_2 = None   # cache size
answer_3 = None   # extra MiB with 2 slots
per_copy = stats["bytes_to_device"] / max(stats["misses"], 1)
check(answer_2, next(k for k in range(K, E + 1) if table["lru"][k - 1] >= 0.9 * table["belady"][k - 1]), rel=0,
      name="exercise 2")
check(answer_3, (simulate_cache(run, min(2, E), "lru")["misses"] - stats["misses"]) * per_copy / 2**20,
      name="exercise 3")

# %% [markdown]
# ## What's next
# **04 Speculative loading** guesses the next layer's experts early, so that even misses can be
# loaded while the current layer computes: {{badge 04_speculative_loading}}
