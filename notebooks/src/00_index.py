# %% [markdown]
# {{badge}}
#
# # moe_colab notebooks: Mixtral-8x7B on a free Colab T4, and why it works
#
# These notebooks take apart the two ideas of Eliseev & Mazur, *Fast Inference of
# Mixture-of-Experts Language Models with Offloading* (arXiv 2312.17238): keep only a few
# experts of each layer on the GPU in an **LRU cache**, and **guess the next layer's experts**
# early so their copies overlap computation. Each notebook measures one idea on a real model.
#
# ## Objectives
# - Know which notebook answers which question, and in which order to read them.
# - Check that your runtime is ready (a T4 GPU on Colab, or any CPU for the small model).
#
# ## What you need
# - Nothing but a browser: every notebook runs offline on CPU with the small `tiny` model that
#   ships inside `moe_colab`, in a few minutes. Click a badge to open a notebook in Colab.
# - For the real Mixtral-8x7B: a Colab T4 GPU (free tier) and `USE_REAL_MIXTRAL = True` at the
#   top of a notebook.

# %%
USE_REAL_MIXTRAL = False   # True: Mixtral-8x7B-Instruct on a GPU (the other notebooks read this flag)

# %% tags=["setup"]

# %% [markdown]
# ## 1. The notebooks
#
# | # | notebook | question | open |
# |---|---|---|---|
# | 01 | Router analysis | Which experts does each token pick, layer by layer? Is the load balanced? | {{badge 01_router_analysis}} |
# | 02 | Expert locality | Do nearby tokens reuse the same experts more often than chance? | {{badge 02_expert_locality}} |
# | 03 | LRU cache | How many expert loads does a small per-layer cache save, and which policy is best? | {{badge 03_lru_cache}} |
# | 04 | Speculative loading | How well does the next layer's router, applied early, guess its experts? | {{badge 04_speculative_loading}} |
# | 05 | Mixed quantization | How small does HQQ make Mixtral (Table 1), what does a 2-bit matrix hold, what does it cost, what fits a T4? | {{badge 05_mixed_quantization}} |
# | 06 | Mixtral on a T4 | Plan, quantize shard by shard to Drive, load offloaded, chat: how many tokens/s and cache hits? | {{badge 06_mixtral_on_a_t4}} |
#
# Read them in order: 02 explains why the cache of 03 works, 04 builds on 03, 05 shrinks the
# experts that 03 and 04 move, and 06 runs all of it on the real Mixtral.

# %% [markdown]
# ## 2. The numbers to keep in mind
# Mixtral-8x7B has 46.7B parameters, 45.1B of them in experts: 32 layers x 8 experts, each
# expert 3 x 4096 x 14336 = 176M parameters (352 MB in 16-bit). Each token uses 2 experts per
# layer, 64 expert uses per token. A T4 has 16 GB: the experts do not fit, so most of them stay
# in host memory and are copied in when needed. The next cell does that arithmetic.

# %%
from moe_colab.config import MODEL_PRESETS

mixtral = MODEL_PRESETS["mixtral-8x7b"]
hidden, intermediate = mixtral["hidden_size"], mixtral["intermediate_size"]
layers, experts, top_k = mixtral["num_hidden_layers"], mixtral["num_local_experts"], mixtral["num_experts_per_tok"]
expert_params = 3 * hidden * intermediate          # w1, w3: [intermediate, hidden]; w2: [hidden, intermediate]
assert round(expert_params / 1e6, 1) == 176.2 and layers * top_k == 64   # the paper's numbers
print(f"one expert: {expert_params / 1e6:.1f}M parameters, {2 * expert_params / 1e6:.0f} MB in 16-bit")
print(f"all experts: {layers * experts * expert_params / 1e9:.1f}B parameters, "
      f"{layers * experts * 2 * expert_params / 1e9:.1f} GB in 16-bit")
print(f"expert uses per decoded token: {layers * top_k}")

# %% [markdown]
# ## Summary
# - Offloading works because consecutive tokens often reuse experts (02, 03) and because the
#   next layer's experts can be guessed early (04).
# - Every notebook runs on CPU with `tiny`; set `USE_REAL_MIXTRAL = True` on a GPU for the real model.
#
# ## Exercises
# 1. Open notebook 01 and find a token whose top-1 expert is the same in every layer.
# 2. Using the arithmetic above, how many experts per layer fit in 16 GB at 2.6 bits per parameter?
#
# ## What's next
# Start with **01 Router analysis**: {{badge 01_router_analysis}}
