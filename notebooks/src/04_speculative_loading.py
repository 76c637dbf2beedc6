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
# Figure 2, right), reproduces exactly what the engine's prefetching did, and weighs what it
# buys (copies hidden behind compute) against what it costs (wrong guesses).
#
# ![Speculative loading moves copies off the critical path](figures/prefetch_timeline.svg)
#
# ## Objectives
# - Make the guess by hand and check it against `moe_colab.analysis.prefetch_recall.guess_experts`.
# - Measure prefetch recall for 1, 2 (and more) layers ahead against chance.
# - Understand the engine's `guess_from="auto"` rule and reproduce the engine's counters exactly
#   with the simulator.
# - Compare hits, prefetch hits and bytes copied with and without prefetch, and say when
#   prefetching pays and when it costs.
#
# ## What you need
# - Any CPU (under a minute with `tiny`); optionally a GPU and `USE_REAL_MIXTRAL = True`
#   (Mixtral-8x7B-Instruct from the shared weights of notebook 00, cache sized by the planner).
# - Notebook 03: the LRU cache that prefetching feeds.

# %%
USE_REAL_MIXTRAL = False   # True: Mixtral-8x7B-Instruct, only if a GPU is present (else `tiny` on CPU)

# %% tags=["setup"]

# %% [markdown]
# ## 1. Model and text

# %%
import inspect

import torch

import moe_colab
import moe_colab.analysis.simulate

tokenizer = rt.tokenizer()      # tokenizer files only
model = rt.load_model()         # the notebook's one model: LRU cache + prefetch 2, guess_from="auto"
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

from moe_colab.notebook.widgets import show

P = curves["prefetch"]
fig = go.Figure([go.Scatter(x=P, y=curves["recall"][i].tolist(), mode="lines+markers", name=f"{a} layer(s) ahead")
                 for i, a in enumerate(curves["ahead"])])
fig.add_scatter(x=P, y=curves["chance"], mode="lines", name="random guess", line=dict(dash="dash"))
fig.update_layout(title=f"Prefetch recall ({rt.model}, {trace.num_tokens} tokens)", xaxis_title="experts pre-loaded",
                  yaxis_title="recall", yaxis_range=[0, 1.02], height=420)
for i, a in enumerate(curves["ahead"]):
    print(f"{a:2d} layer(s) ahead: " + "  ".join(f"p={q}: {r:.2f}" for q, r in zip(P, curves["recall"][i].tolist())))
show(fig)

# %% [markdown]
# ### 3.1 Which hidden state? The engine's `guess_from="auto"` rule
# The guess can read two hidden states of layer `l`: `"before"` (after attention, before the
# experts: known earliest, so the copies also overlap layer `l`'s expert compute) or `"after"`
# (the layer's output: closer to what layer `l+1` sees, but known only once layer `l` is done,
# and it costs a second host sync). Recall one layer ahead, per layer that makes the guess:

# %%
after = prefetch_recall(model, ids, ahead=1, source="after")
print("p:       " + "  ".join(f"{q:5d}" for q in P))
print("before:  " + "  ".join(f"{r:5.2f}" for r in curves["recall"][0].tolist()))
print("after:   " + "  ".join(f"{r:5.2f}" for r in after["recall"][0].tolist()))
print(f"\nwith p = {K} guesses, per guessing layer:")
for l in range(L - 1):
    print(f"  layer {l} -> {l + 1}: before {curves['per_layer'][0, l, K - 1]:.3f}   after {after['per_layer'][0, l, K - 1]:.3f}")

# %% [markdown]
# The gap is concentrated at the first layer: layer 0's experts change the residual stream the
# most (it starts as a bare token embedding), so a guess made before them is poor. Further on,
# "before" and "after" recall about the same, and "before" starts its copies earlier. So the
# engine's default, `guess_from="auto"` (`moe_colab.engine.prefetch.guess_source`), guesses
# from "after" at layer 0 and from "before" everywhere else:

# %%
from moe_colab.engine.prefetch import guess_source

rule = [guess_source("auto", l) for l in range(L - 1)]
print("guess for layer l+1, made at layer l, reads:", {f"{l}->{l + 1}": r for l, r in enumerate(rule)})
assert model.offload_options.guess_from == "auto"

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
# ## 5. The engine with prefetching, reproduced exactly
# Now the engine itself (loaded with `prefetch=2` and `guess_from="auto"`), generating one token
# at a time as in notebook 03. Its counters: `prefetch_hits` (uses served by a prefetch),
# `prefetches`, `prefetch_wasted` (evicted unused), and the bytes copied. Beside it, the
# simulator replays the same generated tokens with guesses made by the same rule: for layer
# `l+1`, from layer `l`'s "after" state when `guess_source("auto", l)` says so, else "before".
# Guessing from "before" everywhere (the library's plain default for `guess_experts`) is shown too:
# it does not match, because the engine does not guess that way at layer 0.

# %%
from moe_colab.analysis.simulate import simulate_cache

engine = model                                        # the one model
k, q = engine.moe_cache.experts_on_device, engine.offload_options.prefetch
cold = not engine.moe_cache.store.swap                # copy mode: the cache can be emptied
if cold:
    engine.moe_cache.clear()                          # start empty, as the simulator does
engine.reset_offload_stats()
run = moe_colab.record_routing(engine, ids[:1], max_new_tokens=63)
stats = engine.offload_stats()
assert stats["hits"] + stats["misses"] == run.num_layers * run.num_tokens * run.top_k


def engine_guesses(model, token_ids, count, guess_from="auto"):
    """Guesses for layer l (made at layer l-1) from the hidden state the engine's rule names."""
    by_source = {src: guess_experts(model, token_ids, count=count, source=src) for src in ("before", "after")}
    g = by_source["before"].clone()
    for l in range(1, g.shape[0]):
        g[l] = by_source[guess_source(guess_from, l - 1)][l]
    return g


sim = simulate_prefetch(run, engine_guesses(model, run.token_ids, q), k, q)
naive = simulate_prefetch(run, guess_experts(model, run.token_ids, count=q), k, q)
keys = ("hits", "misses", "prefetch_hits", "prefetches", "prefetch_wasted")
print(f"{'':24s}" + "".join(f"{c:>15s}" for c in keys))
for name, r in (("engine", stats), ("simulator, auto rule", sim), ("simulator, all 'before'", naive)):
    print(f"{name:24s}" + "".join(f"{r[c]:15d}" for c in keys))
if cold:
    assert all(stats[c] == sim[c] for c in keys), "the simulator with the engine's rule should match it exactly"
    print("the simulator with guess_from='auto' reproduces every counter of the engine")
else:   # swap mode (the real Mixtral on a T4): every slot holds an expert, so the cache cannot start empty
    print("swap mode: the engine's cache started full, the simulator's empty; they differ by the first tokens")

# %% [markdown]
# ### 5.1 With and without prefetch, on the same tokens
# Notebook 03 showed that the engine without prefetch does exactly what `simulate_cache`
# predicts, so the left column replays the same generated tokens through LRU alone (on `tiny`
# the cell also runs a second, prefetch-free engine to confirm it). Every copy moves one expert
# buffer.

# %%
per_copy = stats["bytes_to_device"] // (stats["misses"] + stats["prefetches"])
lru = simulate_cache(run, k, "lru")
without = dict(hits=lru["hits"], misses=lru["misses"], prefetch_hits=0, prefetches=0, prefetch_wasted=0)
if not rt.real_mixtral:                       # tiny: check the left column on a real engine too
    plain = rt.load_model(prefetch=0)
    again = moe_colab.record_routing(plain, ids[:1], max_new_tokens=63)
    assert torch.equal(again.experts, run.experts)           # same tokens, same routing
    assert (plain.offload_stats()["hits"], plain.offload_stats()["misses"]) == (lru["hits"], lru["misses"])
    del plain
rows = [("hits", without["hits"], stats["hits"]), ("  of which prefetch hits", 0, stats["prefetch_hits"]),
        ("misses (demand copies)", without["misses"], stats["misses"]),
        ("prefetches (guessed copies)", 0, stats["prefetches"]),
        ("  of which wasted", 0, stats["prefetch_wasted"]),
        ("copies in all", without["misses"], stats["misses"] + stats["prefetches"])]
print(f"{'':30s} {'no prefetch':>12s} {f'prefetch {q}':>12s}")
for name, a, b in rows:
    print(f"{name:30s} {a:12d} {b:12d}")
mib = lambda copies: copies * per_copy / 2**20                       # noqa: E731
print(f"{'MiB copied to the device':30s} {mib(without['misses']):12.1f} {stats['bytes_to_device'] / 2**20:12.1f}")

# %% [markdown]
# ### 5.2 When prefetching pays, and when it costs
# Read the table with the timeline of the paper's section 3.2 in mind (the figure at the top):
# - **It pays** for every prefetch hit: that expert's copy ran while the previous layer
#   computed, so the layer found it resident instead of stalling on a demand copy. Demand misses
#   are what the compute stream waits for.
# - **It costs** in two ways. Every wrong guess is a copy for nothing (`prefetch_wasted`, and the
#   extra MiB above). And a guess occupies a slot: it evicts an expert that LRU alone would have
#   kept, so some hits of the left column become misses.
# - Whether it pays is the balance of the two, and the table says which won here: compare the
#   demand misses of the two columns (the cell below prints the verdict). With few slots per
#   layer and guesses as good as this model's, the evictions can outweigh the prefetch hits; the
#   paper measured it paying on Mixtral (its Table 2, T4 at 2-bit: 2.092 tokens/s with
#   pre-loading, 1.567 without).
# - On a GPU the copy stream is one queue: a wasted prefetch issued before a demand copy delays
#   it. Prefetching is a bet that guesses are right often enough (recall, section 3) and that
#   the copy link has spare time (notebook 07 draws it).
#
# The same numbers as waiting time. A demand miss waits for about one copy; a prefetched expert
# waits for nothing if its copy finished behind compute. At a T4's ~12 GB/s (pinned, in
# practice), one expert of the real Mixtral at paper-2bit (notebook 05 builds its buffer) takes:

# %%
from moe_colab.config import mixtral_config
from moe_colab.quant import QuantConfig
from moe_colab.quant.format import expert_format

mixtral_expert = expert_format(mixtral_config("mixtral-8x7b"), QuantConfig(4, 2), torch.float16).layout.nbytes
t4_copy_ms = mixtral_expert / 12e9 * 1e3
print(f"one paper-2bit Mixtral expert: {mixtral_expert / 1e6:.1f} MB -> {t4_copy_ms:.1f} ms at 12 GB/s")
tokens = run.num_tokens
for name, misses, copies in (("no prefetch", without["misses"], without["misses"]),
                             (f"prefetch {q}", stats["misses"], stats["misses"] + stats["prefetches"])):
    print(f"{name:12s}: {misses / tokens:5.2f} demand misses per token -> ~{misses / tokens * t4_copy_ms:5.1f} ms of "
          f"waiting per token at T4 rates; {copies / tokens:5.2f} copies per token on the link")
print("(these are this model's counts at Mixtral's copy size: a rate, not a measurement of Mixtral)")
if stats["misses"] < without["misses"]:
    print(f"here prefetching paid: {without['misses'] - stats['misses']} fewer demand misses, "
          f"for {stats['prefetches']} extra copies")
else:
    print(f"here prefetching cost: {stats['misses'] - without['misses']} more demand misses and "
          f"{stats['prefetches']} extra copies; its guesses evicted more than they brought in time")

# ## 6. Try it
# The prefetch slider loads that many guessed experts of each layer early (LRU evicts to make
# room). Watch the hit ratio and the timeline as you change the cache size and the prefetch
# count, then answer exercise 1.

# %%
from moe_colab.notebook.widgets import cache_explorer

cache_explorer(trace, cache_size=2, prefetch=1, guesses=guesses)

# %% [markdown]
# ## Summary
# - The next layer's router on the current hidden state guesses the next layer's experts far
#   better than chance one layer ahead, and worse the further ahead it looks.
# - Layer 0 is the exception: its guess must read the state after its experts. The engine's
#   `guess_from="auto"` does exactly that, and with the same rule the simulator reproduces every
#   counter of the engine.
# - Prefetching turns demand misses (stalls) into prefetch hits (copies hidden behind compute),
#   and costs wasted copies and slots taken from experts LRU would have kept. Section 5.1 showed
#   which side won on this model, with the engine's own counters; the paper measured it paying on
#   Mixtral (Table 2).
#
# ## Exercises
# 1. With `cache_size = 2`, simulate prefetch counts 0, 1 and 2 (section 4's table has them).
#    Which count gives the best hit ratio here, and what does it cost in copies? Write the best
#    count in `answer_1`.
#
#    <details><summary>Hint 1</summary>
#
#    `simulate_prefetch(trace, guesses, 2, p)` for `p` in `0..2`; compare `hit_ratio`, and
#    `misses + prefetches` for the copies.
#    </details>
#    <details><summary>Solution 1</summary>
#
#    `max(range(3), key=lambda p: simulate_prefetch(trace, guesses, 2, p)["hit_ratio"])`. On
#    `tiny` the largest count has the best hit ratio, but it also makes the most copies: a
#    higher hit ratio is not free. With a cache of 2, two guesses fill every slot, so whenever a
#    guess is wrong the token's other expert has just been evicted.
#    </details>
#
# 2. In section 5.1, by what factor did prefetching multiply the copies (all copies with
#    prefetch, divided by copies without)? Write it in `answer_2`. What did those copies buy?
#
#    <details><summary>Hint 2</summary>
#
#    The last row of the table: `(stats["misses"] + stats["prefetches"]) / without["misses"]`.
#    </details>
#    <details><summary>Solution 2</summary>
#
#    The check below confirms the ratio once you answer. What they bought is
#    `without["misses"] - stats["misses"]` fewer demand misses, the copies a layer waits for;
#    if that number is negative, as it can be with few slots, the guesses cost more than they
#    saved. Whether extra copies slow a token also depends on whether the link has spare time:
#    notebook 07 draws it.
#    </details>
#
# 3. The paper's Figure 2 (right) guesses 1, 2 and 10 layers ahead. On this model, how much
#    recall (with `p = top_k` guesses) is lost going from 1 to 2 layers ahead? Write the
#    difference in `answer_3`.
#
#    <details><summary>Hint 3</summary>
#
#    `curves["recall"]` has one row per `ahead` value (`curves["ahead"]`), column `p - 1`.
#    </details>
#    <details><summary>Solution 3</summary>
#
#    `curves["recall"][0, K - 1] - curves["recall"][1, K - 1]` (if the model has more than two
#    layers). The residual stream drifts with every layer, so guesses made further ahead are worse.
#    </details>

# %%
from moe_colab.notebook.exercises import check

answer_1 = None   # best prefetch count with a cache of 2
answer_2 = None   # copies with prefetch / copies without
answer_3 = None   # recall lost from 1 to 2 layers ahead
check(answer_1, max(range(3), key=lambda p: simulate_prefetch(trace, guesses, 2, p)["hit_ratio"]), rel=0,
      name="exercise 1")
check(answer_2, (stats["misses"] + stats["prefetches"]) / without["misses"], name="exercise 2")
if len(curves["ahead"]) > 1:
    check(answer_3, (curves["recall"][0, K - 1] - curves["recall"][1, K - 1]).item(), rel=0.05, abs_tol=0.005,
          name="exercise 3")

# %% [markdown]
# ## What's next
# **05 Mixed quantization** makes every copy counted here about five times smaller:
# {{badge 05_mixed_quantization}}. To watch copies and compute overlap in time, see
# **07 Inside the engine**: {{badge 07_inside_the_engine}}
