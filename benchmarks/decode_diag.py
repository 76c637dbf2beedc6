"""Where the decode time of the offloaded full-size model goes: A/B variants and a trace.

Builds Mixtral-8x7B's shapes with synthetic paper-2bit experts once (as `python -m moe_colab
bench` does), then for each variant of the engine's settings decodes the same prompt with the
rows full / no_prefetch / no_cache (one engine per row and variant over the one store, built
with that OffloadOptions), and profiles a few tokens of the full row:

    copy     OffloadOptions(host_sync="copy"): host values gathered by kernels, one small D2H copy
    mapped   host_sync="mapped": kernels write straight into mapped pinned host memory
    nographs mapped, with cuda_graphs=False (every one-token call eager)

(copy and mapped run with CUDA graphs on.)

The trace analysis prints, per decoded token: memcpys on the compute stream (count, mean and
max duration), the copy stream's busy share, and how long the host waited in synchronisations.
Chrome traces (gzip) go to --out. GPU only (--scale tiny runs it on a CPU, as a smoke test).
benchmarks/results/diag/decode_diag_legacy.json came from this script's first version
(commit 745533b), which also timed the MoE block of commit 00605bc.

    python benchmarks/decode_diag.py --out DIR [--variants copy,mapped,nographs] [--tokens 64]
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import torch

from moe_colab.bench.measure import release, timed_run
from moe_colab.bench.replay import make_routing
from moe_colab.bench.synthetic import bench_config, build_offloaded, make_store
from moe_colab.config import OffloadOptions
from moe_colab.quant.config import resolve_quant

VARIANTS = ("copy", "mapped", "nographs")


ROWS = {"full": {}, "no_prefetch": {"prefetch": 0}, "no_cache": {"prefetch": 0, "reuse": False}}


def options(variant: str, row: str, cuda: bool) -> OffloadOptions:
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return OffloadOptions(experts_on_device=4, prefetch=2, host_sync="copy" if variant == "copy" else "mapped",
                          cuda_graphs=cuda and variant != "nographs", **ROWS[row])


def annotate(model):
    """Label the host work of each piece of a decoder layer in the profile (record_function
    around forward methods); returns a function that takes the labels off again."""
    from moe_colab.adapters.mixtral import MixtralAdapter
    from torch.profiler import record_function
    undo = []

    def wrap(obj, name, label):
        f = getattr(obj, name)

        def g(*args, **kw):
            with record_function(label):
                return f(*args, **kw)
        setattr(obj, name, g)
        undo.append((obj, name))
    for layer in MixtralAdapter.decoder_layers(model):
        wrap(layer, "forward", "L:layer")
        wrap(layer.self_attn, "forward", "L:attention")
        wrap(layer.input_layernorm, "forward", "L:norms")
        wrap(layer.post_attention_layernorm, "forward", "L:norms")
        wrap(MixtralAdapter.moe_block(layer), "forward", "L:moe")
        spec = MixtralAdapter.moe_block(layer).speculator
        if spec is not None:
            wrap(spec, "guess_fn", "M:guess")
    cache = model.moe_cache
    wrap(cache, "sync", "M:sync")
    wrap(cache, "_load", "M:issue_copy")
    wrap(cache.store.format, "forward", "M:expert_forward")

    def remove():
        for obj, name in undo:
            try:
                delattr(obj, name)
            except AttributeError:
                pass
    return remove


def analyse(trace_path: Path, tokens: int) -> dict:
    with gzip.open(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    streams: dict = {}
    for e in gpu:
        streams.setdefault(e["args"].get("stream"), []).append(e)
    compute = max(streams, key=lambda s: sum(e["cat"] == "kernel" for e in streams[s]))
    copy = max((s for s in streams if s != compute), key=lambda s: len(streams[s]), default=None)
    t0 = min(e["ts"] for e in gpu)
    t1 = max(e["ts"] + e["dur"] for e in gpu)
    out = {"window_ms_per_token": (t1 - t0) / 1e3 / tokens, "compute_stream": compute, "copy_stream": copy}
    memcpys: dict = {}
    for e in streams[compute]:
        if e["cat"] == "gpu_memcpy":
            memcpys.setdefault(e["name"], []).append(e["dur"])
    out["compute_stream_memcpys"] = {k: {"per_token": len(v) / tokens, "mean_us": statistics.mean(v),
                                         "max_us": max(v)} for k, v in memcpys.items()}
    busy = sum(e["dur"] for e in streams[compute] if e["cat"] == "kernel")
    out["compute_kernel_ms_per_token"] = busy / 1e3 / tokens
    if copy is not None:
        out["copy_stream_busy_ms_per_token"] = sum(e["dur"] for e in streams[copy]) / 1e3 / tokens
    cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")]
    waits = [e["dur"] for e in cpu if "Synchronize" in e["name"]]
    out["host_sync_wait_ms_per_token"] = sum(waits) / 1e3 / tokens
    out["host_syncs_per_token"] = len(waits) / tokens
    launches = [e for e in cpu if "Launch" in e["name"]]
    out["launches_per_token"] = len(launches) / tokens
    # Compute-stream gaps: idle stretches over 50 us, and what came right after them.
    ev = sorted(streams[compute], key=lambda e: e["ts"])
    gaps, after = [], {}
    for a, b in zip(ev, ev[1:]):
        g = b["ts"] - (a["ts"] + a["dur"])
        if g > 50:
            gaps.append(g)
            key = b["name"][:60]
            after[key] = after.get(key, 0) + g
    out["compute_gaps_over_50us"] = {"per_token": len(gaps) / tokens, "ms_per_token": sum(gaps) / 1e3 / tokens,
                                     "top_followers_ms": dict(sorted(((k, round(v / 1e3 / tokens, 3))
                                                                      for k, v in after.items()),
                                                                     key=lambda kv: -kv[1])[:8])}
    labels: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e["name"][:2] in ("L:", "M:"):
            labels[e["name"]] = labels.get(e["name"], 0) + e["dur"]
    out["host_ms_per_token_by_label"] = {k: round(v / 1e3 / tokens, 3) for k, v in sorted(labels.items())}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="diag_out")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rows", default="full,no_prefetch,no_cache")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--trace-tokens", type=int, default=6)
    p.add_argument("--quant", default="paper-2bit")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--scale", default="full", help="full, or small/tiny for a smoke test")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.float16 if cuda else torch.float32
    if cuda:
        torch.cuda.set_per_process_memory_fraction(
            15 * 2**30 / torch.cuda.get_device_properties(dev).total_memory, dev)
    cfg = bench_config(a.scale, a.layers)
    qcfg = resolve_quant(a.quant)
    t = time.perf_counter()
    store = make_store(cfg, qcfg, dev, dtype, 0)
    print(f"built in {time.perf_counter() - t:.1f} s", flush=True)
    replay = make_routing("mixtral-table5", num_layers=cfg.num_hidden_layers, num_experts=8, top_k=2,
                          tokens=64 + a.tokens + 8, recall=0.8, count=2, device=dev)
    ids = torch.randint(3, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).to(dev)

    def engine(variant, row):
        model = build_offloaded(cfg, qcfg, store, options(variant, row, cuda), device=dev, dtype=dtype,
                                strategies=replay.strategies())
        replay.reset()
        return model
    variants = a.variants.split(",")
    rows = a.rows.split(",")
    results = {v: {r: {"decode_tok_s": []} for r in rows} for v in variants}
    with torch.no_grad():
        # Interleaved (rep, row, variant) so that drifts of the machine hit every variant alike.
        for rep in range(a.runs + 1):
            for row in rows:
                for variant in variants:
                    model = engine(variant, row)
                    r = timed_run(model, ids, 2 if rep == 0 else a.tokens, device=dev, stats_fn=model.offload_stats)
                    del model
                    release(dev)
                    if rep == 0:                      # warm-up
                        continue
                    s = r["decode_stats"]
                    res = results[variant][row]
                    res["decode_tok_s"].append(round(r["decoded"] / r["decode_s"], 2))
                    res.update({"bytes_per_token_MB": round(s["bytes_to_device"] / r["decoded"] / 1e6, 1),
                                "misses_per_token": round(s["misses"] / r["decoded"], 2),
                                "prefetches_per_token": round(s["prefetches"] / r["decoded"], 2)})
        for variant in variants:
            for row in rows:
                res = results[variant][row]
                res["median"] = statistics.median(res["decode_tok_s"])
                print(f"{variant:7s} {row:12s} {res}", flush=True)
        for variant in variants:
            model = engine(variant, "full")
            from torch.profiler import ProfilerActivity, profile
            prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            timed_run(model, ids, 2, device=dev, stats_fn=model.offload_stats)      # graphs captured
            model.moe_cache.clear()
            replay.reset()
            undo = annotate(model)
            r = timed_run(model, ids, a.trace_tokens, device=dev, stats_fn=model.offload_stats, decode_context=prof)
            undo()
            del model
            release(dev)
            raw = out / f"trace_{variant}.json"
            prof.export_chrome_trace(str(raw))
            gz = raw.with_suffix(".json.gz")
            with open(raw, "rb") as f, gzip.open(gz, "wb") as g:
                g.write(f.read())
            raw.unlink()
            try:
                results[variant]["trace"] = analyse(gz, r["decoded"])
            except Exception as e:        # keep the measurements and the trace
                results[variant]["trace"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{variant:7s} trace {json.dumps(results[variant]['trace'], indent=1)}", flush=True)
            (out / "decode_diag.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
