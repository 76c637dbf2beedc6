"""The GPU benchmark: Mixtral-8x7B's shapes, synthetic 2/3-bit weights, four offloading rows.

    python -m moe_colab bench --quant both --profile          # the H200 run (< 8 minutes)
    python -m moe_colab bench --device cpu --scale tiny --quick --prompts 8,16   # CPU, a minute

Rows, measured in one process on the same prompts and the same routing (moe_colab.bench.replay):

    full         LRU expert cache + speculative prefetch       (the paper's "Full algorithm")
    no_prefetch  LRU cache only, prefetch 0                     ("W/o expert pre-loading")
    no_cache     every used expert copied on use (OffloadOptions(reuse=False)), prefetch 0
                                                                ("W/o LRU cache & pre-loading")
    naive        accelerate's dispatch_model offloading whole layers (naive.py)
    full_swap    full at the same k, in the engine's swap mode (host memory for E-k+1 experts per
                 layer; write-backs on their own stream)
    colab        what a free Colab T4 runs: the planner's choice for 15 GiB of device and 12.7 GB
                 of host memory (swap mode, its k, spare host rows and slots), full algorithm
    colab_no_prefetch, colab_copy   the colab row without prefetch, and in copy mode (the
                 references its speed is measured against)

The device is capped like a T4 (15 GiB for the process), experts_on_device defaults to the
paper's demo (4 of 8). Each engine row is its own model, built by build_engine with that row's
OffloadOptions over one shared store of experts, with the routing replay injected as a strategy.
Each row reports decode and prefill tokens/s, cache counters, bytes copied per token, the
host -> device bandwidth measured in this run, and the transfer bound (bandwidth / bytes per
token). After every row: benchmarks/results/bench_<name>.json; with ``--out DIR`` also the
reports DIR/benchmarks.json, DIR/benchmarks.md, DIR/figures/benchmarks.svg (report.py).

Reference: Eliseev & Mazur, arXiv 2312.17238, Table 2.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import measure as bm
from .report import write_reports
from .replay import DEFAULT_RECALL, make_routing
from .synthetic import bench_config, build_offloaded, make_store
from ..config import OffloadOptions
from ..engine.build import Strategies
from ..engine.moe_block import route_with_router
from ..quant.config import resolve_quant
from ..quant.format import QuantizedExpertFormat

OFFLOAD_ROWS = ("full", "no_prefetch", "no_cache", "colab_copy")     # copy mode: one shared store
SWAP_ROWS = ("full_swap", "colab", "colab_no_prefetch")             # swap mode: a store each
ROWS = ("full", "no_prefetch", "no_cache", "naive") + SWAP_ROWS + ("colab_copy",)   # the default rows
EXTRA_ROWS = ()
# Share of a quant's time slot each row may take before it stops adding runs.
ROW_SHARE = {"full": 0.12, "no_prefetch": 0.12, "no_cache": 0.14, "naive": 0.16, "full_swap": 0.12,
             "colab": 0.12, "colab_no_prefetch": 0.12, "colab_copy": 0.12}
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
    a("--guess-from", default=None, choices=["auto", "before", "after"],
      help="hidden state of the speculative guess (default: load_model's)")
    a("--device-memory-gib", type=float, default=15.0, help="device memory cap for the process (T4: 15)")
    a("--rows", default=",".join(ROWS), help=f"comma separated, from {ROWS + EXTRA_ROWS}")
    a("--quick", action="store_true", help="1 run, 32 decoded tokens (naive: 4)")
    a("--profile", action="store_true", help="profile the full row's decode loop (torch.profiler)")
    a("--profile-tokens", type=int, default=16)
    a("--profile-trace", action="store_true", help="also write a chrome trace of the profile")
    a("--bandwidth-mb", default="64,128,256,352", help="copy sizes (MiB) for the bandwidth measurement")
    a("--out", default=None, help="also write the reports benchmarks.md/.json and figures/benchmarks.svg "
      "here (e.g. docs); by default only the raw JSON is written")
    a("--results-dir", default="benchmarks/results", help="where bench_<name>.json goes")
    a("--name", default=None, help="result name (default: a UTC timestamp)")
    a("--seed", type=int, default=0)
    a("--burn-in", type=int, default=128, help="untimed decoded tokens before the first row")
    a("--cuda-graphs", default="on", choices=["on", "off"],
      help="replay one-token matmuls as CUDA graphs (OffloadOptions.cuda_graphs)")
    a("--max-minutes", type=float, default=7.5, help="wall-clock budget; later runs are skipped")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.decode_tokens, args.naive_decode_tokens = 1, min(args.decode_tokens, 32), min(args.naive_decode_tokens, 4)
        args.burn_in = min(args.burn_in, 32)
        args.profile_tokens = min(args.profile_tokens, 8)
    args.prompts = [int(x) for x in args.prompts.split(",") if x.strip()]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ROWS + EXTRA_ROWS]
    if bad or not args.prompts or min(args.prompts) < 1 or args.decode_tokens < 1:
        p.error(f"bad --rows {bad} (choose from {ROWS + EXTRA_ROWS}) or --prompts/--decode-tokens")
    return args


def _error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


def row_options(args, row: str, cuda: bool, colab=None) -> OffloadOptions:
    """The engine settings of one row: the paper's ablations differ only in prefetch and reuse;
    the colab rows take the planner's choice for a free T4 (``colab``, a Plan)."""
    full = OffloadOptions(experts_on_device=args.experts_on_device, prefetch=args.prefetch,
                          guess_from=args.guess_from or "auto", cuda_graphs=cuda and args.cuda_graphs == "on")
    rows = {"full": full, "no_prefetch": full.replace(prefetch=0),
            "no_cache": full.replace(prefetch=0, reuse=False), "full_swap": full.replace(swap=True)}
    if colab is not None:
        t4 = full.replace(experts_on_device=colab.experts_on_device, swap=colab.swap,
                          spare_slots=colab.spare_slots, extra_host_rows=colab.extra_host_rows)
        rows.update(colab=t4, colab_no_prefetch=t4.replace(prefetch=0),
                    colab_copy=t4.replace(swap=False, extra_host_rows=0))
    return rows[row]


class Bench:
    """One benchmark run: shared settings, the result dict, and the time budget."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + 60 * args.max_minutes
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if args.device == "auto" else args.device)
        if self.device.type == "cuda" and self.device.index is None:
            # Some torch.cuda calls (set_per_process_memory_fraction) insist on an index.
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but CUDA is not available")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.config = bench_config(args.scale, args.layers)
        self.name = args.name or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.results_path = Path(args.results_dir) / f"bench_{self.name}.json"
        self.quants = ["paper-2bit", "paper-3bit"] if args.quant == "both" else [args.quant]
        cap = int(args.device_memory_gib * GiB)
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), self.device)
        c = self.config
        self.res = {"schema": "moe_colab.bench/1", "name": self.name,
                    "command": "python -m moe_colab bench " + " ".join(args.argv),
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": bm.machine_info(self.device),
                    "settings": {k: v for k, v in vars(args).items() if k != "argv"} | {
                        "dtype": str(self.dtype)[6:], "device_memory_cap_bytes": cap, "model": {
                            k: getattr(c, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                       "num_local_experts", "num_experts_per_tok", "vocab_size")}},
                    "quants": {}}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        """The raw JSON (after every row), then the reports; a report bug loses no measurement."""
        self.res["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        self.results_path.write_text(json.dumps(self.res, indent=1))
        if self.args.out is None:
            return
        try:
            write_reports(self.res, Path(self.args.out))
        except Exception as e:
            self.log(f"report writing failed: {type(e).__name__}: {e}")

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        a, c, dev = self.args, self.config, self.device
        self.log(f"device {dev} ({self.res['machine'].get('gpu', 'cpu')}), cap {a.device_memory_gib} GiB, "
                 f"{c.num_hidden_layers} layers x {c.num_local_experts} experts, hidden {c.hidden_size}")
        tokens = max(a.prompts) + max(a.decode_tokens, a.naive_decode_tokens, a.profile_tokens)
        self.replay = make_routing(a.routing, num_layers=c.num_hidden_layers, num_experts=c.num_local_experts,
                                   top_k=c.num_experts_per_tok, tokens=tokens, recall=a.guess_recall,
                                   count=a.prefetch, device=dev, seed=a.seed)
        rt = self.res["routing"] = {"source": a.routing, "description": self.replay.description if self.replay else
                                    "the synthetic model's own routers (random weights); guesses by the engine's "
                                    "speculator"}
        if self.replay:
            rt.update(self.replay.summary(prefix=max(a.prompts)))
        self.log(f"routing: {rt['description']}")
        self.expert_bytes = {q: QuantizedExpertFormat(c.hidden_size, c.intermediate_size, resolve_quant(q)).layout.nbytes
                             for q in self.quants}
        sizes = [int(x) * bm.MiB for x in a.bandwidth_mb.split(",")]
        bm.bandwidth(dev, [min(sizes)], pinned=True, reps=1)          # warm-up: first-call costs
        self.pinned_bw = bm.bandwidth(dev, sorted(set(sizes + list(self.expert_bytes.values()))), pinned=True)
        self.pageable_bw = bm.bandwidth(dev, sizes, pinned=False, reps=3)
        self.res["bandwidth"] = {"pinned_GBps": {str(k): round(v, 3) for k, v in self.pinned_bw.items()},
                                 "pageable_GBps": {str(k): round(v, 3) for k, v in self.pageable_bw.items()},
                                 "kind": "host->device" if dev.type == "cuda" else "host memcpy (no GPU)"}
        self.log(f"bandwidth GB/s pinned {self.res['bandwidth']['pinned_GBps']}, pageable "
                 f"{self.res['bandwidth']['pageable_GBps']}")
        gen = torch.Generator().manual_seed(a.seed)
        self.prompts = [torch.randint(3, c.vocab_size, (1, P), generator=gen).to(dev) for P in a.prompts]
        self.save()
        for i, qname in enumerate(self.quants):
            slot = max(0.0, self.deadline - time.perf_counter()) / (len(self.quants) - i)
            self.run_quant(qname, slot)
        self.res["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.res["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.save()
        self.log(f"wrote {self.results_path}" + (f" and {Path(a.out) / 'benchmarks.md'}" if a.out else ""))
        return self.res

    def run_quant(self, qname: str, slot: float) -> None:
        a, dev = self.args, self.device
        qcfg = resolve_quant(qname)
        q = self.res["quants"][qname] = {"describe": qcfg.describe(), "expert_bytes": self.expert_bytes[qname],
                                         "rows": {}}
        store = None
        self.colab = None
        if any(r.startswith("colab") for r in a.rows):
            from ..planner import COLAB_T4, plan
            self.colab = plan(self.config, qcfg, device="cuda", dtype=torch.float16, **COLAB_T4)
            q["colab_plan"] = self.colab.to_dict()
            self.log(f"  colab plan: {self.colab.verdict()}, {self.colab.extra_host_rows} spare host rows, "
                     f"{self.colab.spare_slots} spare slots")
        if any(r in OFFLOAD_ROWS for r in a.rows) or a.profile:
            with bm.PeakRSS() as rss:
                try:
                    t = time.perf_counter()
                    store = make_store(self.config, qcfg, dev, self.dtype, a.seed, progress=lambda l: l % 8 == 7
                                       and self.log(f"  {qname}: {l + 1} layers of experts filled"))
                    q["pinned_bytes_requested"] = store.host_bytes if dev.type == "cuda" else 0
                    self.offload_rows(q, qname, qcfg, store, slot, t)
                except Exception as e:
                    q["build_error"] = _error(e)
                    self.log(f"{qname}: FAILED: {q['build_error']['error']}")
                q["host_memory_stats"] = bm.host_memory_stats() if dev.type == "cuda" else None
            q["host_peak_rss_bytes"] = rss.peak
            bm.release(dev)
        if "naive" in a.rows:
            with bm.PeakRSS() as rss:
                try:
                    if store is None:
                        store = make_store(self.config, qcfg, dev, self.dtype, a.seed)
                    q["rows"]["naive"] = self.naive_row(qcfg, store, slot)
                except Exception as e:
                    q["rows"]["naive"] = _error(e)
                    self.log(f"  naive: FAILED: {q['rows']['naive']['error']}")
            q["naive_peak_rss_bytes"] = rss.peak
            self.save()
        store = None
        bm.release(dev)
        for row in [r for r in SWAP_ROWS if r in a.rows]:
            with bm.PeakRSS() as rss:
                try:
                    q["rows"][row] = self.swap_row(row, qname, qcfg, slot)
                except Exception as e:
                    q["rows"][row] = _error(e)
                    self.log(f"  {row}: FAILED: {q['rows'][row]['error']}")
            q["rows"][row]["host_peak_rss_bytes"] = rss.peak
            self.save()
            bm.release(dev)
        bm.compare_tokens(q["rows"])
        self.save()

    def engine(self, qcfg, store, row: str):
        """A fresh engine model for one row over the shared store; the replay rewound."""
        strategies = self.replay.strategies() if self.replay else Strategies()
        options = row_options(self.args, row, self.device.type == "cuda", self.colab)
        return build_offloaded(self.config, qcfg, store, options, device=self.device, dtype=self.dtype,
                               seed=self.args.seed, strategies=strategies)

    def reset_fn(self, model):
        def reset():
            if not model.moe_cache.store.swap:
                model.moe_cache.clear()
            if self.replay:
                self.replay.reset()
        return reset

    def offload_rows(self, q: dict, qname: str, qcfg, store, slot: float, t_build: float) -> None:
        """full, no_prefetch, no_cache: one engine each over ONE store, then the profile."""
        a, dev = self.args, self.device
        q["build_s"] = round(time.perf_counter() - t_build, 1)
        self.log(f"  experts built in {q['build_s']} s: {store.host_bytes / GiB:.2f} GiB on the host")
        first = True
        for row in [r for r in OFFLOAD_ROWS if r in a.rows]:
            model = self.engine(qcfg, store, row)
            reset = self.reset_fn(model)
            if first:
                self.log(f"  {model.moe_cache.device_bytes / GiB:.2f} GiB of device slots")
                self.burn_in(q, model, reset)
                first = False
            q["rows"][row] = self.row(row, model, slot, self.pinned_bw[self.expert_bytes[qname]] * 1e9,
                                      stats_fn=model.offload_stats, reset_fn=reset, setup=lambda: None)
            self.save()
            del model, reset
            bm.release(dev)
        if a.profile:
            try:
                model = self.engine(qcfg, store, "full")
                q["profile"] = self.profile(model, qname, self.reset_fn(model))
                del model
            except Exception as e:
                q["profile"] = _error(e)
                self.log(f"  profile: FAILED: {q['profile']['error']}")
            bm.release(dev)

    def burn_in(self, q: dict, model, reset) -> None:
        """Untimed decoding before the first row. On the H200 the first row of every process ran
        at ~60% of its later speed for its first ~250 tokens (cause not found,
        docs/benchmark_notes.md); the burn-in's own speed is recorded to keep watching it."""
        a, left, speeds = self.args, self.args.burn_in, []
        while left > 0 and time.perf_counter() < self.deadline:
            reset()
            r = bm.timed_run(model, self.prompts[0], min(left, a.decode_tokens), device=self.device,
                             stats_fn=model.offload_stats)
            speeds.append(round(r["decoded"] / r["decode_s"], 3))
            left -= r["decoded"]
        if speeds:
            q["burn_in_tokens_per_s"] = speeds
            self.log(f"  burn-in (untimed rows): {a.burn_in - max(left, 0)} tokens, tok/s per pass {speeds}")

    def profile(self, model, qname: str, reset) -> dict:
        a = self.args
        trace = Path(a.results_dir) / f"profile_{self.name}_{qname}.json" if a.profile_trace else None
        prof = bm.profile_decode(model, self.prompts[0], a.profile_tokens, device=self.device,
                                 stats_fn=model.offload_stats, reset_fn=reset, trace_path=trace)
        text = Path(a.results_dir) / f"profile_{self.name}_{qname}.txt"
        bm.write_profile_text(text, prof, f"{self.res['command']}\n{qname}, full row")
        self.log(f"  profile per token: {prof['counts_per_token']} -> {text}")
        return prof

    def naive_row(self, qcfg, store, slot: float) -> dict:
        from .naive import build_naive, bytes_moved

        a, dev, replay = self.args, self.device, self.replay
        if dev.type == "cpu":       # no device memory: bench_naive keeps 3/4 of the model in RAM
            budget = None
        elif a.naive_device_gib is not None:
            budget = int(a.naive_device_gib * GiB)
        else:
            budget = int((a.device_memory_gib - a.naive_reserve_gib) * GiB)
        bw = statistics.median((self.pinned_bw if a.naive_pinned else self.pageable_bw).values()) * 1e9
        with tempfile.TemporaryDirectory(prefix="moe_colab_naive_") as offload_dir:
            t = time.perf_counter()
            model, info = build_naive(self.config, qcfg, store, device=dev, dtype=self.dtype, seed=a.seed,
                                      max_device_bytes=budget, pinned=a.naive_pinned, offload_dir=offload_dir,
                                      route=replay.route if replay else route_with_router)
            self.log(f"  naive: dispatched in {time.perf_counter() - t:.1f} s, {len(info['offloaded_modules'])} "
                     f"modules offloaded to {info['offload_tier']} ({info['offloaded_bytes_per_forward'] / GiB:.2f} "
                     f"GiB per forward)")
            r = self.row("naive", model, slot, bw, stats_fn=lambda: {"bytes_to_device": bytes_moved(info)},
                         reset_fn=replay.reset if replay else (lambda: None), setup=lambda: None,
                         n_new=a.naive_decode_tokens, runs=a.naive_runs, warmup_prompts=1, warmup_tokens=1)
            r.update({k: v for k, v in info.items() if k != "calls"})
            del model
        return r

    def swap_row(self, row: str, qname: str, qcfg, slot: float) -> dict:
        """A swap-mode row (what a 12.7 GB Colab needs) over a fresh store: its experts move
        between host and device, so no two rows share it. Its cache cannot be emptied, so runs
        start warm."""
        a, dev, replay = self.args, self.device, self.replay
        opts = row_options(a, row, dev.type == "cuda", self.colab)
        store = make_store(self.config, qcfg, dev, self.dtype, a.seed,      # copy mode where the plan says so
                           device_first=opts.experts_on_device if opts.swap else 0, extra_rows=opts.extra_host_rows)
        model = self.engine(qcfg, store, row)
        self.log(f"  {row}: k={opts.experts_on_device}, experts {store.host_bytes / GiB:.2f} GiB on the host "
                 f"({'swap' if opts.swap else 'copy'} mode, {opts.extra_host_rows} spare rows, "
                 f"{opts.spare_slots if opts.swap else 0} spare slots)")
        r = self.row(row, model, slot, self.pinned_bw[self.expert_bytes[qname]] * 1e9,
                     stats_fn=model.offload_stats, reset_fn=replay.reset if replay else (lambda: None),
                     setup=lambda: None)
        r.update(host_expert_bytes=store.host_bytes, experts_on_device=opts.experts_on_device)
        return r

    def row(self, row, model, slot, bw, *, stats_fn, reset_fn, setup, n_new=None, runs=None,
            warmup_prompts=None, warmup_tokens=24) -> dict:
        """One row, guarded: an error is recorded and printed, and the run goes on."""
        a, dev = self.args, self.device
        now = time.perf_counter()
        if now > self.deadline:
            self.log(f"  {row}: skipped (time budget)")
            return {"skipped": "time budget"}
        self.log(f"  {row}:")
        share = ROW_SHARE[row] * slot
        try:
            setup()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            r = bm.measure_row(model, self.prompts, n_new or a.decode_tokens, runs or a.runs, device=dev,
                               stats_fn=stats_fn, reset_fn=reset_fn, row_deadline=now + share,
                               hard_deadline=min(self.deadline, now + 2 * share), stop_at=self.deadline,
                               warmup_prompts=warmup_prompts, warmup_tokens=warmup_tokens, log=self.log)
        except Exception as e:
            out = _error(e)
            self.log(f"  {row}: FAILED: {out['error']}")
            bm.release(dev)
            return out
        r["bandwidth_GBps"] = bw / 1e9
        # Host->device and device->host copies run on separate engines: the busier direction bounds.
        busier = max(r["bytes_to_device_per_token"] or 0, r["bytes_to_host_per_token"] or 0)
        r["bound_tokens_per_s"] = bw / busier if busier else None
        r["measured_over_bound"] = (r["decode_tokens_per_s"] / r["bound_tokens_per_s"]
                                    if r["bound_tokens_per_s"] and r["decode_tokens_per_s"] else None)
        if dev.type == "cuda":
            r["device_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
        hr = "-" if r["hit_ratio"] is None else f"{r['hit_ratio']:.3f}"
        self.log(f"  {row}: decode {r['decode_tokens_per_s']:.2f} tok/s, hit ratio {hr}, "
                 f"{(r['bytes_per_token'] or 0) / 1e6:.1f} MB/token, bound {r['bound_tokens_per_s'] or 0:.2f} tok/s")
        return r


def main(argv=None) -> int:
    """``python -m moe_colab bench ARGS``: 0 if every row ran, 1 if some failed, 2 for bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        with torch.no_grad():       # scoped: a caller's (or a test's) grad mode is left as it was
            res = Bench(args).run()
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
