"""A free-Colab rehearsal on a bigger GPU: load a full-size quantized Mixtral-8x7B from disk with
the host held to Colab's 12.7 GB and the device to a T4's 15 GiB, then do what a Colab user does.

Per scheme (paper-2bit, then paper-3bit if time allows):

    1. write   a quantized directory of Mixtral-8x7B's shapes with synthetic weights (the trunk and
               every layer's packed experts, through moe_colab's one writer, ~17-19 GB), in this
               process; then time a full integrity check of it (sha256 of every unit, what the
               first load of a downloaded directory costs)
    2. run     in a FRESH process held to the Colab budget: host memory by a cgroup v2 limit
               (memory.max = 12.7 GB; a process above it is killed), or, where the machine forbids
               that, by a watchdog thread that samples RSS and kills the run above 12.7 GB (the
               JSON says which); device memory capped at 15 GiB; budgets for the planner through
               $MOE_COLAB_DEVICE_BYTES / $MOE_COLAB_HOST_BYTES. Then
               load_model(dir, experts_on_device="auto"), a 512-token prompt, 256 streamed tokens.

Records load time, host peak (RSS; under a cgroup also its memory.peak, page cache included),
device peak (the process's used device memory), decode tokens/s from the streamer's timestamps,
and the plan's figures beside them. Writes colab_rehearsal.json and colab_rehearsal.md to --out.
GPU only; run as root for the cgroup.

    python benchmarks/colab_rehearsal.py --out DIR --work /tmp/rehearsal [--quant paper-2bit,paper-3bit]
    python benchmarks/colab_rehearsal.py --report DIR/colab_rehearsal.json --out docs
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HOST_LIMIT = int(12.7e9)
DEVICE_LIMIT = 15 * 2**30
CGROUP = Path("/sys/fs/cgroup/moe_colab_rehearsal")


# -- 1. the directory ---------------------------------------------------------------------------
def write_directory(dst: Path, qname: str, seed: int = 0, scale: str = "full", device: str = "cuda") -> dict:
    """A quantized directory of Mixtral-8x7B's shapes with synthetic weights, via the writer."""
    import torch

    from moe_colab.adapters.mixtral import MixtralAdapter
    from moe_colab.bench.synthetic import bench_config, layer_experts, synthetic_trunk_state
    from moe_colab.convert.manifest import TRUNK_FILE, layer_file
    from moe_colab.convert.writer import QuantizedDirWriter, fresh_manifest
    from moe_colab.engine.build import build_trunk
    from moe_colab.quant.config import resolve_quant
    from moe_colab.quant.format import QuantizedExpertFormat, attach_quant_linears_

    config, qcfg = bench_config(scale), resolve_quant(qname)
    fmt = QuantizedExpertFormat(config.hidden_size, config.intermediate_size, qcfg, torch.float16)
    writer = QuantizedDirWriter(dst, fresh_manifest(model_type="mixtral", config=config, qcfg=qcfg,
                                                   dtype=torch.float16, fmt=fmt, source=f"synthetic:{qname}:{seed}"))
    t0 = time.perf_counter()
    model = build_trunk(MixtralAdapter(), config, torch.float16)
    with torch.device("meta"):
        attach_quant_linears_(model, qcfg)
    trunk = {k: v.cpu() for k, v in synthetic_trunk_state(model, seed, device, torch.float16).items()}
    writer.save_unit(TRUNK_FILE, trunk)
    del trunk, model
    for layer in range(config.num_hidden_layers):
        buf = layer_experts(fmt, config.num_local_experts, layer, seed, device).cpu()
        writer.save_unit(layer_file(layer), {"experts": buf})
    writer.finish()
    wrote = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in dst.iterdir() if p.suffix == ".safetensors")
    # What a first load of a downloaded directory (no verified stamps) spends on sha256.
    from moe_colab.convert import manifest as qm
    stamps = dst / qm.VERIFIED
    kept = stamps.read_bytes()
    stamps.unlink()
    m = qm.read_manifest(dst)
    t1 = time.perf_counter()
    for name, entry in m["files"].items():
        qm.check_sha256(dst, name, entry)
    verify = time.perf_counter() - t1
    stamps.write_bytes(kept)
    return {"write_s": round(wrote, 1), "directory_bytes": size, "sha256_check_s": round(verify, 1),
            "sha256_GBps": round(size / verify / 1e9, 2)}


# -- 2. the run, in a fresh process ---------------------------------------------------------------
def child(directory: str, prompt_tokens: int, new_tokens: int, result_path: str, device: str = "cuda") -> None:
    """What a Colab user does, in a process held to the budget; writes a JSON result."""
    import psutil
    import torch
    from transformers.generation.streamers import BaseStreamer

    import moe_colab
    from moe_colab.bench.measure import PeakRSS

    cuda = device == "cuda"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.float16 if cuda else torch.float32
    if cuda:
        torch.cuda.set_per_process_memory_fraction(DEVICE_LIMIT / torch.cuda.get_device_properties(dev).total_memory,
                                                   dev)

    class Stamps(BaseStreamer):
        """Times each streamed piece: the prompt first, then every new token."""
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    out = {"pid": os.getpid()}
    with PeakRSS(interval=0.02, device=dev if cuda else None) as peaks:
        t0 = time.perf_counter()
        model = moe_colab.load_model(directory, device=dev, dtype=dtype, experts_on_device="auto", progress=False)
        if cuda:
            torch.cuda.synchronize()
        out["load_s"] = round(time.perf_counter() - t0, 1)
        opts = model.offload_options
        out.update(experts_on_device=opts.experts_on_device, swap=opts.swap, extra_host_rows=opts.extra_host_rows,
                   spare_slots=opts.spare_slots, cuda_graphs=opts.cuda_graphs)
        out["pinned_expert_bytes"] = model.moe_cache.store.host_bytes
        ids = torch.randint(3, model.config.vocab_size, (1, prompt_tokens),
                            generator=torch.Generator().manual_seed(0)).to(dev)
        stream = Stamps()
        t1 = time.perf_counter()
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=stream, pad_token_id=0)
        out["generate_s"] = round(time.perf_counter() - t1, 2)
        # times[0]: the prompt; times[1]: the first new token (the prefill's); then one per decode step
        t = stream.times
        out["prefill_s"] = round(t[1] - t[0], 3) if len(t) > 1 else None
        out["decoded_tokens"] = len(t) - 2
        out["decode_tokens_per_s"] = round((len(t) - 2) / (t[-1] - t[1]), 3) if len(t) > 2 else None
        out["generated"] = int(seq.shape[1] - ids.shape[1])
        out["offload_stats"] = {k: v for k, v in model.offload_stats().items() if isinstance(v, int)}
        out["device_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev) if cuda else None
    out["host_peak_rss_bytes"] = peaks.peak
    out["device_peak_bytes"] = peaks.device_peak
    out["rss_end_bytes"] = psutil.Process().memory_info().rss
    Path(result_path).write_text(json.dumps(out, indent=1))


def _cgroup() -> bool:
    """Create the cgroup with memory.max = HOST_LIMIT; False where the machine forbids it."""
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.max").write_text(str(HOST_LIMIT))
        (CGROUP / "memory.swap.max").write_text("0") if (CGROUP / "memory.swap.max").exists() else None
        return (CGROUP / "memory.max").read_text().strip() == str(HOST_LIMIT)
    except OSError:
        return False


def run_held(directory: Path, work: Path, prompt_tokens: int, new_tokens: int, timeout: float,
             device: str = "cuda") -> dict:
    """Run child() in a fresh process under the host limit; the limit's kind and peak recorded."""
    result = work / "child.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, MOE_COLAB_DEVICE_BYTES=str(DEVICE_LIMIT), MOE_COLAB_HOST_BYTES=str(HOST_LIMIT),
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, __file__, "--child", str(directory), "--prompt", str(prompt_tokens), "--new",
           str(new_tokens), "--result", str(result), "--device", device]
    use_cgroup = _cgroup()

    def enter_cgroup():
        (CGROUP / "cgroup.procs").write_text(str(os.getpid()))
    proc = subprocess.Popen(cmd, env=env, preexec_fn=enter_cgroup if use_cgroup else None)
    killed = {"by_watchdog": False}
    if not use_cgroup:          # a watchdog instead: sample RSS, kill above the limit
        import psutil

        def watch():
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    if p.memory_info().rss > HOST_LIMIT:
                        killed["by_watchdog"] = True
                        proc.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    return
                time.sleep(0.02)
        threading.Thread(target=watch, daemon=True).start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    out = json.loads(result.read_text()) if result.is_file() else {}
    out.update(returncode=rc, host_limit_bytes=HOST_LIMIT, device_limit_bytes=DEVICE_LIMIT,
               host_limit_kind="cgroup v2 memory.max" if use_cgroup else "RSS watchdog (cgroup not permitted)",
               killed_by_watchdog=killed["by_watchdog"])
    if use_cgroup:
        for name in ("memory.peak", "memory.events"):
            f = CGROUP / name
            if f.exists():
                out[f"cgroup_{name.replace('.', '_')}"] = f.read_text().strip()
        peak = out.get("cgroup_memory_peak")
        out["cgroup_peak_bytes"] = int(peak) if peak and peak.isdigit() else None
    return out


# -- the report -----------------------------------------------------------------------------------
def markdown(doc: dict) -> str:
    L = ["# Colab rehearsal: full-size Mixtral-8x7B shapes, from disk, held to a free T4's budget", "",
         f"Generated by `python benchmarks/colab_rehearsal.py` on {doc.get('machine', {}).get('gpu', '?')} "
         f"({doc.get('started', '')}); raw numbers in [colab_rehearsal.json](colab_rehearsal.json). Weights are "
         "synthetic (random codes in the quantized layout, random routers), written to disk as a quantized "
         "directory by moe_colab's writer, then loaded by `load_model(dir, experts_on_device=\"auto\")` in a fresh "
         "process: host memory held to 12.7 GB "
         f"({doc.get('results', [{}])[0].get('host_limit_kind', '?') if doc.get('results') else '?'}), device memory "
         "capped at 15 GiB, the planner's budgets given through the environment. A 512-token prompt, then 256 "
         "greedy tokens through a streamer.", "",
         "| scheme | k | swap | host limit | host peak RSS | cgroup peak (page cache incl.) | device peak | load s "
         "| decode tok/s | plan: host | plan: device | directory | sha256 check |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc.get("results", []):
        p = r.get("plan", {})
        gb = lambda b: f"{b / 1e9:.2f} GB" if b else "-"                      # noqa: E731
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"                  # noqa: E731
        L.append(f"| {r['scheme']} | {r.get('experts_on_device', '-')} | {r.get('swap', '-')} | {gb(r['host_limit_bytes'])} "
                 f"| {gb(r.get('host_peak_rss_bytes'))} | {gb(r.get('cgroup_peak_bytes'))} | {gib(r.get('device_peak_bytes'))} "
                 f"| {r.get('load_s', '-')} | {r.get('decode_tokens_per_s', '-')} | {gb(p.get('host_total'))} "
                 f"| {gib((p.get('device_total') or 0) + (p.get('device_margin_bytes') or 0))} "
                 f"| {gb(r.get('directory_bytes'))} | {r.get('sha256_check_s', '-')} s |")
        if r.get("returncode") not in (0, None):
            L.append(f"\n{r['scheme']}: the run ended with {r.get('returncode')} "
                     f"({'killed by the watchdog' if r.get('killed_by_watchdog') else r.get('cgroup_memory_events', '')})")
    L += ["", "host peak RSS: the process's resident memory, sampled every 20 ms. cgroup peak: memory.peak of its "
          "cgroup, which also counts page cache the process brought in (reclaimable). device peak: the process's "
          "used device memory (CUDA context and allocator reserve included). sha256 check: the time to hash the "
          "whole directory once (the first load of a downloaded directory does it; later loads skip unchanged "
          "files, moe_colab/convert/manifest.py). Decode tok/s is the H200's with a T4's memory, not a T4's speed: "
          "docs/benchmarks.md estimates the T4.", ""]
    return "\n".join(L)


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--out", default="rehearsal_out")
    a.add_argument("--work", default="/tmp/moe_colab_rehearsal", help="where the directories are written")
    a.add_argument("--quant", default="paper-2bit,paper-3bit")
    a.add_argument("--prompt", type=int, default=512)
    a.add_argument("--new", type=int, default=256)
    a.add_argument("--max-seconds", type=float, default=540)
    a.add_argument("--scale", default="full", help="full; small or tiny for a smoke test")
    a.add_argument("--device", default="cuda", help="cuda; cpu for a smoke test of the script itself")
    a.add_argument("--child")
    a.add_argument("--result")
    a.add_argument("--report")
    args = a.parse_args()
    if args.child:
        return child(args.child, args.prompt, args.new, args.result, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        doc = json.loads(Path(args.report).read_text())
        (out / "colab_rehearsal.md").write_text(markdown(doc))
        return
    import torch

    from moe_colab.bench.measure import machine_info
    from moe_colab.planner import COLAB_T4, plan
    deadline = time.perf_counter() + args.max_seconds
    doc = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(torch.device(args.device)), "scale": args.scale, "results": []}
    work = Path(args.work)
    for qname in args.quant.split(","):
        left = deadline - time.perf_counter()
        if left < 150:
            print(f"{qname}: skipped ({left:.0f} s left)", flush=True)
            doc["results"].append({"scheme": qname, "skipped": "time budget"})
            continue
        d = work / qname
        shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        r = {"scheme": qname, **write_directory(d, qname, scale=args.scale, device=args.device)}
        print(f"{qname}: wrote {r['directory_bytes'] / 1e9:.1f} GB in {r['write_s']} s; sha256 of all of it "
              f"{r['sha256_check_s']} s", flush=True)
        p = plan(d, device="cuda", dtype=torch.float16, **COLAB_T4)
        r["plan"] = p.to_dict()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        r.update(run_held(d, work, args.prompt, args.new, timeout=max(60.0, deadline - time.perf_counter()),
                          device=args.device))
        r["wall_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps({k: v for k, v in r.items() if k != "plan"}, indent=1), flush=True)
        doc["results"].append(r)
        (out / "colab_rehearsal.json").write_text(json.dumps(doc, indent=1))
        (out / "colab_rehearsal.md").write_text(markdown(doc))
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
