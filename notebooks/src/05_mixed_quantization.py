# %% [markdown]
# {{badge}}
#
# # 05 · Mixed quantization: 4-bit attention, 2-bit experts
#
# Offloading alone does not put Mixtral-8x7B on a free Colab: in 16-bit its weights take
# 87 GiB, and a Colab machine has a 15 GiB T4 and 12.7 GB of RAM. The paper (Eliseev & Mazur,
# arXiv 2312.17238, section 3.3) also quantizes it with HQQ, and **mixes** bit widths: the
# attention layers, small but used by every token, keep 4 bits; the experts, 96.6 % of the
# parameters, drop to 2 or 3 bits. This notebook measures what that buys and what it costs,
# on the real library: sizes for Mixtral, one matrix taken apart byte by byte, a model quantized,
# offloaded and run, perplexity, and the planner's verdict for a T4.
#
# ## Objectives
# - Recompute the size column of the paper's Table 1 for all 16 (attention, experts) pairs.
# - Quantize one expert matrix with HQQ, read its codes, scales and zeros, and dequantize it by
#   hand, bit for bit equal to the library.
# - Count the bits per parameter of each scheme, scales and zeros included.
# - Quantize `tiny` once, load it offloaded, generate, and read `offload_stats()`.
# - Measure perplexity for every pair beside the paper's, and see which schemes fit a T4.
#
# ## What you need
# - Any CPU: everything that runs a model uses the small `tiny` model (about a minute);
#   the Mixtral sizes and plans are computed from its shapes, nothing is downloaded.
# - Notebook 03 (the expert cache) explains `offload_stats()`.
# - Optional: a GPU and `USE_REAL_MIXTRAL = True` run the `tiny` sections on the GPU and add
#   section 7, which loads the 2-bit Mixtral-8x7B-Instruct itself.

# %%
USE_REAL_MIXTRAL = False   # True: also load Mixtral-8x7B-Instruct (section 7), only if a GPU is present

# %% tags=["setup"]

# %% [markdown]
# ## 1. Why quantize: the sizes of Table 1
# `moe_colab.estimate_size(config, quant)` counts every tensor as the library stores it
# (codes, 8-bit scales and zeros, fp16 meta-scales, 16-bit embeddings, routers and norms). Below,
# ours for Mixtral-8x7B beside the size column of the paper's Table 1 (the paper writes "GB";
# its FP16 row, 86.99, is 46.7e9 parameters × 2 bytes in GiB).

# %%
import torch

import moe_colab
from moe_colab.config import mixtral_config
from moe_colab.quant import QuantConfig
from moe_colab.quant.size import PAPER_TABLE1_GIB, size_breakdown

mixtral = mixtral_config("mixtral-8x7b")
GiB = 2**30
name = lambda bits: "FP16" if bits == 16 else f"{bits}-bit"

parts = size_breakdown(mixtral)                       # bytes per part, 16-bit
params = {k: v / 2 for k, v in parts.items()}         # 2 bytes per parameter
share = params["experts"] / sum(params.values())
print(f"parameters: {sum(params.values()) / 1e9:.1f}B, experts {params['experts'] / 1e9:.1f}B ({share:.1%})")
assert round(sum(params.values()) / 1e9, 1) == 46.7 and round(share, 3) == 0.966    # the paper's figures

print(f"\n{'Attn':>5} {'Experts':>7} | {'ours GiB':>8} | {'paper GiB':>9} | {'diff':>6} | 3-bit codes at 3.5 bits")
for (a, e), paper in PAPER_TABLE1_GIB.items():
    ours = moe_colab.estimate_size(mixtral, QuantConfig(a, e)) / GiB
    hqq01 = sum(size_breakdown(mixtral, QuantConfig(a, e), paper_3bit_packing=True).values()) / GiB
    note = f"{hqq01:6.2f} GiB ({100 * (hqq01 - paper) / paper:+.1f}%)" if 3 in (a, e) else ""
    print(f"{name(a):>5} {name(e):>7} | {ours:8.2f} | {paper:9.2f} | {100 * (ours - paper) / paper:+5.1f}% | {note}")

# %% [markdown]
# How to read it:
# - Rows with 16-bit experts differ only by the attention scheme and match the paper to the
#   second decimal: attention is 1.3B parameters, so even 2-bit attention saves only 2 GiB.
# - The experts decide the size: 87 GiB at 16 bits, 17-19 GiB at 2 bits.
# - Our 3-bit rows are 13-15 % smaller than the paper's. The hqq 0.1 library the paper used
#   packed 3-bit codes 10 to a 32-bit word (3.5 bits per weight); we pack exactly 3 bits.
#   Counted at 3.5 bits (last column) every row is within 3 % of the paper. The remaining
#   0.4-0.5 GiB that the paper's quantized-expert rows carry beyond ours is unexplained
#   (`docs/quantization.md` discusses it).
#
# Even 17 GiB is more than a T4's 15 GiB: quantization and offloading are both needed.

# %%
import plotly.graph_objects as go

pairs = list(PAPER_TABLE1_GIB)
labels = [f"{name(a)} / {name(e)}" for a, e in pairs]
fig = go.Figure([
    go.Bar(x=labels, y=[moe_colab.estimate_size(mixtral, QuantConfig(a, e)) / GiB for a, e in pairs], name="ours"),
    go.Bar(x=labels, y=list(PAPER_TABLE1_GIB.values()), name="paper, Table 1"),
])
fig.add_hline(y=15, line_dash="dash", annotation_text="T4: 15 GiB")
fig.add_hline(y=12.7e9 / GiB, line_dash="dot", annotation_text="Colab RAM: 12.7 GB", annotation_position="bottom right")
fig.update_layout(title="Mixtral-8x7B size by (attention / experts) scheme", yaxis_title="GiB",
                  barmode="group", height=420)
fig

# %% [markdown]
# ## 2. HQQ on one matrix
# Take one weight matrix of one expert: `w1` of expert 0 in layer 0 of `tiny`, `[intermediate,
# hidden]`. A matrix is cut into **groups** of `g` consecutive inputs of one output row. Each
# group gets a scale `S` and a zero `Z`, and each weight becomes an integer code `Q` of `bits`
# bits:
#
#     W[o, i]  ≈  (Q[o, i] - Z[o, i // g]) * S[o, i // g],     Q in 0 .. 2**bits - 1
#
# The simplest choice of `S` and `Z` maps each group's minimum to code 0 and its maximum to the
# top code ("round to nearest", RTN). HQQ (Badri & Shaji, 2023), which the paper uses, starts
# there and then moves the zeros to minimise a robust (`p < 1`) norm of the error, with no data:
# no calibration text, only the weights.

# %%
from transformers import AutoTokenizer

from moe_colab.adapters.mixtral import MixtralAdapter as A
from moe_colab.checkpoint import resolve
from moe_colab.quant import packing
from moe_colab.quant.matrix import hqq_quantize

SMALL = "tiny" if rt.real_mixtral else rt.model       # sections 2-6 always use a small model
small_dir = resolve(SMALL)
tokenizer = AutoTokenizer.from_pretrained(small_dir)
dense = A.model_class().from_pretrained(str(small_dir), dtype=torch.float32).eval()   # resident, 16-bit weights
cfg = dense.config
experts0 = A.moe_block(A.decoder_layers(dense)[0]).experts
W = experts0.gate_up_proj[0, : cfg.intermediate_size].detach().clone()      # w1 of expert 0: [I, H]
n_params = sum(p.numel() for p in dense.parameters())
print(f"{SMALL}: {n_params / 1e6:.1f}M parameters")
print(f"W: {list(W.shape)} (out = intermediate {cfg.intermediate_size}, in = hidden {cfg.hidden_size}), "
      f"std {W.std():.4f}")


def rtn(W, bits, g):
    """Round to nearest: each group's min -> code 0, max -> the top code. Returns (Q, S, Z) per group."""
    Wg = W.reshape(W.shape[0], -1, g)                                  # [out, in/g, g]
    lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)      # [out, in/g, 1]
    S = (hi - lo) / (2**bits - 1)
    Z = -lo / S
    Q = torch.round(Wg / S + Z).clamp(0, 2**bits - 1)
    return Q.reshape(W.shape), S.reshape(-1), Z.reshape(-1)


rel = lambda W_hat: ((W_hat - W).norm() / W.norm()).item()            # relative (Frobenius) error
print(f"\n{'scheme':<10} | {'RTN error':>9} | {'HQQ error':>9}")
for bits, g in ((4, 64), (3, 64), (2, 16)):
    W_rtn = packing.dequantize_codes(*rtn(W, bits, g), g, tuple(W.shape))
    W_hqq = packing.dequantize_codes(*hqq_quantize(W, bits, g), g, tuple(W.shape))
    print(f"{bits}-bit g{g:<3} | {rel(W_rtn):9.4f} | {rel(W_hqq):9.4f}")
    if bits == 2:
        assert rel(W_hqq) < rel(W_rtn), "HQQ should improve on round-to-nearest at 2 bits"

# %% [markdown]
# On this matrix HQQ's error is below RTN's, most clearly at 2 bits, where the codes lose about
# a third of the matrix (relative error ~0.3). Now the 2-bit scheme of the paper in detail: groups of 16, so
# every 16 weights carry their own scale and zero.

# %%
bits, g, sg = QuantConfig(16, 2).matrix("expert")          # the paper's 2-bit scheme: group 16, scale group 128
Q, S, Z = hqq_quantize(W, bits, g)
print(f"codes Q {list(Q.shape)} {Q.dtype}; scales S and zeros Z: {S.numel()} each (one per group of {g})")
print("row 0, first 16 codes (group 0):", Q[0, :16].tolist())
print(f"group 0: scale {S[0]:.5f}, zero {Z[0]:.3f}")
print("W[0, :4]           ", [round(x, 4) for x in W[0, :4].tolist()])
print("(Q - Z) * S [0, :4]", [round(x, 4) for x in ((Q[0, :4] - Z[0]) * S[0]).tolist()])
print("how often each code is used:", torch.bincount(Q.flatten().long(), minlength=2**bits).tolist())

# %% [markdown]
# ### 2.1 Storing it: planar codes and 8-bit scales and zeros
# With groups of 16, a 16-bit scale and a 16-bit zero would add 32 bits per 16 weights: 2 bits
# per weight, as much as the codes themselves. So the paper quantizes the scales and zeros too,
# to 8 bits, in "scale groups" of 128 that share one fp16 step and zero (hqq 0.1 did this; hqq
# 0.2 dropped it, so `moe_colab.quant.packing.meta_quantize` does it).
#
# The codes are packed **planar**: for 2 bits, byte `j` of a row holds the codes of inputs `j`,
# `j + in/4`, `j + 2·in/4` and `j + 3·in/4` at bits 0, 2, 4 and 6, so a kernel walking along a
# row unpacks with shifts only. `quantize_matrix` does all of it and returns the stored tensors.

# %%
from moe_colab.quant.matrix import quantize_matrix

mat = quantize_matrix(W, bits, g, sg)
for k, v in mat.items():
    print(f"  {k:8s} {str(list(v.shape)):12s} {str(v.dtype):14s} {v.numel() * v.element_size():6d} bytes")
stored = sum(v.numel() * v.element_size() for v in mat.values())
print(f"{stored} bytes for {W.numel()} weights = {8 * stored / W.numel():.3f} bits per weight "
      f"(16-bit: {2 * W.numel()} bytes)")
assert torch.equal(packing.unpack_codes(mat, bits, W.shape[1]), Q)     # the packing loses nothing

# %% [markdown]
# ### 2.2 Dequantizing by hand
# Three steps: unpack the codes from their planes, rebuild each scale and zero from its 8-bit
# code and its scale group's fp16 step and zero, then `(Q - Z) * S`. The function below handles
# the 4-, 3- and 2-bit layouts (3 bits: the low two bits as for 2-bit in `q2`, the third bit in
# `q1`, one bit per input, eight planes). We check it against `packing.dequantize`, the
# reference the fused GPU kernels are tested against, with `torch.equal`: bit for bit.

# %%
def unpack_by_hand(mat, bits, n_in):
    """Planar codes -> Q uint8 [out, n_in]."""
    if bits == 4:                       # byte j: input j in the low nibble, input j + n_in/2 in the high one
        return torch.cat([mat["q4"] & 0xF, mat["q4"] >> 4], dim=1)
    low = torch.cat([(mat["q2"] >> 2 * s) & 3 for s in range(4)], dim=1)     # plane s: inputs s*n_in/4 ...
    if bits == 2:
        return low
    third = torch.cat([(mat["q1"] >> s) & 1 for s in range(8)], dim=1)       # plane s: inputs s*n_in/8 ...
    return low | (third << 2)


def meta_by_hand(v_q, v_scale, v_zero, scale_group):
    """8-bit codes -> fp32 values; entry n belongs to scale group n // scale_group."""
    m = torch.arange(v_q.numel()) // scale_group
    return (v_q.float() - v_zero.float()[m]) * v_scale.float()[m]


def dequantize_by_hand(mat, bits, g, sg, shape):
    out, n_in = shape
    Q = unpack_by_hand(mat, bits, n_in).float()                                   # [out, in]
    group = torch.arange(n_in) // g                                               # group of each input
    S = meta_by_hand(mat["s_q"], mat["s_scale"], mat["s_zero"], sg).view(out, -1)[:, group]   # [out, in]
    Z = meta_by_hand(mat["z_q"], mat["z_scale"], mat["z_zero"], sg).view(out, -1)[:, group]
    return (Q - Z) * S


print(f"{'scheme':<15} | {'hqq error':>9} | {'+ 8-bit S, Z':>12} | hand == library")
for b, (bg, bsg) in {4: (64, 256), 3: (64, 128), 2: (16, 128)}.items():
    m = quantize_matrix(W, b, bg, bsg)
    ours = dequantize_by_hand(m, b, bg, bsg, tuple(W.shape))
    library = packing.dequantize(m, b, bg, bsg, tuple(W.shape), dtype=torch.float32)
    assert torch.equal(ours, library), f"{b}-bit: the hand-written dequantization differs from the library"
    plain = packing.dequantize_codes(*hqq_quantize(W, b, bg), bg, tuple(W.shape))   # 16-bit S and Z
    print(f"{b}-bit g{bg} s{bsg:<4} | {rel(plain):9.4f} | {rel(ours):12.4f} | True")

# %% [markdown]
# The 8-bit scales and zeros cost almost nothing in accuracy (the error moves in the fourth
# decimal), and save 2 bits per weight at 2-bit. On a GPU the same arithmetic runs fused with the
# matrix product (`moe_colab/quant/kernels.py`), so the 16-bit matrix is never built in memory.

# %% [markdown]
# ## 3. Bits per parameter
# Per weight: the code (`bits`), the 8-bit scale and zero of its group (`16 / g`), and the fp16
# step and zero of the scale group, for scales and for zeros (`4 · 16 / (g · sg)`). By hand, and
# from `moe_colab.quant.size.bits_per_weight` (which counts the stored tensors of an expert matrix):

# %%
from moe_colab.quant.size import bits_per_weight

print(f"{'scheme':<15} | {'by hand':>7} | library")
for b, (bg, bsg) in {4: (64, 256), 3: (64, 128), 2: (16, 128)}.items():
    by_hand = b + 16 / bg + 4 * 16 / (bg * bsg)
    lib = bits_per_weight(b, bg, bsg)        # Mixtral's w2: [4096, 14336]
    assert abs(by_hand - lib) < 1e-9
    print(f"{b}-bit g{bg} s{bsg:<4} | {by_hand:7.3f} | {lib:.3f}")
whole = 8 * PAPER_TABLE1_GIB[(4, 2)] * GiB / sum(params.values())
print(f"\nthe paper's 4-bit/2-bit size, 17.54 GiB for 46.7B parameters: {whole:.2f} bits per parameter overall")

# %% [markdown]
# The paper's text says the 2-bit scheme takes "on average, 2.6 bits per parameter". Counting
# every stored byte we get 3.03 for the experts, and the paper's own Table 1 size works out to
# 3.2 bits per parameter over the whole model; we could not reproduce the 2.6.

# %% [markdown]
# ## 4. Quantize once, load, generate
# `moe_colab.quantize(src, dst, quant)` streams a checkpoint tensor by tensor and writes the
# quantized model to a directory, resumably; `load_model(dst)` then reads the scheme from the
# directory's manifest. Each expert (its `w1`, `w2`, `w3` with their codes, scales and zeros)
# is one byte buffer, so moving it to the GPU is still **one** copy. For Mixtral this takes
# about an hour on a T4 (notebook 06); for `tiny` a few seconds.

# %%
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
# ## 5. What it costs: perplexity
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
N_TOKENS = 768                                        # 3 windows of 256: seconds on a CPU
tokens = torch.tensor(tokenizer(text).input_ids[:N_TOKENS])
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
# With 8,192 held-out tokens (half a minute on one CPU core; exercise 1), on the `tiny` of 2,000
# training steps, every pair was in the expected order and the largest change, 2-bit attention
# with 2-bit experts, was +4.3 %. A model of 9 million parameters is far from Mixtral: treat its
# column as a test that the whole path works, not as a prediction for Mixtral.
#
# One more check: the offloaded engine from section 4, reading the quantized directory, computes
# the same model as `perplexity_table`'s in-memory 4-bit/2-bit variant.

# %%
engine_ppl = perplexity(qmodel, tokens, seq_len=seq_len)
print(f"offloaded paper-2bit: {engine_ppl:.4f}; in memory (4-bit attention, 2-bit experts): {ppl[(4, 2)]:.4f}")
assert abs(engine_ppl - ppl[(4, 2)]) <= (1e-6 if rt.device == "cpu" else 1e-2) * ppl[(4, 2)]

# %% [markdown]
# ## 6. What fits on a free Colab T4
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
# ## 7. The real model (GPU only)
# With `USE_REAL_MIXTRAL = True` on a GPU, this loads Mixtral-8x7B-Instruct at 4-bit attention
# and 2-bit experts and checks that one expert copy is the size computed in section 1. Set the
# environment variable `MOE_COLAB_MIXTRAL` to a directory that notebook 06 quantized (e.g. on
# Google Drive) first; otherwise `load_model` downloads the 93 GB original and quantizes it
# while loading. Without a GPU the cell says so and does nothing.

# %%
if rt.real_mixtral:
    from moe_colab.quant.format import expert_format

    real = moe_colab.load_model(rt.model, **rt.load_kwargs(experts_on_device="auto"))
    real_dir = resolve(rt.model)
    real_tok = AutoTokenizer.from_pretrained(real_dir if (real_dir / "tokenizer_config.json").is_file()
                                             else "mistralai/Mixtral-8x7B-Instruct-v0.1")
    ids = real_tok("[INST] What is 2-bit quantization? [/INST]", return_tensors="pt").input_ids.to(real.device)
    real.reset_offload_stats()
    out = real.generate(ids, max_new_tokens=32, do_sample=False)
    print(real_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    s = real.offload_stats()
    nbytes = expert_format(mixtral, QuantConfig(4, 2), torch.float16).layout.nbytes     # paper-2bit
    print(s, f"\none copy: {s['bytes_to_device'] / max(s['misses'] + s['prefetches'], 1) / 2**20:.2f} MiB; "
             f"a paper-2bit expert is {nbytes / 2**20:.2f} MiB")
else:
    print("skipped: needs a GPU and USE_REAL_MIXTRAL = True (sections 2-6 used 'tiny')")

# %% [markdown]
# ## Summary
# - Experts are 96.6 % of Mixtral's parameters, so their bit width sets the size: 87 GiB in
#   16-bit, 17.1 GiB with 4-bit attention and 2-bit experts (the paper: 17.54 GiB).
# - HQQ stores a code per weight plus a scale and a zero per group; quantizing those to 8 bits
#   brings the paper's 2-bit scheme to 3.03 bits per weight at almost no cost in accuracy.
# - The format is simple enough to dequantize by hand, bit for bit equal to the library; an
#   expert stays one buffer, one copy.
# - On `tiny` every scheme costs little perplexity; on Mixtral the paper measured +28 % for
#   its Colab scheme (4-bit attention, 2-bit experts). With it (or 3-bit experts), 5 experts per layer fit on a T4;
#   16-bit does not fit at all.
#
# ## Exercises
# 1. Set `N_TOKENS = 8192` in section 5 and rerun it. Are the rows now in the order you expect
#    (fewer bits, higher perplexity)? Which part hurts `tiny` more per bit, attention or experts?
# 2. In section 2, quantize `W` with 2 bits and group 64 instead of 16
#    (`hqq_quantize(W, 2, 64)`). How do the error and the bits per weight change?
# 3. Write `rtn` with the scale and zero stored in 8 bits (`packing.meta_quantize`), and compare
#    its error with HQQ's at 2 bits.
# 4. Which scheme is better for the same size: 3-bit attention with 2-bit experts, or 2-bit
#    attention with 3-bit experts? Use the size table and the paper's perplexities.
# 5. Run `moe_colab.plan("mixtral-8x7b", quant="paper-2bit", device="cuda", device_bytes=12 * 2**30,
#    host_bytes=32e9)` (an RTX 3060 laptop). How many experts per layer, and why copy mode?
#
# ## What's next
# **06 Mixtral on a T4** puts it all together: the planner, 2-bit weights quantized shard by
# shard onto Google Drive, the offloaded model, and a chat with it: {{badge 06_mixtral_on_a_t4}}
