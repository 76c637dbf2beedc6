# %% [markdown]
# {{badge}}
#
# # 08 · Beyond Mixtral: Qwen3-MoE, gpt-oss, DeepSeek and the others
#
# Mixtral has 8 experts per layer and uses 2 of them per token. The MoE models people run today
# look different: Qwen3-30B-A3B has 128 experts per layer and uses 8, each expert small
# (3 × 2048 × 768); DeepSeek-V2-Lite adds shared experts every token uses and a dense first
# layer; gpt-oss-20b publishes its experts in 4-bit MXFP4, with biases and a clamped SwiGLU.
# moe_colab handles each through an *adapter* (`moe_colab/adapters/`, checklist in
# `docs/adapters.md`); the engine, the planner and the tools are the same. This notebook builds a
# small Qwen3-MoE here, offline, runs it through the engine, measures how routing over 128 experts
# differs from Mixtral's, and reads the T4 plans of every supported family.
#
# ## Objectives
# - Make a small random Qwen3-MoE with transformers, load it with its experts offloaded, and check
#   the tokens against transformers' own `Qwen3MoeForCausalLM`.
# - Compare routing over 128 experts, top-8, with `tiny`'s 8 experts, top-2: reuse against
#   chance, and the hit ratio against the share of experts cached.
# - Check that the engine counts what the simulator predicts, for the new family too.
# - Read the planner's verdict for a free T4 for every preset, and the Colab path for
#   Qwen3-30B-A3B (behind a flag, as in notebook 06).
#
# ## What you need
# - Any CPU (about a minute): the Qwen3-MoE here is random and small (4 layers, 128 experts of
#   width 32) and is made in the notebook; nothing is downloaded.
# - For the real Qwen3-30B-A3B: a Colab T4 runtime and `USE_REAL_QWEN3 = True` (about 61 GB
#   downloaded shard by shard and quantized to 4-bit experts on the T4; allow an hour or more).
# - Notebooks 03 (the LRU cache) and 04 (speculative loading); 06 for the Colab path.

# %%
USE_REAL_MIXTRAL = False   # this notebook compares with the shipped `tiny` (Mixtral architecture)
USE_REAL_QWEN3 = False     # True: Qwen3-30B-A3B at 4-bit experts, only if a GPU is present (section 5)

# %% tags=["setup"]

# %% [markdown]
# ## 1. A Qwen3-MoE of our own
#
# ![One MoE layer: router, top-k experts, weighted sum](figures/moe_layer.svg)
#
# Qwen3-MoE's block is Mixtral's with other numbers: a router (softmax over all experts in
# float32, then top-k, then renormalised), experts with a gate, an up and a down matrix. Its
# config names differ (`num_experts`, `moe_intermediate_size`), some layers can be dense
# (`mlp_only_layers`), and `head_dim` is set explicitly. We make one with transformers itself,
# with `tiny`'s vocabulary so that its tokenizer works, sharpen its routers (random routers are
# nearly uniform; a trained one is decisive), and save it as the Hub would serve it.

# %%
import tempfile

import torch
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

import moe_colab
from moe_colab.adapters import adapter_for

tokenizer = AutoTokenizer.from_pretrained(moe_colab.model_path("tiny"))
config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, moe_intermediate_size=32,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, mlp_only_layers=[],
                        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                        pad_token_id=3)
torch.manual_seed(0)
reference = Qwen3MoeForCausalLM(config).eval()
with torch.no_grad():
    for layer in reference.model.layers:
        layer.mlp.gate.weight.mul_(30)               # decisive routing, input-dependent
qwen_dir = tempfile.mkdtemp(prefix="qwen3_small_")
reference.save_pretrained(qwen_dir)
ad = adapter_for(config)
print(f"{type(ad).__name__}: {ad.num_layers(config)} MoE layers x {ad.num_experts(config)} experts, "
      f"top-{ad.top_k(config)}, one expert {ad.expert_shapes(config)}")

# %% [markdown]
# The engine loads it like any checkpoint: the adapter reads the per-expert tensors
# (`mlp.experts.{e}.gate_proj.weight`, ...) into packed expert buffers, and 32 of each layer's 128
# experts get a device slot. Greedy tokens must be the ones transformers' own class produces.

# %%
model = moe_colab.load_model(qwen_dir, device="cpu", dtype=torch.float32, experts_on_device=32, prefetch=4,
                             progress=False)
prompt = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
ours = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=3)
theirs = reference.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=3)
assert torch.equal(ours, theirs), "the offloaded model must match transformers' Qwen3MoeForCausalLM"
print("token-identical with transformers:", ours[0, prompt.shape[1]:].tolist())
print(model.offload_stats())

# %% [markdown]
# ## 2. Routing over 128 experts, top-8
#
# ![Reuse: the same experts for nearby tokens](figures/reuse.svg)
#
# Record which experts every layer chose for a piece of Python source, in both models, and ask
# notebook 02's question: how often does a token reuse an expert of the previous token? With 8 of
# 128 chosen at random, two tokens share at least one expert with probability
# 1 - C(120, 8) / C(128, 8), and on average 8/128 of a token's experts.

# %%
import inspect

import moe_colab.analysis.simulate
from moe_colab.analysis.locality import chance_reuse, reuse_probability

text = inspect.getsource(moe_colab.analysis.simulate.simulate_cache)
ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=200).input_ids
tiny = moe_colab.load_model("tiny", device="cpu", dtype=torch.float32, experts_on_device=8, prefetch=0,
                            progress=False)
traces = {"tiny (8 experts, top-2)": moe_colab.record_routing(tiny, ids, tokenizer=tokenizer),
          "Qwen3-MoE here (128, top-8)": moe_colab.record_routing(model, ids, tokenizer=tokenizer)}
print(f"{'model':28s} {'reuse any':>10s} {'chance':>7s} {'reuse share':>12s} {'chance':>7s}")
for name, tr in traces.items():
    any_ = reuse_probability(tr, 1, "any")[:, 0].mean().item()
    frac = reuse_probability(tr, 1, "fraction")[:, 0].mean().item()
    print(f"{name:28s} {any_:10.3f} {chance_reuse(tr.num_experts, tr.top_k):7.3f} {frac:12.3f} "
          f"{chance_reuse(tr.num_experts, tr.top_k, 'fraction'):7.3f}")

# %% [markdown]
# Read the columns against their chance values. "Reuse any" is already 0.41 by chance with eight
# picks of 128 (0.46 for two of 8): it says little. The share of a token's experts that the next
# token reuses is what a cache feels, and its chance value drops from 2/8 to 8/128. Both models
# reuse far more than chance. Our Qwen3 is random: its reuse comes from the input alone (the
# residual stream of nearby tokens is alike, and so is what the routers see); a trained model's
# routing has more structure (`tiny` is trained), so measure before trusting these numbers.
#
# What matters on a T4 is the hit ratio of an LRU cache holding a *share* of each layer's experts.
# The simulator (notebook 03) answers for both traces on one axis:

# %%
import plotly.graph_objects as go

from moe_colab import simulate_cache
from moe_colab.notebook import widgets as W

fig = go.Figure()
table = {}
for name, tr in traces.items():
    E = tr.num_experts
    sizes = sorted({max(tr.top_k, round(E * s / 8)) for s in range(1, 9)})
    ratios = [simulate_cache(tr, k, "lru")["hit_ratio"] for k in sizes]
    table[name] = dict(zip(sizes, ratios))
    fig.add_trace(go.Scatter(x=[k / E for k in sizes], y=ratios, mode="lines+markers", name=name))
fig.update_layout(title="LRU hit ratio against the share of a layer's experts cached",
                  xaxis_title="experts cached / experts per layer", yaxis_title="hit ratio", yaxis_range=[0, 1])
W.show(fig)

# %% [markdown]
# ## 3. The engine counts what the simulator predicts
#
# The same check as notebook 03, on the new family: decode with the engine, record the trace of
# exactly those tokens, replay it in the simulator with the same cache size and no prefetch.

# %%
engine = moe_colab.load_model(qwen_dir, device="cpu", dtype=torch.float32, experts_on_device=24, prefetch=0,
                              progress=False)
engine.reset_offload_stats()
trace = moe_colab.record_routing(engine, prompt[:, :1], max_new_tokens=24)
stats, sim = engine.offload_stats(), simulate_cache(trace, 24, "lru")
print(f"engine: {stats['hits']} hits, {stats['misses']} misses; simulator: {sim['hits']} hits, {sim['misses']} misses")
assert (stats["hits"], stats["misses"]) == (sim["hits"], sim["misses"])

# %% [markdown]
# ## 4. What fits on a free T4, family by family
#
# ![A free Colab T4: what goes where](figures/t4_plan.svg)
#
# `moe_colab.plan` knows every preset's shapes (checked against transformers' config classes):
# dense layers and shared experts go to the trunk, DeepSeek's MLA caches a compressed latent,
# gpt-oss's sliding layers keep 128 tokens. Here is the verdict for a free T4 (15 GiB GPU,
# 12.7 GB RAM) at 4-bit and 3-bit experts; a refusal points to `docs/scaling.md`.

# %%
from moe_colab.config import FAMILY_PRESETS, preset_names
from moe_colab.planner import COLAB_T4, PlanError

print(f"{'preset':20s} {'scheme':11s} verdict")
for name in sorted(FAMILY_PRESETS) + ["mixtral-8x7b"]:
    for quant in ("attn4-exp4", "attn4-exp3"):
        try:
            p = moe_colab.plan(name, quant, device="cuda", **COLAB_T4)
            print(f"{name:20s} {quant:11s} {p.experts_on_device:3d} of {p.num_experts} per layer, "
                  f"{'swap' if p.swap else 'copy'} mode, one expert {p.expert_bytes / 2**20:.2f} MiB")
        except PlanError as e:
            print(f"{name:20s} {quant:11s} refused: {str(e).splitlines()[1].strip()[:70]}")
qwen_t4 = moe_colab.plan("qwen3-30b-a3b", "attn4-exp4", device="cuda", **COLAB_T4)
qwen_t4

# %% [markdown]
# Qwen3-30B-A3B at 4-bit experts is about 16 GB: it fits neither next to its trunk on the GPU nor
# in 12.7 GB of RAM, so the planner keeps about 105 of each layer's 128 experts on the GPU and
# swaps the rest. A token then misses only a few small experts (2.4 MB each) per layer, but it
# runs 48 × 8 = 384 experts: on the GPU the engine runs a layer's selected low-bit experts as one
# grouped launch per matrix (`engine/batched.py`), not 24 launches.

# %% [markdown]
# ## 5. The real Qwen3-30B-A3B on a Colab T4
#
# With `USE_REAL_QWEN3 = True` on a GPU runtime, the cell below quantizes the original checkpoint
# from the Hub shard by shard onto Colab's local disk (4-bit attention and experts; resumable after
# a disconnect), loads it through the planner and chats. Without a GPU it only prints the plan.

# %%
import os

from moe_colab.notebook.runtime import in_colab

if USE_REAL_QWEN3 and torch.cuda.is_available():
    from moe_colab.convert.hub import quantize_from_hub
    root = "/content" if in_colab() else os.path.expanduser("~/.cache/moe_colab")
    qdir = quantize_from_hub("Qwen/Qwen3-30B-A3B", f"{root}/qwen3-30b-a3b-attn4-exp4", "attn4-exp4",
                             scratch=f"{root}/shards")
    qwen = moe_colab.load_model(qdir, device="cuda", dtype=torch.float16, experts_on_device="auto")
    qtok = AutoTokenizer.from_pretrained("Qwen/Qwen3-30B-A3B")
    chat = qtok.apply_chat_template([{"role": "user", "content": "Write a haiku about offloading."}],
                                    add_generation_prompt=True, return_tensors="pt").to("cuda")
    out = qwen.generate(chat, max_new_tokens=64, do_sample=False)
    print(qtok.decode(out[0, chat.shape[1]:], skip_special_tokens=True))
    print(qwen.offload_stats())
else:
    print("USE_REAL_QWEN3 is off (or no GPU): the real path would load", qwen_t4.verdict())

# %% [markdown]
# ## Summary
# - A family is an adapter: which layers are MoE, where the router is and how it scores, what the
#   block adds (shared experts) and returns, the expert's shapes and activation, the checkpoint's
#   names (per-expert, fused or MXFP4). The engine, planner and tools do not change.
# - The offloaded Qwen3-MoE gives transformers' own tokens; the engine's counters equal the
#   simulator's, as for Mixtral.
# - With 128 experts and top-8, "a token reuses some expert" happens 41 % of the time by chance;
#   the share of experts reused (chance 8/128) and the hit ratio per share of experts cached are
#   the numbers to read.
# - On a free T4, Qwen3-30B-A3B at 4-bit experts keeps about 105 of 128 experts per layer on the
#   GPU in swap mode; OLMoE, DeepSeek-V2-Lite and Qwen1.5-MoE fit whole; Phi-3.5-MoE needs 3-bit.
#
# ## Exercises
# 1. Compute by hand the chance that two tokens of a 128-expert, top-8 layer share at least one
#    expert, and write it in `answer_1`.
#
#    <details><summary>Hint 1</summary>
#
#    Count the top-8 sets disjoint from a given one: C(120, 8) of C(128, 8). `math.comb` helps.
#    </details>
#    <details><summary>Solution 1</summary>
#
#    `1 - math.comb(120, 8) / math.comb(128, 8)`, about 0.41: `chance_reuse(128, 8)`.
#    </details>
#
# 2. In the Qwen3-30B-A3B T4 plan above, how many megabytes would one token copy if its hit ratio
#    were 0.8 (48 layers, 8 experts each, `qwen_t4.expert_bytes` per expert)? Write it in `answer_2`.
#
#    <details><summary>Hint 2</summary>
#
#    Misses per token = 48 × 8 × (1 - 0.8); each copies one expert buffer.
#    </details>
#    <details><summary>Solution 2</summary>
#
#    `48 * 8 * 0.2 * qwen_t4.expert_bytes / 1e6`, about 192 MB: at a T4's ~12 GB/s, 16 ms of
#    copies per token, so copies alone would allow about 60 tokens/s.
#    </details>
#
# ## What's next
# - `docs/adapters.md`: the hooks and the checklist to add a family.
# - `docs/scaling.md`: vLLM and SGLang commands when one GPU is not enough.
# - {{badge 06_mixtral_on_a_t4}} for the full Colab walk-through with Mixtral.

# %%
import math

from moe_colab.notebook.exercises import check

answer_1 = None   # your number
check(answer_1, chance_reuse(128, 8), name="answer_1")
answer_2 = None   # your number, in MB
check(answer_2, 48 * 8 * 0.2 * qwen_t4.expert_bytes / 1e6, name="answer_2")
assert math.isclose(chance_reuse(128, 8), 1 - math.comb(120, 8) / math.comb(128, 8))
