# %% [markdown]
# {{badge}}
#
# # 06 · Mixtral-8x7B-Instruct on a free Colab T4
#
# Everything so far, put together: plan the memory, get 2-bit weights onto the machine, load the
# model with its experts offloaded, chat with it while the tokens stream, and read what the
# expert cache did. Mixtral-8x7B has 46.7B parameters (87 GiB in 16-bit); a free Colab has a
# 15 GiB T4 and 12.7 GB of RAM. The paper (Eliseev & Mazur, arXiv 2312.17238) made it fit with
# 4-bit attention, 2-bit experts and an LRU cache of experts on the GPU, and measured 2.09
# tokens/s on a T4 (its Table 2).
#
# ## Objectives
# - Ask `moe_colab.plan` what fits before allocating anything, and read why 16-bit cannot.
# - Get 2-bit weights onto the machine: convert the paper authors' published 2-bit checkpoint
#   (the default), or quantize the original checkpoint yourself, shard by shard.
# - Load with the planned number of experts per layer, chat with streaming, and measure the
#   cache's hit ratio and the tokens per second.
#
# ## What you need
# - Any CPU: without a GPU (or with `USE_REAL_MIXTRAL = False`) the same cells run on the small
#   `tiny` model, quantized the same way in seconds, and say so (about a minute in all).
# - For the real model: a Colab T4 GPU runtime (Runtime → Change runtime type → T4 GPU) and
#   `USE_REAL_MIXTRAL = True`. Two ways to get the weights, both onto Colab's local disk (about
#   100 GB; no Google Drive needed, and a free Drive's 15 GB could not keep the ~18 GiB result):
#
#   | `WEIGHTS` | source | token | download | disk while working | first run |
#   |---|---|---|---|---|---|
#   | `"authors"` (default) | `lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo`, the checkpoint the paper's demo loads | none (public) | ~18 GB in 257 files (256 experts of 66.4 MB, one trunk file) | result ~18 GiB + one file | download + dequantize and re-quantize each file |
#   | `"mistral"` | `mistralai/Mixtral-8x7B-Instruct-v0.1`, the original | yes (gated: accept the conditions on the model page) | ~93 GB in 19 shards of ~4.9 GB | result ~18 GiB + one shard | download + quantize with HQQ |
#
#   The download takes size / your Colab's bandwidth (commonly 50-200 MB/s: a few minutes for
#   the authors' files, 8-30 minutes for the original); the quantization runs on the T4 and we
#   have not timed it there, so allow an hour for a first run. Both resume where they stopped
#   after a disconnect, and every other notebook reuses the result. The tokenizer (about 2 MB,
#   tokenizer files only) comes from the gated `mistralai` repository in both cases: store a
#   Hugging Face token as Colab's secret `HF_TOKEN` (key icon on the left) after accepting the
#   conditions.
# - Notebooks 03 (the LRU cache), 04 (speculative loading) and 05 (quantization) explain the
#   parts; this one only uses them.

# %%
USE_REAL_MIXTRAL = False   # True: Mixtral-8x7B-Instruct, only if a GPU is present (else `tiny` on CPU)

# %% tags=["setup", "gpu"]

# %% [markdown]
# ## 1. The plan, before anything is allocated
#
# ![Mixtral-8x7B on a free Colab T4: what goes where](figures/t4_plan.svg)
#
# A model needs GPU memory for its trunk (embeddings, attention, norms, routers), for the expert
# slots (layers × experts per layer × one packed expert), for the KV cache and for activations;
# and host memory for the experts that are not on the GPU. `moe_colab.plan` adds these up from
# the shapes alone. Here are its verdicts for Mixtral-8x7B on a Colab T4, for each scheme
# (these are computed, so they are the same on any machine):

# %%
import moe_colab
from moe_colab.planner import COLAB_T4, PlanError

for quant in (None, "paper-3bit", "paper-2bit"):
    try:
        p = moe_colab.plan("mixtral-8x7b", quant=quant, device="cuda", **COLAB_T4)
        print(f"{p.scheme:>10}: fits, {p.experts_on_device} of 8 experts per layer on the GPU"
              f"{' (swap mode)' if p.swap else ''}, GPU {(p.device_total + p.device_margin_bytes) / 2**30:.1f} "
              f"of {p.device_budget / 2**30:.0f} GiB with the margin")
    except PlanError as e:
        print(f"{quant or '16-bit':>10}: refused ({str(e).splitlines()[1].strip().split(' = ')[0]})")

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
# On a GPU with `USE_REAL_MIXTRAL = True`: `real_weights(WEIGHTS)` makes the shared pre-quantized
# directory once (see the table above), and finds it on every later run. `"authors"` converts the
# 2-bit checkpoint the paper's authors published (their HQQ 0.1 groups differ from ours, so each
# matrix is dequantized and quantized again); `"mistral"` quantizes the original checkpoint one
# shard at a time (download a shard, quantize it, keep the finished layers, delete the shard).
#
# Otherwise the same function that writes Mixtral's directory, `moe_colab.quantize`, writes a
# 2-bit `tiny` into a temporary directory, and every cell below runs on it.

# %%
import os
import tempfile
from pathlib import Path

from moe_colab.notebook.runtime import real_weights, real_weights_dir

WEIGHTS = "authors"            # "authors": convert the paper authors' checkpoint; "mistral": quantize the original
if rt.real_mixtral:
    if rt.colab and not os.environ.get("HF_TOKEN"):      # the gated tokenizer (and the "mistral" weights)
        from google.colab import userdata
        try:
            os.environ["HF_TOKEN"] = userdata.get("HF_TOKEN")
        except Exception as e:                          # no secret: the tokenizer download will say so
            print(f"no HF_TOKEN secret ({type(e).__name__}); add one to download the tokenizer")
    print(f"weights go to {real_weights_dir(WEIGHTS)}")
    weights = real_weights(WEIGHTS)
    source = "Mixtral-8x7B-Instruct"
else:
    source = rt.model
    weights = moe_colab.quantize(source, Path(tempfile.mkdtemp()) / f"{source}-2bit".replace("/", "_"),
                                 quant="paper-2bit", device=rt.device, progress=False)
    print(f"no GPU or USE_REAL_MIXTRAL = False: this notebook runs on {source!r}, quantized to paper-2bit "
          f"(4-bit attention, 2-bit experts) like Mixtral would be, on {rt.device}")
print("weights:", weights)

# %% [markdown]
# ## 3. Plan for this machine, then load
# For Mixtral, the plan now uses this machine's measured free GPU and host memory.
# `plan(...).load_kwargs()` gives the number of experts per layer, the mode and the scheme to
# pass to `load_model`. `tiny` would fit whole anywhere (all 8 experts per layer, nothing to
# cache), so on it we rehearse the T4's plan for Mixtral instead: 5 of 8 experts per layer, swap
# mode. (On a CPU the "device" and the host are one pool of memory, and the plan says so.)

# %%
from transformers import AutoTokenizer

from moe_colab.checkpoint import resolve

t4 = moe_colab.plan("mixtral-8x7b", quant="paper-2bit", device="cuda", **COLAB_T4)
if rt.real_mixtral:
    p = moe_colab.plan(weights, device=rt.device, dtype=rt.dtype)            # this machine, measured
else:
    p = moe_colab.plan(weights, device=rt.device, dtype=rt.dtype, experts_on_device=t4.experts_on_device,
                       swap=t4.swap)
    print(f"rehearsing the T4 plan for Mixtral on {source!r}: {t4.experts_on_device} of 8 experts per layer"
          f"{', swap mode' if t4.swap else ''}")
print(p)
if rt.real_mixtral:
    model = rt.load_model(WEIGHTS, prefetch=2)       # the same plan: experts_on_device="auto"
    tokenizer = rt.tokenizer(WEIGHTS)                # tokenizer files only
else:
    model = moe_colab.load_model(weights, device=rt.device, dtype=rt.dtype, prefetch=2, progress=False,
                                 **p.load_kwargs())
    tokenizer = AutoTokenizer.from_pretrained(resolve(source))
print(f"\nloaded {source}: {model.moe_cache.experts_on_device} of {model.config.num_local_experts} experts per "
      f"layer on {rt.device}, {model.moe_cache.device_bytes / 2**20:.1f} MiB of expert slots")

# %% [markdown]
# ## 4. Chat, with the tokens streaming in
# `generate` is transformers' own; a `TextStreamer` prints each token as it is decoded. Ours
# also notes when each token arrived, to time decoding apart from reading the prompt. The
# conversation is kept in `history`, so `chat(...)` can be called again with a follow-up.
# `tiny` has no chat template and only completes Python code, so it gets the start of a function
# instead of a question (and its continuation is not good code: it is a teaching model).

# %%
import time

from transformers import TextStreamer


class TimedStreamer(TextStreamer):
    """A TextStreamer that records when the prompt and each new token arrive."""

    def __init__(self, tokenizer, **kw):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kw)
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())     # first call: the prompt; then one per token
        super().put(value)


history = []


def chat(text, max_new_tokens=96 if rt.real_mixtral else 32):
    """Answer ``text`` (with the history so far), streaming; returns (tokens, seconds, decode tokens/s)."""
    history.append({"role": "user", "content": text})
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:                        # tiny has no chat template: plain text
        ids = tokenizer("\n".join(m["content"] for m in history), return_tensors="pt").input_ids
    streamer = TimedStreamer(tokenizer)
    start = time.perf_counter()
    out = model.generate(ids.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                         streamer=streamer, pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    history.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
    t = streamer.times                            # [prompt, token 1, token 2, ...]
    decode = (len(t) - 2) / (t[-1] - t[1]) if len(t) > 2 else float("nan")
    return len(new), seconds, decode


if rt.real_mixtral:
    QUESTIONS = ["Write a Python function that checks whether a number is prime.",
                 "Now explain in two sentences why it is correct."]
else:
    QUESTIONS = ['def is_prime(n):\n    """Return True if n is a prime number."""\n',
                 'def next_prime(n):\n    """Return the smallest prime larger than n."""\n']
model.reset_offload_stats()
n, seconds, decode = chat(QUESTIONS[0])
print(f"\n{n} tokens in {seconds:.1f} s ({n / seconds:.2f} tokens/s, prompt included)")

# %% [markdown]
# ## 5. What the expert cache did
# Every token needs `top_k` experts in each layer. A **hit** found its expert already on the
# device (kept by the LRU cache, or brought early by a prefetch); a **miss** waited for a copy.
# The paper gives its LRU hit ratios for Mixtral only as a plot (Figure 2); secondary sources
# read it as roughly 40-60 %.

# %%
stats = model.offload_stats(per_layer=True)
uses = stats["hits"] + stats["misses"]
print(f"expert uses {uses}: hits {stats['hits']} ({stats['hits'] / uses:.0%}, of which {stats['prefetch_hits']} "
      f"thanks to a prefetch), misses {stats['misses']}; prefetched {stats['prefetches']}, "
      f"{stats['prefetch_wasted']} evicted unused")
print(f"copied host -> {rt.device}: {stats['bytes_to_device'] / 2**20:.1f} MiB "
      f"({stats['misses'] + stats['prefetches']} expert copies)")
for l, s in enumerate(stats["per_layer"]):
    u = max(s["hits"] + s["misses"], 1)
    print(f"layer {l:2d}: hit ratio {s['hits'] / u:.2f}  " + "#" * round(20 * s["hits"] / u))
assert stats["bytes_to_device"] == (stats["misses"] + stats["prefetches"]) * model.moe_cache.store.nbytes  # one copy each

# %% [markdown]
# ## 6. Tokens per second, decoding only
# The prompt is read in one forward pass; each new token then costs one pass through all 32
# layers, with their expert copies. The streamer's timestamps give the decoding rate alone
# (from the first new token to the last), the number to compare with the paper's Table 2:
# 2.092 tokens/s on a T4 with 2-bit experts and the full algorithm (the paper's figure).

# %%
model.reset_offload_stats()
n, seconds, decode = chat(QUESTIONS[1])
s = model.offload_stats()
where = f"{rt.gpu_name or 'CPU'}, " + ("Mixtral-8x7B-Instruct at paper-2bit" if rt.real_mixtral else
                                       f"{source!r} at paper-2bit (not Mixtral: not comparable with the paper)")
print(f"\n{n} tokens in {seconds:.1f} s; decoding {decode:.2f} tokens/s on {where}")
print(f"hit ratio in this answer: {s['hits'] / max(s['hits'] + s['misses'], 1):.2f}; paper, T4, 2-bit: 2.092 tokens/s")

# %% [markdown]
# ## 7. Your turn: chat
# In Jupyter or Colab a text box appears below: type a message and press Enter; the answer
# streams under it, and the history carries over from the cells above. A widget only waits for
# you in the browser: run headless (CI, `nbval`, a script), this cell returns at once. Without
# widgets, call `chat("...")` in a new cell.

# %%
from moe_colab.notebook.runtime import widgets_available

if widgets_available():
    import ipywidgets as widgets
    from IPython.display import display

    box = widgets.Text(placeholder="Ask something and press Enter", continuous_update=False,
                       layout=widgets.Layout(width="90%"))
    answers = widgets.Output()

    def on_enter(change):              # runs only when you press Enter in the browser
        text = change["new"].strip()
        if not text:
            return
        box.value = ""
        with answers:
            print(f"\nyou: {text}")
            n, seconds, decode = chat(text)
            print(f"\n[{n} tokens, {decode:.2f} tokens/s decoding]")

    box.observe(on_enter, names="value")
    display(box, answers)
else:
    print("no widgets here: call chat('your message') in a new cell")

# %% [markdown]
# ## Summary
# - `moe_colab.plan` decides, from shapes alone, how many experts per layer fit and whether the
#   host can keep a copy of every expert; on a T4 it picks 5 experts per layer in swap mode at
#   2 or 3 bits, and refuses 16-bit Mixtral with the numbers.
# - The weights arrive once per machine (the authors' public checkpoint by default, or your own
#   quantization of the original), one file at a time, resumably, on Colab's local disk; on a
#   CPU the same path quantizes `tiny` in seconds.
# - The offloaded model is an ordinary transformers model: chat templates, streaming and
#   `generate` work as usual, and `offload_stats()` tells what the cache did.
#
# ## Exercises
# 1. Load with one expert per layer fewer than the plan (`experts_on_device=p.experts_on_device - 1`)
#    and ask the first question again: how do the hit ratio and the decoding rate change?
#    (On `tiny`, also try all 8.)
#
#    <details><summary>Hint 1</summary>
#
#    `m = moe_colab.load_model(weights, device=rt.device, dtype=rt.dtype, experts_on_device=p.experts_on_device - 1, swap=p.swap)`;
#    on the real model free the first one first (`del model; torch.cuda.empty_cache()`): the T4
#    cannot hold two.
#    </details>
#    <details><summary>Solution 1</summary>
#
#    Fewer slots, lower hit ratio, more copies per token: on a T4, where copies set the pace,
#    decoding slows roughly in proportion to the extra misses. With all 8 on `tiny` nothing is
#    copied after the first token.
#    </details>
#
# 2. Load with `prefetch=0` and compare the decoding rate with `prefetch=2` (the paper's Table 2,
#    "W/o expert pre-loading": 1.567 against 2.092 tokens/s on a T4 at 2-bit).
#
#    <details><summary>Hint 2</summary>
#
#    As in exercise 1, with `prefetch=0`; compare `decode` from `chat(...)`.
#    </details>
#    <details><summary>Solution 2</summary>
#
#    On a T4 prefetching should help, as in the paper, when its guesses are right often enough
#    (notebook 04) and the copy link has idle time (notebook 07). On a CPU with `tiny` the copies
#    are tiny memory copies, so the difference is noise.
#    </details>
#
# 3. Ask `moe_colab.plan` for Mixtral at paper-2bit with a 16k-token context on a T4
#    (`max_context=16384`). Does it still fit, and if not, what does the planner suggest?
#
#    <details><summary>Hint 3</summary>
#
#    `moe_colab.plan("mixtral-8x7b", quant="paper-2bit", device="cuda", max_context=16384, **COLAB_T4)`;
#    the KV cache grows with the context and takes GPU memory from the expert slots.
#    </details>
#    <details><summary>Solution 3</summary>
#
#    The cell below asks. A 16k context needs 2 GiB of KV cache (four times the 4k plan's), which
#    pushes experts off the GPU; with this planner the T4 no longer holds enough slots and it
#    refuses, naming the budget that failed and what would fit. Shorter contexts fit again.
#    </details>
# 4. On a GPU, load with `cuda_graphs=False` (CUDA graphs replay one-token matmuls and are on by
#    default; `docs/benchmark_notes.md`) and ask the same question again: does decoding slow down
#    on a T4, where copies rather than kernel launches take most of the time?
#
#    <details><summary>Hint 4</summary>
#
#    `rt.load_model(WEIGHTS, prefetch=2, cuda_graphs=False)` after freeing the first model.
#    </details>
#    <details><summary>Solution 4</summary>
#
#    Expect a small difference on a T4: graphs save launch time, but the copies dominate there.
#    On a fast GPU with fast copies (the H200 of `docs/benchmarks.md`) launches matter more.
#    </details>

# %%
try:
    long_plan = moe_colab.plan("mixtral-8x7b", quant="paper-2bit", device="cuda", max_context=16384, **COLAB_T4)
    print(f"a 16k context fits with {long_plan.experts_on_device} experts per layer")
except PlanError as e:
    print("the planner refuses a 16k context on a T4:", str(e).splitlines()[0])

# %% [markdown]
# ## What's next
# **07 Inside the engine** opens the engine you just ran: its slots, its host buffers, and one
# decoded token in time: {{badge 07_inside_the_engine}}. Notebooks 03 and 04 explain the cache
# and the prefetch whose numbers you just read, 05 the 2-bit weights; the index: {{badge 00_index}}
