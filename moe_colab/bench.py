"""The GPU benchmark: Mixtral-8x7B's shapes, synthetic 2/3-bit weights, four offloading rows.

    python -m moe_colab bench --quant both --out docs          # the H200 run (< 8 minutes)
    python -m moe_colab bench --device cpu --scale tiny --quick  # the whole path on CPU, seconds

Rows, measured in one process on the same prompts and the same routing (moe_colab.bench_routing):

    full         LRU expert cache + speculative prefetch       (the paper's "Full algorithm")
    no_prefetch  LRU cache only, prefetch 0                     ("W/o expert pre-loading")
    no_cache     every used expert copied on use (cache.reuse = False), prefetch 0
                                                                ("W/o LRU cache & pre-loading")
    naive        accelerate's dispatch_model offloading whole layers (bench_naive.py)

The device is capped like a T4 (15 GiB for the process), experts_on_device defaults to the
paper's demo (4 of 8). Each row reports decode and prefill tokens/s, cache counters, bytes
copied per token, the host -> device bandwidth measured in this run, and the transfer bound
(bandwidth / bytes per token). Results: benchmarks/bench_<name>.json after every row, and at the
end docs/benchmarks.json, docs/benchmarks.md, docs/figures/benchmarks.svg (bench_report.py).

Reference: Eliseev & Mazur, arXiv 2312.17238, Table 2.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import bench_measure as bm
from .bench_report import write_reports
from .bench_routing import DEFAULT_RECALL, make_routing, moe_blocks
from .bench_synthetic import bench_config, build_offloaded, make_store
from .quant.config import resolve_quant
from .quant.format import QuantizedExpertFormat

OFFLOAD_ROWS = ("full", "no_prefetch", "no_cache")
ROWS = OFFLOAD_ROWS + ("naive",)
# Share of a quant's time slot each row may take before it stops adding runs.
ROW_SHARE = {"full": 0.2, "no_prefetch": 0.2, "no_cache": 0.28, "naive": 0.25, "profile": 0.07}
GiB = 1 << 30


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m moe_colab bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--quant", default="both", choices=["paper-2bit", "paper-3bit", "both"])
    a("--scale", default="full", help="full (Mixtral-8x7B), small or tiny: smaller shapes for smoke tests")
    a("--layers", type=int, default=None, help="override the number of layers")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"])
    a("--routing", default="mixtral-table5", help="model | mixtral-table5 | synthetic:P | tiny | trace:PATH")
    a("--guess-recall", type=float, default=DEFAULT_RECALL, help="prefetch guess recall for replayed routing")
    a("--prompts", default="64,512", help="prompt lengths (prefill tokens), comma separated")
    a("--decode-tokens", type=int, default=128)
    a("--runs", type=int, default=2, help="runs per prompt for the offloading rows (median)")
    a("--naive-decode-tokens", type=int, default=16, help="decoded tokens per naive run (it is slow)")
    a("--naive-runs", type=int, default=1)
    a("--naive-pinned", action="store_true", help="keep accelerate's offloaded weights in pinned memory")
    a("--naive-reserve-gib", type=float, default=1.5, help="device memory kept free of naive weights")
    a("--naive-device-gib", type=float, default=None, help="device memory for naive weights "
      "(default: the cap minus the reserve)")
    a("--experts-on-device", type=int, default=4)
    a("--prefetch", type=int, default=2)
    a("--device-memory-gib", type=float, default=15.0, help="device memory cap for the process (T4: 15)")
    a("--rows", default=",".join(ROWS))
    a("--quick", action="store_true", help="1 run, 32 decoded tokens (naive: 4)")
    a("--profile", action="store_true", help="profile the full row's decode loop (torch.profiler)")
    a("--profile-tokens", type=int, default=16)
    a("--profile-trace", action="store_true", help="also write a chrome trace of the profile")
    a("--bandwidth-mb", default="64,128,256,352", help="copy sizes (MiB) for the bandwidth measurement")
    a("--out", default="docs", help="where benchmarks.md/.json and figures/benchmarks.svg go")
    a("--results-dir", default="benchmarks", help="where bench_<name>.json goes")
    a("--name", default=None, help="result name (default: a UTC timestamp)")
    a("--seed", type=int, default=0)
    a("--max-minutes", type=float, default=7.5, help="wall-clock budget; later runs are skipped")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.decode_tokens, args.naive_decode_tokens = 1, min(args.decode_tokens, 32), min(args.naive_decode_tokens, 4)
        args.profile_tokens = min(args.profile_tokens, 8)
    args.prompts = [int(x) for x in args.prompts.split(",") if x.strip()]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ROWS]
    if bad or not args.prompts or min(args.prompts) < 1 or args.decode_tokens < 1:
        p.error(f"bad --rows {bad} (choose from {ROWS}) or --prompts/--decode-tokens")
    return args


def machine_info(device) -> dict:
    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": __import__("os").cpu_count(),
            "host_memory_bytes": bm.psutil.virtual_memory().total, "device": str(device)}
    for mod in ("accelerate", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(gpu=prop.name, gpu_memory_bytes=prop.total_memory, cuda=torch.version.cuda,
                    capability=f"{prop.major}.{prop.minor}")
        try:
            import subprocess
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
        except Exception:
            info["driver"] = None
    return info


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        for f in ("_host_emptyCache",):            # give cached pinned blocks back to the OS
            if hasattr(torch._C, f):
                getattr(torch._C, f)()


def _error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


def configure(model, row: str, speculators: list) -> None:
    """Switch the one offloaded model between the rows."""
    for block, spec in zip(moe_blocks(model), speculators):
        block.speculator = spec if row == "full" else None
    model.moe_cache.reuse = row != "no_cache"


def run(args) -> dict:
    t_start = time.perf_counter()
    deadline = t_start + 60 * args.max_minutes
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but CUDA is not available")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.set_grad_enabled(False)
    name = args.name or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    results_path = Path(args.results_dir) / f"bench_{name}.json"
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)  # noqa: E731
    config = bench_config(args.scale, args.layers)
    quants = ["paper-2bit", "paper-3bit"] if args.quant == "both" else [args.quant]
    cap = int(args.device_memory_gib * GiB)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    res = {"schema": "moe_colab.bench/1", "name": name, "command": "python -m moe_colab bench " + " ".join(args.argv),
           "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(device),
           "settings": {k: v for k, v in vars(args).items() if k != "argv"} | {
               "dtype": str(dtype)[6:], "device_memory_cap_bytes": cap, "model": {
                   k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                   "num_local_experts", "num_experts_per_tok", "vocab_size")}},
           "quants": {}}

    def save():
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(res, indent=1))
        try:
            write_reports(res, Path(args.out))
        except Exception as e:      # a report bug must not lose the measurements
            log(f"report writing failed: {type(e).__name__}: {e}")

    log(f"device {device} ({res['machine'].get('gpu', 'cpu')}), cap {args.device_memory_gib} GiB, model "
        f"{config.num_hidden_layers} layers x {config.num_local_experts} experts, hidden {config.hidden_size}")
    tokens_needed = max(args.prompts) + max(args.decode_tokens, args.naive_decode_tokens, args.profile_tokens)
    replay = make_routing(args.routing, num_layers=config.num_hidden_layers, num_experts=config.num_local_experts,
                          top_k=config.num_experts_per_tok, tokens=tokens_needed, recall=args.guess_recall,
                          count=args.prefetch, device=device, seed=args.seed)
    res["routing"] = {"source": args.routing, "description": replay.description if replay else
                      "the synthetic model's own routers (random weights); guesses by the engine's speculator"}
    if replay:
        res["routing"].update(replay.summary(prefix=max(args.prompts)))
    log(f"routing: {res['routing']['description']}")
    sizes = [int(x) * bm.MiB for x in args.bandwidth_mb.split(",")]
    expert_bytes = {q: QuantizedExpertFormat(config.hidden_size, config.intermediate_size, resolve_quant(q)).layout.nbytes
                    for q in quants}
    bm.bandwidth(device, [min(sizes)], pinned=True, reps=1)          # warm-up: first-call costs
    pinned_bw = bm.bandwidth(device, sorted(set(sizes + list(expert_bytes.values()))), pinned=True)
    pageable_bw = bm.bandwidth(device, sizes, pinned=False, reps=3)
    res["bandwidth"] = {"pinned_GBps": {str(k): round(v, 2) for k, v in pinned_bw.items()},
                        "pageable_GBps": {str(k): round(v, 2) for k, v in pageable_bw.items()},
                        "kind": "host->device" if device.type == "cuda" else "host memcpy (no GPU)"}
    log(f"bandwidth GB/s pinned {res['bandwidth']['pinned_GBps']}, pageable {res['bandwidth']['pageable_GBps']}")
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, config.vocab_size, (1, P), generator=gen).to(device) for P in args.prompts]
    save()

    for qi, qname in enumerate(quants):
        qcfg = resolve_quant(qname)
        slot = max(0.0, deadline - time.perf_counter()) / (len(quants) - qi)
        q = res["quants"][qname] = {"describe": qcfg.describe(), "expert_bytes": expert_bytes[qname], "rows": {}}
        bw_expert = pinned_bw[expert_bytes[qname]] * 1e9
        bw_naive = (statistics.median(pinned_bw.values()) if args.naive_pinned else
                    statistics.median(pageable_bw.values())) * 1e9
        store = model = None
        if any(r in OFFLOAD_ROWS for r in args.rows) or args.profile:
            with bm.PeakRSS() as rss:
                try:
                    t = time.perf_counter()
                    store = make_store(config, qcfg, device, dtype, args.seed,
                                       progress=lambda l: l % 8 == 7 and log(f"  {qname}: {l + 1} layers of experts filled"))
                    model = build_offloaded(config, qcfg, store, device=device, dtype=dtype,
                                            experts_on_device=args.experts_on_device, prefetch=args.prefetch, seed=args.seed)
                    q["build_s"] = round(time.perf_counter() - t, 1)
                    q["pinned_bytes_requested"] = store.host_bytes if device.type == "cuda" else 0
                    log(f"{qname}: built in {q['build_s']} s, experts {store.host_bytes / GiB:.2f} GiB on the host, "
                        f"{model.moe_cache.device_bytes / GiB:.2f} GiB of device slots")
                except Exception as e:
                    q["build_error"] = _error(e)
                    log(f"{qname}: build FAILED: {q['build_error']['error']}")
                if model is not None:
                    speculators = [b.speculator for b in moe_blocks(model)]
                    if replay:
                        replay.install(model)

                    def reset():
                        model.moe_cache.clear()
                        if replay:
                            replay.reset()
                    for row in [r for r in OFFLOAD_ROWS if r in args.rows]:
                        q["rows"][row] = _row(row, model, prompts, args, device, deadline, slot, log, bw_expert,
                                              stats_fn=model.offload_stats, reset_fn=reset,
                                              setup=lambda r=row: configure(model, r, speculators))
                        save()
                    if args.profile:
                        try:
                            configure(model, "full", speculators)
                            trace = Path(args.results_dir) / f"profile_{name}_{qname}.json" if args.profile_trace else None
                            q["profile"] = bm.profile_decode(model, prompts[0], args.profile_tokens, device=device,
                                                             stats_fn=model.offload_stats, reset_fn=reset, trace_path=trace)
                            log(f"{qname}: profile per token {q['profile']['counts_per_token']}")
                        except Exception as e:
                            q["profile"] = _error(e)
                    if device.type == "cuda":
                        q["host_memory_stats"] = {k: v for k, v in torch.cuda.host_memory_stats().items()
                                                  if "bytes" in k} if hasattr(torch.cuda, "host_memory_stats") else None
            q["host_peak_rss_bytes"] = rss.peak
            model = speculators = reset = None      # the device slots go with them
            _free(device)
        if "naive" in args.rows:
            with bm.PeakRSS() as rss:
                try:
                    if store is None:
                        store = make_store(config, qcfg, device, dtype, args.seed)
                    q["rows"]["naive"] = _naive_row(config, qcfg, store, prompts, args, device, dtype, deadline,
                                                    slot, log, bw_naive, replay)
                except Exception as e:
                    q["rows"]["naive"] = _error(e)
                    log(f"{qname} naive: FAILED: {q['rows']['naive']['error']}")
            q["naive_peak_rss_bytes"] = rss.peak
        store = None
        _free(device)
        _compare_tokens(q["rows"])
        save()
    res["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save()
    log(f"wrote {results_path} and {Path(args.out) / 'benchmarks.md'}")
    return res


def _compare_tokens(rows: dict) -> None:
    """Share of each row's generated tokens equal to the full row's (same prompt, common length):
    every row computes the same model on the same routing, so 1.0 is expected."""
    ref = rows.get("full", {}).get("tokens")
    for r in rows.values():
        if not ref or "tokens" not in r:
            continue
        same = total = 0
        for p, toks in r["tokens"].items():
            if p in ref:
                n = min(len(toks), len(ref[p]))
                same += sum(a == b for a, b in zip(toks[:n], ref[p][:n]))
                total += n
        r["same_tokens_as_full"] = same / total if total else None


def _row(row, model, prompts, args, device, deadline, slot, log, bw, *, stats_fn, reset_fn, setup,
         n_new=None, runs=None, warmup_prompts=None) -> dict:
    """One row, guarded: an error is recorded and printed, and the run goes on."""
    now = time.perf_counter()
    if now > deadline:
        log(f"  {row}: skipped (time budget)")
        return {"skipped": "time budget"}
    log(f"  {row}:")
    share = ROW_SHARE[row] * slot
    try:
        setup()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r = bm.measure_row(model, prompts, n_new or args.decode_tokens, runs or args.runs, device=device,
                           stats_fn=stats_fn, reset_fn=reset_fn, row_deadline=now + share,
                           hard_deadline=min(deadline, now + 2 * share), warmup_prompts=warmup_prompts,
                           log=log)
    except Exception as e:
        out = _error(e)
        log(f"  {row}: FAILED: {out['error']}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return out
    r["bandwidth_GBps"] = bw / 1e9
    r["bound_tokens_per_s"] = bw / r["bytes_per_token"] if r["bytes_per_token"] else None
    r["measured_over_bound"] = (r["decode_tokens_per_s"] / r["bound_tokens_per_s"]
                                if r["bound_tokens_per_s"] and r["decode_tokens_per_s"] else None)
    if device.type == "cuda":
        r["device_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    hr = "-" if r["hit_ratio"] is None else f"{r['hit_ratio']:.3f}"
    log(f"  {row}: decode {r['decode_tokens_per_s']:.2f} tok/s, hit ratio {hr}, "
        f"{(r['bytes_per_token'] or 0) / 1e6:.1f} MB/token, bound {r['bound_tokens_per_s'] or 0:.2f} tok/s")
    return r


def _naive_row(config, qcfg, store, prompts, args, device, dtype, deadline, slot, log, bw, replay) -> dict:
    from .bench_naive import build_naive, bytes_moved

    budget = int((args.device_memory_gib - args.naive_reserve_gib) * GiB if args.naive_device_gib is None
                 else args.naive_device_gib * GiB)
    with tempfile.TemporaryDirectory(prefix="moe_colab_naive_") as offload_dir:
        if device.type == "cpu":    # no device memory: bench_naive keeps 3/4 of the model in RAM
            budget = None
        t = time.perf_counter()
        model, info = build_naive(config, qcfg, store, device=device, dtype=dtype, seed=args.seed,
                                  max_device_bytes=budget, pinned=args.naive_pinned, offload_dir=offload_dir)
        log(f"  naive: dispatched in {time.perf_counter() - t:.1f} s, {len(info['offloaded_modules'])} modules "
            f"offloaded to {info['offload_tier']} ({info['offloaded_bytes_per_forward'] / GiB:.2f} GiB per forward)")
        if replay:
            replay.install(model)
        stats = lambda: {"bytes_to_device": bytes_moved(info)}  # noqa: E731
        reset = replay.reset if replay else (lambda: None)
        r = _row("naive", model, prompts, args, device, deadline, slot, log, bw, stats_fn=stats, reset_fn=reset,
                 setup=lambda: None, n_new=args.naive_decode_tokens, runs=args.naive_runs, warmup_prompts=1)
        r.update({k: v for k, v in info.items() if k != "calls"})
        del model
        _free(device)
    return r


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        res = run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [f"{q}/{r}" for q, d in res["quants"].items() for r, v in d["rows"].items() if "error" in v]
    failed += [f"{q}/build" for q, d in res["quants"].items() if "build_error" in d]
    if failed:
        print(f"rows that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
