# %% [markdown]
# {{badge}}
#
# # 01 · Router analysis: which experts does each token pick?
#
# In a Mixtral layer, a small linear **router** scores the 8 experts for every token and only
# the best 2 run. Which 2 depends on the token and on the layer. This notebook records those
# choices on a real model and looks at them three ways: token by token, per layer (is the load
# balanced?) and per kind of token (do keywords, names and punctuation go to different experts?).
#
# ## Objectives
# - Record the routing of a prompt with `moe_colab.record_routing` and read a `RoutingTrace`.
# - Rebuild a router by hand (norm, linear, softmax, top-k) and check it against the library.
# - Explore the tokens × layers heatmap; measure the expert load per layer; relate token kinds to experts.
# - Preview how a per-layer expert cache would fare on these choices.
#
# ## What you need
# - Any CPU: the notebook uses the small `tiny` model shipped with `moe_colab` (well under a minute).
# - Optional: a GPU runtime and `USE_REAL_MIXTRAL = True` below for Mixtral-8x7B-Instruct (the
#   shared pre-quantized weights of notebook 00's "What you need"; the planner sizes the cache).

# %%
USE_REAL_MIXTRAL = False   # True: Mixtral-8x7B-Instruct, only if a GPU is present (else `tiny` on CPU)

# %% tags=["setup"]

# %% [markdown]
# ## 1. Load the model and its tokenizer
# `moe_colab.load_model` returns an ordinary transformers model whose experts live in host
# memory behind a small cache on the device. Routing does not depend on the cache, so any
# cache size gives the same trace.

# %%
import torch

import moe_colab

torch.manual_seed(0)
tokenizer = rt.tokenizer()      # tokenizer files only
model = rt.load_model()         # the notebook's one model: tiny, or the planned real Mixtral
cfg = model.config
E, K = cfg.num_local_experts, cfg.num_experts_per_tok
print(f"{rt.model}: {cfg.num_hidden_layers} layers, {E} experts per layer, top-{K} routing")

# %% [markdown]
# ## 2. Record the routing of a prompt
# `record_routing` hooks every layer's router during one forward pass and returns a
# `RoutingTrace`: `experts` and `weights`, both `[layers, tokens, top_k]`.

# %%
prompt = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
'''
ids = tokenizer(prompt, return_tensors="pt").input_ids
trace = moe_colab.record_routing(model, ids, tokenizer=tokenizer)
print(trace)
print("token 0, layer 0: experts", trace.experts[0, 0].tolist(), "weights", [round(w, 3) for w in trace.weights[0, 0].tolist()])

# %% [markdown]
# ### 2.1 A router by hand
#
# ![A Mixtral MoE layer: the router picks 2 of 8 experts per token](figures/moe_layer.svg)
#
# A Mixtral router is one matrix `W_gate` `[E, H]`. For each token it normalises the residual
# stream `h` with the layer's `post_attention_layernorm`, computes `logits = W_gate · norm(h)`,
# takes a softmax over the E experts, keeps the top-k, and rescales their weights to sum to 1.
# Below we do exactly that from the hidden states each layer's router saw, and check the result
# against the trace for every layer and token.

# %%
from moe_colab.analysis.prefetch_recall import layer_states

_, states = layer_states(model, ids)          # states["before"][l]: [T, H], what layer l's router sees
for l, layer in enumerate(model.model.layers):
    h = layer.post_attention_layernorm(states["before"][l])        # [T, H]
    logits = torch.nn.functional.linear(h, layer.mlp.gate.weight)   # h @ W_gate.T: [T, E]
    probs = logits.float().softmax(dim=-1)                          # [T, E]
    w, e = probs.topk(K, dim=-1)                                    # [T, K], best first
    w = w / w.sum(dim=-1, keepdim=True)
    assert torch.equal(e.cpu(), trace.experts[l]), f"layer {l}: the hand-made router disagrees"
    assert torch.allclose(w.cpu(), trace.weights[l], atol=1e-3), f"layer {l}: weights disagree"
print(f"the hand-made router matches record_routing at all {cfg.num_hidden_layers} layers")

# %% [markdown]
# ## 3. Tokens × layers
# Each column is one token; each layer has one thin row per choice: its top-1 expert, then its
# top-2 (so both chosen experts show), coloured by expert id. Hover over a cell to see the token
# text and both experts with their weights; drag to zoom into a stretch of tokens.
# Look for horizontal runs: consecutive tokens that keep an expert at the same layer. Those runs
# are what makes an expert cache work (notebooks 02 and 03).

# %%
from moe_colab.notebook.widgets import routing_heatmap, text_table

routing_heatmap(trace)

# %% [markdown]
# The same information as text (this is also what a run without a browser can read):

# %%
print(text_table(trace))

# %% [markdown]
# ## 4. Expert load per layer
# A balanced router sends each expert `1/E` of the uses. Mixtral was trained with a
# load-balancing loss, but balance over a long training corpus does not mean balance on one
# text. We route a longer text: two functions of `moe_colab.analysis.simulate`, code the model never saw.

# %%
import inspect

import moe_colab.analysis.simulate
from moe_colab.analysis.locality import expert_load
from moe_colab.notebook.widgets import expert_load_view

text = inspect.getsource(moe_colab.analysis.simulate.simulate_cache) + inspect.getsource(moe_colab.analysis.simulate.simulate_prefetch)
n = min(512, cfg.max_position_embeddings)
enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt", truncation=True, max_length=n)
long_trace = moe_colab.record_routing(model, enc.input_ids, tokenizer=tokenizer)
load = expert_load(long_trace)              # [layers, experts], each row sums to 1

# The same numbers by hand: count each expert's uses per layer.
by_hand = torch.stack([torch.bincount(long_trace.experts[l].flatten(), minlength=E) for l in range(cfg.num_hidden_layers)])
assert torch.allclose(load, by_hand / by_hand.sum(-1, keepdim=True))
for l in range(cfg.num_hidden_layers):
    print(f"layer {l:2d}: busiest expert {int(load[l].argmax())} serves {load[l].max():.0%} of uses, "
          f"idlest {int(load[l].argmin())} {load[l].min():.0%} (uniform: {1 / E:.0%})")
expert_load_view(long_trace)

# %% [markdown]
# ## 5. Kinds of token and their experts
# Python's own tokenizer tells us what each piece of the text is (keyword, identifier, number,
# string, comment, punctuation, whitespace). `category_expert_counts` counts, per layer, how
# often tokens of each kind used each expert. If experts specialised by syntax, rows would
# concentrate on one or two experts; the Mixtral paper (arXiv 2401.04088, section 5) saw such
# structure mostly for indentation and keywords, not for topics. Use the buttons to change layer.

# %%
from moe_colab.analysis.locality import CATEGORIES, category_expert_counts, token_categories
from moe_colab.notebook.widgets import category_view

offsets = [tuple(o) for o in enc.offset_mapping[0].tolist()]
kinds = token_categories(text, offsets)
counts = category_expert_counts(long_trace, kinds)          # [layers, categories, experts]
last = cfg.num_hidden_layers - 1
print(f"layer {last}: the expert most used by each kind of token, and how often it is in their top-{K}")
for c, name in enumerate(CATEGORIES):
    uses = counts[last, c]                                  # [E]: uses by tokens of this kind
    tokens_of_kind = int(uses.sum()) // K
    if tokens_of_kind >= 5:
        top = int(uses.argmax())
        print(f"{name:12s} {tokens_of_kind:4d} tokens: expert {top} in the top-{K} of {uses[top] / tokens_of_kind:4.0%} "
              f"of them (of all tokens: {load[last, top] * K:4.0%})")
category_view(counts, CATEGORIES)

# %% [markdown]
# ## 6. A first look at caching
# Offloading keeps only a few experts of each layer on the GPU. Move the sliders: **cache size**
# is how many experts per layer stay on the device, **prefetch** how many experts of the next
# layer are guessed and loaded early (notebook 04). The readout is the share of expert uses of
# the prompt above that found their expert already there (simulated; notebook 03 explains it).

# %%
from moe_colab.analysis.prefetch_recall import guess_experts
from moe_colab.notebook.widgets import cache_explorer

guesses = guess_experts(model, ids, count=E)     # [layers, tokens, E]: guesses for each layer, best first
explorer = cache_explorer(trace, cache_size=2, guesses=guesses)
explorer

# %% [markdown]
# ## Summary
# - A router is a linear layer, a softmax and a top-k: we rebuilt it by hand and matched
#   `record_routing` exactly.
# - Choices change from layer to layer, but consecutive tokens often keep an expert at the same
#   layer: the horizontal runs in the heatmap.
# - Load is uneven on a single text, and some token kinds lean on particular experts.
#
# ## Exercises
# 1. Change the prompt of section 2 to prose (or to another language) and compare the heatmap
#    with the code prompt: are the horizontal runs longer or shorter?
#
#    <details><summary>Hint 1</summary>
#
#    Set `prompt = "..."` and rerun the cells of sections 2 and 3; compare exercise 3's number too.
#    </details>
#    <details><summary>Solution 1</summary>
#
#    `tiny` was trained on Python only, so on prose its routers see text unlike anything they
#    learned; expect fewer and shorter runs (exercise 3's statistic drops towards chance). On the
#    real Mixtral, trained on both, runs appear in prose too.
#    </details>
#
# 2. Which layer has the most uneven load on the long text of section 4? Measure unevenness as
#    the busiest expert's share of uses. Write the layer number in `answer_2`.
#
#    <details><summary>Hint 2</summary>
#
#    `load` is `[layers, experts]`; `load.max(dim=1)` gives the busiest share per layer.
#    </details>
#    <details><summary>Solution 2</summary>
#
#    `int(load.max(dim=1).values.argmax())`. It changes with the text: route another text (e.g.
#    `inspect.getsource(moe_colab.analysis.locality)`) and the busiest layer may move.
#    </details>
#
# 3. Per layer, how often is a token's top-1 expert the previous token's top-1 expert? Average
#    over layers and write it in `answer_3`. How does it compare with chance (1/E)?
#
#    <details><summary>Hint 3</summary>
#
#    `top1 = long_trace.experts[:, :, 0]` is `[layers, tokens]`; compare `top1[:, 1:]` with `top1[:, :-1]`.
#    </details>
#    <details><summary>Solution 3</summary>
#
#    `(top1[:, 1:] == top1[:, :-1]).float().mean().item()`; on `tiny` it is well above `1/E`:
#    the horizontal runs of the heatmap, measured. Notebook 02 does this properly, for all top-k.
#    </details>

# %%
from moe_colab.notebook.exercises import check

answer_2 = None   # the layer with the most uneven load
answer_3 = None   # share of tokens keeping the previous token's top-1 expert, averaged over layers
top1 = long_trace.experts[:, :, 0]
check(answer_2, int(load.max(dim=1).values.argmax()), rel=0, name="exercise 2")
check(answer_3, (top1[:, 1:] == top1[:, :-1]).float().mean().item(), name="exercise 3")

# %% [markdown]
# ## What's next
# **02 Expert locality** measures those horizontal runs properly and compares them with chance
# and with the paper: {{badge 02_expert_locality}}
