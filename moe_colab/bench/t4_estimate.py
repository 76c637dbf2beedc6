"""A Colab T4 decode estimate that counts compute, not only the host->device copies.

The benchmark runs on an H200. Its "T4 estimate" used to be 12 GB/s / bytes copied per token:
right only if the T4 computed for free. Here each expert forward measured on the H200 is moved
to the T4 by the slower of two resources, then placed in the engine's overlap of copies and
compute:

    kernel on the T4    t = max(bytes_moved / bw_T4,  t_H200 * fp32_H200 / fp32_T4)
        memory term: the bytes the kernel moves (quant/fallback.py's bytes_per_weight) at the
        T4's bandwidth, derated by the share of its own peak the H200 reached in the same run;
        compute term: the whole H200 time scaled by the FP32 (FMA) throughput ratio, as if the
        H200 had spent all of it computing (an upper bound for that term).
    one layer           t_layer = max(C, h * k * t) + (1 - h) * k * t
        k experts per token (top-k), h the hit ratio measured by the benchmark: the hits compute
        while the layer's copies (C = bytes copied per token / layers at 12 GB/s, prefetches
        included) run; each miss computes after its copy (the engine's order, engine/cache.py)
    one token           t_token = layers * t_layer + t_trunk
        t_trunk: the attention projections (4-bit, the same fused-kernel time per weight as a
        4-bit expert) and the 16-bit lm_head read at the T4's bandwidth; attention itself,
        norms and the router are left out (small at batch 1 and short contexts)

What it assumes, said in every report: T4 datasheet figures (320 GB/s, 8.1 FP32 TFLOPS), the
benchmark's routing and hit ratio, no other work on the GPU, perfect overlap where the engine
overlaps. It is an estimate to compare paths, not a measurement of a T4.

References: NVIDIA T4 and H200 datasheets; Eliseev & Mazur, arXiv 2312.17238, section 3 (the
overlap of loading and computing) and Table 2 (T4 rows).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth_GBps: float        # peak memory bandwidth (datasheet)
    fp32_tflops: float           # peak FP32 (FMA) throughput, no tensor cores (datasheet)


# Datasheet figures (SXM variants); T4: 40 SMs x 64 FP32 lanes x 2 x 1.59 GHz.
GPUS = {
    "T4": Gpu("T4", 320.0, 8.1),
    "A100": Gpu("A100", 2039.0, 19.5),
    "H100": Gpu("H100", 3350.0, 67.0),
    "H200": Gpu("H200", 4800.0, 67.0),
}
T4 = GPUS["T4"]
LINK_GBPS = 12.0                 # a T4's pinned host->device rate in practice (bench/report.py)
ATTN_WEIGHTS = lambda h, kv: 2 * h * h + 2 * kv * h   # noqa: E731  q, o [h, h]; k, v [kv, h]


def gpu_named(name: str) -> Gpu | None:
    """The GPUS entry whose key appears in a device name ("NVIDIA H200" -> H200), else None."""
    for key in sorted(GPUS, key=len, reverse=True):
        if key in name.upper():
            return GPUS[key]
    return None


def kernel_ms(measured_ms: float, bytes_moved: float, src: Gpu, dst: Gpu = T4,
              src_measured_GBps: float | None = None) -> dict:
    """One kernel (or expert forward) measured on ``src``, estimated on ``dst``:
    {"ms", "memory_ms", "compute_ms", "bound"}. ``src_measured_GBps``: the bandwidth ``src``
    reached in the same run (its share of peak derates ``dst``'s peak alike); None: peak."""
    if measured_ms < 0 or bytes_moved < 0:
        raise ValueError("times and byte counts must be >= 0")
    efficiency = min(1.0, src_measured_GBps / src.bandwidth_GBps) if src_measured_GBps else 1.0
    memory_ms = bytes_moved / (dst.bandwidth_GBps * efficiency * 1e9) * 1e3
    compute_ms = measured_ms * src.fp32_tflops / dst.fp32_tflops
    return {"ms": max(memory_ms, compute_ms), "memory_ms": memory_ms, "compute_ms": compute_ms,
            "bound": "memory" if memory_ms >= compute_ms else "compute"}


def layer_ms(expert_ms: float, *, top_k: int, hit_ratio: float, copy_ms: float) -> float:
    """One MoE layer: hits compute under the layer's copies, misses after them."""
    if not 0.0 <= hit_ratio <= 1.0:
        raise ValueError(f"hit_ratio must be in [0, 1], got {hit_ratio}")
    hits = top_k * hit_ratio
    return max(copy_ms, hits * expert_ms) + (top_k - hits) * expert_ms


def token_ms(expert_ms: float, *, layers: int, top_k: int, hit_ratio: float, copy_bytes_per_token: float,
             link_GBps: float = LINK_GBPS, trunk_ms: float = 0.0) -> float:
    """One decoded token: ``layers`` MoE layers (copies at ``link_GBps``) plus the trunk."""
    copy_ms = copy_bytes_per_token / layers / (link_GBps * 1e9) * 1e3
    return layers * layer_ms(expert_ms, top_k=top_k, hit_ratio=hit_ratio, copy_ms=copy_ms) + trunk_ms


def transfer_only_tokens_per_s(copy_bytes_per_token: float, link_GBps: float = LINK_GBPS) -> float:
    """The old estimate: the link's rate over the bytes copied per token (compute free)."""
    return link_GBps * 1e9 / copy_bytes_per_token


def trunk_ms(*, layers: int, hidden: int, kv_dim: int, vocab: int, attn_ms_per_weight: float,
             dst: Gpu = T4, efficiency: float = 1.0) -> float:
    """Attention projections (their per-weight time on dst) and the fp16 lm_head read."""
    return (layers * ATTN_WEIGHTS(hidden, kv_dim) * attn_ms_per_weight
            + vocab * hidden * 2 / (dst.bandwidth_GBps * efficiency * 1e9) * 1e3)


# ------------------------------------------------------------------------------------------------
# from the measurements (benchmarks/t4_kernels.py's JSON and the benchmark's rows) to tables
# ------------------------------------------------------------------------------------------------
VARIANTS = ("fused_sm75", "fused", "fallback_cuda", "fallback_torch", "reference")
LABELS = {"fused_sm75": "fused kernel (sm_75 PTX, T4 launch config)", "fused": "fused kernel (this GPU's config)",
          "fallback_cuda": "fallback: CUDA dequantize + cuBLAS", "fallback_torch": "fallback: torch dequantize + cuBLAS",
          "reference": "old torch path (packing.quant_linear_torch)"}


def expert_estimates(kernels_json: dict) -> dict:
    """{bits: {variant: kernel_ms(...) of one expert at T = 1 on the T4}} from t4_kernels.json."""
    bench = kernels_json.get("experts") or {}
    src = gpu_named(kernels_json.get("ran_on", "")) or GPUS["H200"]
    bw = kernels_json.get("device_bandwidth_GBps")
    out = {}
    for bits, row in bench.items():
        out[int(bits)] = {}
        for v in VARIANTS:
            r = row.get("variants", {}).get(v, {})
            ms = r.get("graph_ms", r.get("ms"))
            if ms is not None and r.get("bytes_moved") is not None:
                out[int(bits)][v] = kernel_ms(ms, r["bytes_moved"], src, T4, bw)
    return out


def token_table(kernels_json: dict, benchmark: dict, row: str = "full") -> list[dict]:
    """Per scheme of the benchmark: transfer-only tokens/s and the compute-aware estimate for
    each variant, from the benchmark's ``row`` (hit ratio, bytes per token) and the kernels."""
    est = expert_estimates(kernels_json)
    model = benchmark.get("settings", {}).get("model", {})
    layers, top_k = model.get("num_hidden_layers", 32), model.get("num_experts_per_tok", 2)
    hidden, vocab = model.get("hidden_size", 4096), model.get("vocab_size", 32000)
    kv_dim = hidden // 4                                 # Mixtral: 8 of 32 heads are key/value heads
    src = gpu_named(kernels_json.get("ran_on", "")) or GPUS["H200"]
    bw = kernels_json.get("device_bandwidth_GBps")
    eff = min(1.0, bw / src.bandwidth_GBps) if bw else 1.0
    attn = est.get(4, {}).get("fused_sm75") or est.get(4, {}).get("fused")
    experts_weights = (kernels_json.get("experts", {}).get("4", {}) or {}).get("weights")
    per_weight = attn["ms"] / experts_weights if attn and experts_weights else None
    rows = []
    for qn, q in benchmark.get("quants", {}).items():
        r = q.get("rows", {}).get(row) or {}
        m = re.search(r"(\d+)-?bit", qn)               # "paper-2bit" -> 2: the experts' width
        bits = int(m.group(1)) if m else None
        b, h = r.get("bytes_per_token"), r.get("hit_ratio")
        if not b or h is None or bits not in est:
            continue
        trunk = trunk_ms(layers=layers, hidden=hidden, kv_dim=kv_dim, vocab=vocab,
                         attn_ms_per_weight=per_weight, efficiency=eff) if per_weight else 0.0
        out = {"scheme": qn, "bits": bits, "row": row, "hit_ratio": h, "bytes_per_token": b,
               "transfer_only_tokens_per_s": transfer_only_tokens_per_s(b), "trunk_ms": trunk,
               "measured_h200_tokens_per_s": r.get("decode_tokens_per_s"), "variants": {}}
        for v, k in est[bits].items():
            t = token_ms(k["ms"], layers=layers, top_k=top_k, hit_ratio=h, copy_bytes_per_token=b, trunk_ms=trunk)
            out["variants"][v] = {"expert_ms": k["ms"], "bound": k["bound"], "token_ms": t,
                                  "tokens_per_s": 1e3 / t}
        rows.append(out)
    return rows


ASSUMPTIONS = ("T4: 320 GB/s and 8.1 FP32 TFLOPS (datasheet), derated by the share of its peak the H200 "
               "reached in the same run; each expert forward on the T4 takes the longer of its bytes at that "
               "bandwidth and its H200 time scaled by the FP32 throughput ratio; a layer's copies (12 GB/s, the "
               "benchmark's bytes per token) overlap its hits' compute, each miss computes after its copy; "
               "the trunk adds the 4-bit attention projections and the lm_head read; routing and hit ratio "
               "are the benchmark's. An estimate to compare paths, not a T4 measurement.")


def markdown(kernels_json: dict | None, benchmark: dict) -> list[str]:
    """Lines for docs/benchmarks.md: the transfer-only estimate beside the compute-aware one."""
    L = ["## T4 estimate with compute", ""]
    if not kernels_json:
        return L + ["No kernel measurements found: run `python benchmarks/t4_kernels.py all` on a GPU "
                    "(it writes t4_kernels.json).", ""]
    rows = token_table(kernels_json, benchmark)
    if not rows:
        return L + ["The benchmark has no row with bytes per token and hit ratio for a measured bit width.", ""]
    shown = [v for v in VARIANTS if any(v in r["variants"] for r in rows)]
    L += [f"Tokens/s on a T4, full row (kernel times measured on {kernels_json.get('ran_on', '?')}, "
          "[t4_kernels.md](t4_kernels.md)):", "",
          "| scheme | hit ratio | MB copied / token | transfer only | " + " | ".join(LABELS[v] for v in shown) + " |",
          "|---|---|---|---|" + "---|" * len(shown)]
    for r in rows:
        cells = [f"{r['variants'][v]['tokens_per_s']:.2f} ({r['variants'][v]['expert_ms']:.2f} ms/expert, "
                 f"{r['variants'][v]['bound']})" if v in r["variants"] else "-" for v in shown]
        L.append(f"| {r['scheme']} | {r['hit_ratio']:.3f} | {r['bytes_per_token'] / 1e6:.0f} | "
                 f"{r['transfer_only_tokens_per_s']:.2f} | " + " | ".join(cells) + " |")
    return L + ["", f"Assumptions: {ASSUMPTIONS}", ""]


def default_kernels_json() -> dict | None:
    """docs/t4_kernels.json of a source checkout, if there is one."""
    path = Path(__file__).resolve().parents[2] / "docs" / "t4_kernels.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def benchmark_section(res: dict) -> list[str]:
    """The section bench/report.py adds to docs/benchmarks.md."""
    return markdown(res.get("t4_kernels") or default_kernels_json(), res)
