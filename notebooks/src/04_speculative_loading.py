# %% [markdown]
# {{badge}}
#
# # 04 · Speculative expert loading
#
# An LRU cache still misses, and a miss stalls the layer until its expert has been copied. The
# paper's second idea (section 3.2): the residual stream changes little from one layer to the
# next, so **the next layer's router applied to the current layer's hidden state** is a good
# guess of the experts the next layer will pick. Loading those guesses while the current layer
# computes hides the copy time. This notebook measures how good the guesses are (the paper's
# Figure 2, right) and what they do to the cache.
#
# ## Objectives
# - Make the guess by hand and check it against `moe_colab.analysis.prefetch_recall.guess_experts`.
# - Measure prefetch recall for 1, 2 (and more) layers ahead against chance.
# - Simulate LRU with prefetching, then run the engine with `prefetch=2` and read `prefetch_hits`.
#
# ## What you need
# - Any CPU (one to two minutes with `tiny`); optionally a GPU and `USE_REAL_MIXTRAL = True`.
# - Notebook 03: the LRU cache that prefetching feeds.

# %%
USE_REAL_MIXTRAL = False   # True: Mixtral-8x7B-Instruct, only if a GPU is present (else `tiny` on CPU)

# %% tags=["setup"]

# %% [markdown]
# ## 1. Model and text

# %%
import inspect

import torch
from transformers import AutoTokenizer

import moe_colab
import moe_colab.analysis.simulate
from moe_colab.checkpoint import resolve

tokenizer = AutoTokenizer.from_pretrained(resolve(rt.model))
model = moe_colab.load_model(rt.model, **rt.load_kwargs())
cfg = model.config
E, K, L = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers

text = inspect.getsource(moe_colab.analysis.simulate.simulate_cache)
n = min(256, cfg.max_position_embeddings)
ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=n).input_ids[0]    # <= n tokens
trace = moe_colab.record_routing(model, ids, tokenizer=tokenizer)
print(trace)

# %% [markdown]
# ## 2. The guess, by hand
# While layer `l` runs, we already hold its hidden state `h_l` (after attention, before the
# experts). Layer `l+1` will compute `router_{l+1}(norm_{l+1}(h_{l+1}))`; we compute the same
# thing on `h_l` instead, and keep the `p` best experts as the guess.

# %%
from moe_colab.analysis.prefetch_recall import guess_experts, layer_states

p = K
_, states = layer_states(model, ids)                  # states["before"][l]: [T, H]
library = guess_experts(model, ids, count=p)          # [L, T, p]; layer 0 has no guess (-1)
layers = model.model.layers
for l in range(L - 1):
    nxt = layers[l + 1]
    h = nxt.post_attention_layernorm(states["before"][l])           # the NEXT layer's norm
    logits = torch.nn.functional.linear(h, nxt.mlp.gate.weight)    # the NEXT layer's router: h @ W.T
    probs = logits.float().softmax(dim=-1)                          # [T, E]
    guess = probs.topk(p, dim=-1).indices                           # [T, p]
    assert torch.equal(guess.cpu(), library[l + 1]), f"layer {l + 1}: the hand-made guess disagrees"
print(f"the hand-made guess matches guess_experts for layers 1..{L - 1}")

# %% [markdown]
# How often is it right? The **recall** of a guess is the share of the experts the layer really
# used that were among the guessed ones. By hand for `p = top_k`, one layer ahead:

# %%
from moe_colab.analysis.prefetch_recall import prefetch_recall

truth = trace.experts                                              # [L, T, K]
found = (library[1:, :, :, None] == truth[1:, :, None, :]).any(-2)  # [L-1, T, K]: was each used expert guessed?
by_hand = found.float().mean().item()
curves = prefetch_recall(model, ids, ahead=[a for a in (1, 2, 10) if a < L])
library_recall = curves["recall"][0, p - 1].item()
assert abs(by_hand - library_recall) < 1e-5
print(f"recall one layer ahead with {p} guesses: {by_hand:.3f} by hand, {library_recall:.3f} from prefetch_recall; "
      f"chance {p / E:.3f}")

# %% [markdown]
# ## 3. Recall curves (the paper's Figure 2, right)
# The paper plots recall against the number of experts pre-loaded (1 to 8) when guessing 1, 2
# and 10 layers ahead on Mixtral-8x7B-Instruct; it gives the values only as a plot (summaries
# read them as above 80-90 % one layer ahead; we could not verify that reading). Ours follow,
# with the model that produced them in the title. Random guesses would score `p/E`.

# %%
import plotly.graph_objects as go

P = curves["prefetch"]
fig = go.Figure([go.Scatter(x=P, y=curves["recall"][i].tolist(), mode="lines+markers", name=f"{a} layer(s) ahead")
                 for i, a in enumerate(curves["ahead"])])
fig.add_scatter(x=P, y=curves["chance"], mode="lines", name="random guess", line=dict(dash="dash"))
fig.update_layout(title=f"Prefetch recall ({rt.model}, {trace.num_tokens} tokens)", xaxis_title="experts pre-loaded",
                  yaxis_title="recall", yaxis_range=[0, 1.02], height=420)
for i, a in enumerate(curves["ahead"]):
    print(f"{a:2d} layer(s) ahead: " + "  ".join(f"p={q}: {r:.2f}" for q, r in zip(P, curves["recall"][i].tolist())))
fig

# %% [markdown]
# The engine can feed the guess from two hidden states: `"before"` (after attention, before the
# experts: known earliest, so copies overlap the experts' compute too) or `"after"` (the layer's
# output: closer to what the next layer sees, but later). Which guesses better here?

# %%
after = prefetch_recall(model, ids, ahead=1, source="after")
print("p:       " + "  ".join(f"{q:5d}" for q in P))
print("before:  " + "  ".join(f"{r:5.2f}" for r in curves["recall"][0].tolist()))
print("after:   " + "  ".join(f"{r:5.2f}" for r in after["recall"][0].tolist()))

# %% [markdown]
# ## 4. Prefetching in front of the LRU cache
# `simulate_prefetch` loads the `p` guessed experts of layer `l` before layer `l` runs (evicting
# least recently used ones), then serves the demand. A prefetched expert that is then used is a
# **prefetch hit**: its copy happened while something else computed. A prefetched expert evicted
# unused is **wasted**: a copy for nothing. Prefetching does not reduce the number of copies; it
# moves them off the critical path.

# %%
from moe_colab.analysis.simulate import simulate_prefetch

guesses = guess_experts(model, ids, count=E)          # all E guesses, best first; prefetch p uses the first p
print("k  p   hit ratio  prefetch hits  wasted  copies")
for k in (2, 4):
    for q in range(0, k + 1):
        r = simulate_prefetch(trace, guesses, k, q)
        print(f"{k}  {q}   {r['hit_ratio']:9.3f}  {r['prefetch_hits']:13d}  {r['prefetch_wasted']:6d}  "
              f"{r['misses'] + r['prefetches']:6d}")

# %% [markdown]
# ## 5. The engine with prefetching
# Now the engine with `experts_on_device=4, prefetch=2`, generating one token at a time as in
# notebook 03. Its counters: `prefetch_hits` (uses served by a prefetch), `prefetch_wasted`, and
# the bytes copied. Beside them, the simulator replays the same generated tokens with guesses
# computed by `guess_experts` from one forward pass over them; the engine made its own guesses
# step by step, so the two can differ where rounding flips a near-tie between two experts.

# %%
k, q = 4, 2
engine = moe_colab.load_model(rt.model, **rt.load_kwargs(experts_on_device=k, prefetch=q))
engine.reset_offload_stats()
run = moe_colab.record_routing(engine, ids[:1], max_new_tokens=63)
stats = engine.offload_stats()
sim = simulate_prefetch(run, guess_experts(model, run.token_ids, count=q), k, q)
assert stats["hits"] + stats["misses"] == run.num_layers * run.num_tokens * run.top_k
print(f"{'':10s} {'hits':>6s} {'misses':>6s} {'prefetch hits':>13s} {'wasted':>6s}")
for name, r in (("engine", stats), ("simulator", sim)):
    print(f"{name:10s} {r['hits']:6d} {r['misses']:6d} {r['prefetch_hits']:13d} {r['prefetch_wasted']:6d}")
print(f"engine: {stats['bytes_to_device'] / 2**20:.1f} MiB copied to the device")
del engine

# %% [markdown]
# ## 6. Try it
# The prefetch slider loads that many guessed experts of each layer early (LRU evicts to make
# room). Watch the hit ratio: with a small cache, prefetching too many guesses evicts experts
# that were about to be reused.

# %%
from moe_colab.notebook.widgets import cache_explorer

cache_explorer(trace, cache_size=2, prefetch=1, guesses=guesses)

# %% [markdown]
# ## Summary
# - The next layer's router on the current hidden state guesses the next layer's experts far
#   better than chance one layer ahead, and worse the further ahead it looks.
# - In front of an LRU cache, prefetched experts turn demand misses into prefetch hits whose
#   copies overlap computation; wrong guesses cost copies and can evict useful experts.
# - The engine's counters follow the simulator's on the same tokens.
#
# ## Exercises
# 1. With `cache_size=2`, which prefetch count gives the best hit ratio? Why not the largest?
# 2. Count the copies (misses + prefetches) for `k = 4` with and without prefetch: what does
#    speculative loading cost in PCIe traffic, and what does it buy?
# 3. The paper guessed 10 layers ahead too. If your model has enough layers, how fast does recall
#    fall with distance?
#
# ## What's next
# Back to the index: {{badge 00_index}}. The quantization notebook (05) and the full
# Mixtral-8x7B on a T4 (06) build on these two ideas.
