"""The fast fallback for low-bit matmuls: dequantize into a reusable 16-bit workspace, then cuBLAS.

When the fused Triton kernels cannot run on a GPU (no Triton, a compile or launch error, a wrong
result in the self-test of engine/compute.py), a model must still decode at a useful speed. The
torch reference (packing.quant_linear_torch) is not that: it makes about ten passes over the
matrix in fp32 (~29 bytes moved per weight; 0.57 ms for one 4096 x 14336 matrix on an H200).
This module computes the same y = x @ W.T in row chunks:

    for rows [r0, r1) of W (at most kernels.DEQUANT_CHUNK weights, ~32 MB in fp16):
        workspace[:r1-r0, :in] = W[r0:r1]            ONE pass: packed codes + 8-bit meta -> 16 bit
        y[:, r0:r1]            = x @ workspace.T     cuBLAS

Two implementations of the dequantizing pass, the same arithmetic as packing.dequantize
(meta-dequantize S and Z in fp32, (Q - Z) * S in fp32, one rounding to the output dtype):

    "cuda"   one elementwise CUDA kernel (source below), compiled at first use by NVRTC, the
             runtime compiler that ships with every CUDA build of PyTorch (no nvcc, no Triton),
             into a cubin for this GPU, loaded and launched through the CUDA driver API with
             ctypes on torch's current stream (so CUDA graphs capture it). Reads the packed bytes once, writes each 16-bit weight once: with cuBLAS
             re-reading them, ~4.4 bytes per weight.
    "torch"  vectorised torch (runs anywhere, CPU included): unpack into a uint8 buffer, then
             two fp32 passes; ~16 bytes per weight. Used when NVRTC or the driver is missing.

Both are bit-for-bit equal to packing.dequantize (tests/test_fallback.py: "torch" on CPU,
"cuda" on a GPU); the matmul is then cuBLAS's, as in the prefill ("dequant") path of kernels.py.

References: moe_colab/quant/packing.py (the format), moe_colab/quant/kernels.py (the fused
kernels and DEQUANT_CHUNK); NVRTC and driver API: docs.nvidia.com/cuda/nvrtc,
docs.nvidia.com/cuda/cuda-driver-api (cuModuleLoadData, cuLaunchKernel).
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading

import torch
import torch.nn.functional as F

from .packing import CODE_NAMES, META_NAMES

PLANES = {4: 2, 2: 4, 3: 8}           # inputs interleaved per packed byte column (packing.py)
CHUNK = 1 << 24                       # weights dequantized at a time (kernels.DEQUANT_CHUNK)
IMPLS = ("cuda", "torch")

# Bytes moved per weight of one matmul at decode batch sizes (x and y are negligible):
#   fused  the packed codes (bits/8) + 8-bit scale/zero codes per group (2/g), read once
#   cuda   the packed bytes + meta, one 16-bit write, one 16-bit read by cuBLAS
#   torch  unpack (read packed, write + and-in-place uint8: ~3), (Q - Z) fp32 (read 1, write 4),
#          * S to 16 bit (read 4, write 2), cuBLAS read 2
#   reference  packing.quant_linear_torch: unpack with torch.cat (~5), Q.float() (5), - Z (8),
#          * S (8), .to(fp16) (6), cuBLAS read 2
# Used for the fallback warning's cost and by moe_colab/bench/t4_estimate.py.
def bytes_per_weight(impl: str, bits: int, group_size: int) -> float:
    packed = bits / 8 + 2 / group_size
    extra = {"fused": 0.0, "cuda": 4.0, "torch": 16.0, "reference": 34.0}
    if impl not in extra:
        raise ValueError(f"unknown implementation {impl!r}; choose one of {sorted(extra)}")
    return packed + extra[impl]


# ------------------------------------------------------------------------------------------------
# the vectorised torch implementation (and the shared chunking)
# ------------------------------------------------------------------------------------------------
def _meta_rows(mat, v: str, scale_group: int, a: int, b: int) -> torch.Tensor:
    """fp32 values [b - a] of S (v="s") or Z (v="z") for flat group indices a..b-1: exactly
    packing.meta_dequantize restricted to that range."""
    q, scale, zero = mat[f"{v}_q"].reshape(-1)[a:b], mat[f"{v}_scale"], mat[f"{v}_zero"]
    if a % scale_group == 0 and (b - a) % scale_group == 0:     # whole meta-groups: broadcast, no gather
        m = slice(a // scale_group, b // scale_group)
        return ((q.view(-1, scale_group).float() - zero[m, None].float()) * scale[m, None].float()).view(-1)
    m = torch.arange(a, b, device=q.device) // scale_group                  # [b - a] meta-group
    return (q.float() - zero.float()[m]) * scale.float()[m]


def _codes_rows(mat, bits: int, k: int, r0: int, r1: int) -> torch.Tensor:
    """Integer codes Q[r0:r1] uint8 [rows, k] (packing.unpack_codes on a row range), built with
    broadcast shifts into one buffer instead of a cat of planes."""
    P = PLANES[bits]
    rows = r1 - r0
    dev = next(iter(mat.values())).device
    if bits in (2, 4):
        width = 8 // P
        packed = mat["q4" if bits == 4 else "q2"][r0:r1]                       # [rows, k/P]
        shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=dev)      # [P]
        Q = torch.bitwise_right_shift(packed[:, None, :], shifts[None, :, None])   # [rows, P, k/P]
        return Q.bitwise_and_((1 << width) - 1).view(rows, k)
    q2, q1 = mat["q2"][r0:r1], mat["q1"][r0:r1]                                # [rows, k/4], [rows, k/8]
    low = torch.bitwise_right_shift(q2[:, None, :], torch.arange(0, 8, 2, dtype=torch.uint8, device=dev)[None, :, None])
    low = low.bitwise_and_(3).view(rows, k)                                    # low two bits, 4 planes
    high = torch.bitwise_right_shift(q1[:, None, :], torch.arange(8, dtype=torch.uint8, device=dev)[None, :, None])
    high = high.bitwise_and_(1).bitwise_left_shift_(2).view(rows, k)           # third bit, 8 planes
    return low.bitwise_or_(high)


def dequantize_rows_torch(mat, bits, group_size, scale_group, shape, rows, out: torch.Tensor) -> torch.Tensor:
    """out [r1 - r0, in] (fp16/bf16/fp32, may be a view of a larger workspace) = W[r0:r1],
    bit-for-bit packing.dequantize(...)[r0:r1]."""
    n, k = shape
    r0, r1 = rows
    ng = k // group_size
    Q = _codes_rows(mat, bits, k, r0, r1).view(r1 - r0, ng, group_size)       # [rows, in/g, g]
    S = _meta_rows(mat, "s", scale_group, r0 * ng, r1 * ng).view(r1 - r0, ng, 1)
    Z = _meta_rows(mat, "z", scale_group, r0 * ng, r1 * ng).view(r1 - r0, ng, 1)
    # (Q - Z) * S in fp32 (as dequantize_codes), rounded once to out's dtype on store
    torch.mul(torch.sub(Q, Z), S, out=out.view(r1 - r0, ng, group_size))
    return out


# ------------------------------------------------------------------------------------------------
# the CUDA implementation: one kernel, compiled by NVRTC, launched through the driver API
# ------------------------------------------------------------------------------------------------
# One thread per (row, packed column j): it reads the byte(s) holding the P codes of inputs
# p * in/P + j (p = 0..P-1, the planar layout of packing.py), meta-dequantizes the scale and zero
# of each one's group and writes P weights. Threads of a block take consecutive j, so every load
# and every store of the block is contiguous. --fmad=false keeps (a - b) * c as two roundings,
# exactly as torch computes it.
KERNEL_NAME = "moe_colab_dequant"
KERNEL_SOURCE = r"""
__device__ __forceinline__ float h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ void store(void* out, long long idx, float w, int kind) {
    if (kind == 0) {                       // fp32
        ((float*)out)[idx] = w;
    } else if (kind == 1) {                // fp16, round to nearest even
        unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(w));
        ((unsigned short*)out)[idx] = h;
    } else {                               // bf16, round to nearest even (finite values)
        unsigned int u; asm("mov.b32 %0, %1;" : "=r"(u) : "f"(w));
        u += 0x7FFFu + ((u >> 16) & 1u);
        ((unsigned short*)out)[idx] = (unsigned short)(u >> 16);
    }
}
extern "C" __global__ void moe_colab_dequant(
        const unsigned char* __restrict__ qa, const unsigned char* __restrict__ qb,
        const unsigned char* __restrict__ sq, const unsigned short* __restrict__ ss,
        const unsigned short* __restrict__ sz, const unsigned char* __restrict__ zq,
        const unsigned short* __restrict__ zs, const unsigned short* __restrict__ zz,
        void* __restrict__ out, long long row0, long long rows, long long K, long long stride_qa,
        long long stride_qb, long long ld, long long G, long long SG, int bits, int kind) {
    const long long r = blockIdx.x;                                  // row of the chunk
    const long long j = (long long)blockIdx.y * blockDim.x + threadIdx.x;   // packed column
    const int P = bits == 4 ? 2 : (bits == 2 ? 4 : 8);
    const long long plane = K / P;
    if (r >= rows || j >= plane) return;
    const long long row = row0 + r;
    const unsigned int ca = qa[row * stride_qa + j];
    unsigned int cb = 0u, c1 = 0u;
    if (bits == 3) { cb = qa[row * stride_qa + j + plane]; c1 = qb[row * stride_qb + j]; }
    const long long ng = K / G;
    #pragma unroll
    for (int p = 0; p < 8; ++p) {
        if (p >= P) break;
        unsigned int q;
        if (bits == 4)      q = (ca >> (4 * p)) & 15u;
        else if (bits == 2) q = (ca >> (2 * p)) & 3u;
        else                q = ((((p & 1) ? cb : ca) >> (2 * (p >> 1))) & 3u) | (((c1 >> p) & 1u) << 2);
        const long long i = p * plane + j;                           // input index
        const long long flat = row * ng + i / G;                     // its group in S, Z
        const long long m = flat / SG;                               // and meta-group
        const float s = ((float)sq[flat] - h2f(sz[m])) * h2f(ss[m]);
        const float z = ((float)zq[flat] - h2f(zz[m])) * h2f(zs[m]);
        store(out, r * ld + i, ((float)q - z) * s, kind);
    }
}
"""
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_BLOCK = 256


class NvrtcError(RuntimeError):
    """NVRTC or the CUDA driver could not build, load or launch the dequantize kernel."""


def _find_nvrtc() -> ctypes.CDLL:
    """libnvrtc: by name (torch's CUDA build has usually loaded it), else from the nvidia-*
    pip packages next to torch, else from CUDA_HOME."""
    major = (torch.version.cuda or "12").split(".")[0]
    names = [f"nvrtc64_{major}0_0.dll"] if sys.platform == "win32" else [f"libnvrtc.so.{major}", "libnvrtc.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    roots = [os.path.dirname(os.path.dirname(torch.__file__))] + [os.environ.get(v, "") for v in ("CUDA_HOME", "CUDA_PATH")]
    patterns = ("nvidia/*/lib/libnvrtc.so*", "nvidia/*/*/lib/libnvrtc.so*", "lib64/libnvrtc.so*", "lib/libnvrtc.so*")
    for root in filter(None, roots):
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if "builtins" in os.path.basename(path) or "alt" in os.path.basename(path):
                    continue
                try:
                    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass
    raise NvrtcError(f"no NVRTC library found (tried {names} and nvidia/*/lib under {roots[0]})")


def _find_driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError as e:
        raise NvrtcError(f"no CUDA driver library: {e}") from e


def nvrtc_compile(source: str, arch: str) -> bytes:
    """``source`` compiled by NVRTC: a cubin for arch "sm_XY", PTX text (NUL-terminated) for
    "compute_XY". Raises NvrtcError with NVRTC's log."""
    lib = _find_nvrtc()
    prog = ctypes.c_void_p()

    def check(rc, what):
        if rc != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise NvrtcError(f"{what}: {lib.nvrtcGetErrorString(rc).decode()}")
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{KERNEL_NAME}.cu".encode(), 0, None, None),
          "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"--fmad=false", b"-default-device"]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if rc != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise NvrtcError(f"NVRTC could not compile the dequantize kernel for {arch}:\n{log.value.decode()[:2000]}")
        kind = "CUBIN" if arch.startswith("sm_") else "PTX"
        size = ctypes.c_size_t()
        check(getattr(lib, f"nvrtcGet{kind}Size")(prog, ctypes.byref(size)), f"nvrtcGet{kind}Size")
        image = ctypes.create_string_buffer(size.value)
        check(getattr(lib, f"nvrtcGet{kind}")(prog, image), f"nvrtcGet{kind}")
        return image.raw                            # PTX: NUL-terminated, as cuModuleLoadData wants
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class CudaDequant:
    """The dequantize kernel loaded into one device's primary context."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.index = index
        major, minor = torch.cuda.get_device_capability(index)
        # A cubin for this GPU needs no PTX JIT (and no driver as new as NVRTC's PTX ISA); an
        # NVRTC older than the GPU cannot make one: then PTX the driver compiles.
        for arch in (f"sm_{major}{minor}", f"compute_{major}{minor}", "compute_75"):
            try:
                self.image, self.arch = nvrtc_compile(KERNEL_SOURCE, arch), arch
                break
            except NvrtcError as e:
                error = e
        else:
            raise error
        cu = self.cu = _find_driver()
        torch.cuda.init()
        self.ctx = ctypes.c_void_p()
        dev = ctypes.c_int()
        self._check(cu.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
        self._check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev), "cuDevicePrimaryCtxRetain")
        self.module, self.function = ctypes.c_void_p(), ctypes.c_void_p()
        with self._context():
            self._check(cu.cuModuleLoadData(ctypes.byref(self.module), self.image), "cuModuleLoadData")
            self._check(cu.cuModuleGetFunction(ctypes.byref(self.function), self.module, KERNEL_NAME.encode()),
                        "cuModuleGetFunction")

    def _check(self, rc, what):
        if rc != 0:
            name = ctypes.c_char_p()
            self.cu.cuGetErrorName(rc, ctypes.byref(name))
            raise NvrtcError(f"{what} failed: {name.value.decode() if name.value else rc}")

    def _context(self):
        cu, ctx, check = self.cu, self.ctx, self._check
        # cuda.h maps cuCtxPushCurrent/PopCurrent to their _v2 entry points; the unsuffixed
        # symbols are the pre-3.2 ABI, which refuses today's contexts (CUDA_ERROR_INVALID_CONTEXT,
        # seen on an H200 with driver 580).
        push = getattr(cu, "cuCtxPushCurrent_v2", None) or cu.cuCtxPushCurrent
        pop = getattr(cu, "cuCtxPopCurrent_v2", None) or cu.cuCtxPopCurrent

        class _Ctx:                       # the device's primary context (torch's), pushed around a call
            def __enter__(self):
                check(push(ctx), "cuCtxPushCurrent")

            def __exit__(self, *exc):
                pop(ctypes.byref(ctypes.c_void_p()))
        return _Ctx()

    def __call__(self, mat, bits, group_size, scale_group, shape, rows, out: torch.Tensor) -> torch.Tensor:
        """out [r1 - r0, in] (row stride out.stride(0), unit column stride) = W[r0:r1]."""
        n, k = shape
        r0, r1 = rows
        qa = mat["q4"] if bits == 4 else mat["q2"]
        qb = mat["q1"] if bits == 3 else qa
        for t in (qa, qb, out, *(mat[nm] for nm in META_NAMES)):
            if t.device != self.device:
                raise ValueError(f"tensor on {t.device}, the kernel was loaded for {self.device}")
        if qa.stride(1) != 1 or qb.stride(1) != 1 or not all(mat[nm].is_contiguous() for nm in META_NAMES):
            raise ValueError("the kernel reads codes with unit column stride and contiguous scales/zeros")
        if out.stride(1) != 1 or tuple(out.shape) != (r1 - r0, k) or out.dtype not in _KIND:
            raise ValueError(f"out must be [{r1 - r0}, {k}] fp32/fp16/bf16 with unit column stride, got "
                             f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
        ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (qa, qb, *(mat[nm] for nm in META_NAMES), out)]
        ll = [ctypes.c_longlong(v) for v in (r0, r1 - r0, k, qa.stride(0), qb.stride(0), out.stride(0),
                                              group_size, scale_group)]
        ii = [ctypes.c_int(bits), ctypes.c_int(_KIND[out.dtype])]
        args = ptrs + ll + ii
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        plane = k // PLANES[bits]
        stream = ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)
        with self._context():
            self._check(self.cu.cuLaunchKernel(self.function, r1 - r0, -(-plane // _BLOCK), 1, _BLOCK, 1, 1, 0,
                                               stream, params, None), "cuLaunchKernel")
        return out


_LOADED: dict = {}
_LOCK = threading.Lock()


def cuda_dequant(device) -> CudaDequant:
    """The kernel for ``device``, compiled and loaded once per process (raises NvrtcError)."""
    device = torch.device(device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = CudaDequant(torch.device("cuda", key))
        return _LOADED[key]


# ------------------------------------------------------------------------------------------------
# the linear layer
# ------------------------------------------------------------------------------------------------
class Workspace:
    """One reusable buffer per (device, dtype) for the dequantized rows (at most CHUNK values)."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, device, dtype, numel: int) -> torch.Tensor:
        key = (str(device), dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[key] = torch.empty(numel, device=device, dtype=dtype)
        return buf[:numel]


def dequantize_rows(mat, bits, group_size, scale_group, shape, rows, out, impl: str):
    if impl == "cuda":
        return cuda_dequant(out.device)(mat, bits, group_size, scale_group, shape, rows, out)
    if impl == "torch":
        return dequantize_rows_torch(mat, bits, group_size, scale_group, shape, rows, out)
    raise ValueError(f"unknown fallback implementation {impl!r}; choose one of {IMPLS}")


def quant_linear_fallback(x, mat, bits, group_size, scale_group, shape, *, impl: str = "torch",
                          workspace: Workspace | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """x [..., in] -> x @ W.T [..., out] in x's dtype: W dequantized ``chunk`` weights at a time
    into ``workspace`` (``impl`` "cuda" or "torch"), then F.linear (cuBLAS on a GPU). bf16 below
    sm_80 computes in fp32 (no bf16 math there), like the Triton path."""
    for name in CODE_NAMES[bits] + META_NAMES:
        if name not in mat:
            raise KeyError(f"{bits}-bit matrix is missing tensor {name!r}")
    n, k = (int(s) for s in shape)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)                                                # [T, in]
    wdtype = x.dtype
    if x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) < (8, 0):
        wdtype, x2 = torch.float32, x2.float()
    step = max(1, min(n, chunk // k))
    ws = (workspace or Workspace()).get(x.device, wdtype, step * k)
    if step >= n:                                                        # one chunk: no copy of y
        w = dequantize_rows(mat, bits, group_size, scale_group, (n, k), (0, n), ws.view(n, k), impl)
        return F.linear(x2, w).to(x.dtype).view(*lead, n)
    y = torch.empty(x2.shape[0], n, device=x.device, dtype=x.dtype)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        w = dequantize_rows(mat, bits, group_size, scale_group, (n, k), (r0, r1), ws[:(r1 - r0) * k].view(r1 - r0, k), impl)
        y[:, r0:r1] = F.linear(x2, w)
    return y.view(*lead, n)
