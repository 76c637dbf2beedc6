"""MXFP4 (OCP microscaling FP4), as gpt-oss checkpoints store their experts: decode to float.

    blocks  uint8 [..., G, 16]   two E2M1 codes per byte, the LOW nibble the even element
    scales  uint8 [..., G]       one E8M0 exponent per 32 values, bias 127
    value   FP4[code] * 2 ** (scale - 127),   FP4 = 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives

The result is [..., G * 32] along the input dimension, in float32, where every MXFP4 value is
exact; casting to bf16 is exact too (8 exponent bits), to fp16 exact unless the scale leaves
fp16's range (|value| beyond 65504 or below 2**-24).

Why moe_colab converts instead of keeping MXFP4 with a kernel: its experts run through one
format and one set of kernels (HQQ codes, Triton with a self-test and fallback, CUDA graphs),
and MXFP4 at 4.25 bits per weight is the size of that format's 4-bit experts (4.25 too); a second
low-bit kernel family for sm_75 would double that surface for no memory gain. The price: a 4-bit
load re-quantizes already-quantized weights (two rounding steps), so ``quant=None`` (16-bit
experts, exact) is the reference and the 4-bit error is measured, not assumed.

Reference: transformers/integrations/mxfp4.py (_convert_moe_packed_tensors); OCP Microscaling
Formats (MX) v1.0.
"""
from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> float32 [..., G * 32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]              # [..., G, 16] each
    v = torch.stack([lo, hi], dim=-1).reshape(*blocks.shape[:-1], BLOCK)          # [..., G, 32]
    v = torch.ldexp(v, scales.to(torch.int32)[..., None] - 127)
    return v.reshape(*blocks.shape[:-2], -1)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] (K % 32 == 0) -> (blocks, scales): the simplest MXFP4 writer (scale
    2**ceil(log2(amax / 6)), nearest code). For tests that write gpt-oss-style checkpoints."""
    g = w.float().reshape(*w.shape[:-1], -1, BLOCK)
    amax = g.abs().amax(-1, keepdim=True).clamp(min=2.0 ** -126)
    e = torch.ceil(torch.log2(amax / 6.0))
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = ((g / torch.exp2(e))[..., None] - lut).abs().argmin(-1)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (e[..., 0] + 127).to(torch.uint8)
