"""The offloading benchmark for families beyond Mixtral: real shapes, synthetic low-bit weights.

    python benchmarks/bench_families.py --model qwen3-30b-a3b --quant attn4-exp4,attn4-exp3
    python benchmarks/bench_families.py --model gpt-oss-20b --quant attn4-exp4
    python benchmarks/bench_families.py --model qwen3-30b-a3b --device cpu --layers 2 --quick   # CPU smoke

The model is a preset's config (moe_colab.config.FAMILY_PRESETS: Qwen3-30B-A3B, gpt-oss-20b, ...)
with synthetic weights (bench/synthetic.py: the packed low-bit experts filled in place, never a
16-bit copy), assembled by build_engine as load_model does. Every row replays the same routing
(bench/replay.py; default synthetic, consecutive-token overlap 0.6, guesses with recall 0.8:
neither family publishes a routing statistic we could replay) and is measured by bench/measure.py,
as the Mixtral benchmark (bench/run.py) does. The device is capped at 15 GiB like a free T4.

    colab                  the planner's choice for a free T4 (15 GiB device, 12.7 GB host: its k,
                           swap mode, spare slots and rows), full algorithm, batched experts
    colab_copy             the same k in copy mode (every expert also in host memory)
    colab_copy_unbatched   the same, one call per expert (OffloadOptions(batched_experts=False)):
                           what batching a layer's experts saves, per token and per layer
    naive                  accelerate's dispatch_model over the same bytes (bench/naive.py)

Reported per row: decode tokens/s, hit ratio, bytes copied per token, the measured host->device
bandwidth, the T4 transfer estimate (12 GB/s over the bytes per token: bench/t4_estimate.py), and
for the copy rows a decode profile (kernel launches and host time per token and per layer).
The JSON goes to benchmarks/results/families_<model>_<name>.json; ``--out DIR`` adds a markdown
table DIR/benchmarks_<model>.md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import measure as bm
from .replay import DEFAULT_RECALL, make_routing
from .synthetic import build_offloaded, make_store
from ..adapters import adapter_for
from ..config import FAMILY_PRESETS, OffloadOptions, preset_config
from ..quant.config import resolve_quant

GiB = 1 << 30
ROWS = ("colab", "colab_copy", "colab_copy_unbatched", "naive")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/bench_families.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="qwen3-30b-a3b", choices=sorted(FAMILY_PRESETS))
    a("--quant", default="attn4-exp4", help="comma separated presets, e.g. attn4-exp4,attn4-exp3")
    a("--layers", type=int, default=None, help="fewer decoder layers (smoke tests)")
    a("--scale", default="full", choices=["full", "tiny"], help="tiny: small widths, 16 experts (CPU smoke tests)")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"])
    a("--rows", default=",".join(ROWS))
    a("--routing", default="synthetic:0.6", help="as bench/run.py: synthetic:P | model | trace:PATH")
    a("--guess-recall", type=float, default=DEFAULT_RECALL)
    a("--prefetch", type=int, default=None, help="default: top_k / 2")
    a("--prompts", default="64")
    a("--decode-tokens", type=int, default=64)
    a("--naive-decode-tokens", type=int, default=4)
    a("--runs", type=int, default=1)
    a("--profile-tokens", type=int, default=8)
    a("--device-memory-gib", type=float, default=15.0)
    a("--host-gb", type=float, default=12.7, help="the planner's host budget (a free Colab: 12.7)")
    a("--naive-reserve-gib", type=float, default=1.5)
    a("--quick", action="store_true", help="16 decoded tokens, 2 for naive")
    a("--max-minutes", type=float, default=4.0)
    a("--results-dir", default="benchmarks/results")
    a("--out", default=None)
    a("--name", default=None)
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.decode_tokens, args.naive_decode_tokens, args.profile_tokens = 16, 2, 4
    args.prompts = [int(x) for x in args.prompts.split(",") if x.strip()]
    args.rows = [r for r in args.rows.split(",") if r]
    args.quants = [q for q in args.quant.split(",") if q]
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        p.error(f"unknown rows {bad}; choose from {ROWS}")
    return args


def tiny_overrides(model: str) -> dict:
    """The preset's family at small widths (hidden 128, 16 experts of 64, top-4, 2 layers, vocab
    512): every code path of a row in seconds on a CPU."""
    from ..adapters import adapter_for
    model_type, kw = FAMILY_PRESETS[model]
    ad = adapter_for(model_type)
    over = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                num_experts_per_tok=4, intermediate_size=128, max_position_embeddings=512)
    over[ad.num_experts_attr] = 16
    over[ad.expert_size_attr] = 64
    if "head_dim" in kw:
        over["head_dim"] = 32
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in kw and key != ad.expert_size_attr:
            over[key] = 64 if key == "moe_intermediate_size" else 128
    if model_type.startswith("deepseek"):
        over.update(num_key_value_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    if model_type == "gpt_oss":
        over["sliding_window"] = 32
    return over


def _error(e) -> dict:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


class FamilyBench:
    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.deadline = self.t0 + 60 * args.max_minutes
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if args.device == "auto" else args.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.device_memory_gib * GiB / total), self.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        over = tiny_overrides(args.model) if args.scale == "tiny" else {}
        if args.layers:
            over["num_hidden_layers"] = args.layers
        self.config = preset_config(args.model, **over)
        self.adapter = adapter_for(self.config)
        c, ad = self.config, self.adapter
        self.L, self.E, self.k = ad.num_layers(c), ad.num_experts(c), ad.top_k(c)
        self.prefetch = args.prefetch if args.prefetch is not None else max(1, self.k // 2)
        self.name = args.name or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.path = Path(args.results_dir) / f"families_{args.model}_{self.name}.json"
        self.res = {"schema": "moe_colab.bench_families/1", "model": args.model, "name": self.name,
                    "machine": bm.machine_info(self.device), "settings": {k: v for k, v in vars(args).items()},
                    "shapes": {"moe_layers": self.L, "experts": self.E, "top_k": self.k,
                               "hidden": c.hidden_size, "expert_intermediate": ad.expert_size(c),
                               "vocab": c.vocab_size}, "quants": {}}

    def log(self, msg):
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.res["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.path.write_text(json.dumps(self.res, indent=1))
        if self.args.out:
            Path(self.args.out).mkdir(parents=True, exist_ok=True)
            (Path(self.args.out) / f"benchmarks_{self.args.model}.md").write_text(markdown(self.res))

    def run(self) -> dict:
        a, dev = self.args, self.device
        self.log(f"{a.model}: {self.L} MoE layers x {self.E} experts, top-{self.k}, on {dev}, cap "
                 f"{a.device_memory_gib} GiB")
        tokens = max(a.prompts) + max(a.decode_tokens, a.profile_tokens) + 2
        self.replay = make_routing(a.routing, num_layers=self.L, num_experts=self.E, top_k=self.k, tokens=tokens,
                                   recall=a.guess_recall, count=self.prefetch, device=dev, seed=a.seed)
        if self.replay:
            self.res["routing"] = {"source": a.routing, "description": self.replay.description,
                                   **self.replay.summary(prefix=max(a.prompts))}
        gen = torch.Generator().manual_seed(a.seed)
        self.prompts = [torch.randint(3, self.config.vocab_size, (1, P), generator=gen).to(dev) for P in a.prompts]
        for q in a.quants:
            try:
                self.run_quant(q)
            except Exception as e:
                self.res["quants"][q] = _error(e)
                self.log(f"{q}: FAILED {e}")
            self.save()
        self.log(f"wrote {self.path}")
        return self.res

    def options(self, row, plan) -> OffloadOptions:
        t4 = OffloadOptions.defaults(experts_on_device=plan.experts_on_device, prefetch=self.prefetch, swap=plan.swap,
                                     spare_slots=plan.spare_slots, extra_host_rows=plan.extra_host_rows,
                                     cuda_graphs=self.device.type == "cuda", batched_experts=True)
        copy = t4.replace(swap=False, extra_host_rows=0)
        return {"colab": t4, "colab_copy": copy, "colab_copy_unbatched": copy.replace(batched_experts=False)}[row]

    def run_quant(self, qname):
        from ..planner import plan as make_plan
        a, dev = self.args, self.device
        qcfg = resolve_quant(qname)
        p = make_plan(self.config, qcfg, device="cuda", dtype=torch.float16, device_bytes=int(15 * GiB),
                      host_bytes=int(a.host_gb * 1e9))
        q = self.res["quants"][qname] = {"plan": p.to_dict(), "verdict": p.verdict(), "rows": {}}
        self.log(f"{qname}: {p.verdict()}; expert {p.expert_bytes / 2**20:.2f} MiB")
        bw = bm.bandwidth(dev, [p.expert_bytes, 64 * 2**20], pinned=True)
        q["bandwidth_GBps"] = {str(k): round(v, 3) for k, v in bw.items()}
        rows = a.rows
        if "colab" in rows:
            q["rows"]["colab"] = self.engine_row("colab", qcfg, p, bw[p.expert_bytes])
            self.save()
        copy_rows = [r for r in ("colab_copy", "colab_copy_unbatched") if r in rows]
        if copy_rows or "naive" in rows:
            t = time.perf_counter()
            store = make_store(self.config, qcfg, dev, self.dtype, a.seed)
            self.log(f"  copy-mode store: {store.host_bytes / GiB:.2f} GiB in {time.perf_counter() - t:.1f} s")
            for r in copy_rows:
                q["rows"][r] = self.engine_row(r, qcfg, p, bw[p.expert_bytes], store=store, profile=True)
                self.save()
            if "naive" in rows:
                q["rows"]["naive"] = self.naive_row(qcfg, store)
            del store
            bm.release(dev)
        b, u = q["rows"].get("colab_copy", {}), q["rows"].get("colab_copy_unbatched", {})
        if b.get("profile") and u.get("profile"):
            q["batching"] = {k: {"unbatched": u["profile"].get(k), "batched": b["profile"].get(k)}
                             for k in ("wall_ms_per_token", "device_compute_ms_per_token", "launches_per_token")}
            q["batching"]["layers"] = self.L
        nv = q["rows"].get("naive", {}).get("decode_tokens_per_s")
        cb = q["rows"].get("colab", {}).get("decode_tokens_per_s")
        q["colab_over_naive"] = cb / nv if cb and nv else None

    def engine_row(self, row, qcfg, plan, bw, store=None, profile=False) -> dict:
        from .t4_estimate import transfer_only_tokens_per_s
        a, dev = self.args, self.device
        if time.perf_counter() > self.deadline:
            return {"skipped": "time budget"}
        opts = self.options(row, plan)
        try:
            t = time.perf_counter()
            if store is None:       # swap mode: a store of its own (its experts move)
                store = make_store(self.config, qcfg, dev, self.dtype, a.seed, device_first=opts.experts_on_device
                                   if opts.swap else 0, extra_rows=opts.extra_host_rows if opts.swap else 0)
            model = build_offloaded(self.config, qcfg, store, opts, device=dev, dtype=self.dtype, seed=a.seed,
                                    strategies=self.replay.strategies() if self.replay else None)
            self.log(f"  {row}: k={opts.experts_on_device} {'swap' if opts.swap else 'copy'} "
                     f"batched={opts.batched_experts}, built in {time.perf_counter() - t:.1f} s")

            def reset():
                if not model.moe_cache.store.swap:
                    model.moe_cache.clear()
                if self.replay:
                    self.replay.reset()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            now = time.perf_counter()
            r = bm.measure_row(model, self.prompts, a.decode_tokens, a.runs, device=dev,
                               stats_fn=model.offload_stats, reset_fn=reset, row_deadline=now + 60,
                               hard_deadline=now + 120, stop_at=self.deadline, log=self.log)
            r["bandwidth_GBps"] = bw
            r["t4_transfer_tokens_per_s"] = (transfer_only_tokens_per_s(r["bytes_to_device_per_token"])
                                            if r.get("bytes_to_device_per_token") else None)
            r["options"] = {k: getattr(opts, k) for k in ("experts_on_device", "swap", "prefetch", "batched_experts")}
            r["fallbacks"] = model.offload_stats().get("fallbacks", {})
            if dev.type == "cuda":
                r["device_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
            if profile:
                prof = bm.profile_decode(model, self.prompts[0], a.profile_tokens, device=dev,
                                         stats_fn=model.offload_stats, reset_fn=reset)
                launches = sum(v for k, v in prof["counts_per_token"].items() if "LaunchKernel" in k
                               or "GraphLaunch" in k)
                r["profile"] = {"wall_ms_per_token": prof["wall_ms_per_token"],
                                "device_compute_ms_per_token": prof["device_compute_ms_per_token"],
                                "launches_per_token": launches, "counts_per_token": prof["counts_per_token"]}
            self.log(f"  {row}: decode {r['decode_tokens_per_s']:.2f} tok/s, hit ratio {r['hit_ratio']}, "
                     f"{(r['bytes_per_token'] or 0) / 1e6:.1f} MB/token")
            del model
            bm.release(dev)
            return r
        except Exception as e:
            self.log(f"  {row}: FAILED {type(e).__name__}: {e}")
            bm.release(dev)
            return _error(e)

    def naive_row(self, qcfg, store) -> dict:
        from .naive import build_naive, bytes_moved
        from ..engine.moe_block import route_with_router
        a, dev = self.args, self.device
        if time.perf_counter() > self.deadline:
            return {"skipped": "time budget"}
        budget = None if dev.type == "cpu" else int((a.device_memory_gib - a.naive_reserve_gib) * GiB)
        try:
            with tempfile.TemporaryDirectory(prefix="moe_colab_naive_") as offload_dir:
                model, info = build_naive(self.config, qcfg, store, device=dev, dtype=self.dtype, seed=a.seed,
                                          max_device_bytes=budget, offload_dir=offload_dir,
                                          route=self.replay.route if self.replay else route_with_router)
                now = time.perf_counter()
                r = bm.measure_row(model, self.prompts, a.naive_decode_tokens, 1, device=dev,
                                   stats_fn=lambda: {"bytes_to_device": bytes_moved(info)},
                                   reset_fn=self.replay.reset if self.replay else (lambda: None),
                                   row_deadline=now + 60, hard_deadline=now + 90, stop_at=self.deadline,
                                   warmup_prompts=1, warmup_tokens=1, log=self.log)
                r.update({k: v for k, v in info.items() if k not in ("calls", "offloaded_bytes")})
                del model
            self.log(f"  naive: decode {r['decode_tokens_per_s']:.3f} tok/s")
            return r
        except Exception as e:
            self.log(f"  naive: FAILED {type(e).__name__}: {e}")
            return _error(e)
        finally:
            bm.release(dev)


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def markdown(res: dict) -> str:
    s = res["shapes"]
    lines = [f"# Offloading benchmark: {res['model']} shapes, synthetic low-bit weights", "",
             f"{s['moe_layers']} MoE layers x {s['experts']} experts, top-{s['top_k']}, hidden {s['hidden']}, "
             f"expert width {s['expert_intermediate']}; device capped at {res['settings']['device_memory_gib']} GiB; "
             f"machine: {res['machine'].get('gpu', 'cpu')}. Routing: {res.get('routing', {}).get('description', '-')}.",
             ""]
    for qname, q in res["quants"].items():
        if "error" in q:
            lines += [f"## {qname}: failed: {q['error']}", ""]
            continue
        lines += [f"## {qname}: {q['verdict']}", "",
                  "| row | decode tok/s | hit ratio | MB/token | T4 transfer estimate tok/s | launches/token | wall ms/token |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row, r in q["rows"].items():
            if "error" in r or "skipped" in r:
                lines.append(f"| {row} | {r.get('error') or r.get('skipped')} | | | | | |")
                continue
            pr = r.get("profile") or {}
            lines.append(f"| {row} | {_f(r.get('decode_tokens_per_s'))} | {_f(r.get('hit_ratio'), '{:.3f}')} | "
                         f"{_f((r.get('bytes_per_token') or 0) / 1e6, '{:.1f}')} | "
                         f"{_f(r.get('t4_transfer_tokens_per_s'))} | {_f(pr.get('launches_per_token'), '{:.0f}')} | "
                         f"{_f(pr.get('wall_ms_per_token'))} |")
        bt = q.get("batching")
        if bt:
            L = bt["layers"]
            lines += ["", "Per layer, before and after batching a layer's experts (copy rows, same k): "
                      f"{_f((bt['launches_per_token']['unbatched'] or 0) / L, '{:.1f}')} -> "
                      f"{_f((bt['launches_per_token']['batched'] or 0) / L, '{:.1f}')} launches, "
                      f"{_f((bt['wall_ms_per_token']['unbatched'] or 0) / L, '{:.3f}')} -> "
                      f"{_f((bt['wall_ms_per_token']['batched'] or 0) / L, '{:.3f}')} ms of wall time."]
        if q.get("colab_over_naive"):
            lines.append(f"colab row over naive: {q['colab_over_naive']:.1f}x")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    FamilyBench(parse_args(argv)).run()
    return 0
