"""A layer's selected low-bit experts in one launch per matrix: a grouped GEMV over cache slots.

Decoding one token, a layer of Qwen3-30B-A3B runs 8 of its 128 experts, each three [768 x 2048]
matrices; one launch per matrix and expert (quant_linear) is 24 launches of a few microseconds
of work each, and the host spends more time launching than the GPU computes. Here the n experts
of one call are addressed through a table of their buffers' device addresses (each expert is ONE
packed buffer, storage.py; a cache slot's tensors sit at fixed offsets inside it), so one launch
computes the same matrix of every expert:

    program (n-block, expert e):  base = addr[e]  (uint8*)
        codes   base + off_q4 (or off_q2, off_q1)        [N, K/P] packed planes
        scales  base + off_s_q, off_s_scale, ...         8-bit codes + fp16 meta (packing.py)
        y[e, rows] = W_e[rows] @ x_e   (fp32 accumulation over every group, no split-K)

    grouped_expert_forward(fmt, views, x):   x [1, H] -> [n, 1, H]
        gate = G(w1, x), up = G(w3, x)       [n, I] fp32 -> x dtype (+ biases)
        h    = glu(gate, up)                 [n, I]      (one elementwise op for all n)
        y    = G(w2, h)                      [n, H]      x_e = h[e]

So a layer's experts cost 3 kernel launches and a few elementwise ops, whatever n is. The arithmetic
per weight is the fused kernel's (kernels.py, "fma": w = q*s - z*s, fp32 FMAs); only the order of
the sum over K differs from a split-K launch, so results agree to rounding, not bit for bit.

On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 before import), as kernels.py.
Reference: Triton's grouped GEMM tutorial (device pointer tables); Eliseev & Mazur, arXiv 2312.17238.
"""
from __future__ import annotations

import torch

from . import kernels as K
from .kernels import PLANES, tl, triton

if triton is not None:
    @triton.jit
    def _grouped_gemv_kernel(x_ptr, out_ptr, addr_ptr, off_qa, off_qb, off_sq, off_ss, off_sz, off_zq, off_zs,
                             off_zz, N, Kdim, stride_xe, stride_oe, stride_qa, stride_qb, SG,
                             BITS: tl.constexpr, P: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        e = tl.program_id(1)
        base = tl.load(addr_ptr + e)                              # int64: this expert's buffer
        qa_ptr = (base + off_qa).to(tl.pointer_type(tl.uint8))
        qb_ptr = (base + off_qb).to(tl.pointer_type(tl.uint8))
        sq_ptr = (base + off_sq).to(tl.pointer_type(tl.uint8))
        zq_ptr = (base + off_zq).to(tl.pointer_type(tl.uint8))
        ss_ptr = (base + off_ss).to(tl.pointer_type(tl.float16))
        sz_ptr = (base + off_sz).to(tl.pointer_type(tl.float16))
        zs_ptr = (base + off_zs).to(tl.pointer_type(tl.float16))
        zz_ptr = (base + off_zz).to(tl.pointer_type(tl.float16))
        x_row = x_ptr + e * stride_xe
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # [BN] output rows
        mask_n = offs_n < N
        offs_g = tl.arange(0, G)
        plane = Kdim // P
        ngp = plane // G
        ng = Kdim // G
        row_a = qa_ptr + offs_n[:, None] * stride_qa
        row_b = qb_ptr + offs_n[:, None] * stride_qb
        acc2 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        for gi in range(0, ngp):
            col = gi * G + offs_g
            ca = tl.load(row_a + col[None, :], mask=mask_n[:, None], other=0)
            if BITS == 3:
                cb = tl.load(row_a + (col + plane)[None, :], mask=mask_n[:, None], other=0)
                c1 = tl.load(row_b + col[None, :], mask=mask_n[:, None], other=0)
            else:
                cb = ca
                c1 = ca
            for p in tl.static_range(P):
                q = K._code(ca, cb, c1, p, BITS)
                xk = p * plane + col
                flat = offs_n * ng + (p * ngp + gi)
                m = flat // SG
                s = (tl.load(sq_ptr + flat, mask=mask_n, other=0).to(tl.float32)
                     - tl.load(sz_ptr + m, mask=mask_n, other=0).to(tl.float32)) \
                    * tl.load(ss_ptr + m, mask=mask_n, other=0).to(tl.float32)
                z = (tl.load(zq_ptr + flat, mask=mask_n, other=0).to(tl.float32)
                     - tl.load(zz_ptr + m, mask=mask_n, other=0).to(tl.float32)) \
                    * tl.load(zs_ptr + m, mask=mask_n, other=0).to(tl.float32)
                w = q.to(tl.float32) * s[:, None] - (s * z)[:, None]
                acc2 += w * tl.load(x_row + xk).to(tl.float32)[None, :]
        acc = tl.sum(acc2, axis=1)
        tl.store(out_ptr + e * stride_oe + offs_n, acc, mask=mask_n)


def available(x: torch.Tensor) -> bool:
    """Can the grouped kernel run on x's device (CUDA with Triton, or CPU under the interpreter)?"""
    return triton is not None and (x.is_cuda or K.interpreting())


def _block_n(bits: int, group_size: int) -> int:
    # the fused kernel's T = 1 register budget (kernels.launch_config): BLOCK_N * G * P ~ 4096
    P = PLANES[bits]
    return K._next_pow2(max(4, min(64, 4096 // (group_size * P), 4096 // group_size)))


def grouped_gemv(x: torch.Tensor, addrs: torch.Tensor, offsets: dict[str, int], bits: int, group_size: int,
                 scale_group: int, shape: tuple[int, int]) -> torch.Tensor:
    """out [n, N] float32: out[e] = W_e @ x[e] for the n experts whose buffers start at ``addrs``
    (int64 [n] on x's device); x [n, K] or [1, K] (shared by every expert). ``offsets``: byte
    offset of each stored tensor (q4|q2|q1, s_q, ...) of this matrix inside an expert buffer."""
    N, Kd = shape
    n = addrs.shape[0]
    P = PLANES[bits]
    if (Kd // P) % group_size:
        raise ValueError(f"in/{P} = {Kd // P} is not a multiple of group_size {group_size}")
    out = torch.empty(n, N, device=x.device, dtype=torch.float32)
    code = "q4" if bits == 4 else "q2"
    off_qb = offsets["q1"] if bits == 3 else offsets[code]
    stride_qa = Kd // 2 if bits == 4 else Kd // 4
    bn = _block_n(bits, group_size)
    grid = (triton.cdiv(N, bn), n)
    _grouped_gemv_kernel[grid](
        x, out, addrs, offsets[code], off_qb, offsets["s_q"], offsets["s_scale"], offsets["s_zero"],
        offsets["z_q"], offsets["z_scale"], offsets["z_zero"], N, Kd, x.stride(0) if x.shape[0] > 1 else 0,
        out.stride(0), stride_qa, Kd // 8, scale_group, BITS=bits, P=P, G=group_size, BLOCK_N=bn, num_warps=4)
    return out


def supports(fmt) -> bool:
    """Every matrix of ``fmt`` has whole groups per plane (what the kernel walks)."""
    P = PLANES[fmt.bits]
    return all((shape[1] // P) % fmt.group_size == 0 for shape in fmt.shapes.values())


def matrix_offsets(fmt) -> dict[str, dict[str, int]]:
    """{"w1": {"q4": byte offset, "s_q": ..., ...}, ...} of a QuantizedExpertFormat's layout."""
    out: dict[str, dict[str, int]] = {}
    for spec in fmt.layout.specs:
        name, _, tensor = spec.name.partition(".")
        if tensor:
            out.setdefault(name, {})[tensor] = spec.offset
    return out


def buffer_addresses(fmt, views_list) -> torch.Tensor:
    """int64 [n] on the host: the device address where each expert's packed buffer starts."""
    first = fmt.layout.specs[0]
    return torch.tensor([v[first.name].data_ptr() - first.offset for v in views_list], dtype=torch.int64)


def expert_biases(views_list, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(b13 [n, 2I], b2 [n, H]) in ``dtype`` of experts with biases (GPT-OSS), else None."""
    if "b13" not in views_list[0]:
        return None
    return (torch.stack([v["b13"] for v in views_list]).to(dtype),
            torch.stack([v["b2"] for v in views_list]).to(dtype))


def grouped_expert_forward(fmt, addrs: torch.Tensor, x: torch.Tensor, biases=None) -> torch.Tensor:
    """x [1, H] -> [n, 1, H]: the n experts whose buffers start at ``addrs`` (int64 [n] on x's
    device; buffer_addresses) of a QuantizedExpertFormat (or its biased variant) on one token:
    three grouped launches and a few elementwise ops; ``biases`` from expert_biases."""
    offsets = getattr(fmt, "_grouped_offsets", None)
    if offsets is None:
        offsets = fmt._grouped_offsets = matrix_offsets(fmt)
    q = (fmt.bits, fmt.group_size, fmt.scale_group)
    no_bf16 = x.dtype == torch.bfloat16 and x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0)
    xc = x.float() if no_bf16 else x
    gate = grouped_gemv(xc, addrs, offsets["w1"], *q, fmt.shapes["w1"]).to(x.dtype)      # [n, I]
    up = grouped_gemv(xc, addrs, offsets["w3"], *q, fmt.shapes["w3"]).to(x.dtype)        # [n, I]
    fn = getattr(fmt, "fn", None)
    if biases is not None:
        i = fmt.intermediate
        gate, up = gate + biases[0][:, :i], up + biases[0][:, i:]
    h = fn.combine(gate, up, fmt.act) if fn is not None else fmt.act(gate) * up          # [n, I]
    hc = h.float() if no_bf16 else h
    y = grouped_gemv(hc.contiguous(), addrs, offsets["w2"], *q, fmt.shapes["w2"]).to(x.dtype)   # [n, H]
    if biases is not None:
        y = y + biases[1]
    return y[:, None, :]
