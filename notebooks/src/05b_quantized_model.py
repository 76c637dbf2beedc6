# %% [markdown]
# {{badge}}
#
# # 05b · Quantized for real: one directory, offloaded, scored, planned
#
# Notebook 05 took one matrix apart. Here the whole model: `moe_colab.quantize` writes a
# quantized directory once, `load_model` runs it with its experts offloaded (each expert still
# one buffer, one copy), perplexity measures what every (attention, experts) pair of the paper's
# Table 1 costs, and `moe_colab.plan` says what fits a free Colab T4.
#
# ![Mixtral-8x7B on a free Colab T4: what goes where](figures/t4_plan.svg)
#
# ## Objectives
# - Quantize `tiny` once, check the written bytes against `estimate_size`, load it offloaded,
#   generate, and read `offload_stats()`.
# - Measure perplexity for every pair beside the paper's Table 1.
# - Read the planner's verdicts for Mixtral on a T4, and (on a GPU) load the real 2-bit Mixtral.
#
# ## What you need
# - Any CPU (under a minute): everything that runs a model uses the small `tiny` model; the
#   Mixtral plans are computed from its shapes.
# - Notebooks 03 (`offload_stats()`) and 05 (the format).
# - Optional: a GPU and `USE_REAL_MIXTRAL = True` add section 4, which loads the 2-bit
#   Mixtral-8x7B-Instruct from the shared weights of notebook 00.

# %%
USE_REAL_MIXTRAL = False   # True: also load Mixtral-8x7B-Instruct (section 4), only if a GPU is present

# %% tags=["setup"]

# %% [markdown]
# ## 1. Quantize once, load, generate
# `moe_colab.quantize(src, dst, quant)` streams a checkpoint tensor by tensor and writes the
# quantized model to a directory, resumably; `load_model(dst)` then reads the scheme from the
# directory's manifest. Each expert (its `w1`, `w2`, `w3` with their codes, scales and zeros)
# is one byte buffer, so moving it to the GPU is still **one** copy. For Mixtral this takes
# about an hour on a T4 (notebook 06); for `tiny` a few seconds.

# %%
import torch
from transformers import AutoTokenizer

import moe_colab
from moe_colab.adapters.mixtral import MixtralAdapter as A
from moe_colab.checkpoint import resolve
from moe_colab.config import mixtral_config
from moe_colab.quant import QuantConfig

SMALL = "tiny" if rt.real_mixtral else rt.model       # sections 1-3 always use a small model
small_dir = resolve(SMALL)
tokenizer = AutoTokenizer.from_pretrained(small_dir)
dense = A.model_class().from_pretrained(str(small_dir), dtype=torch.float32).eval()   # resident, for section 2
cfg = dense.config
n_params = sum(p.numel() for p in dense.parameters())
mixtral = mixtral_config("mixtral-8x7b")
GiB = 2**30
name = lambda bits: "FP16" if bits == 16 else f"{bits}-bit"                          # noqa: E731

import json
import math
import tempfile
import time
from pathlib import Path

from moe_colab.convert.manifest import MANIFEST

qdir = Path(tempfile.mkdtemp()) / "tiny-paper-2bit"
start = time.perf_counter()
moe_colab.quantize(SMALL, qdir, quant="paper-2bit", device=rt.device, progress=False)
print(f"quantized {SMALL!r} in {time.perf_counter() - start:.1f} s into {qdir}")
manifest = json.loads((qdir / MANIFEST).read_text())
for f, entry in manifest["files"].items():
    print(f"  {f:24s} {entry['size'] / 2**20:6.2f} MiB")

# the tensors written, counted from the manifest, equal estimate_size exactly
dtype_bytes = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1}
written = sum(math.prod(t_["shape"]) * dtype_bytes[t_["dtype"]]
              for entry in manifest["files"].values() for t_ in entry["tensors"].values())
estimate = moe_colab.estimate_size(cfg, "paper-2bit")
print(f"tensors written {written / 2**20:.3f} MiB, estimate_size {estimate / 2**20:.3f} MiB, "
      f"16-bit {moe_colab.estimate_size(cfg) / 2**20:.3f} MiB")
assert written == estimate

# %% [markdown]
# Now load it with 4 of the 8 experts of each layer on the device and 2 prefetched, generate,
# and read what the cache did. Every miss copies one packed expert: `bytes_to_device / misses`
# is the size of one 2-bit expert buffer (`manifest["expert_nbytes"]`).

# %%
qmodel = moe_colab.load_model(qdir, device=rt.device, dtype=rt.dtype, experts_on_device=4, prefetch=2,
                              progress=False)
ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids.to(qmodel.device)
qmodel.reset_offload_stats()
out = qmodel.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(tokenizer.decode(out[0], skip_special_tokens=True))
stats = qmodel.offload_stats()
print(stats)
copies = stats["misses"] + stats["prefetches"]
per_copy = stats["bytes_to_device"] / copies
dense_expert = 3 * cfg.hidden_size * cfg.intermediate_size * 2
print(f"one copy: {per_copy:.0f} bytes (the 2-bit expert buffer is {manifest['expert_nbytes']}; "
      f"a 16-bit expert would be {dense_expert}, {dense_expert / manifest['expert_nbytes']:.1f}x more)")
assert per_copy == manifest["expert_nbytes"]

# %% [markdown]
# ## 2. What it costs: perplexity
# Perplexity is `exp` of the mean next-token loss on text the model did not train on: lower is
# better. `tiny` was trained on Python's standard library minus a held-out 2 % of its files
# (`moe_colab.tiny.data`); we score the first `N_TOKENS` tokens of those held-out files.
# `perplexity_table` quantizes the attention and the experts of one resident model at each bit
# width and swaps them in and out, so all 16 pairs take seconds.

# %%
from moe_colab.quant.perplexity import perplexity, perplexity_table
from moe_colab.tiny.data import read_sources, stdlib_files

_, heldout, stdlib = stdlib_files()
text = "\n".join(read_sources(heldout))
N_TOKENS = 256                                        # one window of 256: 16 pairs x 1 forward pass
tokens = torch.tensor(tokenizer(text, verbose=False).input_ids[:N_TOKENS])   # no "too long" warning: we cut it
print(f"held-out text: {len(heldout)} files of {stdlib} ({', '.join(p.name for p in heldout[:4])}, ...), "
      f"{tokens.numel()} tokens scored")
seq_len = min(256, cfg.max_position_embeddings)
dense = dense.to(device=rt.device, dtype=rt.dtype)
start = time.perf_counter()
ppl = perplexity_table(dense, tokens, seq_len=seq_len, progress=False)
print(f"16 pairs in {time.perf_counter() - start:.1f} s")

# %%
PAPER_WIKI2 = {   # the paper's Table 1, WikiText2 perplexity of Mixtral-8x7B (base)
    (16, 16): 3.59, (16, 4): 3.67, (16, 3): 3.96, (16, 2): 4.52,
    (4, 16): 3.68, (4, 4): 3.76, (4, 3): 4.05, (4, 2): 4.61,
    (3, 16): 3.99, (3, 4): 4.06, (3, 3): 4.34, (3, 2): 4.90,
    (2, 16): 4.98, (2, 4): 5.08, (2, 3): 5.36, (2, 2): 5.97,
}
print(f"ours: {SMALL!r} ({n_params / 1e6:.1f}M parameters) on {tokens.numel()} held-out stdlib tokens | "
      f"paper: Mixtral-8x7B on WikiText2")
print(f"{'Attn':>5} {'Experts':>7} | {'ours':>7} {'vs FP16':>8} | {'paper':>5} {'vs FP16':>8}")
for (a, e), theirs in PAPER_WIKI2.items():
    mine = ppl[(a, e)]
    print(f"{name(a):>5} {name(e):>7} | {mine:7.3f} {100 * (mine / ppl[(16, 16)] - 1):+7.1f}% | "
          f"{theirs:5.2f} {100 * (theirs / PAPER_WIKI2[(16, 16)] - 1):+7.1f}%")

# fewer bits in one part (the other part unchanged) should not score better: list any pair that does
BITS = (16, 4, 3, 2)
out_of_order = [f"{name(a)}/{name(e)} < {name(a2)}/{name(e2)}" for a, e in ppl for a2, e2 in ppl
                if ((a == a2 and BITS.index(e) > BITS.index(e2)) or (e == e2 and BITS.index(a) > BITS.index(a2)))
                and ppl[(a, e)] < ppl[(a2, e2)]]
print(f"on {tokens.numel()} tokens, fewer bits scored better in: {', '.join(out_of_order) or 'no pair'}")

# %% [markdown]
# The two columns come from different models and texts, so compare the **changes**, not the
# values. For Mixtral the paper measured +28 % perplexity for its Colab scheme (4-bit attention,
# 2-bit experts) and +66 % with everything at 2 bits, attention being the more sensitive part
# per parameter. On `tiny` the changes are far smaller, so small that a few hundred tokens need
# not put them in order (the last line above names any pair where fewer bits scored better).
# With 8,192 held-out tokens (minutes on a CPU; exercise 1), on the `tiny` of 2,000
# training steps, every pair was in the expected order and the largest change, 2-bit attention
# with 2-bit experts, was +4.3 %. A model of 9 million parameters is far from Mixtral: treat its
# column as a test that the whole path works, not as a prediction for Mixtral.
#
# One more check: the offloaded engine from section 1, reading the quantized directory, computes
# the same model as `perplexity_table`'s in-memory 4-bit/2-bit variant.

# %%
engine_ppl = perplexity(qmodel, tokens, seq_len=seq_len)
print(f"offloaded paper-2bit: {engine_ppl:.4f}; in memory (4-bit attention, 2-bit experts): {ppl[(4, 2)]:.4f}")
assert abs(engine_ppl - ppl[(4, 2)]) <= (1e-6 if rt.device == "cpu" else 1e-2) * ppl[(4, 2)]

# %% [markdown]
# ## 3. What fits on a free Colab T4
# `moe_colab.plan` adds up, from shapes alone, what the GPU needs (trunk, expert slots, KV cache
# for 4096 tokens, activations, a margin) and what the host needs (the experts that are not on
# the GPU), and picks the largest number of experts per layer that fits. Colab's free tier: a
# 15 GiB T4 and 12.7 GB of RAM.

# %%
from moe_colab.planner import COLAB_T4, PlanError

print(f"budgets: GPU {COLAB_T4['device_bytes'] / GiB:.0f} GiB, host {COLAB_T4['host_bytes'] / 1e9:.1f} GB")
verdicts = {}
for quant in ("paper-2bit", "paper-3bit", None):
    try:
        p = moe_colab.plan("mixtral-8x7b", quant=quant, device="cuda", **COLAB_T4)
        verdicts[quant] = p.experts_on_device
        print(f"\n{p}")
    except PlanError as e:
        verdicts[quant] = None
        print(f"\n16-bit: refused.\n{e}")
assert verdicts["paper-2bit"] and verdicts["paper-3bit"] and verdicts[None] is None

# %% [markdown]
# Both of the paper's schemes fit with 5 of 8 experts per layer on the GPU, in **swap mode**: an
# expert lives on the GPU *or* in host memory, because 12.7 GB of RAM cannot hold all 256
# experts beside everything else. 16-bit is refused before anything is allocated, and the
# message says by how much and what would fit instead. `load_model(..., experts_on_device="auto")`
# runs the same plan. (The paper's demo kept 4 experts per layer and quoted ~16 GB of GPU memory
# and ~11 GB of RAM.)

# %% [markdown]
# ## 4. The real model (GPU only)
# With `USE_REAL_MIXTRAL = True` on a GPU, this loads Mixtral-8x7B-Instruct at 4-bit attention
# and 2-bit experts from the shared pre-quantized directory of notebook 00 (made on first use
# from the paper authors' checkpoint, then reused), with the experts per layer the planner
# picks for this machine, and checks that one expert copy is the size of a paper-2bit expert.
# Without a GPU the cell says so and does nothing.

# %%
if rt.real_mixtral:
    from moe_colab.quant.format import expert_format

    real = rt.load_model()                 # the notebook's one real model, planned for this machine
    real_tok = rt.tokenizer()              # tokenizer files only
    ids = real_tok("[INST] What is 2-bit quantization? [/INST]", return_tensors="pt").input_ids.to(real.device)
    real.reset_offload_stats()
    out = real.generate(ids, max_new_tokens=32, do_sample=False)
    print(real_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    s = real.offload_stats()
    nbytes = expert_format(mixtral, QuantConfig(4, 2), torch.float16).layout.nbytes     # paper-2bit
    print(s, f"\none copy: {s['bytes_to_device'] / max(s['misses'] + s['prefetches'], 1) / 2**20:.2f} MiB; "
             f"a paper-2bit expert is {nbytes / 2**20:.2f} MiB")
else:
    print("skipped: needs a GPU and USE_REAL_MIXTRAL = True (sections 1-3 used 'tiny')")

# %% [markdown]
# ## Summary
# - `moe_colab.quantize` writes exactly the bytes `estimate_size` predicts; the offloaded model
#   reads them with each expert still one buffer, one copy.
# - On `tiny` every scheme costs little perplexity; on Mixtral the paper's Table 1 measured
#   +28 % for its Colab scheme (4-bit attention, 2-bit experts), and the offloaded engine computes
#   exactly the in-memory quantized model.
# - With 2- or 3-bit experts, 5 experts per layer fit on a free T4 in swap mode; 16-bit does not
#   fit at all, and the planner says so before allocating anything.
#
# ## Exercises
# 1. Set `N_TOKENS = 8192` in section 2 and rerun it. Are the rows now in the order you expect
#    (fewer bits, higher perplexity)? Which part hurts `tiny` more per bit, attention or experts?
#
#    <details><summary>Hint 1</summary>
#
#    Compare `ppl[(2, 16)]` (only attention at 2 bits) with `ppl[(16, 2)]` (only experts), each
#    relative to `ppl[(16, 16)]`, and remember how many parameters each part has.
#    </details>
#    <details><summary>Solution 1</summary>
#
#    With 8,192 tokens every pair falls in order on the shipped `tiny`. Per bit removed,
#    attention hurts more: it is a small share of the parameters but every token uses all of it,
#    as in the paper's Table 1 (2-bit attention alone: 4.98 against 3.59; 2-bit experts alone: 4.52).
#    </details>
#
# 2. Run `moe_colab.plan("mixtral-8x7b", quant="paper-2bit", device="cuda", device_bytes=12 * 2**30,
#    host_bytes=32e9)` (an RTX 3060 laptop). How many experts per layer fit? Write it in
#    `answer_2`. Why copy mode, not swap?
#
#    <details><summary>Hint 2</summary>
#
#    The plan's `experts_on_device` and `swap`; compare the host budget with the size of all
#    256 experts at paper-2bit.
#    </details>
#    <details><summary>Solution 2</summary>
#
#    Fewer experts per layer than on the T4 (the GPU is smaller), but 32 GB of RAM hold a copy
#    of every expert, so no write-back is needed: copy mode, one copy per miss instead of two.
#    </details>

# %%
from moe_colab.notebook.exercises import check

answer_2 = None   # experts per layer on a 12 GiB GPU with 32 GB of RAM
laptop = moe_colab.plan("mixtral-8x7b", quant="paper-2bit", device="cuda", device_bytes=12 * 2**30, host_bytes=32e9)
check(answer_2, laptop.experts_on_device, rel=0, name="exercise 2")

# %% [markdown]
# ## What's next
# **06 Mixtral on a T4** puts it all together: the planner, the 2-bit weights, the offloaded model,
# and a chat with it: {{badge 06_mixtral_on_a_t4}}
