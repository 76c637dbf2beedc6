"""Tests for the fused low-bit Triton kernels (moe_colab/quant/kernels.py).

The oracle is the torch reference moe_colab.quant.packing (itself checked here against a literal
reading of notes/quant_format.md). Three kinds of test:

- CPU, Triton's interpreter: Triton reads TRITON_INTERPRET when a kernel is DECORATED (at import of
  kernels.py), so the interpreted cases run in ONE subprocess that sets it first; the rest of the
  suite keeps compiled (or no) kernels. Inputs and outputs are poisoned: the matrix lives in a
  0xFF-filled buffer (fp16 NaN past every tensor), x is a strided view of a NaN-padded tensor and
  the output starts as NaN, so a read out of bounds or an unwritten output shows up as NaN.
- CPU, compile only: every launch compiles for sm_75 (T4) and sm_90 (H200) with the ptxas
  Triton ships (benchmarks/kernels_compile.py), without spilling registers.
- GPU (@pytest.mark.gpu): Mixtral shapes, T = 1..16 and 64, fp16 and bf16, every path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from moe_colab.engine.compute import ModelCompute
from moe_colab.quant import kernels, packing
from moe_colab.engine.storage import PackedLayout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCHEMES = {4: (64, 256), 3: (64, 128), 2: (16, 128)}      # the paper's (group_size, scale_group)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_matrix(bits, shape, group_size, scale_group, seed=0, device="cpu"):
    """Stored tensors of a random quantized matrix: random codes, scales and zeros."""
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    Q = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=g)
    mat = packing.pack_codes(Q, bits)
    S = torch.rand(n * k // group_size, generator=g) * 0.02 + 1e-3
    Z = torch.rand(n * k // group_size, generator=g) * (2 ** bits - 1)
    for v, t in (("s", S), ("z", Z)):
        mat[f"{v}_q"], mat[f"{v}_scale"], mat[f"{v}_zero"] = packing.meta_quantize(t, scale_group)
    return {name: t.to(device) for name, t in mat.items()}


def poisoned(mat):
    """The same tensors, as views of one buffer whose padding is 0xFF (fp16 NaN, code 255)."""
    layout = PackedLayout([(name, tuple(t.shape), t.dtype) for name, t in mat.items()])
    buf = torch.full((layout.nbytes + 64,), 0xFF, dtype=torch.uint8, device=next(iter(mat.values())).device)
    views = layout.views(buf[:layout.nbytes])
    for name, t in mat.items():
        views[name].copy_(t)
    return views


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


# -- the oracle against the written contract -----------------------------------------------------
def spec_dequantize(Q, S, Z, group_size):
    """W[o, i] = (Q[o, i] - Z[o, i // g]) * S[o, i // g], read literally (S, Z [out, in/g])."""
    i = torch.arange(Q.shape[1])
    return (Q.double() - Z.double()[:, i // group_size]) * S.double()[:, i // group_size]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_reference_packing_follows_the_spec(bits):
    n, k = 6, 64
    Q = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    codes = packing.pack_codes(Q, bits)
    Qi = Q.long()
    if bits == 4:
        want = {"q4": Qi[:, :k // 2] | (Qi[:, k // 2:] << 4)}
    else:
        want = {"q2": sum(((Qi & 3)[:, s * k // 4:(s + 1) * k // 4]) << (2 * s) for s in range(4))}
        if bits == 3:
            want["q1"] = sum((((Qi >> 2) & 1)[:, s * k // 8:(s + 1) * k // 8]) << s for s in range(8))
    assert sorted(codes) == sorted(want)
    for name in want:
        assert torch.equal(codes[name].long(), want[name]), name
    group_size, scale_group = 16, 5   # 5 does not divide n*k/g = 24: a padded last meta-group
    S = torch.rand(n, k // group_size) * 0.1 + 0.01
    Z = torch.rand(n, k // group_size) * (2 ** bits - 1)
    mat = dict(codes)
    for v, t in (("s", S), ("z", Z)):
        mat[f"{v}_q"], mat[f"{v}_scale"], mat[f"{v}_zero"] = packing.meta_quantize(t, scale_group)
    m = torch.arange(S.numel()) // scale_group     # literal meta-dequantization
    S_hat = ((mat["s_q"].double() - mat["s_zero"].double()[m]) * mat["s_scale"].double()[m]).view(n, -1)
    Z_hat = ((mat["z_q"].double() - mat["z_zero"].double()[m]) * mat["z_scale"].double()[m]).view(n, -1)
    assert (S_hat - S).abs().max() <= mat["s_scale"].double().max() / 2 + 1e-7
    W = packing.dequantize(mat, bits, group_size, scale_group, (n, k), torch.float32)
    torch.testing.assert_close(W.double(), spec_dequantize(Q, S_hat, Z_hat, group_size), rtol=1e-6, atol=1e-7)


# -- CPU: dispatch and validation (no Triton launch) -----------------------------------------------
def test_quant_linear_on_cpu_is_the_torch_path():
    bits, (g, sg) = 4, SCHEMES[4]
    mat = random_matrix(bits, (24, 256), g, sg, seed=1)
    x = torch.randn(2, 3, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no fallback warning on the normal CPU route
        y = kernels.quant_linear(x, mat, bits, g, sg, (24, 256))
    assert y.shape == (2, 3, 24) and y.dtype == x.dtype
    ref = packing.quant_linear_torch(x.reshape(6, 256), mat, bits, g, sg, (24, 256)).view(2, 3, 24)
    torch.testing.assert_close(y, ref)


def test_bad_inputs_are_named():
    bits, (g, sg) = 2, SCHEMES[2]
    mat = random_matrix(bits, (8, 64), g, sg)
    x = torch.randn(1, 64)
    qlt = kernels.quant_linear_triton        # validates before it looks at the device
    with pytest.raises(ValueError, match="bit width"):
        qlt(x, mat, 5, g, sg, (8, 64))
    with pytest.raises(ValueError, match="features"):
        qlt(torch.randn(1, 32), mat, bits, g, sg, (8, 64))
    with pytest.raises(KeyError, match="z_q"):
        qlt(x, {k: v for k, v in mat.items() if k != "z_q"}, bits, g, sg, (8, 64))
    with pytest.raises(ValueError, match="q2"):
        qlt(x, {**mat, "q2": mat["q2"][:4]}, bits, g, sg, (8, 64))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        qlt(x.double(), mat, bits, g, sg, (8, 64))
    with pytest.raises(ValueError, match="backend"):
        kernels.quant_linear(x, mat, bits, g, sg, (8, 64), backend="cuda")
    if not kernels.interpreting() and kernels.triton is not None:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            qlt(x, mat, bits, g, sg, (8, 64))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_launch_config_choices(bits):
    g, _ = SCHEMES[bits]
    for shape in [(14336, 4096), (4096, 14336)]:
        ngp = shape[1] // kernels.PLANES[bits] // g
        for cc, sms in [((7, 5), 40), ((9, 0), 132)]:
            for T in range(1, 17):
                for dtype in (torch.float16, torch.float32):
                    cfg = kernels.launch_config(T, shape, bits, g, dtype, cc, sms)
                    assert cfg["path"] in ("fma", "dot")
                    assert cfg["path"] == "fma" or (cc >= (8, 0) and dtype == torch.float16 and T >= 4)
                    assert cfg["block_t"] >= T and ngp % cfg["split_k"] == 0
                    assert cfg["block_n"] & (cfg["block_n"] - 1) == 0
            assert kernels.launch_config(17, shape, bits, g, torch.float16, cc, sms)["path"] == "dequant"
    # groups that straddle the planes (in/8 = 32 < 64 for 3-bit) can only be dequantized
    assert kernels.launch_config(1, (64, 256), 3, 64, torch.float32, (9, 0), 132)["path"] == "dequant"
    with pytest.raises(ValueError, match="dot"):
        kernels.launch_config(4, (64, 4096), bits, g, torch.float16, (7, 5), 40, path="dot")


# -- CPU: compile for the T4 and the H200 without a GPU ---------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("cc", [75, 90])
def test_kernels_compile_for_t4_and_h200(cc):
    if kernels.triton is None or kernels.interpreting():
        pytest.skip("needs Triton compiling for real GPUs (TRITON_INTERPRET unset)")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from kernels_compile import check
        import triton.compiler.compiler  # noqa: F401  (internals the tool relies on)
    except ImportError as e:
        pytest.skip(f"Triton internals moved: {e}")
    cases = [(3, 1, torch.float16), (2, 16, torch.float32), (4, 64, torch.float16)]
    if cc >= 80:
        cases.append((3, 8, torch.bfloat16))        # the tensor-core path
    for bits, T, dtype in cases:
        r = check(cc, bits, T, dtype, (14336, 4096))
        if r.get("internals_moved"):
            pytest.skip(r["error"])
        assert r["ok"], r
        assert r["spill_bytes"] in (0, None), r


# -- CPU: the kernels under Triton's interpreter (one subprocess) ------------------------------------
def _case(bits, T, dtype="float32", path="auto", shape=None, **kw):
    shape = shape or ((36, 512) if bits == 3 else (36, 256))    # 36 rows: partial row blocks
    name = f"{bits}bit-T{T}-{dtype}-{path}" + "".join(f"-{k}{v}" for k, v in kw.items())
    if shape != ((36, 512) if bits == 3 else (36, 256)):
        name += f"-{shape[0]}x{shape[1]}"
    return dict(name=name, bits=bits, T=T, dtype=dtype, path=path, shape=shape, kw=kw)


INTERP_CASES = (
    [_case(b, T) for b in (2, 3, 4) for T in (1, 3, 16)]                 # fused fma path
    + [_case(3, 2), _case(2, 8)]                                         # the other token blocks
    + [_case(b, 20) for b in (2, 3, 4)]                                  # prefill: dequant + matmul
    + [_case(3, 20, chunk=16 * 512)]                                     # ... in 16-row chunks
    + [_case(b, 3, split_k=2, shape=(36, 1024 if b == 3 else 256)) for b in (2, 3, 4)]   # split-K
    + [_case(b, 5, "float16", "dot") for b in (2, 3, 4)]                 # tensor-core path (sm_80+)
    + [_case(b, 2, "float16") for b in (2, 4)]
    + [_case(4, 2, "bfloat16", "fma")]
    + [_case(3, 1, shape=(20, 256))]                  # 3-bit groups straddle planes: dequant path
)
TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.5e-2}


def _expected_path(c):
    if c["path"] != "auto":
        return c["path"]
    g, _ = SCHEMES[c["bits"]]
    fusable = (c["shape"][1] // kernels.PLANES[c["bits"]]) % g == 0
    return "fma" if c["T"] <= 16 and fusable else "dequant"


def _run_case(c):
    """One interpreted case -> its measurements (run inside the subprocess)."""
    bits, T, (n, k) = c["bits"], c["T"], c["shape"]
    g, sg = SCHEMES[bits]
    dtype = getattr(torch, c["dtype"])
    kw = dict(c["kw"])
    kernels.DEQUANT_CHUNK = kw.pop("chunk", 1 << 24)
    mat = poisoned(random_matrix(bits, (n, k), g, sg, seed=bits * 100 + T))
    big = torch.full((T, k + 24), float("nan"), dtype=dtype)
    big[:, :k] = torch.randn(T, k, generator=torch.Generator().manual_seed(T)).to(dtype)
    x = big[:, :k]                                               # strided rows, NaN beyond
    out = torch.full((T, n), float("nan"), dtype=dtype)
    t0 = time.time()
    y = kernels.quant_linear_triton(x, mat, bits, g, sg, (n, k), out=out, path=c["path"], **kw)
    seconds = time.time() - t0
    ref = packing.quant_linear_torch(x.float(), mat, bits, g, sg, (n, k))
    cfg = kernels.launch_config(T, (n, k), bits, g, dtype, (8, 0), 4, path=c["path"], **kw)
    w_ref = packing.dequantize(mat, bits, g, sg, (n, k), torch.float32)
    w_err = max((kernels.dequantize_triton(mat, bits, g, sg, (n, k), torch.float32) - w_ref).abs().max().item(),
                (kernels.dequantize_triton(mat, bits, g, sg, (n, k), torch.float32, rows=(5, n - 3))
                 - w_ref[5:n - 3]).abs().max().item())
    return {"rel_err": rel_err(y, ref), "nan": int(torch.isnan(y).sum()), "same_buffer": y.data_ptr() == out.data_ptr(),
            "dtype": str(y.dtype)[6:], "path": cfg["path"], "dequant_err": w_err, "seconds": round(seconds, 2)}


def _interp_worker():
    assert kernels.interpreting(), "TRITON_INTERPRET=1 must be set before kernels.py is imported"
    torch.set_num_threads(1)
    for c in INTERP_CASES:
        try:
            r = _run_case(c)
        except Exception as e:  # report and go on: one broken case must not hide the others
            r = {"error": f"{type(e).__name__}: {e}"}
        print("CASE " + json.dumps({"name": c["name"], **r}), flush=True)


@pytest.fixture(scope="module")
def interpreted():
    if kernels.triton is None:
        pytest.skip("Triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", "import test_kernels; test_kernels._interp_worker()"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            r = json.loads(line[5:])
            results[r.pop("name")] = r
    print(f"interpreter subprocess: {time.time() - t0:.1f}s, {len(results)} cases")
    if proc.returncode != 0 and not results:
        pytest.fail(f"interpreter subprocess failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return results


@pytest.mark.parametrize("case", INTERP_CASES, ids=[c["name"] for c in INTERP_CASES])
def test_interpreted_kernel_matches_reference(interpreted, case):
    r = interpreted.get(case["name"])
    assert r is not None, "case did not run (subprocess died?)"
    assert "error" not in r, r["error"]
    assert r["path"] == _expected_path(case)
    assert r["nan"] == 0 and r["same_buffer"] and r["dtype"] == case["dtype"]
    assert r["rel_err"] < TOL[case["dtype"]], r
    assert r["dequant_err"] == 0.0, r          # the dequant kernel is bit-exact in fp32


# -- GPU ----------------------------------------------------------------------------------------
GPU_SHAPES = [(14336, 4096), (4096, 14336)]     # Mixtral w1/w3 and w2
GPU_T = list(range(1, 17)) + [64]


@pytest.fixture(scope="module")
def gpu_mats():
    cache = {}

    def get(bits, shape):
        if (bits, shape) not in cache:
            g, sg = SCHEMES[bits]
            mat = poisoned(random_matrix(bits, shape, g, sg, seed=bits, device="cuda"))
            w32 = packing.dequantize(mat, bits, g, sg, shape, torch.float32)   # ~235 MB each
            cache[(bits, shape)] = (mat, w32)
        return cache[(bits, shape)]
    return get


def _gpu_check(gpu_mats, bits, shape, T, dtype, path="auto", **kw):
    g, sg = SCHEMES[bits]
    mat, w32 = gpu_mats(bits, shape)
    x = torch.randn(T, shape[1], device="cuda").to(dtype)
    out = torch.full((T, shape[0]), float("nan"), device="cuda", dtype=dtype)
    y = kernels.quant_linear_triton(x, mat, bits, g, sg, shape, out=out, path=path, **kw)
    torch.cuda.synchronize()
    assert y.dtype == dtype and not torch.isnan(y).any()
    exact = x.float() @ w32.T                                       # fp32 oracle
    # fused paths accumulate in fp32 (error: the output rounding); dequant rounds W, then cuBLAS
    fused = path != "dequant" and T <= kernels.MAX_FUSED_T
    tol = {torch.float16: 2e-3 if fused else 5e-3, torch.bfloat16: 1e-2 if fused else 2e-2}[dtype]
    assert rel_err(y, exact) < tol
    ref = packing.quant_linear_torch(x, mat, bits, g, sg, shape)    # the torch path, same dtype
    assert rel_err(y, ref) < {torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("T", GPU_T)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=["14336x4096", "4096x14336"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gpu_mixtral_shapes(gpu_mats, bits, shape, dtype, T):
    _gpu_check(gpu_mats, bits, shape, T, dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("T", [1, 2, 5, 16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gpu_fma_path_and_split_k(gpu_mats, bits, T):
    """The T4's path (fma) on this GPU too, with and without split-K."""
    _gpu_check(gpu_mats, bits, (4096, 14336), T, torch.float16, path="fma")
    _gpu_check(gpu_mats, bits, (4096, 14336), T, torch.float16, path="fma", split_k=4)
    _gpu_check(gpu_mats, bits, (4096, 14336), T, torch.float16, path="fma", split_k=1)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gpu_dequant_kernel_and_dispatch(bits):
    g, sg = SCHEMES[bits]
    shape = (512, 1024)
    mat = poisoned(random_matrix(bits, shape, g, sg, seed=7, device="cuda"))
    for dtype in (torch.float32, torch.float16):
        w = kernels.dequantize_triton(mat, bits, g, sg, shape, dtype)
        ref = packing.dequantize(mat, bits, g, sg, shape, dtype)
        # Both compute (q - z) * s, but the GPU may fuse it into one FMA: compare by relative
        # norm (seen on an H200: 1-2% of elements differ by ~1e-8), exact equality is checked
        # under the interpreter.
        assert not torch.isnan(w).any()
        rel = ((w.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < (1e-6 if dtype == torch.float32 else 1e-3), rel
    x = torch.randn(3, shape[1], device="cuda", dtype=torch.float16)
    compute = ModelCompute()
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # Triton works here: no fallback warning
        y = compute.quant_linear(x, mat, bits, g, sg, shape)
    assert compute.fallbacks == {}
    assert rel_err(y, packing.quant_linear_torch(x, mat, bits, g, sg, shape)) < 5e-3


@pytest.mark.gpu
@cuda
def test_gpu_fallback_warns_once(monkeypatch):
    """If the kernel cannot run on this GPU, the model's ModelCompute warns once, records why,
    and uses the fallback (dequantize + cuBLAS, quant/fallback.py); another model's ModelCompute
    is not switched."""
    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")
    bits, (g, sg) = 4, SCHEMES[4]
    mat = random_matrix(bits, (256, 512), g, sg, device="cuda")
    x = torch.randn(2, 512, device="cuda", dtype=torch.float16)
    other = ModelCompute()
    fine = other.quant_linear(x, mat, bits, g, sg, (256, 512))
    monkeypatch.setattr(kernels, "quant_linear_triton", broken)
    compute = ModelCompute()
    with pytest.warns(UserWarning, match="simulated compile failure"):
        y = compute.quant_linear(x, mat, bits, g, sg, (256, 512))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y2 = compute.quant_linear(x, mat, bits, g, sg, (256, 512))
    ref = packing.quant_linear_torch(x, mat, bits, g, sg, (256, 512))
    assert rel_err(y, ref) < 1e-3 and torch.equal(y2, y)      # the same W (bit-exact), then cuBLAS
    assert "simulated compile failure" in compute.fallbacks["kernels"]
    monkeypatch.undo()
    assert other.fallbacks == {} and torch.equal(other.quant_linear(x, mat, bits, g, sg, (256, 512)), fine)


@pytest.mark.gpu
@cuda
def test_gpu_trusted_calls_still_check_new_buffers():
    """QuantLinear and the expert format skip the per-call checks only for buffers they have
    already checked: a replaced buffer of the wrong shape, or a new views dict, is checked again."""
    from moe_colab.quant.config import QuantConfig
    from moe_colab.quant.format import QuantizedExpertFormat, QuantLinear

    g, sg = SCHEMES[2]
    lin = QuantLinear(256, 64, 2, g, sg, device="cuda")
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    first = lin(x)
    assert torch.equal(lin(x), first)                       # the trusted second call: same result
    lin.q2 = torch.zeros(64, 32, dtype=torch.uint8, device="cuda")          # expected (64, 64)
    with pytest.raises(ValueError, match="q2"):
        lin(x)
    fmt = QuantizedExpertFormat(256, 512, QuantConfig(4, 2), torch.float16)
    buf = torch.zeros(fmt.layout.nbytes, dtype=torch.uint8, device="cuda")
    views = fmt.layout.views(buf)
    fmt.forward(views, x)
    fmt.forward(views, x)
    bad = dict(views, **{"w1.q2": views["w1.q2"][:, :-1]})
    with pytest.raises(ValueError, match="q2"):
        fmt.forward(bad, x)
