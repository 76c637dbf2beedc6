"""Writes a benchmark result (bench.py's dict) as docs/benchmarks.json, docs/benchmarks.md and a
hand-made SVG bar chart docs/figures/benchmarks.svg (no matplotlib), next to the paper's Table 2.

Reference: Eliseev & Mazur, arXiv 2312.17238, Table 2 (tokens/s, Mixtral-8x7B-Instruct, batch 1).
"""
from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import escape

from .t4_estimate import benchmark_section as t4_compute_section

T4_GBPS = 12.0           # a T4's pinned host->device rate in practice (PCIe 3.0 x16)
COLAB_RAM = 12.7e9       # free Colab's host memory, bytes
ROW_NAMES = {"full": "Full algorithm (LRU + prefetch)", "no_prefetch": "W/o expert pre-loading",
             "no_cache": "W/o LRU cache & pre-loading", "naive": "Naive offloading (accelerate)",
             "full_swap": "Full algorithm, swap mode (same k)",
             "colab": "Colab T4 plan: full, swap mode, the planner's k",
             "colab_no_prefetch": "Colab T4 plan, w/o pre-loading",
             "colab_copy": "Colab T4 plan's k in copy mode (reference)"}
PAPER_ROWS = ("full", "no_prefetch", "no_cache", "naive")
# Table 2 of the paper: {row: {(bits, gpu): tokens/s}}
PAPER_TABLE2 = {
    "full": {(2, "A100"): 3.061, (2, "RTX3080M"): 2.655, (2, "RTX3060"): 2.278, (2, "T4"): 2.092,
             (3, "A100"): 2.845, (3, "RTX3080M"): 2.475, (3, "RTX3060"): 2.038, (3, "T4"): 1.603},
    "no_prefetch": {(2, "A100"): 2.918, (2, "RTX3080M"): 2.227, (2, "RTX3060"): 2.051, (2, "T4"): 1.567,
                    (3, "A100"): 2.683, (3, "RTX3080M"): 2.024, (3, "RTX3060"): 1.857, (3, "T4"): 1.365},
    "no_cache": {(2, "A100"): 2.265, (2, "RTX3080M"): 1.758, (2, "RTX3060"): 1.547, (2, "T4"): 1.168,
                 (3, "A100"): 2.055, (3, "RTX3080M"): 1.595, (3, "RTX3060"): 1.346, (3, "T4"): 1.061},
    "naive": {(2, "A100"): 1.392, (2, "RTX3080M"): 1.059, (2, "RTX3060"): 0.919, (2, "T4"): 0.661,
              (3, "A100"): 1.246, (3, "RTX3080M"): 0.914, (3, "RTX3060"): 1.791, (3, "T4"): 0.580},
}
COLORS = {"full": "#0072b2", "no_prefetch": "#56b4e9", "no_cache": "#a0c4e8", "naive": "#e69f00",
          "full_swap": "#009e73", "colab": "#d55e00", "colab_no_prefetch": "#cc79a7", "colab_copy": "#999999"}


def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def _sizes(d: dict) -> str:
    return ", ".join(f"{int(k) / 1e6:.4g} MB: {v:.3g}" for k, v in d.items()) or "-"


def t4_estimate(row: dict):
    """Transfer-bound tokens/s on a T4 (12 GB/s each way: loads and write-backs use separate copy
    engines) for the busier direction of this row's measured bytes per token: an upper bound."""
    b = max(row.get("bytes_to_device_per_token") or row.get("bytes_per_token") or 0,
            row.get("bytes_to_host_per_token") or 0)
    return T4_GBPS * 1e9 / b if b else None


def targets(q: dict) -> dict:
    """The targets of issues #5 and #11, from one run's medians (benchmark figures, not tests)."""
    rows = q.get("rows", {})
    tps = {r: rows.get(r, {}).get("decode_tokens_per_s") for r in ROW_NAMES}
    out = {}

    def ratio(name, a, b, target):
        if tps.get(a) and tps.get(b):
            out[name] = {"value": tps[a] / tps[b], "target": f">= {target}", "met": tps[a] >= target * tps[b]}
    ratio("full_over_naive", "full", "naive", 5)
    ratio("full_over_no_prefetch", "full", "no_prefetch", 1.1)
    ratio("colab_over_no_prefetch", "colab", "colab_no_prefetch", 1.1)
    ratio("swap_over_copy", "full_swap", "full", 0.9)
    ratio("colab_swap_over_copy", "colab", "colab_copy", 0.9)
    for r in ("full", "colab"):
        mb = rows.get(r, {}).get("measured_over_bound")
        if mb is not None:
            out[f"{r}_over_bound"] = {"value": mb, "target": ">= 0.85", "met": mb >= 0.85}
    same = [v.get("same_tokens_as_full") for r, v in rows.items() if r != "naive" and isinstance(v, dict)
            and v.get("same_tokens_as_full") is not None]
    if same:
        out["same_tokens"] = {"value": min(same), "target": "1.000 for every engine row", "met": min(same) == 1.0}
    if tps["full"] and tps["no_prefetch"] and tps["no_cache"]:
        out["ordering"] = {"value": [tps["full"], tps["no_prefetch"], tps["no_cache"]],
                           "target": "full > no_prefetch > no_cache",
                           "met": tps["full"] > tps["no_prefetch"] > tps["no_cache"]}
    return out


SHORT = {"full": "full", "no_prefetch": "no prefetch", "no_cache": "no cache", "naive": "naive",
         "full_swap": "swap", "colab": "colab", "colab_no_prefetch": "colab no pf", "colab_copy": "colab copy"}


def svg_chart(res: dict) -> str:
    """Grouped bars: decode tokens/s per row and quant, the transfer bound as a dashed outline."""
    groups = [(qn, q.get("rows", {})) for qn, q in res.get("quants", {}).items()]
    shown = [r for r in ROW_NAMES if any(r in rows for _, rows in groups)]
    vals = [v for _, rows in groups for r in rows.values() if isinstance(r, dict)
            for v in (r.get("decode_tokens_per_s"), r.get("bound_tokens_per_s")) if v]
    top = max(vals) * 1.12 if vals else 1.0
    pitch, bw, gap, left, bottom, plot_top = 70, 46, 50, 64, 300, 44
    gw = len(shown) * pitch
    W, H = left + len(groups) * (gw + gap) + 20, 372
    m = res.get("machine", {})
    y = lambda v: bottom - (bottom - plot_top) * v / top  # noqa: E731
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         f'font-family="sans-serif" font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{left}" y="18" font-size="14">Decode tokens/s, batch 1: {escape(str(m.get("gpu", m.get("device", ""))))}'
         f'</text><text x="{left}" y="34" fill="#555">filled: measured; dashed outline: transfer bound '
         f'(bandwidth / bytes per token)</text>']
    for i in range(6):
        v = top * i / 5
        s.append(f'<line x1="{left - 4}" y1="{y(v):.1f}" x2="{W - 10}" y2="{y(v):.1f}" stroke="#e2e2e2"/>'
                 f'<text x="{left - 7}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    s.append(f'<line x1="{left}" y1="{bottom}" x2="{W - 10}" y2="{bottom}" stroke="black"/>')
    for g, (qn, rows) in enumerate(groups):
        x0 = left + gap / 2 + g * (gw + gap)
        s.append(f'<text x="{x0 + gw / 2:.1f}" y="{bottom + 42}" text-anchor="middle" font-size="13" '
                 f'font-weight="bold">{escape(qn)}</text>')
        for i, r in enumerate(shown):
            row, x = rows.get(r, {}), x0 + i * pitch + (pitch - bw) / 2
            cx = x + bw / 2
            s.append(f'<text x="{cx:.1f}" y="{bottom + 16}" text-anchor="middle" font-size="10">{SHORT[r]}</text>')
            v, b = row.get("decode_tokens_per_s"), row.get("bound_tokens_per_s")
            if v:
                s.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bw}" height="{bottom - y(v):.1f}" fill="{COLORS[r]}"/>'
                         f'<text x="{cx:.1f}" y="{y(v) - 4:.1f}" text-anchor="middle">{v:.3g}</text>')
            elif row:
                s.append(f'<text x="{cx:.1f}" y="{bottom - 6}" text-anchor="middle" fill="#c00">n/a</text>')
            if b:
                s.append(f'<rect x="{x - 3:.1f}" y="{y(b):.1f}" width="{bw + 6}" height="{bottom - y(b):.1f}" '
                         f'fill="none" stroke="#333" stroke-dasharray="4,3"/>')
    s.append("</svg>")
    return "\n".join(s)


def markdown(res: dict) -> str:
    m, st, rt, bwd = res.get("machine", {}), res.get("settings", {}), res.get("routing", {}), res.get("bandwidth", {})
    model = st.get("model", {})
    L = ["# Offloading benchmark: Mixtral-8x7B shapes, synthetic low-bit weights",
         "", f"Generated by `{res.get('command', '')}` ({res.get('started', '')}, {res.get('elapsed_s', '?')} s); "
         "do not edit by hand. Raw numbers: [benchmarks.json](benchmarks.json).", "",
         "## Setup", "",
         f"- **Machine**: {m.get('gpu', m.get('device'))}, driver {m.get('driver', '-')}, CUDA {m.get('cuda', '-')}; "
         f"torch {m.get('torch')}, transformers {m.get('transformers')}, accelerate {m.get('accelerate')}, "
         f"triton {m.get('triton')}; host RAM {m.get('host_memory_bytes', 0) / 1e9:.0f} GB.",
         f"- **Model**: {model.get('num_hidden_layers')} layers, hidden {model.get('hidden_size')}, intermediate "
         f"{model.get('intermediate_size')}, {model.get('num_local_experts')} experts, top-{model.get('num_experts_per_tok')}"
         f" (scale `{st.get('scale')}`); random weights written directly in the quantized layout (no checkpoint). "
         f"Device memory capped at {st.get('device_memory_gib')} GiB (a T4 has 15 GB), {st.get('experts_on_device')} "
         f"experts per layer on the device, prefetch {st.get('prefetch')} (full row), {st.get('dtype')}.",
         f"- **Routing** (`{rt.get('source')}`, the same in every row): {rt.get('description', '')}."
         + (f" Measured overlap of consecutive tokens' experts: {_f(rt.get('overlap_mean'), '{:.3f}')} (chance "
            f"{_f(rt.get('chance_overlap'), '{:.3f}')}); prefetch guesses hold the next layer's true experts with "
            f"recall {_f(rt.get('guess_recall_measured'), '{:.3f}')} (target {rt.get('guess_recall_target')})."
            if "overlap_mean" in rt else ""),
         f"- **Prompts**: random token ids, prefill of {', '.join(map(str, st.get('prompts', [])))} tokens, then "
         f"{st.get('decode_tokens')} decoded tokens (naive: {st.get('naive_decode_tokens')}), batch 1, greedy; "
         f"median over {st.get('runs')} run(s) per prompt (naive: {st.get('naive_runs')}).",
         f"- **Bandwidth** ({bwd.get('kind')}, measured in this run, GB/s by copy size): pinned "
         f"{_sizes(bwd.get('pinned_GBps', {}))}; pageable {_sizes(bwd.get('pageable_GBps', {}))}.", ""]
    for qn, q in res.get("quants", {}).items():
        L += [f"## {qn}: {q.get('describe', '')}", "",
              f"One expert = {q.get('expert_bytes', 0) / 1e6:.1f} MB, copied in one piece."]
        if "build_error" in q:
            L += ["", f"**Build failed**: `{q['build_error']['error']}`"]
        L += ["", "| row | decode tok/s | prefill tok/s (per prompt) | hit ratio | prefetch recall | MB copied / token "
              "| bandwidth GB/s | transfer bound tok/s | measured / bound | T4 estimate tok/s* | same tokens as full |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r, label in ROW_NAMES.items():
            row = q.get("rows", {}).get(r)
            if row is None:
                continue
            if "error" in row or "skipped" in row:
                L.append(f"| {label} | {'failed: `' + row.get('error', '')[:120] + '`' if 'error' in row else 'skipped'} "
                         "| | | | | | | | | |")
                continue
            pre = " / ".join(f"{_f(v['prefill_tokens_per_s'], '{:.0f}')} ({p})" for p, v in row.get("per_prompt", {}).items())
            L.append(f"| {label} | **{_f(row.get('decode_tokens_per_s'))}** | {pre} | {_f(row.get('hit_ratio'), '{:.3f}')} "
                     f"| {_f(row.get('prefetch_recall'), '{:.3f}')} | {_f((row.get('bytes_per_token') or 0) / 1e6, '{:.4g}')} "
                     f"| {_f(row.get('bandwidth_GBps'), '{:.3g}')} | {_f(row.get('bound_tokens_per_s'), '{:.4g}')} "
                     f"| {_f(row.get('measured_over_bound'), '{:.3g}')} | {_f(t4_estimate(row), '{:.4g}')} "
                     f"| {_f(row.get('same_tokens_as_full'), '{:.3f}')} |")
        nv = q.get("rows", {}).get("naive", {})
        if nv.get("offloaded_modules") is not None:
            L += ["", f"Naive: accelerate offloaded {len(nv['offloaded_modules'])} modules to {nv.get('offload_tier')} "
                  f"({nv.get('offloaded_bytes_per_forward', 0) / 1e9:.2f} GB moved per forward; offloaded weights "
                  f"{'pinned' if nv.get('offloaded_experts_pinned') else 'pageable'})."]
        cp = q.get("colab_plan")
        if cp:
            L += ["", f"Colab plan (15 GiB device, 12.7 GB host): {cp['experts_on_device']} of {cp['num_experts']} "
                  f"experts per layer, {'swap' if cp['swap'] else 'copy'} mode, {cp['spare_slots']} spare slots, "
                  f"{cp['extra_host_rows']} spare host rows; planned host {cp['host_total'] / 1e9:.2f} GB, device "
                  f"{(cp['device_total'] + cp['device_margin_bytes']) / 2**30:.2f} GiB with margin."]
        for r in ("full_swap", "colab", "colab_no_prefetch"):
            row = q.get("rows", {}).get(r, {})
            if row.get("host_expert_bytes"):
                rss = row.get("host_peak_rss_bytes") or 0
                L += ["", f"{ROW_NAMES[r]}: {row['host_expert_bytes'] / 1e9:.1f} GB of experts on the host, peak "
                      f"resident {rss / 1e9:.1f} GB of this process (the benchmark's own data included); "
                      f"{_f((row.get('bytes_to_device_per_token') or 0) / 1e6, '{:.0f}')} MB/token loaded, "
                      f"{_f((row.get('bytes_to_host_per_token') or 0) / 1e6, '{:.0f}')} MB/token written back; its runs "
                      "start from a warm cache (swap mode cannot empty it)."]
        if q.get("host_peak_rss_bytes"):
            rss = q["host_peak_rss_bytes"]
            L += ["", f"Host memory: peak resident {rss / 1e9:.1f} GB while building and running the offloaded model "
                  f"({'within' if rss <= COLAB_RAM else 'ABOVE'} free Colab's {COLAB_RAM / 1e9} GB); pinned expert "
                  f"storage {q.get('pinned_bytes_requested', 0) / 1e9:.1f} GB."]
        prof = q.get("profile")
        if prof and "counts_per_token" in prof:
            L += ["", f"Profile of the full row ({prof['tokens']} decoded tokens): {prof['wall_ms_per_token']:.1f} ms per "
                  f"token wall, {_f(prof.get('htod_copy_ms_per_token'))} ms host->device copies, "
                  f"{_f(prof.get('device_compute_ms_per_token'))} ms device kernels; per token: "
                  + ", ".join(f"{k} {v}" for k, v in prof["counts_per_token"].items()) + "."]
        tg = targets(q)
        if tg:
            L += ["", "Targets (benchmark figures, not tests): " + "; ".join(
                f"{k} = {[round(x, 2) for x in v['value']] if isinstance(v['value'], list) else round(v['value'], 2)} "
                f"(target {v['target']}: {'met' if v['met'] else 'NOT met'})" for k, v in tg.items()) + "."]
        L.append("")
    L += ["*T4 estimate = 12 GB/s / measured bytes per token of the busier direction (a T4 has separate copy "
          "engines for loads and write-backs): the transfer bound a T4 would have for the same copies. An upper "
          "bound, not a measurement; the section below adds compute.", "",
          "![decode tokens/s per row, with the transfer bound](figures/benchmarks.svg)", "",
          "## Beside the paper's Table 2", "",
          "Tokens/s. The paper: real Mixtral-8x7B-Instruct; ours: synthetic weights of the same shapes, "
          f"on {m.get('gpu', m.get('device'))} capped at {st.get('device_memory_gib')} GiB.", "",
          "| algorithm | paper 2-bit A100 | paper 2-bit T4 | ours 2-bit | ours 2-bit T4 est. | paper 3-bit A100 "
          "| paper 3-bit T4 | ours 3-bit | ours 3-bit T4 est. |", "|---|---|---|---|---|---|---|---|---|"]
    for r in PAPER_ROWS:
        label, cells = ROW_NAMES[r], []
        for bits, qn in ((2, "paper-2bit"), (3, "paper-3bit")):
            row = res.get("quants", {}).get(qn, {}).get("rows", {}).get(r, {})
            cells += [f"{PAPER_TABLE2[r][(bits, 'A100')]}", f"{PAPER_TABLE2[r][(bits, 'T4')]}",
                      _f(row.get("decode_tokens_per_s")), _f(t4_estimate(row), "{:.4g}")]
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    L += ["", "## Definitions", "",
          "- decode tok/s: decoded tokens / decode seconds; each decoded token is one single-token forward with "
          "a KV cache (median over runs and prompts). Prefill tok/s: prompt tokens / seconds of the prompt's "
          "forward. Both timed between device synchronisations.",
          "- hit ratio = hits / (hits + misses) of the expert cache during decode; prefetch recall = prefetch "
          "hits / (hits + misses): the share of expert uses served by a copy a speculative prefetch had brought.",
          "- MB copied / token: host->device bytes during decode (expert cache copies, prefetches included; naive: "
          "bytes of every offloaded module accelerate loaded, counted per call) / decoded tokens.",
          "- transfer bound = bandwidth / bytes per token of the busier direction (host->device, or device->host "
          "in swap mode; bandwidth measured in this run: pinned copies of one expert for our rows; pageable, or "
          "pinned with --naive-pinned, for naive); measured / bound near 1 means the copies are the whole cost.",
          "- same tokens as full: share of greedy tokens equal to the full row's; every row computes the same "
          "weights on the same routing, so it should be 1. Runs before the kernels' split-K partial sums were "
          "added in a fixed order (atomic adds until 2026-11-28) could differ in the last bits, enough to flip "
          "a greedy near-tie on random weights; after that, below 1 means a bug.", ""]
    return "\n".join(L + t4_compute_section(res))   # the T4 estimate with compute, beside the one above


def write_reports(res: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks.json").write_text(json.dumps(res, indent=1))
    (out_dir / "benchmarks.md").write_text(markdown(res))
    (out_dir / "figures" / "benchmarks.svg").write_text(svg_chart(res))
