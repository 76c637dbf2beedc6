"""The T4's kernels, proven without a T4: moe_colab's sm_75 Triton code run and checked on a newer
GPU, the fast fallback timed against the fused kernel and the copy time, and a T4 estimate that
counts compute.

1. Cases (``run``): everything a T4 multiplies with the fused kernels. For each bit width
   (2, 3, 4), matrix shape (Mixtral's experts and attention, the tiny model's, an odd row
   count), T = 1..16 (fused kernel) and 17, 64, 512 (prefill: the dequant kernel in row chunks
   of kernels.DEQUANT_CHUNK, then cuBLAS), fp16, with the launch configuration
   kernels.launch_config picks for a T4 (cc 7.5, 40 SMs) and, for fused launches, the other
   split-K choice forced: moe_colab's own quant_linear_triton runs with every Triton launch
   swapped for the same kernel compiled for sm_75 and loaded from its PTX (benchmarks/
   sm75_ptx.py), with exactly the arguments the real dispatch passes. Each case checks:
     - the result against packing.quant_linear_torch (same dtype) and an fp32 oracle (relative
       norm, the GPU tests' tolerances), no NaN (the output starts as NaN, the matrix sits in a
       0xFF-padded buffer like an expert cache slot), the result in ``out``;
     - the captured arguments against an independent re-derivation (expected_launches);
     - the PTX's ".target sm_75", and registers / local memory of the real sm_75 cubin.
2. One expert (``bench``): w1, w3 [14336, 4096], w2 [4096, 14336], x fp16, T = 1, 2/3/4-bit:
   the fused kernel (this GPU's config; and the sm_75 PTX with the T4's config), the fallback
   (quant/fallback.py, CUDA and torch dequantize + cuBLAS), the old torch path, each timed as a
   CUDA graph replay (GPU time, no launch overhead), beside the copy time of one expert at
   12 GB/s (a T4's PCIe) and this GPU's copy bandwidth.
3. The T4 estimate (moe_colab/bench/t4_estimate.py): each expert time moved to a T4 by
   bandwidth and FP32 throughput, then per token with the benchmark's hit ratio and bytes
   (docs/benchmarks.json), beside the transfer-only estimate.

    python benchmarks/t4_kernels.py list [--quick]              the cases and their T4 configs (CPU)
    python benchmarks/t4_kernels.py check                       CPU: capture == re-derivation, sm_75 PTX
    python benchmarks/t4_kernels.py all --out DIR [--quick]     GPU: run + bench -> DIR/t4_kernels.{json,md}
    python benchmarks/t4_kernels.py run | bench ...             GPU: one part only (prints, --json FILE)
    python benchmarks/t4_kernels.py report DIR/t4_kernels.json --out docs   CPU: the markdown again

What it does not prove: the SASS Triton's ptxas makes for sm_75 (the driver here compiles the
PTX for its own GPU), T4 timing. See sm75_ptx.py. References: moe_colab/quant/kernels.py,
moe_colab/quant/fallback.py, moe_colab/bench/t4_estimate.py; Eliseev & Mazur, arXiv 2312.17238.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
import sm75_ptx as P  # noqa: E402

from moe_colab.bench import t4_estimate  # noqa: E402
from moe_colab.engine.storage import PackedLayout  # noqa: E402
from moe_colab.quant import fallback, kernels, packing  # noqa: E402

SCHEMES = {4: (64, 256), 3: (64, 128), 2: (16, 128)}     # bits -> (group_size, scale_group), the paper's
MIXTRAL = [(14336, 4096), (4096, 14336)]                 # expert w1/w3 [I, H], w2 [H, I]
ATTENTION = [(4096, 4096), (1024, 4096)]                 # q/o, k/v (4-bit in the paper's schemes)
SMALL = [(384, 192), (192, 384), (36, 512)]              # the tiny model's experts; 36 rows: partial blocks
DECODE_T = list(range(1, kernels.MAX_FUSED_T + 1))
PREFILL_T = [17, 64, 512]
STICKY = re.compile(r"illegal|misaligned|CUDA error|unspecified launch")


# ------------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------------
def _other_split(cfg, shape, bits):
    """The split-K choice auto did not take: 1 if it split, else the largest of 8, 4, 2 dividing
    the groups per plane (None if none does)."""
    if cfg["split_k"] > 1:
        return 1
    ngp = shape[1] // kernels.PLANES[bits] // SCHEMES[bits][0]
    return next((s for s in (8, 4, 2) if ngp % s == 0), None)


def t4_cases(bits_list=(2, 3, 4), shapes=None, Ts=None, dtype=torch.float16, quick=False) -> list[dict]:
    """[{bits, T, shape, dtype, split_k, cfg}]: the auto dispatch on a T4 (split_k None), plus
    for fused launches the other split-K choice (every T for small shapes, T 1, 2, 5, 16 for
    Mixtral-sized ones). quick: Mixtral and the odd shape, fewer T."""
    shapes = shapes or (MIXTRAL + SMALL[2:] if quick else MIXTRAL + ATTENTION + SMALL)
    Ts = Ts or ([1, 2, 3, 4, 7, 8, 16, 17, 512] if quick else DECODE_T + PREFILL_T)
    cases = []
    for bits in bits_list:
        g, _ = SCHEMES[bits]
        for shape in shapes:
            if shape[1] % 8 or shape[1] % g:
                continue                        # not a matrix of this scheme
            for T in Ts:
                cfg = kernels.launch_config(T, shape, bits, g, dtype, P.T4_CC, P.T4_SMS)
                cases.append(dict(bits=bits, T=T, shape=tuple(shape), dtype=dtype, split_k=None, cfg=cfg))
                s = _other_split(cfg, shape, bits) if cfg["path"] != "dequant" else None
                if s is not None and (shape[0] * shape[1] < 2 ** 24 or T in (1, 2, 5, 16)):
                    cfg2 = kernels.launch_config(T, shape, bits, g, dtype, P.T4_CC, P.T4_SMS, split_k=s)
                    cases.append(dict(bits=bits, T=T, shape=tuple(shape), dtype=dtype, split_k=s, cfg=cfg2))
    return cases


def case_name(c) -> str:
    cfg = c["cfg"]
    how = (f"{cfg['path']} BT={cfg['block_t']} BN={cfg['block_n']} split={cfg['split_k']}"
           if cfg["path"] != "dequant" else "dequant")
    return (f"{c['bits']}-bit {c['shape'][0]}x{c['shape'][1]} T={c['T']} {str(c['dtype'])[6:]} {how}"
            + (" (forced)" if c["split_k"] is not None else ""))


# ------------------------------------------------------------------------------------------------
# capturing moe_colab's own dispatch
# ------------------------------------------------------------------------------------------------
class _KernelProxy:
    """Stands in for a @triton.jit kernel of kernels.py: kernel[grid](*a, **kw) hands the launch
    to on_launch(real_kernel, grid, a, kw)."""

    def __init__(self, fn, on_launch):
        self._fn, self._on_launch = fn, on_launch

    def __getitem__(self, grid):
        return lambda *args, **meta: self._on_launch(self._fn, grid, args, meta)

    def __getattr__(self, name):
        return getattr(self._fn, name)


@contextlib.contextmanager
def t4_dispatch(on_launch, cc=P.T4_CC, sms=P.T4_SMS, allow_cpu=False):
    """Inside: kernels.py believes the GPU is (cc, sms) and hands each Triton launch to
    on_launch instead of running it. allow_cpu: accept CPU tensors too (quant_linear_triton's CPU
    branch then uses cc (8, 0), 4 SMs, so callers pass path and split_k explicitly)."""
    names = ("_fused_kernel", "_dequant_kernel", "_gpu_info", "interpreting")
    missing = [n for n in names if not hasattr(kernels, n)]
    if missing:
        raise P.InternalsMoved(f"moe_colab.quant.kernels no longer has {missing}: update t4_dispatch")
    saved = {n: getattr(kernels, n) for n in names}
    kernels._fused_kernel = _KernelProxy(saved["_fused_kernel"], on_launch)
    kernels._dequant_kernel = _KernelProxy(saved["_dequant_kernel"], on_launch)
    kernels._gpu_info = lambda index=None: (tuple(cc), int(sms))
    if allow_cpu:
        kernels.interpreting = lambda: True
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(kernels, n, v)


@dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    meta: dict
    info: dict = field(default_factory=dict)

    @property
    def name(self):
        return getattr(self.kernel, "__name__", str(self.kernel))


class Runner:
    """on_launch for t4_dispatch. mode "sm75": run the launch from its sm_75 PTX; "native": the
    real kernel[grid](...) (a control for the harness); "record": only record it."""

    def __init__(self, mode="sm75", sync=True, keep=True):
        if mode not in ("sm75", "native", "record"):
            raise ValueError(f"mode must be sm75, native or record, got {mode!r}")
        self.mode, self.sync, self.keep, self.launches = mode, sync, keep, []

    def __call__(self, kernel, grid, args, meta):
        rec = Launch(kernel, tuple(grid), tuple(args), dict(meta))
        if self.keep:                           # (timing loops keep nothing: no tensors pile up)
            self.launches.append(rec)
        if self.mode == "native":
            kernel[grid](*args, **meta)
            rec.info = {"ptx_target": "native"}
        elif self.mode == "sm75":
            compiled, spec = P.compile_launch(kernel, args, meta)
            P.launch(compiled, grid, *spec.bound.values())
            ptx = compiled.asm["ptx"]
            rec.info = {"ptx_target": P.ptx_target(ptx), "ptx_version": P.ptx_version(ptx),
                        "shared": compiled.metadata.shared, "regs_here": getattr(compiled, "n_regs", None),
                        "sm75": P.sm75_usage(compiled), "t4_problem": P.t4_problem(compiled)}
        if self.sync and self.mode != "record" and torch.cuda.is_available():
            torch.cuda.synchronize()            # a fault shows at its own launch


def expected_launches(x, mat, bits, group_size, scale_group, shape, *, out, path="auto", split_k=None,
                      cc=P.T4_CC, sms=P.T4_SMS):
    """([(kernel, grid, args, meta)], cfg) that quant_linear_triton should make on a (cc, sms) GPU,
    re-derived from launch_config, fused_accumulator and _fused_launch, and for the dequant path
    from dequantize_triton's constants (16 x 64 blocks, row chunks of DEQUANT_CHUNK weights)."""
    n, k = shape
    x2 = x.reshape(-1, k)
    T = x2.shape[0]
    xc = x2.float() if (x.dtype == torch.bfloat16 and tuple(cc) < (8, 0)) else x2
    cfg = kernels.launch_config(T, (n, k), bits, group_size, xc.dtype, tuple(cc), sms, path=path, split_k=split_k)
    if cfg["path"] == "dequant":
        qa, qb = kernels._code_args(mat, bits)
        step = max(16, kernels.DEQUANT_CHUNK // k // 16 * 16)
        launches = []
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            w = torch.empty(r1 - r0, k, device=x.device, dtype=xc.dtype)
            grid = (-(-(r1 - r0) // 16), -(-(k // kernels.PLANES[bits]) // 64))
            args = (w, qa, qb, *kernels._meta_args(mat), r0, r1, k, w.stride(0), qa.stride(0), qb.stride(0),
                    scale_group)
            launches.append((_unwrap(kernels._dequant_kernel), grid, args,
                             dict(BITS=bits, P=kernels.PLANES[bits], G=group_size, BLOCK_N=16, BLOCK_J=64)))
        return launches, cfg
    y = out.view(T, n)
    acc = y if (cfg["split_k"] == 1 and xc.dtype == y.dtype) else kernels.fused_accumulator(T, n, cfg, xc.dtype, x.device)
    grid, args, meta = kernels._fused_launch(xc, acc, mat, bits, group_size, scale_group, (n, k), cfg)
    return [(_unwrap(kernels._fused_kernel), tuple(grid), args, meta)], cfg


def _unwrap(kernel):
    return kernel._fn if isinstance(kernel, _KernelProxy) else kernel


def diff_launches(recorded, expected, known: dict) -> list[str]:
    """Differences between captured launches and expected ones: kernel, grid, meta, and every
    argument (tensors by dtype, shape, stride and, for caller-owned ones in ``known``, address)."""
    ptrs = {t.data_ptr(): name for name, t in known.items() if isinstance(t, torch.Tensor) and t.numel()}

    def describe(v):
        if isinstance(v, torch.Tensor):
            return (str(v.dtype), tuple(v.shape), tuple(v.stride()), v.device.type, ptrs.get(v.data_ptr(), "fresh"))
        return v
    if len(recorded) != len(expected):
        return [f"{len(recorded)} launches captured, {len(expected)} expected"]
    problems = []
    for i, (rec, (kernel, grid, args, meta)) in enumerate(zip(recorded, expected)):
        where = f"launch {i} ({rec.name})"
        if rec.kernel is not kernel:
            problems.append(f"{where}: kernel {rec.name} != {kernel.__name__}")
        if tuple(rec.grid) != tuple(grid):
            problems.append(f"{where}: grid {rec.grid} != {tuple(grid)}")
        if rec.meta != meta:
            problems.append(f"{where}: meta {rec.meta} != {meta}")
        if len(rec.args) != len(args):
            problems.append(f"{where}: {len(rec.args)} arguments != {len(args)}")
            continue
        names = list(kernel.arg_names)
        for j, (a, b) in enumerate(zip(rec.args, args)):
            if describe(a) != describe(b):
                problems.append(f"{where}: argument {names[j]}: {describe(a)} != {describe(b)}")
    return problems


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def random_matrix(bits, shape, group_size, scale_group, seed=0, device="cpu"):
    """Stored tensors of a random quantized matrix (codes, scales, zeros), made on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    n, k = shape
    Q = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=g, device=device)
    mat = packing.pack_codes(Q, bits)
    for v, t in (("s", torch.rand(n * k // group_size, generator=g, device=device) * 0.02 + 1e-3),
                 ("z", torch.rand(n * k // group_size, generator=g, device=device) * (2 ** bits - 1))):
        mat[f"{v}_q"], mat[f"{v}_scale"], mat[f"{v}_zero"] = packing.meta_quantize(t, scale_group)
    return mat


def packed(mat, fill=0xFF):
    """The same tensors as views of one PackedLayout buffer (an expert cache slot's alignment)
    padded with ``fill`` (0xFF: fp16 NaN, code 255; None: uninitialised)."""
    layout = PackedLayout([(name, tuple(t.shape), t.dtype) for name, t in mat.items()])
    device = next(iter(mat.values())).device
    buf = (torch.empty(layout.nbytes + 64, dtype=torch.uint8, device=device) if fill is None
           else torch.full((layout.nbytes + 64,), fill, dtype=torch.uint8, device=device))
    views = layout.views(buf[:layout.nbytes])
    for name, t in mat.items():
        if t.numel():
            views[name].copy_(t)
    return views


def shape_only_matrix(bits, shape, device="cpu"):
    """Uninitialised tensors with the real shapes, dtypes and layout offsets (to specialise)."""
    g, sg = SCHEMES[bits]
    spec = packing.tensor_shapes(bits, shape, g, sg)
    layout = PackedLayout([(name, s, dt) for name, (s, dt) in spec.items()])
    return layout.views(torch.empty(layout.nbytes, dtype=torch.uint8, device=device))


def rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


TOL_EXACT = {True: 2e-3, False: 5e-3}     # vs the fp32 oracle: fused (fp32 sums) / dequant (W rounded)
TOL_REF = 5e-3                            # vs packing.quant_linear_torch in fp16
_MATS: dict = {}


def _matrix(bits, shape, device, seed):
    key = (bits, tuple(shape), str(device), seed)
    if key not in _MATS:
        g, sg = SCHEMES[bits]
        mat = packed(random_matrix(bits, shape, g, sg, seed=seed, device=device))
        if len(_MATS) >= 2:                  # Mixtral-sized: ~0.3 GB each with the fp32 copy
            _MATS.pop(next(iter(_MATS)))
        _MATS[key] = (mat, packing.dequantize(mat, bits, g, sg, tuple(shape), torch.float32))
    return _MATS[key]


def run_case(c, *, device="cuda", mode="sm75", seed=0) -> dict:
    """One case through kernels.quant_linear_triton with the T4's config and every launch run
    from sm_75 PTX (mode "native": the real kernels, a harness control); checked as the module
    docstring says. Returns a JSON-able row with "ok" and "problems"."""
    bits, T, shape, dtype = c["bits"], c["T"], c["shape"], c["dtype"]
    g, sg = SCHEMES[bits]
    on_cpu = str(device) == "cpu"
    cc, sms = ((8, 0), 4) if on_cpu else (P.T4_CC, P.T4_SMS)
    mat, w32 = _matrix(bits, shape, device, seed + bits)
    gen = torch.Generator(device=device).manual_seed(1000 * T + shape[0] + shape[1])
    x = torch.randn(T, shape[1], device=device, generator=gen).to(dtype)
    out = torch.full((T, shape[0]), float("nan"), device=device, dtype=dtype)
    runner = Runner(mode=mode, sync=not on_cpu)
    row = {"case": case_name(c), "bits": bits, "T": T, "shape": list(shape), "dtype": str(dtype)[6:],
           "split_k_forced": c["split_k"], "cfg": c["cfg"], "mode": mode}
    try:
        with t4_dispatch(runner, cc=cc, sms=sms, allow_cpu=on_cpu):
            y = kernels.quant_linear_triton(x, mat, bits, g, sg, shape, out=out, split_k=c["split_k"])
        if not on_cpu:
            torch.cuda.synchronize()
    except Exception as e:
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:1500]}", problems=["exception"],
                   launches=[{"kernel": r.name, "grid": list(r.grid), **r.info} for r in runner.launches])
        return row
    expected, cfg = expected_launches(x, mat, bits, g, sg, shape, out=out, split_k=c["split_k"], cc=cc, sms=sms)
    known = {"x": x, "out": out, **{f"mat.{name}": t for name, t in mat.items()}}
    fused = cfg["path"] != "dequant"
    row.update(rel_ref=rel_err(y, packing.quant_linear_torch(x, mat, bits, g, sg, shape)),
               rel_exact=rel_err(y, x.float() @ w32.T), nan=int(torch.isnan(y).sum()),
               arg_diffs=diff_launches(runner.launches, expected, known),
               launches=[{"kernel": r.name, "grid": list(r.grid), **r.info} for r in runner.launches])
    problems = []
    if not runner.launches:
        problems.append("no Triton launch captured")
    want = "sm_75" if mode == "sm75" else "native"
    if any(r.info.get("ptx_target") != want for r in runner.launches):
        problems.append(f"a launch did not run {want}")
    problems += [r.info["t4_problem"] for r in runner.launches if r.info.get("t4_problem")]
    if row["nan"]:
        problems.append(f"{row['nan']} NaN in the output")
    if not row["rel_ref"] < TOL_REF:
        problems.append(f"relative error vs quant_linear_torch {row['rel_ref']:.2e} >= {TOL_REF}")
    if not row["rel_exact"] < TOL_EXACT[fused]:
        problems.append(f"relative error vs the fp32 oracle {row['rel_exact']:.2e} >= {TOL_EXACT[fused]}")
    if row["arg_diffs"]:
        problems.append(f"{len(row['arg_diffs'])} argument differences")
    if y.dtype != dtype or y.data_ptr() != out.data_ptr():
        problems.append(f"result {y.dtype} not written into out")
    row.update(ok=not problems, problems=problems)
    return row


def case_launches_cpu(c):
    """The expected launches of a case on CPU tensors (to specialise and compile without a GPU)."""
    g, sg = SCHEMES[c["bits"]]
    mat = shape_only_matrix(c["bits"], c["shape"])
    x = torch.empty(c["T"], c["shape"][1], dtype=c["dtype"])
    out = torch.empty(c["T"], c["shape"][0], dtype=c["dtype"])
    return expected_launches(x, mat, c["bits"], g, sg, c["shape"], out=out, split_k=c["split_k"])[0]


def distinct_specs(cases):
    specs = {}
    for c in cases:
        for kernel, grid, args, meta in case_launches_cpu(c):
            s = P.specialize(kernel, args, meta)
            specs.setdefault(s.key, s)
    return list(specs.values())


def run_cases(cases, *, jobs=0, load_threads=8, max_seconds=0.0, mode="sm75", device="cuda", log=print) -> dict:
    """Every case (compiling in ``jobs`` processes and loading in ``load_threads`` threads first);
    stops at a sticky CUDA fault or after max_seconds. Returns the summary with every row."""
    t0 = time.time()
    setup = {}
    if mode == "sm75":
        specs = distinct_specs(cases)
        errors = P.precompile(specs, jobs)     # fills Triton's disk cache in parallel
        compiled = []
        t1 = time.time()
        for c in cases:              # compile (Triton's disk cache is warm) and load, all up front
            for kernel, grid, args, meta in case_launches_cpu(c):
                try:
                    compiled.append(P.compile_launch(kernel, args, meta)[0])
                except Exception as e:
                    errors.append(str(e)[:300])
        compiled = list({id(k): k for k in compiled}.values())
        t2 = time.time()
        load_errors = P.preload(compiled, load_threads) if device != "cpu" else []
        setup = {"specialisations": len(specs), "compile_errors": errors[:20], "load_errors": load_errors[:20],
                 "precompile_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1), "load_s": round(time.time() - t2, 1)}
        log(f"{len(specs)} distinct sm_75 specialisations: compiled in {t1 - t0:.0f}+{t2 - t1:.0f}s "
            f"({len(errors)} errors), loaded in {time.time() - t2:.0f}s ({len(load_errors)} errors)")
    rows, done = [], 0
    for c in cases:
        if max_seconds and time.time() - t0 > max_seconds:
            log(f"time budget reached after {done} of {len(cases)} cases")
            break
        r = run_case(c, device=device, mode=mode)
        rows.append(r)
        done += 1
        status = (f"ref {r['rel_ref']:.1e} exact {r['rel_exact']:.1e}" if "rel_ref" in r else r.get("error", ""))
        log(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']}  {status}  {'; '.join(r['problems'])}")
        if "error" in r and STICKY.search(r["error"]):
            log("stopping: a CUDA fault poisons the context; rerun from this case in a new process")
            break
    ok_rows = [r for r in rows if "rel_ref" in r]
    return {"cases": len(rows), "planned": len(cases), "failures": sum(not r["ok"] for r in rows),
            "max_rel_err": max((max(r["rel_ref"], r["rel_exact"]) for r in ok_rows), default=None),
            "max_rel_err_vs_reference": max((r["rel_ref"] for r in ok_rows), default=None),
            "max_rel_err_vs_fp32": max((r["rel_exact"] for r in ok_rows), default=None),
            "sm75_max_regs": max((l.get("sm75", {}).get("regs", 0) for r in rows for l in r.get("launches", [])), default=None),
            "sm75_max_local": max((l.get("sm75", {}).get("local", 0) for r in rows for l in r.get("launches", [])), default=None),
            "setup": setup, "seconds": round(time.time() - t0, 1), "rows": rows}


# ------------------------------------------------------------------------------------------------
# one expert: fused vs fallback vs the old torch path vs the copy
# ------------------------------------------------------------------------------------------------
def gpu_time(fn, graph=True) -> dict:
    """{"ms": median eager GPU time, "graph_ms": median of a CUDA-graph replay (no launch gaps)}."""
    import triton.testing

    def bench(f):
        try:
            return float(triton.testing.do_bench(f, warmup=10, rep=60, return_mode="median"))
        except TypeError:
            return float(triton.testing.do_bench(f, warmup=10, rep=60, quantiles=[0.5])[0])
    out = {"ms": bench(fn)}
    if graph:
        try:
            fn()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            out["graph_ms"] = bench(g.replay)
        except Exception as e:
            out["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def device_bandwidth_GBps(device, mib=1024) -> float:
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / gpu_time(lambda: dst.copy_(src), graph=False)["ms"] / 1e6     # read + write


def bench_expert(bits, device="cuda", hidden=4096, intermediate=14336, T=1, log=print) -> dict:
    """One Mixtral expert at T tokens through every variant (see the module docstring)."""
    g, sg = SCHEMES[bits]
    shapes = {"w1": (intermediate, hidden), "w3": (intermediate, hidden), "w2": (hidden, intermediate)}
    mats = {n: packed(random_matrix(bits, s, g, sg, seed=i, device=device)) for i, (n, s) in enumerate(shapes.items())}
    weights = sum(n * k for n, k in shapes.values())
    expert_bytes = sum(PackedLayout([(nm, tuple(t.shape), t.dtype) for nm, t in m.items()]).nbytes for m in mats.values())
    x = torch.randn(T, hidden, device=device, dtype=torch.float16)
    ws = fallback.Workspace()
    runner = Runner(mode="sm75", sync=False, keep=False)

    def linear(variant):
        if variant == "fused":
            return lambda v, n: kernels.quant_linear_triton(v, mats[n], bits, g, sg, shapes[n], trusted=True)
        if variant == "fused_sm75":
            def lin(v, n):
                with t4_dispatch(runner):
                    return kernels.quant_linear_triton(v, mats[n], bits, g, sg, shapes[n], trusted=True)
            return lin
        if variant.startswith("fallback_"):
            impl = variant.split("_")[1]
            return lambda v, n: fallback.quant_linear_fallback(v, mats[n], bits, g, sg, shapes[n], impl=impl, workspace=ws)
        return lambda v, n: packing.quant_linear_torch(v, mats[n], bits, g, sg, shapes[n])

    def expert(lin):
        return lambda: lin(F.silu(lin(x, "w1")) * lin(x, "w3"), "w2")
    ref = expert(linear("reference"))().float()
    row = {"bits": bits, "group_size": g, "scale_group": sg, "T": T, "weights": weights, "expert_bytes": expert_bytes,
           "copy_ms_12GBps": expert_bytes / (t4_estimate.LINK_GBPS * 1e9) * 1e3, "variants": {}}
    impl_bytes = {"fused": "fused", "fused_sm75": "fused", "fallback_cuda": "cuda", "fallback_torch": "torch",
                  "reference": "reference"}
    for variant in ("fused", "fused_sm75", "fallback_cuda", "fallback_torch", "reference"):
        r = {"bytes_moved": fallback.bytes_per_weight(impl_bytes[variant], bits, g) * weights}
        try:
            fn = expert(linear(variant))
            y = fn().float()
            torch.cuda.synchronize()
            r["rel_err_vs_reference"] = rel_err(y, ref)
            r.update(gpu_time(fn))
        except Exception as e:                 # one broken variant must not hide the others
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["variants"][variant] = r
        log(f"  {bits}-bit expert T={T} {variant}: " + (f"{r.get('graph_ms', r.get('ms')):.3f} ms (graph), "
            f"{r['ms']:.3f} ms eager, rel err {r['rel_err_vs_reference']:.1e}" if "ms" in r else r["error"]))
    del mats
    torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------
# CPU self-check: the capture equals the re-derivation, and launches compile to sm_75 PTX
# ------------------------------------------------------------------------------------------------
def check_cpu(cases, compile_n=4, log=print) -> list[str]:
    """Without a GPU: (1) record quant_linear_triton's launches for each case on CPU tensors
    (path and split_k passed explicitly: kernels.py's CPU branch uses cc (8, 0), 4 SMs) and
    compare with expected_launches for the T4; (2) compile ``compile_n`` distinct launches for
    sm_75 and check the installed PTX; (3) launch() refuses a short argument list."""
    failures = []
    for c in cases:
        g, sg = SCHEMES[c["bits"]]
        mat = shape_only_matrix(c["bits"], c["shape"])
        x = torch.zeros(c["T"], c["shape"][1], dtype=c["dtype"])
        out = torch.empty(c["T"], c["shape"][0], dtype=c["dtype"])
        runner = Runner(mode="record")
        saved = F.linear
        try:
            with t4_dispatch(runner, allow_cpu=True):
                kernels.F.linear = lambda a, w, b=None: torch.zeros(a.shape[0], w.shape[0], dtype=a.dtype)
                kernels.quant_linear_triton(x, mat, c["bits"], g, sg, c["shape"], out=out, path=c["cfg"]["path"],
                                            split_k=c["cfg"].get("split_k"))
        except Exception as e:
            failures.append(f"{case_name(c)}: capture failed: {type(e).__name__}: {e}")
            continue
        finally:
            kernels.F.linear = saved
        expected, _ = expected_launches(x, mat, c["bits"], g, sg, c["shape"], out=out, split_k=c["split_k"])
        known = {"x": x, "out": out, **{f"mat.{n}": t for n, t in mat.items()}}
        failures += [f"{case_name(c)}: {d}" for d in diff_launches(runner.launches, expected, known)]
    log(f"{len(cases)} cases: captured launches compared with expected_launches, {len(failures)} problems")
    picked = {}
    for c in cases:
        picked.setdefault((c["cfg"]["path"], c["cfg"].get("block_t"), c["bits"]), c)
    compiled = spec = None
    for c in list(picked.values())[:compile_n]:
        kernel, grid, args, meta = case_launches_cpu(c)[0]
        t0 = time.time()
        try:
            compiled, spec = P.compile_launch(kernel, args, meta)
        except Exception as e:
            failures.append(f"{case_name(c)}: compile: {e}")
            continue
        ptx = compiled.asm["ptx"]
        if not (P.ptx_target(ptx) == "sm_75" and compiled.kernel == ptx.encode() + b"\0"
                and compiled.sm75_cubin[:4] == b"\x7fELF" and len(spec.bound) == len(compiled.src.signature)):
            failures.append(f"{case_name(c)}: PTX not installed as expected")
        log(f"  compiled {case_name(c)}: .target {P.ptx_target(ptx)} .version {P.ptx_version(ptx)}, "
            f"{len(spec.bound)} launcher arguments, sm_75 cubin {P.sm75_usage(compiled)} ({time.time() - t0:.1f}s)")
    if compiled is not None:
        try:
            P.launch(compiled, (1,), *list(spec.bound.values())[:-1])
            failures.append("launch accepted a short argument list")
        except TypeError:
            pass
    return failures


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def markdown(res: dict, benchmark: dict | None) -> str:
    L = ["# The T4's kernels, run from their sm_75 code on another GPU", "",
         f"Generated by `{res.get('command', '')}` on {res.get('started', '?')} ({res.get('ran_on')}, "
         f"torch {res.get('torch')}, triton {res.get('triton')}); do not edit by hand. Raw numbers: "
         "[t4_kernels.json](t4_kernels.json). Method: `benchmarks/t4_kernels.py`, `benchmarks/sm75_ptx.py`.", "",
         "## sm_75 PTX against the torch reference", ""]
    if res.get("cases") is not None:
        s = res.get("setup", {})
        how = ("ran from PTX with `.target sm_75`" if all(r["mode"] == "sm75" for r in res.get("rows", []))
               else "ran with the real kernels (`--mode native`, a control of the harness, NOT the sm_75 code)")
        L += [f"**{res['cases']} cases** (of {res.get('planned')} planned) {how} through "
              f"moe_colab's own `quant_linear_triton` with the T4's launch configuration (cc 7.5, 40 SMs): "
              f"**{res['failures']} failures**, largest relative error {_f(res.get('max_rel_err'), '{:.2e}')} "
              f"(vs `packing.quant_linear_torch`: {_f(res.get('max_rel_err_vs_reference'), '{:.2e}')}; vs an fp32 "
              f"oracle: {_f(res.get('max_rel_err_vs_fp32'), '{:.2e}')}). {s.get('specialisations', '?')} distinct "
              f"sm_75 specialisations; the sm_75 cubins use at most {res.get('sm75_max_regs')} registers per thread "
              f"and {res.get('sm75_max_local')} bytes of local memory (spills).", "",
              "Each case: bit width 2/3/4 x shape (Mixtral experts and attention, the tiny model, 36 rows) x T = 1..16 "
              "(fused kernel) and 17/64/512 (dequant kernel in row chunks + cuBLAS), fp16, the auto split-K choice "
              "and the other one forced; arguments checked against an independent re-derivation; the output starts "
              "as NaN and the matrix sits in a 0xFF-padded buffer.", ""]
        bad = [r for r in res.get("rows", []) if not r["ok"]]
        if bad:
            L += ["| failed case | problems |", "|---|---|"]
            L += [f"| {r['case']} | {'; '.join(r['problems'])} {r.get('error', '')[:200]} |" for r in bad[:40]]
            L.append("")
        per = {}
        for r in res.get("rows", []):
            d = per.setdefault((r["bits"], r["cfg"]["path"]), [0, 0, 0.0])
            d[0] += 1
            d[1] += not r["ok"]
            d[2] = max(d[2], r.get("rel_ref", 0.0), r.get("rel_exact", 0.0))
        L += ["| bits | path | cases | failures | max rel. err |", "|---|---|---|---|---|"]
        L += [f"| {b} | {p} | {n} | {f} | {e:.2e} |" for (b, p), (n, f, e) in sorted(per.items())]
        L.append("")
    else:
        L += ["Not run.", ""]
    L += ["What this shows and what not: the sm_75 PTX Triton emits (FMA path, no tensor cores, no bf16 "
          "math) computes the right numbers on every configuration a T4 uses. The H200's driver compiles that PTX "
          "for sm_90, so a fault in the SASS Triton's ptxas makes for sm_75, and T4 timing, are not covered; the "
          "sm_75 cubins' registers and spills are checked against the T4's limits.", ""]
    ex = res.get("experts") or {}
    if ex:
        L += ["## One expert at T = 1: fused kernel, fallback, old torch path, copy", "",
              f"Mixtral expert (w1, w3 [14336, 4096], w2 [4096, 14336]), x fp16, median GPU time of a CUDA-graph replay "
              f"on {res.get('ran_on')} (device copy bandwidth {_f(res.get('device_bandwidth_GBps'), '{:.0f}')} GB/s); "
              "T4 column: moe_colab/bench/t4_estimate.py (bytes at the T4's bandwidth or the H200 time scaled by FP32 "
              "throughput, whichever is longer).", "",
              "| bits | variant | H200 ms | eager ms | bytes moved (MB) | T4 est. ms | T4 bound | copy at 12 GB/s ms | "
              "T4 est. / copy |", "|---|---|---|---|---|---|---|---|---|"]
        est = t4_estimate.expert_estimates(res)
        for bits, row in sorted(ex.items(), key=lambda kv: int(kv[0])):
            for v, r in row["variants"].items():
                e = est.get(int(bits), {}).get(v)
                if "error" in r:
                    L.append(f"| {bits} | {t4_estimate.LABELS[v]} | failed: `{r['error'][:100]}` | | | | | | |")
                    continue
                L.append(f"| {bits} | {t4_estimate.LABELS[v]} | {_f(r.get('graph_ms', r.get('ms')), '{:.3f}')} | "
                         f"{_f(r.get('ms'), '{:.3f}')} | {r['bytes_moved'] / 1e6:.0f} | {_f(e and e['ms'], '{:.2f}')} | "
                         f"{e['bound'] if e else '-'} | {row['copy_ms_12GBps']:.2f} | "
                         f"{_f(e and e['ms'] / row['copy_ms_12GBps'], '{:.2f}')} |")
        L.append("")
    if benchmark:
        L += [line.replace("## T4 estimate with compute", "## T4 estimate per token, with compute")
              for line in t4_estimate.markdown(res, benchmark)]
    return "\n".join(L)


def _f(v, fmt="{:.3g}"):
    return "-" if v is None else fmt.format(v)


def _load_benchmark(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write(res: dict, out_dir: Path, benchmark_json) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "t4_kernels.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "t4_kernels.md").write_text(markdown(res, _load_benchmark(benchmark_json)))


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["list", "check", "run", "bench", "all", "report"])
    ap.add_argument("result", nargs="?", help="report: the t4_kernels.json to render")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and T")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--T", type=int, nargs="+")
    ap.add_argument("--shapes", nargs="+", help="NxK ...")
    ap.add_argument("--jobs", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)),
                    help="processes compiling for sm_75 first")
    ap.add_argument("--load-threads", type=int, default=8, help="threads loading the PTX (driver JIT)")
    ap.add_argument("--max-seconds", type=float, default=0, help="run: start no case after this")
    ap.add_argument("--mode", choices=["sm75", "native"], default="sm75", help="native: the real kernels (control)")
    ap.add_argument("--out", help="all/report: write t4_kernels.json and t4_kernels.md here")
    ap.add_argument("--json", help="run/bench: write the result here")
    ap.add_argument("--benchmark-json", default=str(ROOT / "docs" / "benchmarks.json"),
                    help="the offloading benchmark's result (hit ratio, bytes per token) for the per-token estimate")
    a = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes] if a.shapes else None
    cases = t4_cases(a.bits, shapes, a.T, quick=a.quick)
    if a.cmd == "list":
        for c in cases:
            print(case_name(c))
        print(f"{len(cases)} cases")
        return 0
    if a.cmd == "check":
        fails = check_cpu(cases if a.T or a.shapes else t4_cases(a.bits, MIXTRAL + SMALL[2:], [1, 2, 3, 8, 16, 17, 64]))
        for f in fails:
            print("FAIL", f)
        return 1 if fails else 0
    if a.cmd == "report":
        res = json.loads(Path(a.result).read_text())
        write(res, Path(a.out or Path(a.result).parent), a.benchmark_json)
        return 0
    if not torch.cuda.is_available():
        print(f"{a.cmd} needs a CUDA GPU")
        return 2
    import triton
    res = {"target": "sm_75", "ran_on": torch.cuda.get_device_name(), "triton": triton.__version__,
           "torch": torch.__version__, "command": "python benchmarks/t4_kernels.py " + " ".join(argv or sys.argv[1:]),
           "started": datetime.datetime.now().isoformat(timespec="seconds")}
    print(f"{res['ran_on']}, triton {res['triton']}, torch {res['torch']}", flush=True)
    t0 = time.time()
    if a.cmd in ("run", "all"):
        res.update(run_cases(cases, jobs=a.jobs, load_threads=a.load_threads, max_seconds=a.max_seconds,
                             mode=a.mode, log=lambda s: print(s, flush=True)))
        print(f"{res['cases']} cases run, {res['failures']} failed, max rel err {res['max_rel_err']}", flush=True)
    if a.cmd in ("bench", "all"):
        res["device_bandwidth_GBps"] = device_bandwidth_GBps("cuda")
        res["experts"] = {str(b): bench_expert(b, log=lambda s: print(s, flush=True)) for b in a.bits}
    res["elapsed_s"] = round(time.time() - t0, 1)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    if a.out:
        write(res, Path(a.out), a.benchmark_json)
    if "experts" in res:
        print("\n".join(line for line in markdown(res, _load_benchmark(a.benchmark_json)).splitlines()
                        if line.startswith("|") or line.startswith("Assumptions")))
    failed = res.get("failures", 0) or (res.get("cases", 0) < res.get("planned", 0))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
