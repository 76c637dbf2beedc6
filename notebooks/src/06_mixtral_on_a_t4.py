# %% [markdown]
# {{badge}}
#
# # 06 · Mixtral-8x7B-Instruct on a free Colab T4
#
# Everything so far, put together: plan the memory, get 2-bit weights onto the machine, load the
# model with its experts offloaded, chat with it while the tokens stream, and read what the
# expert cache did. Mixtral-8x7B has 46.7B parameters (87 GB in 16-bit); a free Colab has a
# 15 GB T4 and 12.7 GB of RAM. The paper (arXiv 2312.17238) made it fit with 4-bit attention,
# 2-bit experts and an LRU cache of experts on the GPU, and measured 2.09 tokens/s on a T4.
#
# ## Objectives
# - Ask `moe_colab.plan` what fits before allocating anything, and read why 16-bit cannot.
# - Quantize the original checkpoint shard by shard into Google Drive (resumable), or convert
#   the paper authors' own 2-bit checkpoint.
# - Load with the planned number of experts per layer, chat with streaming, and measure the
#   cache's hit ratio and the tokens per second.
#
# ## What you need
# - Any CPU: without a GPU the same cells run on the small `tiny` model (16-bit, a minute) and
#   say so. With `USE_REAL_MIXTRAL = True` on a T4 GPU runtime: the first run downloads ~93 GB
#   one shard at a time and quantizes it (allow an hour or more; Google Drive keeps the result,
#   and a disconnected run resumes where it stopped). Later runs load from Drive in minutes.

# %%
USE_REAL_MIXTRAL = False   # True: Mixtral-8x7B-Instruct, only if a GPU is present (else `tiny` on CPU)

# %% [setup]

# %% [markdown]
# ## 1. The plan, before anything is allocated
# A model needs GPU memory for its trunk (embeddings, attention, norms, routers), for the expert
# slots (layers × experts per layer × one packed expert), for the KV cache and for activations;
# and host memory for the experts that are not on the GPU. `moe_colab.plan` adds these up from
# the shapes alone. Here are its verdicts for Mixtral-8x7B on a T4, for each scheme:

# %%
import torch

import moe_colab
from moe_colab.planner import COLAB_T4, PlanError

for quant in (None, "paper-3bit", "paper-2bit"):
    try:
        p = moe_colab.plan("mixtral-8x7b", quant=quant, device="cuda", **COLAB_T4)
        print(f"{p.scheme:>10}: fits, {p.experts_on_device} of 8 experts per layer on the GPU"
              f"{' (swap mode)' if p.swap else ''}, GPU {p.device_total / 2**30:.1f} GiB")
    except PlanError as e:
        print(f"{quant or '16-bit':>10}: refused: {str(e).splitlines()[1].strip()}")

# %% [markdown]
# The full table of the 2-bit plan. **Swap mode** means an expert lives either on the GPU or
# in host memory, never both: 12.7 GB of RAM cannot hold all 256 experts next to the rest.

# %%
moe_colab.plan("mixtral-8x7b", quant="paper-2bit", device="cuda", **COLAB_T4)

# %% [markdown]
# And why 16-bit is refused: the error names the numbers and what to change. `load_model` checks
# the same way, so a model that cannot fit stops here instead of crashing the runtime.

# %%
try:
    moe_colab.plan("mixtral-8x7b", quant=None, device="cuda", **COLAB_T4)
except PlanError as e:
    print(e)

# %% [markdown]
# ## 2. Weights for this machine
# On a GPU with `USE_REAL_MIXTRAL = True`: quantize the original checkpoint one shard at a time
# (download a shard, quantize it, keep the finished layers, delete the shard). The result goes to
# Google Drive if it is mounted, so it survives the runtime; rerunning the cell resumes.
# `WEIGHTS = "authors"` converts the 2-bit checkpoint the paper's authors published instead
# (their HQQ 0.1 groups differ from ours, so it is dequantized and quantized again).
#
# Without a GPU the notebook uses `tiny`, unquantized: the cells below run the same way.

# %%
from pathlib import Path

WEIGHTS = "original"           # "original": quantize mistralai's checkpoint; "authors": convert theirs
if rt.real_mixtral:
    drive = Path("/content/drive/MyDrive")
    if rt.colab and not drive.exists():
        from google.colab import drive as gdrive
        gdrive.mount("/content/drive")
    out = (drive if drive.exists() else Path("/content")) / "moe_colab" / f"mixtral-8x7b-instruct-2bit-{WEIGHTS}"
    if WEIGHTS == "authors":
        from moe_colab.quant.authors_format import convert_authors_checkpoint
        weights = convert_authors_checkpoint(out, quant="paper-2bit", scratch="/content/shards")
    else:
        from moe_colab.hub import quantize_from_hub
        weights = quantize_from_hub("mistralai/Mixtral-8x7B-Instruct-v0.1", out, "paper-2bit",
                                    scratch="/content/shards")
    quant = "paper-2bit"
else:
    weights, quant = rt.model, None
    print(f"no GPU (or USE_REAL_MIXTRAL = False): using {rt.model!r}, unquantized, on {rt.device}")
print("weights:", weights)

# %% [markdown]
# ## 3. Plan for this machine, then load
# Now with this machine's measured free GPU and host memory. `plan(...).load_kwargs()` gives
# the number of experts per layer and the mode to pass to `load_model`.

# %%
from transformers import AutoTokenizer

from moe_colab.checkpoint import resolve

p = moe_colab.plan(weights, quant=quant, device=rt.device, dtype=rt.dtype)
print(p)
model = moe_colab.load_model(weights, device=rt.device, dtype=rt.dtype, prefetch=2, **p.load_kwargs())
has_tokenizer = (resolve(weights) / "tokenizer_config.json").is_file()
tokenizer = AutoTokenizer.from_pretrained(resolve(weights) if has_tokenizer else "mistralai/Mixtral-8x7B-Instruct-v0.1")
print(f"loaded: {model.moe_cache.experts_on_device} experts per layer on {rt.device}, "
      f"{model.moe_cache.device_bytes / 2**30:.2f} GiB of expert slots")

# %% [markdown]
# ## 4. Chat, with the tokens streaming in
# `generate` is transformers' own; a `TextStreamer` prints each token as it is decoded. The
# conversation is kept in `history`, so you can call `chat(...)` again with a follow-up.

# %%
import time

from transformers import TextStreamer

history = []


def chat(text, max_new_tokens=64 if rt.real_mixtral else 32):
    history.append({"role": "user", "content": text})
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:                        # tiny has no chat template: plain text
        ids = tokenizer("\n".join(m["content"] for m in history), return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = model.generate(ids.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                         streamer=streamer, pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    history.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
    return len(new), seconds


model.reset_offload_stats()
n, seconds = chat("Write a Python function that checks whether a number is prime.")
print(f"\n{n} tokens in {seconds:.1f} s: {n / seconds:.2f} tokens/s (prompt included)")

# %% [markdown]
# ## 5. What the expert cache did
# Every token needs `top_k` experts in each layer. A **hit** found its expert already on the
# GPU (by the LRU cache or a prefetch); a **miss** waited for a copy. The paper's LRU cache
# reached roughly half hits on Mixtral (its Figure 2; secondary sources quote 40-60%).

# %%
stats = model.offload_stats(per_layer=True)
uses = stats["hits"] + stats["misses"]
print(f"expert uses {uses}: hits {stats['hits']} ({stats['hits'] / uses:.0%}), misses {stats['misses']}, "
      f"prefetched {stats['prefetches']} of which used {stats['prefetch_hits']}")
print(f"copied host -> {rt.device}: {stats['bytes_to_device'] / 2**20:.1f} MiB")
for l, s in enumerate(stats["per_layer"]):
    u = s["hits"] + s["misses"]
    print(f"layer {l:2d}: hit ratio {s['hits'] / u:.2f}" + "  " + "#" * round(20 * s["hits"] / u))

# %% [markdown]
# ## 6. Tokens per second, decoding only
# The prompt is processed in one forward pass; decoding then costs one pass per token. Timing a
# second, longer answer and subtracting nothing else gives the rate to compare with the paper's
# Table 2 (2-bit experts, full algorithm, T4: 2.092 tokens/s).

# %%
model.reset_offload_stats()
n, seconds = chat("Now explain in two sentences why it is correct.")
print(f"\n{n} tokens in {seconds:.1f} s: {n / seconds:.2f} tokens/s on {rt.gpu_name or 'CPU'} "
      f"with {rt.model if not rt.real_mixtral else 'Mixtral-8x7B-Instruct, paper-2bit'}")
s = model.offload_stats()
print(f"hit ratio in this answer: {s['hits'] / (s['hits'] + s['misses']):.2f}")

# %% [markdown]
# ## Summary
# - `moe_colab.plan` decides, from shapes alone, how many experts per layer fit and whether the
#   host can keep a copy of every expert; it refuses 16-bit Mixtral on a T4 with the numbers.
# - Quantizing shard by shard keeps disk and RAM bounded and survives disconnects.
# - The offloaded model is an ordinary transformers model: chat templates, streaming and
#   `generate` work as usual, and `offload_stats()` tells what the cache did.
#
# ## Exercises
# 1. Load with one expert per layer fewer than the plan (`experts_on_device=p.experts_on_device - 1`):
#    how do the hit ratio and tokens/s change?
# 2. Set `prefetch=0` and compare tokens/s with `prefetch=2` (the paper's Table 2, row 2).
# 3. Ask `moe_colab.plan` for a 16k-token context: what does it suggest?
#
# ## What's next
# Back to the index: {{badge 00_index}}. Notebooks 03 and 04 explain the cache and the prefetch
# whose numbers you just read.
