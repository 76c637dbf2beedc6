"""The low-bit matrix format, in plain torch: bit packing, 8-bit meta-quantization of scales and
zeros, dequantization, and the reference linear layer (the Triton kernels' oracle).

A weight W [out, in] (nn.Linear layout, y = x @ W.T) is quantized along the input dimension in
groups of ``group_size`` consecutive inputs of one output row (hqq axis=1):

    W[o, i] = (Q[o, i] - Z[o, i // g]) * S[o, i // g],      Q integer in [0, 2**bits)

Codes are packed "planar" along the input dimension, so a kernel walking K unpacks with shifts:

    4-bit  q4 uint8 [out, in/2]   q4[o, j] = Q[o, j] | Q[o, j + in/2] << 4
    2-bit  q2 uint8 [out, in/4]   q2[o, j] = sum_s Q[o, j + s*in/4] << 2s          (s = 0..3)
    3-bit  q2 (low two bits, as above) + q1 uint8 [out, in/8]
                                  q1[o, j] = sum_s ((Q[o, j + s*in/8] >> 2) & 1) << s   (s = 0..7)

S and Z ([out * in/g], row-major) are each stored as 8-bit codes with one fp16 scale and zero per
"meta-group" of ``scale_group`` consecutive entries (what hqq 0.1 called quant_scale/quant_zero):

    S[n] ~ (s_q[n] - s_zero[n // scale_group]) * s_scale[n // scale_group]

Stored names (a prefix such as "w1." is added by the caller): q4 | q2 | q2+q1, s_q, s_scale,
s_zero, z_q, z_scale, z_zero. The full contract is notes/quant_format.md.

References: HQQ (Badri & Shaji 2023, https://mobiusml.github.io/hqq_blog/); Eliseev & Mazur,
arXiv 2312.17238, section 3.3 and Table 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (2, 3, 4)
CODE_NAMES = {4: ("q4",), 3: ("q2", "q1"), 2: ("q2",)}
META_NAMES = ("s_q", "s_scale", "s_zero", "z_q", "z_scale", "z_zero")

# A meta-group's zero-point is kept below this magnitude so that fp16 stores it to within half a
# code (fp16 spacing is 1 between 1024 and 2048): then no value is clamped, and every value is
# reconstructed to within half a step. Near-constant groups get a slightly coarser step instead.
_MAX_META_ZERO = 2000.0


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r} for packed codes; choose one of {SUPPORTED_BITS}")


def _check_in_features(in_features: int) -> None:
    if in_features % 8:
        raise ValueError(f"input dimension {in_features} is not a multiple of 8, which the planar "
                         f"bit packing needs")


def tensor_shapes(bits: int, shape: tuple[int, int], group_size: int, scale_group: int) -> dict:
    """{name: (shape, dtype)} of every stored tensor of one quantized matrix [out, in]."""
    _check_bits(bits)
    out, inn = shape
    _check_in_features(inn)
    if inn % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {inn}")
    n_groups = out * inn // group_size
    n_meta = -(-n_groups // scale_group)
    codes = {"q4": ((out, inn // 2), torch.uint8), "q2": ((out, inn // 4), torch.uint8),
             "q1": ((out, inn // 8), torch.uint8)}
    spec = {name: codes[name] for name in CODE_NAMES[bits]}
    for v in ("s", "z"):
        spec[f"{v}_q"] = ((n_groups,), torch.uint8)
        spec[f"{v}_scale"] = ((n_meta,), torch.float16)
        spec[f"{v}_zero"] = ((n_meta,), torch.float16)
    return spec


# -- bit packing ---------------------------------------------------------------------------------
def _pack_planes(Q: torch.Tensor, planes: int, width: int) -> torch.Tensor:
    """Q [out, in] (values < 2**width) -> uint8 [out, in/planes]; plane s sits at bits s*width."""
    out, inn = Q.shape
    Q = Q.to(torch.uint8).view(out, planes, inn // planes)     # plane s = inputs [s*in/planes, ...)
    packed = torch.zeros(out, inn // planes, dtype=torch.uint8, device=Q.device)
    for s in range(planes):
        packed |= Q[:, s] << (s * width)
    return packed


def _unpack_planes(packed: torch.Tensor, planes: int, width: int) -> torch.Tensor:
    """uint8 [out, in/planes] -> uint8 [out, in], the inverse of _pack_planes."""
    mask = (1 << width) - 1
    return torch.cat([(packed >> (s * width)) & mask for s in range(planes)], dim=1)


def pack_codes(Q: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Integer codes Q uint8 [out, in] -> {"q4"} | {"q2"} | {"q2", "q1"} (see the module doc)."""
    _check_bits(bits)
    if Q.dim() != 2:
        raise ValueError(f"codes must be a 2-D [out, in] tensor, got shape {tuple(Q.shape)}")
    _check_in_features(Q.shape[1])
    if Q.numel() and int(Q.max()) >= 1 << bits:
        raise ValueError(f"codes reach {int(Q.max())}, which does not fit in {bits} bits")
    Q = Q.to(torch.uint8)
    if bits == 4:
        return {"q4": _pack_planes(Q, 2, 4)}
    if bits == 2:
        return {"q2": _pack_planes(Q, 4, 2)}
    return {"q2": _pack_planes(Q & 3, 4, 2), "q1": _pack_planes((Q >> 2) & 1, 8, 1)}


def unpack_codes(codes: dict[str, torch.Tensor], bits: int, in_features: int) -> torch.Tensor:
    """The inverse of pack_codes: uint8 [out, in_features]."""
    _check_bits(bits)
    _check_in_features(in_features)
    if bits == 4:
        Q = _unpack_planes(codes["q4"], 2, 4)
    elif bits == 2:
        Q = _unpack_planes(codes["q2"], 4, 2)
    else:
        Q = _unpack_planes(codes["q2"], 4, 2) | (_unpack_planes(codes["q1"], 8, 1) << 2)
    if Q.shape[1] != in_features:
        raise ValueError(f"packed codes hold {Q.shape[1]} inputs per row, expected {in_features}")
    return Q


# -- meta-quantization of scales and zeros ---------------------------------------------------------
def meta_quantize(v: torch.Tensor, scale_group: int):
    """v (any shape, read row-major) -> (v_q uint8 [numel], v_scale fp16 [M], v_zero fp16 [M]),
    M = ceil(numel / scale_group), with v[n] ~ (v_q[n] - v_zero[m]) * v_scale[m], m = n // scale_group.

    Min-max affine 8 bits per meta-group. The step v_scale is rounded UP to fp16 and the zero is
    rounded to fp16 before the codes are chosen, so every value lands within half a step:
        |v - v_hat| <= v_scale / 2,  v_scale = fp16_up(max(range / 255, |min| / 2000)).
    """
    if scale_group < 1:
        raise ValueError(f"scale_group must be >= 1, got {scale_group}")
    flat = v.detach().reshape(-1).double()
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot meta-quantize an empty tensor")
    if not torch.isfinite(flat).all():
        raise ValueError("scales/zeros contain inf or nan; the weight matrix is not quantizable")
    m = -(-n // scale_group)
    pad = m * scale_group - n
    if pad:  # repeat the last value: it leaves the last group's min and max unchanged
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    groups = flat.view(m, scale_group)                          # [M, scale_group]
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)             # [M]
    step = torch.maximum((hi - lo) / 255, lo.abs() / _MAX_META_ZERO).clamp_min(2.0 ** -24)
    step16 = step.to(torch.float16)
    low = step16.double() < step                                # fp16 rounded down: one ulp up
    step16 = torch.where(low, torch.nextafter(step16, torch.full_like(step16, float("inf"))), step16)
    if not torch.isfinite(step16).all():
        raise ValueError("scales/zeros span more than fp16 can hold; the weight matrix is not quantizable")
    zero16 = (-lo / step16.double()).to(torch.float16)          # |zero| <= 2000: within 0.5 in fp16
    codes = torch.round(groups / step16.double()[:, None] + zero16.double()[:, None]).clamp_(0, 255)
    return codes.reshape(-1)[:n].to(torch.uint8), step16, zero16


def meta_dequantize(v_q: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                    scale_group: int, numel: int) -> torch.Tensor:
    """fp32 [numel] values back from meta_quantize's output."""
    m = torch.arange(numel, device=v_q.device) // scale_group   # meta-group of each entry
    return (v_q.reshape(-1)[:numel].float() - v_zero.float()[m]) * v_scale.float()[m]


# -- dequantization and the reference linear --------------------------------------------------------
def dequantize_codes(Q: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, group_size: int,
                     shape: tuple[int, int]) -> torch.Tensor:
    """W fp32 [out, in] = (Q - Z) * S group-wise; S and Z hold out * in/group_size values."""
    out, inn = shape
    Qg = Q.reshape(out, inn // group_size, group_size).float()   # [out, in/g, g]
    S = S.reshape(out, inn // group_size, 1).float()
    Z = Z.reshape(out, inn // group_size, 1).float()
    return ((Qg - Z) * S).reshape(out, inn)


def dequantize(mat: dict[str, torch.Tensor], bits: int, group_size: int, scale_group: int,
               shape: tuple[int, int], dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Stored tensors of one matrix (names without prefix) -> W [out, in] in ``dtype``."""
    out, inn = shape
    if inn % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {inn}")
    Q = unpack_codes(mat, bits, inn)                              # [out, in] uint8
    n_groups = out * inn // group_size
    S = meta_dequantize(mat["s_q"], mat["s_scale"], mat["s_zero"], scale_group, n_groups)
    Z = meta_dequantize(mat["z_q"], mat["z_scale"], mat["z_zero"], scale_group, n_groups)
    return dequantize_codes(Q, S, Z, group_size, shape).to(dtype)


def quant_linear_torch(x: torch.Tensor, mat: dict[str, torch.Tensor], bits: int, group_size: int,
                       scale_group: int, shape: tuple[int, int]) -> torch.Tensor:
    """x [T, in] -> x @ W.T [T, out]: dequantize, then an ordinary matmul in x's dtype."""
    return F.linear(x, dequantize(mat, bits, group_size, scale_group, shape, x.dtype))
