"""Measurements for the benchmark: copy bandwidth, a timed greedy decode, one row, a profile.

    bandwidth     host -> device copies of 64..352 MiB (pinned and pageable), median of a few
    timed_run     prefill (one forward over the prompt) and decode (single-token forwards with a
                  DynamicCache, greedy), timed separately with a device synchronisation
    measure_row   warm-up, then runs over every prompt; medians, and expert-cache counters of
                  the decode phase summed over runs
    profile_decode torch.profiler over a few decoded tokens: top ops, and per-token counts of
                  synchronisations and copies (what keeps a row from its transfer bound)

Definitions (docs/benchmarks.md repeats them):
    decode tokens/s    decoded tokens / decode seconds (each token is one single-token forward)
    hit ratio          hits / (hits + misses) over the decode phase
    prefetch recall    prefetch_hits / (hits + misses): the share of expert uses served by a copy
                       that a speculative prefetch had brought (it was not resident before)
    bytes per token    bytes copied during decode / decoded tokens: host -> device, plus
                       device -> host in swap mode (one copy stream carries both)
    transfer bound     bandwidth / bytes per token: the speed if copies were the only cost
"""
from __future__ import annotations

import gc
import inspect
import os
import platform
import statistics
import subprocess
import threading
import time
from contextlib import nullcontext

import psutil
import torch

MiB = 1 << 20


def machine_info(device) -> dict:
    """Versions and hardware, for the report."""
    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "host_memory_bytes": psutil.virtual_memory().total, "device": str(device)}
    for mod in ("accelerate", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    if torch.device(device).type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(gpu=prop.name, gpu_memory_bytes=prop.total_memory, cuda=torch.version.cuda,
                    capability=f"{prop.major}.{prop.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
        except Exception:
            info["driver"] = None
    return info


def release(device) -> None:
    """Give freed device memory, and torch's cached pinned host blocks, back."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


def host_memory_stats() -> dict | None:
    """torch's pinned (host) allocator counters in bytes, where this torch has them."""
    try:
        return {k: v for k, v in torch.cuda.host_memory_stats().items() if "bytes" in k}
    except Exception:
        return None


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _time_copy(dst, src, device, reps: int) -> float:
    """Median seconds of dst.copy_(src)."""
    times = []
    for i in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=src.is_pinned())
        sync(device)
        if i:                                   # the first copy is a warm-up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bandwidth(device, sizes: list[int], *, pinned: bool, reps: int = 5) -> dict[int, float]:
    """{bytes: GB/s} host -> ``device`` (on a CPU-only machine: host memcpy)."""
    device = torch.device(device)
    top = max(sizes)
    pin = pinned and device.type == "cuda"
    host = torch.empty(top, dtype=torch.uint8, pin_memory=pin)
    host.fill_(1)                               # fault the pages in before timing
    dev = torch.empty(top, dtype=torch.uint8, device=device)
    out = {n: n / _time_copy(dev[:n], host[:n], device, reps) / 1e9 for n in sizes}
    del host, dev
    return out


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the largest seen (bytes).
    With a CUDA ``device`` it also samples the device's used memory (total - free: the CUDA context
    and the allocator's reserve count) into ``device_peak``."""

    def __init__(self, interval: float = 0.05, device=None):
        self.interval, self.peak, self.device_peak, self.device = interval, 0, 0, device
        self._proc, self._stop = psutil.Process(), threading.Event()

    def sample(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)
        if self.device is not None:
            free, total = torch.cuda.mem_get_info(self.device)
            self.device_peak = max(self.device_peak, total - free)

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def _kv_name(model) -> str:
    # transformers renamed past_key_values to cache in 5.2x: accept both.
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _diff(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float))}


@torch.no_grad()
def timed_run(model, ids, n_new: int, *, device, stats_fn, deadline: float | None = None,
              decode_context=None) -> dict:
    """Greedy: one prefill forward over ``ids`` [1, P], then up to ``n_new`` single-token forwards
    (fewer if ``deadline`` passes). Returns seconds, tokens, and counter deltas per phase."""
    kv = {_kv_name(model): _new_cache(model)}
    sync(device)
    s0, t0 = stats_fn(), time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kv)
    nxt = out.logits[:, -1:].argmax(-1)                                 # [1, 1]
    sync(device)
    s1, t1 = stats_fn(), time.perf_counter()
    tokens, done = [nxt], 0
    with decode_context or nullcontext():
        for _ in range(n_new):
            out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **kv)
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(nxt)
            done += 1
            if deadline is not None and time.perf_counter() > deadline:
                break
        sync(device)
    s2, t2 = stats_fn(), time.perf_counter()
    return {"prompt": ids.shape[1], "prefill_s": t1 - t0, "decode_s": t2 - t1, "decoded": done,
            "tokens": torch.cat(tokens, dim=1)[0].tolist(),
            "prefill_stats": _diff(s1, s0), "decode_stats": _diff(s2, s1)}


def _ratio(a, b):
    return a / b if b else None


def measure_row(model, prompts: list, n_new: int, runs: int, *, device, stats_fn, reset_fn,
                row_deadline: float, hard_deadline: float, stop_at: float, warmup_prompts: int | None = None,
                warmup_tokens: int = 24, log=print) -> dict:
    """Warm-up (``warmup_tokens`` decoded tokens: the engine captures its CUDA graphs on the
    second and third use of each slot, see moe_colab.engine.graphs), then ``runs`` rounds over every prompt. Each run starts from an
    empty expert cache and a rewound routing. Time limits: the first round always runs (unless
    ``stop_at`` has passed), later rounds only before ``row_deadline``; a decode loop stops
    adding tokens after ``hard_deadline``."""
    for ids in prompts[:warmup_prompts]:
        reset_fn()
        timed_run(model, ids, min(warmup_tokens, n_new), device=device, stats_fn=stats_fn)
    records = []
    for r in range(runs):
        for ids in prompts:
            now = time.perf_counter()
            if now > stop_at or (r and now > row_deadline):
                continue
            reset_fn()
            rec = timed_run(model, ids, n_new, device=device, stats_fn=stats_fn, deadline=hard_deadline)
            records.append(rec)
            log(f"    prompt {rec['prompt']:4d}: prefill {rec['prompt'] / rec['prefill_s']:9.1f} tok/s, "
                f"decode {rec['decoded'] / rec['decode_s']:7.2f} tok/s ({rec['decoded']} tokens)")
    if not records:
        raise RuntimeError("no run fitted in the time budget")
    dec = [r["decoded"] / r["decode_s"] for r in records if r["decoded"]]
    totals: dict[str, float] = {}
    for r in records:
        for k, v in r["decode_stats"].items():
            totals[k] = totals.get(k, 0) + v
    decoded = sum(r["decoded"] for r in records)
    uses = totals.get("hits", 0) + totals.get("misses", 0)
    per_prompt = {}
    for P in sorted({r["prompt"] for r in records}):
        rs = [r for r in records if r["prompt"] == P]
        per_prompt[str(P)] = {
            "prefill_tokens_per_s": statistics.median(P / r["prefill_s"] for r in rs),
            "decode_tokens_per_s": statistics.median(r["decoded"] / r["decode_s"] for r in rs),
            "prefill_bytes": statistics.median(r["prefill_stats"].get("bytes_to_device", 0) for r in rs),
            "runs": len(rs)}
    return {
        "decode_tokens_per_s": statistics.median(dec) if dec else None,
        "decode_tokens_per_s_runs": [round(d, 4) for d in dec],
        "per_prompt": per_prompt,
        "hit_ratio": _ratio(totals.get("hits", 0), uses) if uses else None,
        "prefetch_recall": _ratio(totals.get("prefetch_hits", 0), uses) if uses else None,
        "bytes_per_token": _ratio(totals.get("bytes_to_device", 0) + totals.get("bytes_to_host", 0), decoded),
        "bytes_to_device_per_token": _ratio(totals.get("bytes_to_device", 0), decoded),
        "bytes_to_host_per_token": _ratio(totals.get("bytes_to_host", 0), decoded),
        "decode_counters": totals, "decoded_tokens": decoded, "truncated_runs": sum(r["decoded"] < n_new for r in records),
        "tokens": {str(r["prompt"]): r["tokens"] for r in records},
    }


def profile_decode(model, ids, n_tokens: int, *, device, stats_fn, reset_fn, trace_path=None) -> dict:
    """torch.profiler over ``n_tokens`` decoded tokens: top ops, per-token sync/copy counts."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts)
    reset_fn()
    rec = timed_run(model, ids, n_tokens, device=device, stats_fn=stats_fn, decode_context=prof)
    n = max(1, rec["decoded"])
    ka = prof.key_averages()
    table = None
    for key in (["self_cuda_time_total", "self_device_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        try:
            table = ka.table(sort_by=key, row_limit=30)
            break
        except Exception:   # sort keys differ across torch versions
            continue
    watch = ("Synchronize", "Memcpy", "aten::item", "aten::_local_scalar_dense", "LaunchKernel",
             "cudaStreamWaitEvent", "cudaEventRecord", "aten::copy_", "aten::nonzero")
    counts = {e.key: e.count for e in ka if any(w in e.key for w in watch)}

    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA] if cuda else []
    htod = sum(e.time_range.elapsed_us() for e in gpu if "Memcpy HtoD" in e.name)
    kernels = sum(e.time_range.elapsed_us() for e in gpu if "Memcpy" not in e.name and "Memset" not in e.name)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    return {"tokens": rec["decoded"], "wall_ms_per_token": 1e3 * rec["decode_s"] / n,
            "htod_copy_ms_per_token": htod / 1e3 / n if cuda else None,
            "device_compute_ms_per_token": kernels / 1e3 / n if cuda else None,
            "counts_per_token": {k: round(v / n, 2) for k, v in sorted(counts.items())},
            "table": table}


def write_profile_text(path, prof: dict, title: str) -> None:
    path.write_text(f"{title}, {prof['tokens']} decoded tokens\n"
                    f"wall ms/token {prof['wall_ms_per_token']:.2f}, host->device copy ms/token "
                    f"{prof['htod_copy_ms_per_token']}, device kernel ms/token {prof['device_compute_ms_per_token']}\n"
                    f"counts per token:\n" + "\n".join(f"  {k}: {v}" for k, v in prof["counts_per_token"].items())
                    + f"\n\n{prof['table']}\n")


def compare_tokens(rows: dict) -> None:
    """Share of each row's generated tokens equal to the full row's (same prompt, common length):
    every row computes the same model on the same routing, so 1.0 is expected."""
    ref = rows.get("full", {}).get("tokens")
    for r in rows.values():
        if not ref or "tokens" not in r:
            continue
        same = total = 0
        for p, toks in r["tokens"].items():
            n = min(len(toks), len(ref.get(p, [])))
            same += sum(a == b for a, b in zip(toks[:n], ref[p][:n])) if n else 0
            total += n
        r["same_tokens_as_full"] = same / total if total else None
