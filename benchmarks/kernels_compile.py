"""Compile the fused low-bit kernels for a GPU architecture WITHOUT a GPU (CPU machine, CI).

Triton lowers a kernel to PTX and runs the ptxas it ships, so on any Linux machine we can check
that every launch quant_linear_triton would make compiles for the T4 (sm_75) and the H200
(sm_90), and read the registers and spills ptxas reports. It uses Triton internals (the JIT's
argument specialisation), so it may need touching when Triton changes; it is a developer tool.

    python benchmarks/kernels_compile.py                 # sm_75 and sm_90, Mixtral shapes
    python benchmarks/kernels_compile.py --cc 75 --bits 3 --T 1 4

References: moe_colab/quant/kernels.py; notes/quant_format.md.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moe_colab.quant import kernels, packing  # noqa: E402

SCHEMES = {4: (64, 256), 3: (64, 128), 2: (16, 128)}     # bits -> (group_size, scale_group)
SMS = {75: 40, 80: 108, 90: 132}                          # T4, A100, H100/H200


def random_matrix(bits, shape, group_size, scale_group, device="cpu", seed=0):
    """Stored tensors of a random quantized matrix (random codes, scales and zeros)."""
    torch.manual_seed(seed)
    n, k = shape
    mat = packing.pack_codes(torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, device=device), bits)
    n_groups = n * k // group_size
    scales = torch.rand(n_groups, device=device) * 0.02 + 1e-3
    zeros = torch.rand(n_groups, device=device) * (2 ** bits - 1)
    for v, t in (("s", scales), ("z", zeros)):
        mat[f"{v}_q"], mat[f"{v}_scale"], mat[f"{v}_zero"] = packing.meta_quantize(t, scale_group)
    return mat


def compile_launch(kernel, args, meta, cc):
    """triton.compile one launch for sm_<cc>, specialised as the JIT would specialise `args`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cc, 32)
    try:
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, options = binder(*args, **meta)
        options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, spec, options)
    except (AttributeError, TypeError, ValueError) as e:
        raise InternalsMoved(f"this Triton ({triton.__version__}) specialises arguments differently: {e}") from e
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


class InternalsMoved(RuntimeError):
    """The Triton internals this tool uses are not what it expects (not a kernel problem)."""


def ptxas_usage(compiled):
    """(registers, spill bytes) from the ptxas Triton ships, or (None, None)."""
    import triton
    ptx = compiled.asm["ptx"]
    arch = re.search(r"\.target (\S+)", ptx).group(1)
    try:   # the ptxas Triton itself used for this architecture
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path
    except Exception:
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spill = re.findall(r"(\d+) bytes spill stores", r.stderr)
    return (int(regs[0]) if regs else None), (int(spill[0]) if spill else None)


def check(cc, bits, T, dtype, shape, path="auto", **overrides):
    """Compile the launch quant_linear_triton would make; returns a result dict."""
    group_size, scale_group = SCHEMES[bits]
    mat = random_matrix(bits, shape, group_size, scale_group)
    x = torch.zeros(T, shape[1], dtype=dtype)
    xc = x.float() if (dtype == torch.bfloat16 and cc < 80) else x
    cfg = kernels.launch_config(T, shape, bits, group_size, xc.dtype, (cc // 10, cc % 10), SMS.get(cc, 80),
                                path=path, **overrides)
    row = {"cc": cc, "bits": bits, "T": T, "dtype": str(dtype)[6:], "shape": list(shape), **cfg}
    t0 = time.time()
    try:
        if cfg["path"] == "dequant":
            n, k = shape
            P = kernels.PLANES[bits]
            qa, qb = kernels._code_args(mat, bits)
            w = torch.empty(n, k, dtype=xc.dtype)
            args = (w, qa, qb, *kernels._meta_args(mat), 0, n, k, w.stride(0), qa.stride(0), qb.stride(0),
                    scale_group)
            meta = dict(BITS=bits, P=P, G=group_size, BLOCK_N=16, BLOCK_J=64)
            compiled = compile_launch(kernels._dequant_kernel, args, meta, cc)
        else:
            acc = kernels.fused_accumulator(T, shape[0], cfg, xc.dtype, "cpu")     # as kernels.py
            _, args, meta = kernels._fused_launch(xc, acc, mat, bits, group_size, scale_group, shape, cfg)
            compiled = compile_launch(kernels._fused_kernel, args, meta, cc)
        row["regs"], row["spill_bytes"] = ptxas_usage(compiled)
        row["shared_bytes"] = compiled.metadata.shared
        row["ok"] = True
    except Exception as e:  # report and go on with the next configuration
        row["ok"], row["error"] = False, f"{type(e).__name__}: {str(e)[:400]}"
        row["internals_moved"] = isinstance(e, InternalsMoved)
    row["compile_s"] = round(time.time() - t0, 1)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[75, 90])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--shape", type=int, nargs=2, default=[14336, 4096])
    args = ap.parse_args(argv)
    if kernels.interpreting():
        sys.exit("unset TRITON_INTERPRET: this tool compiles for real GPUs")
    failures = 0
    for cc in args.cc:
        dtypes = [torch.float16, torch.float32, torch.bfloat16]   # bf16 runs as fp32 below sm_80
        for bits in args.bits:
            for T in args.T:
                for dtype in dtypes:
                    paths = ["auto"] + (["fma"] if cc >= 80 and dtype != torch.float32 and 4 <= T <= 16 else [])
                    for path in paths:
                        r = check(cc, bits, T, dtype, tuple(args.shape), path=path)
                        failures += not r["ok"]
                        cfg = (f"path={r['path']} BT={r.get('block_t', '-')} BN={r.get('block_n', '-')} "
                               f"split={r.get('split_k', '-')}")
                        status = (f"regs={r['regs']} spill={r['spill_bytes']}B smem={r['shared_bytes']}B"
                                  if r["ok"] else "FAILED " + r["error"])
                        print(f"sm_{cc} {bits}-bit T={T:<3} {r['dtype']:<8} {cfg:<40} {status} "
                              f"({r['compile_s']}s)", flush=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
