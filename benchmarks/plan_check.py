"""Does the full-size model stay inside the memory plan? Measured peaks against moe_colab.plan.

For each scheme: ask the planner for a free Colab T4 (15 GiB device, 12.7 GB host), cap this
process's device memory at the plan's device budget, build Mixtral-8x7B's shapes with synthetic
low-bit weights exactly as the plan says (experts_on_device, swap mode), then prefill a prompt
that fills the plan's context (max_context - decode tokens) and decode the rest. Sampled every
20 ms in a thread: the process's device memory (CUDA's total - free, so the CUDA context and
the allocator's reserve count) and resident host memory. Compared with:

    device   torch's peak allocation   vs  trunk + expert cache + KV cache + workspace
             the process's peak         vs  that + the plan's margin (what must fit in 15 GiB)
    host     pinned expert bytes        vs  the plan's host experts
             peak resident memory       vs  host experts + reserve

GPU only. Writes plan_check.json and plan_check.md into --out; --report re-renders the markdown
from a saved JSON (no GPU).

    python benchmarks/plan_check.py --out docs [--quant paper-2bit,paper-3bit] [--decode 64]
    python benchmarks/plan_check.py --report docs/plan_check.json --out docs
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch

from moe_colab.bench.measure import PeakRSS, machine_info, timed_run
from moe_colab.bench.synthetic import bench_config, build_offloaded, make_store
from moe_colab.config import OffloadOptions
from moe_colab.planner import COLAB_T4, GiB, plan
from moe_colab.quant.config import resolve_quant


def check(qname: str, device, decode: int) -> dict:
    p = plan("mixtral-8x7b", qname, device="cuda", dtype=torch.float16, **COLAB_T4)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, p.device_budget / total), device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free, tot = torch.cuda.mem_get_info(device)
    base_device = tot - free                    # the CUDA context (and anything left over)
    base_host = psutil.Process().memory_info().rss
    cfg = bench_config("full")
    qcfg = resolve_quant(qname)
    t0 = time.perf_counter()
    with PeakRSS(interval=0.02, device=device) as peaks:
        store = make_store(cfg, qcfg, device, torch.float16, 0, device_first=p.experts_on_device if p.swap else 0)
        model = build_offloaded(cfg, qcfg, store, OffloadOptions.defaults(
                                    experts_on_device=p.experts_on_device, prefetch=2, swap=p.swap),
                                device=device, dtype=torch.float16)
        built = time.perf_counter() - t0
        prompt = p.max_context - decode
        ids = torch.randint(3, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            run = timed_run(model, ids, decode, device=device, stats_fn=model.offload_stats)
    r = {"quant": qname, "plan": p.to_dict(), "build_s": round(built, 1), "prompt_tokens": prompt,
         "decoded_tokens": run["decoded"], "prefill_s": round(run["prefill_s"], 2),
         "decode_tokens_per_s": round(run["decoded"] / run["decode_s"], 2),
         "pinned_expert_bytes": store.host_bytes,
         "torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
         "torch_peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
         "device_context_bytes": base_device, "device_process_peak_bytes": peaks.device_peak,
         "host_rss_before_bytes": base_host, "host_rss_peak_bytes": peaks.peak}
    del model, store
    torch.cuda.empty_cache()
    return r


def table(results: list[dict]) -> list[str]:
    g = lambda n: f"{n / GiB:.2f}"                                             # noqa: E731
    out = ["| quantity | " + " | ".join(r["quant"] for r in results) + " |",
           "|---|" + "---:|" * len(results)]

    def row(label, f):
        out.append(f"| {label} | " + " | ".join(f(r) for r in results) + " |")
    row("plan: experts on device, mode", lambda r: f"k={r['plan']['experts_on_device']} "
        f"{'swap' if r['plan']['swap'] else 'copy'}")
    row("plan: device (trunk + cache + KV + workspace) GiB", lambda r: g(r["plan"]["device_total"]))
    row("measured: torch peak allocated GiB", lambda r: g(r["torch_peak_allocated_bytes"]))
    row("measured: torch peak reserved GiB", lambda r: g(r["torch_peak_reserved_bytes"]))
    row("plan: device + margin GiB (budget 15.00)", lambda r: g(r["plan"]["device_total"] + r["plan"]["device_margin_bytes"]))
    row("measured: process device peak incl. CUDA context GiB", lambda r: g(r["device_process_peak_bytes"]))
    row("measured: of which CUDA context GiB", lambda r: g(r["device_context_bytes"]))
    row("plan: pinned host experts GiB", lambda r: g(r["plan"]["host_expert_bytes"]))
    row("measured: pinned host experts GiB", lambda r: g(r["pinned_expert_bytes"]))
    row("plan: host total (experts + reserve) GiB", lambda r: g(r["plan"]["host_total"]))
    row("measured: peak resident host memory GiB", lambda r: g(r["host_rss_peak_bytes"]))
    row("measured: resident before building GiB", lambda r: g(r["host_rss_before_bytes"]))
    row("prompt + decoded tokens", lambda r: f"{r['prompt_tokens']} + {r['decoded_tokens']}")
    row("decode tokens/s (H200, swap mode)", lambda r: f"{r['decode_tokens_per_s']:.2f}")
    return out


def within(r: dict) -> dict[str, bool]:
    p = r["plan"]
    return {"torch allocation <= planned device": r["torch_peak_allocated_bytes"] <= p["device_total"],
            "process device peak <= planned device + margin":
                r["device_process_peak_bytes"] <= p["device_total"] + p["device_margin_bytes"],
            "pinned experts <= planned": r["pinned_expert_bytes"] <= p["host_expert_bytes"],
            "peak resident host memory <= planned host": r["host_rss_peak_bytes"] <= p["host_total"]}


def verdict(results: list[dict]) -> str:
    bad = [f"{r['quant']}: {name}" for r in results for name, ok in within(r).items() if not ok]
    if not bad:
        return "**Every measured peak is at or below its planned figure.**"
    return "**Over the plan:** " + "; ".join(bad) + "."


def markdown(doc: dict) -> str:
    m = doc["machine"]
    head = ["# Measured memory against the plan: Mixtral-8x7B shapes under the Colab T4 plan", "",
            "Generated by `python benchmarks/plan_check.py` (see its docstring for what is measured and",
            f"how); raw numbers in [plan_check.json](plan_check.json). Machine: {m.get('gpu', '?')}, torch "
            f"{m.get('torch', '?')}, {doc['finished']}.", "",
            "The planner (`moe_colab.plan`, figures in [planner.md](planner.md)) chose for a free Colab T4",
            "(15 GiB of GPU memory, 12.7 GB of host memory) and this process was held to the plan's device",
            "budget. Each scheme ran in a fresh process: built with synthetic weights in the quantized",
            "layout exactly as planned, then a prompt filling the planned context minus the decoded tokens,",
            "then the decoded tokens. The weights are generated on the GPU and copied into place, so the",
            "host peak is the engine's, not a checkpoint reader's (the planner's reserve is meant to cover",
            "that; a full-size checkpoint load was not measured).", "",
            verdict(doc["results"]), ""]
    return "\n".join(head + table(doc["results"])) + "\n"


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--out", default="docs")
    a.add_argument("--report", help="a saved plan_check.json: write its markdown only")
    a.add_argument("--quant", default="paper-2bit,paper-3bit")
    a.add_argument("--decode", type=int, default=64)
    a.add_argument("--one", help=argparse.SUPPRESS)       # internal: measure one scheme, print JSON
    args = a.parse_args()
    if args.report:
        doc = json.loads(Path(args.report).read_text())
        (Path(args.out) / "plan_check.md").write_text(markdown(doc))
        return
    if not torch.cuda.is_available():
        raise SystemExit("plan_check needs a CUDA GPU")
    if args.one:
        device = torch.device("cuda", torch.cuda.current_device())
        torch.ones(1, device=device)            # create the CUDA context before the baseline
        print("RESULT " + json.dumps(check(args.one, device, args.decode)), flush=True)
        return
    # One fresh process per scheme: the baselines (CUDA context, resident memory) are then clean.
    results = []
    for q in args.quant.split(","):
        run = subprocess.run([sys.executable, __file__, "--one", q, "--decode", str(args.decode)],
                             capture_output=True, text=True)
        lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
        if run.returncode or not lines:
            raise SystemExit(f"plan_check for {q} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device())
    doc = {"schema": "moe_colab.plan_check/1", "machine": machine_info(device),
           "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": results}
    (out / "plan_check.json").write_text(json.dumps(doc, indent=1))
    print("\n".join(table(results)))
    (out / "plan_check.md").write_text(markdown(doc))


if __name__ == "__main__":
    main()
