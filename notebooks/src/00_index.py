# %% [markdown]
# {{badge}}
#
# # moe_colab notebooks: Mixtral-8x7B on a free Colab T4, and why it works
#
# These notebooks take apart the two ideas of Eliseev & Mazur, *Fast Inference of
# Mixture-of-Experts Language Models with Offloading* (arXiv 2312.17238): keep only a few
# experts of each layer on the GPU in an **LRU cache**, and **guess the next layer's experts**
# early so their copies overlap computation. Each notebook measures one idea on a real model,
# and rebuilds the piece it explains by hand, checked against the library.
#
# ## Objectives
# - Know which notebook answers which question, and in which order to read them.
# - Do the arithmetic of Mixtral's experts that every later notebook leans on.
#
# ## What you need
# - Nothing but a browser: every notebook runs offline on a CPU runtime with the small `tiny`
#   model that ships inside `moe_colab`, each in under a minute. Click a badge to open a notebook
#   in Colab, or the link beside it to stay in JupyterLab or Binder.
# - For the real Mixtral-8x7B-Instruct: a Colab T4 GPU (free tier) and `USE_REAL_MIXTRAL = True`
#   at the top of a notebook (each notebook has its own flag). The first notebook run that way
#   downloads the paper authors' pre-quantized checkpoint (public, no token, about 18 GB in 257
#   files) and converts it on Colab's local disk, file by file (allow about an hour); every later
#   notebook reuses the result. The tokenizer comes from the `mistralai` repository, which is
#   gated: accept its conditions on the model page and add a Hugging Face token as Colab's
#   `HF_TOKEN` secret. Notebook 06 also shows how to quantize the original 93 GB checkpoint yourself.

# %%
USE_REAL_MIXTRAL = False   # True: Mixtral-8x7B-Instruct, only if a GPU is present (else `tiny` on CPU)

# %% tags=["setup"]

# %% [markdown]
# ## 1. The notebooks
#
# ![The notebooks and how they build on each other](figures/course_map.svg)
#
# | # | notebook | question | open |
# |---|---|---|---|
# | 01 | Router analysis | Which experts does each token pick, layer by layer? Is the load balanced? | {{badge 01_router_analysis}} |
# | 02 | Expert locality | Do nearby tokens reuse the same experts more often than chance? | {{badge 02_expert_locality}} |
# | 03 | LRU cache | How many expert loads does a small per-layer cache save, and which policy is best? | {{badge 03_lru_cache}} |
# | 04 | Speculative loading | How well does the next layer's router guess its experts, and when does prefetching pay? | {{badge 04_speculative_loading}} |
# | 05 | Mixed quantization | How small does HQQ make Mixtral (Table 1), what does a 2-bit matrix hold, what does it cost, what fits a T4? | {{badge 05_mixed_quantization}} |
# | 06 | Mixtral on a T4 | Plan, get the 2-bit weights, load offloaded, chat: how many tokens/s and cache hits? | {{badge 06_mixtral_on_a_t4}} |
# | 07 | Inside the engine | Where do the experts live, and what happens, in time, while one token is decoded? | {{badge 07_inside_the_engine}} |
#
# Read them in order: 02 explains why the cache of 03 works, 04 builds on 03, 05 shrinks the
# experts that 03 and 04 move, 06 runs all of it on the real Mixtral, and 07 opens the engine
# to watch copies and compute overlap.

# %% [markdown]
# ## 2. The numbers to keep in mind
#
# ![A Mixtral MoE layer: the router picks 2 of 8 experts per token](figures/moe_layer.svg)
#
# Mixtral-8x7B has 46.7B parameters, 45.1B of them in experts: 32 layers x 8 experts, each
# expert 3 x 4096 x 14336 = 176M parameters (352 MB, i.e. 336 MiB, in 16-bit). Each token uses
# 2 experts per layer, 64 expert uses per token. A T4 has 15 GiB of usable memory: the experts
# (84 GiB in 16-bit) do not fit, so most of them stay in host memory and are copied in when
# needed. The next cell does that arithmetic. (Sizes: GB = 10^9 bytes, GiB = 2^30 bytes.)

# %%
from moe_colab.config import MODEL_PRESETS

mixtral = MODEL_PRESETS["mixtral-8x7b"]
hidden, intermediate = mixtral["hidden_size"], mixtral["intermediate_size"]
layers, experts, top_k = mixtral["num_hidden_layers"], mixtral["num_local_experts"], mixtral["num_experts_per_tok"]
expert_params = 3 * hidden * intermediate          # w1, w3: [intermediate, hidden]; w2: [hidden, intermediate]
assert round(expert_params / 1e6, 1) == 176.2 and layers * top_k == 64   # the paper's numbers
print(f"one expert: {expert_params / 1e6:.1f}M parameters, {2 * expert_params / 1e6:.0f} MB "
      f"({2 * expert_params / 2**20:.0f} MiB) in 16-bit")
print(f"all experts: {layers * experts * expert_params / 1e9:.1f}B parameters, "
      f"{layers * experts * 2 * expert_params / 2**30:.1f} GiB in 16-bit")
print(f"expert uses per decoded token: {layers * top_k}")

# %% [markdown]
# ## Summary
# - Offloading works because consecutive tokens often reuse experts (02, 03) and because the
#   next layer's experts can be guessed early (04); quantization (05) makes each copy 5x smaller.
# - Every notebook runs on a CPU with `tiny`; set `USE_REAL_MIXTRAL = True` in a notebook on a
#   GPU for the real model (one shared download, reused by every notebook).
#
# ## Exercises
# 1. Decoding 100 tokens with Mixtral makes how many expert uses? If every use were a miss, how
#    many GB (10^9 bytes) of 16-bit experts would cross PCIe? Write the GB in `answer_1` below.
#
#    <details><summary>Hint 1</summary>
#
#    Uses per token are `layers * top_k`; each miss copies one expert of `2 * expert_params` bytes.
#    </details>
#    <details><summary>Solution 1</summary>
#
#    `100 * 64 = 6400` uses; `6400 * 2 * expert_params / 1e9` = 2255 GB: at a T4's ~12 GB/s
#    that is over three minutes per 100 tokens, which is why caching and prefetching matter.
#    </details>
#
# 2. Notebook 05 measures that the paper's 2-bit scheme stores 3.03 bits per expert weight,
#    codes, scales and zeros included. How many 2-bit experts would fit in a T4's 15 GiB if
#    nothing else needed memory? Write the count in `answer_2`.
#
#    <details><summary>Hint 2</summary>
#
#    One expert is `expert_params * 3.03 / 8` bytes; divide `15 * 2**30` by it and round down.
#    </details>
#    <details><summary>Solution 2</summary>
#
#    `int(15 * 2**30 / (expert_params * 3.03 / 8))` = 241 of the 256 experts. The trunk
#    (attention, embeddings), the KV cache and activations need room too, which is why notebook 06's
#    planner keeps 5 of 8 per layer (160) on the GPU.
#    </details>

# %%
from moe_colab.notebook.exercises import check

answer_1 = None   # GB for 100 tokens, all misses
answer_2 = None   # 2-bit experts in 15 GiB
check(answer_1, 100 * layers * top_k * 2 * expert_params / 1e9, name="exercise 1")
check(answer_2, int(15 * 2**30 / (expert_params * 3.03 / 8)), rel=0.005, name="exercise 2")

# %% [markdown]
# ## What's next
# Start with **01 Router analysis**: {{badge 01_router_analysis}}
