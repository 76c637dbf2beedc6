"""Fused low-bit Triton kernels: y = x @ W.T straight from the packed format of packing.py.

Decoding multiplies a handful of token rows (T = 1..16) by each expert matrix, so the time is
the time to READ the matrix: the kernel reads 2-4 bit codes and 8-bit scales/zeros once and
never writes a 16-bit matrix out (GEMV / split-K style):

    program (n-block, k-split): rows offs_n [BLOCK_N] of W, groups [g0, g1) of every plane
      for each group of one plane (G packed columns):
        codes [BLOCK_N, G] uint8 -> for each plane p (shifts only, planar layout):
          q [BLOCK_N, G]   integer codes of inputs p*K/P + columns
          s, z [BLOCK_N]   meta-dequantized scale and zero of that group (8-bit codes inline)
          "fma":  w = q*s - z*s (one FMA per weight); acc[t, n, k] += x[t, k] * w[n, k]   (fp32)
          "dot":  acc[t, n] += s * (x @ q.T - z * sum_k x)    (tensor cores on exact integer codes)
    split-K programs each write their fp32 partial sums; torch adds them in a fixed order after
    the kernel (no atomics: the same input always gives the same bits).

"fma" runs on any GPU (T4 included: no tensor cores, no bf16 math; T = 1 is a plain 2-D GEMV
whose partial sums stay in the codes' register layout; T = 2..16 add a token axis). "dot" needs
sm_80+ and fp16/bf16 x (Triton >= 3.3 lowers tl.dot to FMAs below sm_80, so the T4 never takes
it); x is padded to 16 rows. Above T = 16 (prefill) the matrix is dequantized once by a Triton
kernel and multiplied by cuBLAS ("dequant"). Register use of every launch is checked for sm_75
and sm_90 without a GPU by benchmarks/kernels_compile.py.

`quant_linear` dispatches: Triton on CUDA, the torch reference (packing.quant_linear_torch) on
CPU. Falling back when Triton is missing or fails is a per-model decision, taken by
moe_colab.engine.compute.ModelCompute (warned once, recorded in offload_stats()). The kernels run on CPU tensors
only under Triton's interpreter: TRITON_INTERPRET=1 set before this module is imported.

Format: notes/quant_format.md, moe_colab/quant/packing.py. Reference: Eliseev & Mazur,
arXiv 2312.17238, section 3.3; HQQ (Badri & Shaji 2023).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    TRITON_ERROR = None
except Exception as e:  # no triton wheel (e.g. Windows, CPU-only installs)
    triton = tl = None
    TRITON_ERROR = f"{type(e).__name__}: {e}"

MAX_FUSED_T = 16       # above this many rows the dequantize-then-cuBLAS path is faster
# On sm_80+, fp16/bf16 2-bit rows from this count use tensor cores (tl.dot). Measured on an H200
# (docs/kernels.md): the fma path wins at T=4 for every width and at T=16 for 3 and 4 bits; dot
# wins only for 2-bit at T=16 (0.55 ms vs 0.76 ms per expert).
DOT_MIN_T = 16
DOT_BITS = (2,)
DEQUANT_CHUNK = 1 << 24    # prefill dequantizes at most this many weights at a time (32 MB fp16)
PLANES = {4: 2, 2: 4, 3: 8}          # inputs interleaved per packed byte column
CODE_NAMES = {4: ("q4",), 2: ("q2",), 3: ("q2", "q1")}
META_NAMES = ("s_q", "s_scale", "s_zero", "z_q", "z_scale", "z_zero")

if triton is not None:
    @triton.jit
    def _code(ca, cb, c1, p: tl.constexpr, BITS: tl.constexpr):
        """Plane p's codes from packed bytes (quant_format.md): ca = q4/q2 bytes at the column;
        for 3 bits cb = the q2 bytes K/8 further on and c1 = the q1 bytes (the high bit)."""
        if BITS == 4:
            q = (ca >> (4 * p)) & 15
        elif BITS == 2:
            q = (ca >> (2 * p)) & 3
        else:
            if p % 2 == 0:
                lo = (ca >> (2 * (p // 2))) & 3
            else:
                lo = (cb >> (2 * (p // 2))) & 3
            q = lo | (((c1 >> p) & 1) << 2)
        return q

    @triton.jit
    def _fused_kernel(x_ptr, out_ptr, qa_ptr, qb_ptr, sq_ptr, ss_ptr, sz_ptr, zq_ptr, zs_ptr, zz_ptr,
                      T, N, K, stride_xt, stride_xk, stride_os, stride_ot, stride_on, stride_qa, stride_qb,
                      SG, groups_per_split,
                      BITS: tl.constexpr, P: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # [BN] output rows
        mask_n = offs_n < N
        offs_t = tl.arange(0, BLOCK_T)                            # [BT] token rows
        mask_t = offs_t < T
        offs_g = tl.arange(0, G)                                  # [G] columns of one group
        plane = K // P                                            # inputs per plane
        ngp = plane // G                                          # groups per plane and row
        ng = K // G                                               # groups per row
        row_a = qa_ptr + offs_n[:, None] * stride_qa              # [BN, 1]
        row_b = qb_ptr + offs_n[:, None] * stride_qb
        if USE_DOT:
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        elif BLOCK_T == 1:  # decode: plain GEMV, per-lane partial sums reduced after the loop
            acc2 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        else:
            acc3 = tl.zeros((BLOCK_T, BLOCK_N, G), dtype=tl.float32)
        g_begin = pid_k * groups_per_split
        for gi in range(g_begin, g_begin + groups_per_split):
            col = gi * G + offs_g                                 # [G] packed column
            ca = tl.load(row_a + col[None, :], mask=mask_n[:, None], other=0)    # [BN, G] uint8
            if BITS == 3:  # low 2 bits: q2 columns col (planes 0,2,4,6) and col + K/8 (1,3,5,7)
                cb = tl.load(row_a + (col + plane)[None, :], mask=mask_n[:, None], other=0)
                c1 = tl.load(row_b + col[None, :], mask=mask_n[:, None], other=0)
            else:          # unused below for 2 and 4 bits
                cb = ca
                c1 = ca
            for p in tl.static_range(P):
                q = _code(ca, cb, c1, p, BITS)                    # [BN, G] codes of plane p
                xk = p * plane + col                              # [G] input index
                flat = offs_n * ng + (p * ngp + gi)               # [BN] index into S, Z
                m = flat // SG                                    # its meta-group
                s = (tl.load(sq_ptr + flat, mask=mask_n, other=0).to(tl.float32)
                     - tl.load(sz_ptr + m, mask=mask_n, other=0).to(tl.float32)) \
                    * tl.load(ss_ptr + m, mask=mask_n, other=0).to(tl.float32)
                z = (tl.load(zq_ptr + flat, mask=mask_n, other=0).to(tl.float32)
                     - tl.load(zz_ptr + m, mask=mask_n, other=0).to(tl.float32)) \
                    * tl.load(zs_ptr + m, mask=mask_n, other=0).to(tl.float32)
                if USE_DOT:  # integer codes are exact in fp16/bf16: dot first, then (q - z) * s
                    xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + xk[None, :] * stride_xk,
                                 mask=mask_t[:, None], other=0.0)   # [BT, G]
                    # (via fp32: Triton's CPU interpreter turns uint8 -> bf16 into zeros)
                    d = tl.dot(xv, tl.trans(q.to(tl.float32).to(xv.dtype)))   # [BT, BN] fp32
                    xs = tl.sum(xv.to(tl.float32), axis=1)        # [BT]
                    acc += s[None, :] * (d - z[None, :] * xs[:, None])
                else:  # w = (q - z) * s as one FMA, then one FMA per token row
                    w = q.to(tl.float32) * s[:, None] - (s * z)[:, None]            # [BN, G]
                    if BLOCK_T == 1:  # 2-D: stays in the codes' register layout
                        acc2 += w * tl.load(x_ptr + xk * stride_xk).to(tl.float32)[None, :]
                    else:
                        xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + xk[None, :] * stride_xk,
                                     mask=mask_t[:, None], other=0.0)   # [BT, G]
                        acc3 += xv.to(tl.float32)[:, None, :] * w[None, :, :]
        if not USE_DOT:
            if BLOCK_T == 1:
                acc = tl.sum(acc2, axis=1)[None, :]               # [1, BN]
            else:
                acc = tl.sum(acc3, axis=2)                        # [BT, BN]
        # split-K: program pid_k writes its own fp32 partial sums, out[pid_k] (stride_os = 0 without)
        out = out_ptr + pid_k * stride_os + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on
        mask = mask_t[:, None] & mask_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequant_kernel(w_ptr, qa_ptr, qb_ptr, sq_ptr, ss_ptr, sz_ptr, zq_ptr, zs_ptr, zz_ptr,
                        row0, N, K, stride_w, stride_qa, stride_qb, SG,
                        BITS: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
        offs_n = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)   # [BN] rows row0..N-1
        offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)   # [BJ] packed column
        plane = K // P
        mask = (offs_n < N)[:, None] & (offs_j < plane)[None, :]      # [BN, BJ]
        ca = tl.load(qa_ptr + offs_n[:, None] * stride_qa + offs_j[None, :], mask=mask, other=0)
        if BITS == 3:
            cb = tl.load(qa_ptr + offs_n[:, None] * stride_qa + (offs_j + plane)[None, :], mask=mask, other=0)
            c1 = tl.load(qb_ptr + offs_n[:, None] * stride_qb + offs_j[None, :], mask=mask, other=0)
        else:
            cb = ca
            c1 = ca
        for p in tl.static_range(P):
            q = _code(ca, cb, c1, p, BITS)                            # [BN, BJ] codes of plane p
            i = p * plane + offs_j                                    # [BJ] input index
            flat = offs_n[:, None] * (K // G) + (i // G)[None, :]     # [BN, BJ] index into S, Z
            m = flat // SG
            s = (tl.load(sq_ptr + flat, mask=mask, other=0).to(tl.float32)
                 - tl.load(sz_ptr + m, mask=mask, other=0).to(tl.float32)) \
                * tl.load(ss_ptr + m, mask=mask, other=0).to(tl.float32)
            z = (tl.load(zq_ptr + flat, mask=mask, other=0).to(tl.float32)
                 - tl.load(zz_ptr + m, mask=mask, other=0).to(tl.float32)) \
                * tl.load(zs_ptr + m, mask=mask, other=0).to(tl.float32)
            w = (q.to(tl.float32) - z) * s
            tl.store(w_ptr + (offs_n - row0)[:, None] * stride_w + i[None, :],
                     w.to(w_ptr.dtype.element_ty), mask=mask)


def interpreting() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and type(_fused_kernel).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=None)
def _gpu_info(index) -> tuple[tuple[int, int], int]:
    """(compute capability, SM count) of a CUDA device."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    return (props.major, props.minor), props.multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_call(x, mat, bits, group_size, scale_group, shape) -> tuple[int, int]:
    """Validate one call (shapes, dtypes, devices; raises naming the tensor); returns (out, in)."""
    if bits not in PLANES:
        raise ValueError(f"unsupported bit width {bits!r}; the kernels handle {sorted(PLANES)}")
    n, k = (int(s) for s in shape)
    if k % 8 or k % group_size:
        raise ValueError(f"input dimension {k} must be a multiple of 8 and of group_size {group_size}")
    if scale_group < 1:
        raise ValueError(f"scale_group must be >= 1, got {scale_group}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the matrix {tuple(shape)} expects {k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    want = {"q4": (n, k // 2), "q2": (n, k // 4), "q1": (n, k // 8)}
    n_groups = n * k // group_size
    n_meta = -(-n_groups // scale_group)
    for name in CODE_NAMES[bits] + META_NAMES:
        if name not in mat:
            raise KeyError(f"{bits}-bit matrix is missing tensor {name!r} (has {sorted(mat)})")
        t = mat[name]
        if t.device != x.device:
            raise ValueError(f"tensor {name!r} is on {t.device} but x is on {x.device}")
        if name in want:
            if tuple(t.shape) != want[name] or t.dtype != torch.uint8 or t.stride(-1) != 1:
                raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, expected uint8 {want[name]} "
                                 f"with unit column stride")
        else:
            numel = n_groups if name.endswith("_q") else n_meta
            if t.numel() != numel or not t.is_contiguous():
                raise ValueError(f"{name}: got {t.numel()} values (contiguous={t.is_contiguous()}), "
                                 f"expected {numel} contiguous")
    return n, k


def _meta_args(mat):
    return [mat[name] for name in META_NAMES[:3]] + [mat[name] for name in META_NAMES[3:]]


def _code_args(mat, bits):
    qa = mat["q4"] if bits == 4 else mat["q2"]
    qb = mat["q1"] if bits == 3 else qa          # unused unless 3-bit
    return qa, qb


def dequantize_triton(mat, bits, group_size, scale_group, shape, dtype=torch.float16, rows=None,
                      _check_input=True) -> torch.Tensor:
    """W[r0:r1] [r1 - r0, in] in ``dtype`` (rows=(r0, r1); default all) from the stored tensors:
    one Triton kernel, the same values as packing.dequantize."""
    n, k = (int(s) for s in shape)
    probe = mat["q4"] if bits == 4 else mat.get("q2", next(iter(mat.values())))
    if _check_input:
        check_call(torch.empty(0, k, device=probe.device, dtype=torch.float32), mat, bits, group_size,
               scale_group, shape)
    r0, r1 = rows or (0, n)
    if not 0 <= r0 < r1 <= n:
        raise ValueError(f"rows {rows} outside the matrix's {n} rows")
    w = torch.empty(r1 - r0, k, device=probe.device, dtype=dtype)
    qa, qb = _code_args(mat, bits)
    P = PLANES[bits]
    block_n, block_j = 16, 64
    grid = (triton.cdiv(r1 - r0, block_n), triton.cdiv(k // P, block_j))
    _dequant_kernel[grid](w, qa, qb, *_meta_args(mat), r0, r1, k, w.stride(0), qa.stride(0), qb.stride(0),
                          scale_group, BITS=bits, P=P, G=group_size, BLOCK_N=block_n, BLOCK_J=block_j)
    return w


def launch_config(T, shape, bits, group_size, dtype, cc, sms, *, path="auto", split_k=None,
                  block_n=None, num_warps=None) -> dict:
    """How to run x [T, in] @ W.T: {"path": "fma" | "dot" | "dequant", and for the fused paths
    block_t, block_n, split_k, num_warps}. Pure function of shapes and GPU (cc, SM count)."""
    n, k = shape
    P = PLANES[bits]
    fusable = (k // P) % group_size == 0          # groups must not straddle a plane boundary
    if path == "auto":
        if T > MAX_FUSED_T or not fusable:
            path = "dequant"
        elif (cc >= (8, 0) and dtype != torch.float32 and group_size >= 16 and T >= DOT_MIN_T
              and bits in DOT_BITS):
            path = "dot"
        else:
            path = "fma"
    if path == "dequant":
        return {"path": path}
    if path not in ("fma", "dot"):
        raise ValueError(f"unknown path {path!r}; choose auto, fma, dot or dequant")
    if not fusable:
        raise ValueError(f"the fused path needs in/{P} = {k // P} to be a multiple of group_size "
                         f"{group_size}; use path='dequant'")
    if path == "dot" and (dtype == torch.float32 or group_size < 16 or cc < (8, 0)):
        raise ValueError("path='dot' needs fp16/bf16 x, group_size >= 16 and an sm_80+ GPU")
    block_t = 16 if path == "dot" else _next_pow2(T)
    if not 1 <= T <= MAX_FUSED_T:
        raise ValueError(f"the fused path handles 1..{MAX_FUSED_T} rows, got {T}; use path='dequant'")
    # Registers (checked with ptxas for sm_75, benchmarks/kernels_compile.py): the fma path holds
    # a [BLOCK_T, BLOCK_N, G] fp32 accumulator and unpacks BLOCK_N * G * P codes per step; keep
    # both near 4096 values (128 threads) so that 3-bit, with 8 planes, does not spill.
    # The dot path (sm_90 ptxas): 16 rows for G = 64 (3-bit at 32 rows spills), 64 for 2-bit.
    if block_n:
        if block_n & (block_n - 1) or block_n < (16 if path == "dot" else 1):
            raise ValueError(f"block_n must be a power of two (>= 16 for path='dot'), got {block_n}")
        bn = block_n
    elif path == "dot":
        bn = 64 if group_size * P <= 64 else 16
    else:
        bn = _next_pow2(max(4, min(64, 4096 // (group_size * P), 4096 // (block_t * group_size))))
    ngp = (k // P) // group_size                  # groups per plane and row
    grid_n = -(-n // bn)
    if split_k is None:   # split K until there are enough programs to fill the GPU
        split_k = 1
        while grid_n * split_k < 2 * sms and ngp % (2 * split_k) == 0 and ngp // (2 * split_k) >= 4:
            split_k *= 2
    if ngp % split_k:
        raise ValueError(f"split_k={split_k} must divide the {ngp} groups of a plane")
    return {"path": path, "block_t": block_t, "block_n": bn, "split_k": split_k,
            "num_warps": num_warps or 4}


_launch_config = functools.lru_cache(maxsize=4096)(launch_config)   # pure: same shapes, same answer


def fused_accumulator(T: int, n: int, cfg: dict, dtype: torch.dtype, device) -> torch.Tensor:
    """Where the fused kernel writes: fp32 partial sums [split_k, T, n] with split-K, else [T, n]
    in ``dtype`` (x's, or fp32 for bf16 below sm_80)."""
    if cfg["split_k"] > 1:
        return torch.empty(cfg["split_k"], T, n, device=device, dtype=torch.float32)
    return torch.empty(T, n, device=device, dtype=dtype)


def _fused_launch(xc, acc, mat, bits, group_size, scale_group, shape, cfg):
    """(grid, args, meta) of one fused-kernel launch; acc [T, out] (or [split_k, T, out] of fp32
    partial sums) receives the result."""
    n, k = shape
    P = PLANES[bits]
    qa, qb = _code_args(mat, bits)
    ngp = (k // P) // group_size
    s_os, s_ot, s_on = acc.stride() if acc.dim() == 3 else (0, *acc.stride())
    args = (xc, acc, qa, qb, *_meta_args(mat), xc.shape[0], n, k, xc.stride(0), xc.stride(1),
            s_os, s_ot, s_on, qa.stride(0), qb.stride(0), scale_group, ngp // cfg["split_k"])
    meta = dict(BITS=bits, P=P, G=group_size, BLOCK_T=cfg["block_t"], BLOCK_N=cfg["block_n"],
                USE_DOT=cfg["path"] == "dot", num_warps=cfg["num_warps"])
    return (-(-n // cfg["block_n"]), cfg["split_k"]), args, meta


def quant_linear_triton(x, mat, bits, group_size, scale_group, shape, *, out=None, path="auto",
                        split_k=None, block_n=None, num_warps=None, trusted=False) -> torch.Tensor:
    """x [..., in] fp16/bf16/fp32 (CUDA, or CPU under TRITON_INTERPRET=1) -> x @ W.T [..., out]
    in x's dtype. ``path`` "auto" | "fma" | "dot" | "dequant"; ``split_k``, ``block_n`` and
    ``num_warps`` override launch_config's choice (tests and benchmarks)."""
    if triton is None:
        raise RuntimeError(f"Triton is not available ({TRITON_ERROR})")
    n, k = (int(shape[0]), int(shape[1])) if trusted else check_call(x, mat, bits, group_size, scale_group, shape)
    if not x.is_cuda and not interpreting():
        raise RuntimeError("quant_linear_triton got CPU tensors: Triton runs on CPU only under its "
                           "interpreter (set TRITON_INTERPRET=1 before importing moe_colab.quant.kernels)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)                                        # [T, in]
    T = x2.shape[0]
    if out is not None and (tuple(out.shape) != (*lead, n) or out.dtype != x.dtype
                            or out.device != x.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*lead, n)} on {x.device}")
    y = out.view(T, n) if out is not None else torch.empty(T, n, device=x.device, dtype=x.dtype)
    if T == 0:
        return y.view(*lead, n)
    cc, sms = _gpu_info(x.device.index) if x.is_cuda else ((8, 0), 4)   # interpreter: a small sm_80
    xc = x2.float() if (x.dtype == torch.bfloat16 and cc < (8, 0)) else x2   # no bf16 math below sm_80
    cfg = _launch_config(T, (n, k), bits, group_size, xc.dtype, cc, sms, path=path, split_k=split_k,
                         block_n=block_n, num_warps=num_warps)
    if cfg["path"] == "dequant":   # in row chunks: the 16-bit copy never exceeds DEQUANT_CHUNK values
        step = max(16, DEQUANT_CHUNK // k // 16 * 16)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            w = dequantize_triton(mat, bits, group_size, scale_group, (n, k), xc.dtype, (r0, r1), False)
            y[:, r0:r1] = F.linear(xc, w)
        return y.view(*lead, n)
    if cfg["split_k"] == 1 and xc.dtype == y.dtype:
        acc = y                 # the kernel writes the result in place
    else:
        acc = fused_accumulator(T, n, cfg, xc.dtype, x.device)
    grid, args, meta = _fused_launch(xc, acc, mat, bits, group_size, scale_group, (n, k), cfg)
    _fused_kernel[grid](*args, **meta)
    if acc.dim() == 3:          # split-K: add the partial sums, always in the same order
        acc = acc.sum(dim=0)
    if acc is not y:
        y.copy_(acc)
    return y.view(*lead, n)


def _torch_path(x, mat, bits, group_size, scale_group, shape):
    from moe_colab.quant.packing import quant_linear_torch
    k = x.shape[-1]
    y = quant_linear_torch(x.reshape(-1, k), mat, bits, group_size, scale_group, tuple(shape))
    return y.view(*x.shape[:-1], y.shape[-1])


def quant_linear(x, mat, bits, group_size, scale_group, shape, *, backend="auto") -> torch.Tensor:
    """x [..., in] -> x @ W.T [..., out] in x's dtype. backend "auto": Triton on CUDA, torch on
    CPU; "triton" | "torch" force one. A failure raises: falling back to the torch path is a
    per-model decision (moe_colab.engine.compute.ModelCompute), not this function's."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; choose auto, triton or torch")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return _torch_path(x, mat, bits, group_size, scale_group, shape)
    return quant_linear_triton(x, mat, bits, group_size, scale_group, shape)
