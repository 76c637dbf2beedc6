"""Time one Mixtral expert forward through the low-bit kernels, against the memory-read bound.

    python benchmarks/kernels_bench.py            # CUDA: Mixtral expert, T = 1, 4, 16 -> docs/kernels.{json,md}
    python benchmarks/kernels_bench.py --quick    # small shapes, T = 1 and 4, prints only (smoke run)
    TRITON_INTERPRET=1 python benchmarks/kernels_bench.py --quick     # the same on CPU (interpreter)

An expert is y = w2(silu(w1 x) * w3 x), w1, w3 [14336, 4096], w2 [4096, 14336]. At decode batch
sizes the forward is bound by reading the expert's bytes, so next to each time we print the time
to read those bytes at this GPU's measured device bandwidth (a large device-to-device copy).
Variants: "auto" (what quant_linear runs), "fma" (the T4's path), "dot" (tensor cores, sm_80+),
"dequant" (Triton dequantize + cuBLAS, the prefill path), "fallback" (what a model falls back to
when its kernels fail: quant/fallback.py, the NVRTC dequantize kernel + cuBLAS on CUDA), "torch"
(the old torch reference path, T = 1 only), and the 16-bit expert (cuBLAS). The T4's own sm_75
code, the fallback against the copy time and a T4 estimate: benchmarks/t4_kernels.py. Random codes, scales and zeros are packed with packing.py (no
hqq needed: speed does not depend on the values). A small launch-parameter sweep per matrix
follows, to tune kernels.launch_config. Each section runs in its own process, so one crash (a
compile error, an illegal address) is reported and the others still run.

References: Eliseev & Mazur, arXiv 2312.17238 (schemes: section 3.3); moe_colab/quant/kernels.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from kernels_compile import SCHEMES, random_matrix  # noqa: E402

from moe_colab.quant import fallback, kernels, packing  # noqa: E402

FULL = dict(hidden=4096, intermediate=14336, T=[1, 4, 16], copy_mib=2048)
QUICK = dict(hidden=512, intermediate=1024, T=[1, 4], copy_mib=64)
INTERP = dict(hidden=512, intermediate=512, T=[1, 4], copy_mib=16)   # CPU interpreter: logic check only


def timer(fn, device) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing
        try:
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except TypeError:   # older Triton: no return_mode
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0])
    t0 = time.perf_counter()   # CPU (interpreter): one call, the numbers only show it runs
    fn()
    return (time.perf_counter() - t0) * 1e3


def section_bandwidth(dev, cfg):
    n = cfg["copy_mib"] << 20
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), dev)
    return {"copy_bytes": n, "copy_ms": ms, "bandwidth_GBps": 2 * n / ms / 1e6}   # read + write


def expert_fn(mats, bits, shapes, variant):
    g, sg = SCHEMES[bits]
    if variant == "torch":
        def lin(x, name):
            return packing.quant_linear_torch(x, mats[name], bits, g, sg, shapes[name])
    elif variant == "fallback":
        ws, impl = fallback.Workspace(), "cuda" if torch.cuda.is_available() else "torch"

        def lin(x, name):
            return fallback.quant_linear_fallback(x, mats[name], bits, g, sg, shapes[name], impl=impl, workspace=ws)
    else:
        path = "auto" if variant == "auto" else variant

        def lin(x, name):
            return kernels.quant_linear_triton(x, mats[name], bits, g, sg, shapes[name], path=path)
    return lambda x: lin(F.silu(lin(x, "w1")) * lin(x, "w3"), "w2")


def section_bits(dev, cfg, bits):
    H, I = cfg["hidden"], cfg["intermediate"]
    g, sg = SCHEMES[bits]
    shapes = {"w1": (I, H), "w3": (I, H), "w2": (H, I)}
    mats = {name: random_matrix(bits, shape, g, sg, seed=i, device=dev) for i, (name, shape) in enumerate(shapes.items())}
    nbytes = sum(t.numel() * t.element_size() for m in mats.values() for t in m.values())
    cc = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (8, 0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    rows = []
    for T in cfg["T"]:
        x = torch.randn(T, H, device=dev, dtype=torch.float16)
        ref = expert_fn(mats, bits, shapes, "torch")(x).float()
        variants = (["auto", "fma", "dequant"] + (["dot"] if cc >= (8, 0) else []) + ["fallback"]
                    + (["torch"] if T == 1 else []))
        for variant in variants:
            row = {"T": T, "variant": variant}
            if variant in ("auto", "fma", "dot"):
                row["launch"] = {name: kernels.launch_config(T, shape, bits, g, torch.float16, cc, sms,
                                                             path=variant) for name, shape in shapes.items()}
                row["path"] = row["launch"]["w1"]["path"]
            try:
                fn = expert_fn(mats, bits, shapes, variant)
                y = fn(x).float()
                row["rel_err_vs_torch"] = ((y - ref).norm() / ref.norm()).item()
                row["ms"] = timer(lambda: fn(x), dev)
            except Exception as e:  # one broken variant must not hide the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(f"  {bits}-bit T={T} {variant}: {row.get('ms', row.get('error'))}", file=sys.stderr, flush=True)
    return {"bits": bits, "group_size": g, "scale_group": sg, "bytes": nbytes, "rows": rows}


def section_dense(dev, cfg):
    H, I = cfg["hidden"], cfg["intermediate"]
    w13 = torch.randn(2 * I, H, device=dev, dtype=torch.float16) * 0.02   # as storage.DenseExpertFormat
    w2 = torch.randn(H, I, device=dev, dtype=torch.float16) * 0.02

    def fn(x):
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)
    rows = []
    for T in cfg["T"]:
        x = torch.randn(T, H, device=dev, dtype=torch.float16)
        rows.append({"T": T, "variant": "cublas", "ms": timer(lambda: fn(x), dev)})
    return {"bits": 16, "bytes": 3 * H * I * 2, "rows": rows}


def section_sweep(dev, cfg, bits):
    """Per matrix: block_n x split_k around launch_config's choice, fma and dot paths."""
    H, I = cfg["hidden"], cfg["intermediate"]
    cc = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (8, 0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    rows = []
    g, sg = SCHEMES[bits]
    for shape in [(I, H), (H, I)]:
        mat = random_matrix(bits, shape, g, sg, device=dev)
        ngp = shape[1] // kernels.PLANES[bits] // g
        for T in (1, 4):
            x = torch.randn(T, shape[1], device=dev, dtype=torch.float16)
            for path in ["fma"] + (["dot"] if cc >= (8, 0) and T > 1 else []):
                base = kernels.launch_config(T, shape, bits, g, torch.float16, cc, sms, path=path)
                lo = 16 if path == "dot" else 4
                for bn in sorted({max(lo, base["block_n"] // 2), base["block_n"], min(128, base["block_n"] * 2)}):
                    for split in sorted({1, base["split_k"], 2 * base["split_k"]}):
                        if ngp % split:
                            continue
                        row = {"bits": bits, "shape": list(shape), "T": T, "path": path, "block_n": bn,
                               "split_k": split, "default": bn == base["block_n"] and split == base["split_k"]}
                        try:
                            ms = timer(lambda: kernels.quant_linear_triton(
                                x, mat, bits, g, sg, shape, path=path, block_n=bn, split_k=split), dev)
                            row["us"] = ms * 1e3
                        except Exception as e:
                            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        rows.append(row)
    return {"rows": rows}


def pick_config(quick):
    if not torch.cuda.is_available():
        return INTERP
    return QUICK if quick else FULL


def run_section(name, quick):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not kernels.interpreting() and name not in ("bandwidth", "16"):
        raise RuntimeError("no CUDA: run on a GPU, or set TRITON_INTERPRET=1 (with --quick) for a CPU smoke run")
    cfg = pick_config(quick)
    torch.manual_seed(0)
    if name == "bandwidth":
        return section_bandwidth(dev, cfg)
    if name == "16":
        return section_dense(dev, cfg)
    if name.startswith("sweep"):
        return section_sweep(dev, cfg, int(name[5:]))
    return section_bits(dev, cfg, int(name))


def markdown(res) -> str:
    bw = res.get("bandwidth", {}).get("bandwidth_GBps")
    lines = [f"# Low-bit kernels: one Mixtral expert forward on {res['device']}", "",
             f"Generated by `python benchmarks/kernels_bench.py{' --quick' if res['quick'] else ''}` on "
             f"{res['date']} (torch {res['torch']}, triton {res['triton']}). Shapes: hidden {res['hidden']}, "
             f"intermediate {res['intermediate']}; x fp16; " + ("median of triton.testing.do_bench." if res.get("cc") else
             "ONE call each on the CPU interpreter: these times only show that every path runs."), "",
             f"Device bandwidth (device-to-device copy, read + write): "
             f"{bw:.0f} GB/s. \"Read bound\" = the expert's bytes / that bandwidth." if bw else
             "Device bandwidth: not measured.", "",
             "\"fallback\": what a model uses when its kernels fail their self-test (quant/fallback.py). The T4's "
             "sm_75 code run on this GPU, the fallback against the copy time, and a T4 estimate with compute: "
             "[t4_kernels.md](t4_kernels.md).", "",
             "| expert | MB | T | auto (path) ms | fma ms | dot ms | dequant+cuBLAS ms | fallback ms | torch ms | "
             "read bound ms | bound / auto |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in res["experts"]:
        if "error" in e:
            lines.append(f"| {e['bits']}-bit | | | section failed: {e['error'][:120]} | | | | | | | |")
            continue
        mb = e["bytes"] / 1e6
        bound = e["bytes"] / (bw * 1e9) * 1e3 if bw else None
        for T in sorted({r["T"] for r in e["rows"]}):
            cell = {}
            for r in e["rows"]:
                if r["T"] == T:
                    cell[r["variant"]] = (f"{r['ms']:.3f}" if "ms" in r else "error", r)
            get = lambda v: cell.get(v, ("-", None))[0]   # noqa: E731
            if e["bits"] == 16:
                auto_ms = cell["cublas"][1]["ms"]
                lines.append(f"| 16-bit | {mb:.0f} | {T} | {auto_ms:.3f} (cuBLAS) | - | - | - | - | - | "
                             f"{bound:.3f} | {bound / auto_ms:.0%} |" if bound else f"| 16-bit | {mb:.0f} | {T} | {auto_ms:.3f} | | | | | | | |")
                continue
            auto = cell.get("auto", ("-", None))
            auto_txt = f"{auto[0]} ({auto[1].get('path', '?')})" if auto[1] else "-"
            ratio = f"{bound / auto[1]['ms']:.0%}" if bound and auto[1] and "ms" in auto[1] else "-"
            lines.append(f"| {e['bits']}-bit | {mb:.1f} | {T} | {auto_txt} | {get('fma')} | {get('dot')} | "
                         f"{get('dequant')} | {get('fallback')} | {get('torch')} | {f'{bound:.3f}' if bound else '-'} | {ratio} |")
    errs = [(e["bits"], r) for e in res["experts"] for r in e.get("rows", []) if "error" in r]
    if errs:
        lines += ["", "Errors:", ""] + [f"- {b}-bit T={r['T']} {r['variant']}: {r['error']}" for b, r in errs]
    bad = [(e["bits"], r) for e in res["experts"] for r in e.get("rows", [])
           if r.get("rel_err_vs_torch") is not None and r["rel_err_vs_torch"] > 5e-3]
    if bad:
        lines += ["", "WRONG RESULTS (relative error vs the torch path > 5e-3):", ""]
        lines += [f"- {b}-bit T={r['T']} {r['variant']}: {r['rel_err_vs_torch']:.2e}" for b, r in bad]
    sweep = res.get("sweep", {}).get("rows", [])
    if sweep:
        lines += ["", "## Launch-parameter sweep (one matrix, microseconds; * = launch_config's choice)", "",
                  "| bits | shape | T | path | best block_n / split_k | best us | default us |", "|---|---|---|---|---|---|---|"]
        keys = sorted({(r["bits"], tuple(r["shape"]), r["T"], r["path"]) for r in sweep})
        for key in keys:
            rs = [r for r in sweep if (r["bits"], tuple(r["shape"]), r["T"], r["path"]) == key and "us" in r]
            if not rs:
                continue
            best = min(rs, key=lambda r: r["us"])
            dflt = next((f"{r['us']:.1f}" for r in rs if r["default"]), "-")
            lines.append(f"| {key[0]} | {key[1][0]}x{key[1][1]} | {key[2]} | {key[3]} | {best['block_n']} / "
                         f"{best['split_k']}{' *' if best['default'] else ''} | {best['us']:.1f} | {dflt} |")
    sweep_errors = res.get("sweep", {}).get("errors", []) + [
        f"{r['bits']}-bit {r['shape']} T={r['T']} {r['path']} block_n={r['block_n']} split_k={r['split_k']}: "
        f"{r['error']}" for r in sweep if "error" in r]
    if sweep_errors:
        lines += ["", "Sweep errors:", ""] + [f"- {e}" for e in sweep_errors]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, no sweep, print only")
    ap.add_argument("--out-dir", default=None, help="where to write kernels.json/.md (default: docs/ for full runs)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sections", nargs="+", help="run only these: bandwidth 16 2 3 4 sweep2 sweep3 sweep4")
    ap.add_argument("--section", help=argparse.SUPPRESS)   # internal: run one section, print JSON
    ap.add_argument("--timeout", type=int, default=420, help="seconds per section")
    args = ap.parse_args(argv)
    if args.section:
        print("RESULT " + json.dumps(run_section(args.section, args.quick)), flush=True)
        return 0
    cfg = pick_config(args.quick)
    import triton
    dev_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    res = {"device": dev_name, "quick": args.quick, "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "triton": triton.__version__, "hidden": cfg["hidden"],
           "intermediate": cfg["intermediate"], "experts": []}
    if torch.cuda.is_available():
        res["cc"] = list(torch.cuda.get_device_capability())
    sections = args.sections or (["bandwidth", "16", "2", "3", "4"]
                                 + ([] if args.quick or args.no_sweep else ["sweep2", "sweep3", "sweep4"]))
    for name in sections:
        t0 = time.time()
        cmd = [sys.executable, __file__, "--section", name] + (["--quick"] if args.quick else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
            out = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if out:
                r = json.loads(out[-1][7:])
            else:   # the last line of a traceback names the problem; the log keeps the rest
                print(p.stderr[-4000:], file=sys.stderr)
                tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
                r = {"error": f"exit {p.returncode}: {tail[:300]}"}
        except subprocess.TimeoutExpired:
            r = {"error": f"timed out after {args.timeout} s"}
        print(f"section {name}: {time.time() - t0:.1f} s" + (f"  ERROR {r['error']}" if "error" in r else ""), flush=True)
        if name == "bandwidth":
            res["bandwidth"] = r
        elif name.startswith("sweep"):
            res.setdefault("sweep", {"rows": [], "errors": []})
            res["sweep"]["rows"] += r.get("rows", [])
            if "error" in r:
                res["sweep"]["errors"].append(f"{name}: {r['error']}")
        else:
            res["experts"].append(r if "bits" in r else {"bits": int(name), **r})
    md = markdown(res)
    print()
    print(md)
    out_dir = args.out_dir or (None if args.quick else str(ROOT / "docs"))
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "kernels.json").write_text(json.dumps(res, indent=1) + "\n")
        (Path(out_dir) / "kernels.md").write_text(md)
        print(f"wrote {out_dir}/kernels.json and {out_dir}/kernels.md")
    failed = [e for e in res["experts"] if "error" in e] + [r for e in res["experts"] for r in e.get("rows", []) if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
