"""One weight matrix through HQQ (the hqq package) and our 8-bit meta-quantization.

    W [out, in] --hqq Quantizer.quantize(axis=1, group_size=g, optimize=True)--> Q, S, Z
                --pack_codes / meta_quantize--> {"q4"|"q2"|"q2","q1", "s_q", "s_scale", ...}

hqq 0.2 groups ``g`` consecutive entries of the row-major matrix when axis=1, i.e. ``g``
consecutive inputs of one output row (in % g == 0), and returns the scale already inverted:
W ~ (Q - Z) * S. Its "half-quadratic" optimizer refines the zero-points without any data.
hqq 0.2 no longer quantizes S and Z (quant_scale / quant_zero are gone), so we meta-quantize
them here, as the paper did with hqq 0.1 (packing.meta_quantize).

References: HQQ, https://mobiusml.github.io/hqq_blog/ and hqq/core/quantize.py (Quantizer);
Eliseev & Mazur, arXiv 2312.17238, section 3.3.
"""
from __future__ import annotations

import torch

from .packing import META_NAMES, meta_quantize, pack_codes, tensor_shapes


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def round_zero(bits: int) -> bool:
    """hqq's BaseQuantizeConfig (0.1, which the paper used, and 0.2) rounds 4-bit zero-points."""
    return bits == 4


def hqq_quantize(W: torch.Tensor, bits: int, group_size: int, device=None):
    """W [out, in] -> (Q uint8 [out, in], S fp32 [out*in/g], Z fp32 [out*in/g]) by hqq, unpacked.

    ``device`` is where hqq's optimizer runs (default: W's device; it works in fp16 on CUDA, fp32
    on CPU); results come back on the CPU.
    """
    from hqq.core.quantize import Quantizer

    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(W.shape)}")
    out, inn = W.shape
    tensor_shapes(bits, (out, inn), group_size, 1)   # checks bits, in % 8 and in % group_size
    device = torch.device(device) if device is not None else W.device
    W_q, meta = Quantizer.quantize(W.to(device), nbits=bits, channel_wise=True, group_size=group_size,
                                   optimize=True, round_zero=round_zero(bits), axis=1, bitpack=False,
                                   device=str(device))
    Q = W_q.reshape(out, inn).round().to(torch.uint8).cpu()
    S = meta["scale"].reshape(-1).float().cpu()      # already 1/scale: W ~ (Q - Z) * S
    Z = meta["zero"].reshape(-1).float().cpu()
    return Q, S, Z


def quantize_matrix(W: torch.Tensor, bits: int, group_size: int, scale_group: int,
                    device=None) -> dict[str, torch.Tensor]:
    """W [out, in] -> the stored tensors of the low-bit format (names without prefix), on the CPU."""
    Q, S, Z = hqq_quantize(W, bits, group_size, device)
    mat = pack_codes(Q, bits)
    mat["s_q"], mat["s_scale"], mat["s_zero"] = meta_quantize(S, scale_group)
    mat["z_q"], mat["z_scale"], mat["z_zero"] = meta_quantize(Z, scale_group)
    assert all(n in mat for n in META_NAMES)
    return mat
