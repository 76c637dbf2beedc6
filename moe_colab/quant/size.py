"""How many bytes a model takes under a quantization scheme (Table 1's "size" column).

Every tensor is counted as this package stores it: 16-bit embeddings, lm_head, norms and
routers; attention projections in the low-bit format (codes + 8-bit scales and zeros + fp16
meta-scales) or 16-bit; each expert as its packed buffer (ExpertFormat layout, 64-byte aligned).

    >>> from moe_colab.config import mixtral_config
    >>> estimate_size(mixtral_config("mixtral-8x7b"), "paper-2bit") / 2**30    # GiB
    17.0...

The paper's "GB" are GiB (2**30 bytes): its FP16 row, 86.99, is 46.7e9 parameters * 2 bytes.
Reference: Eliseev & Mazur, arXiv 2312.17238, Table 1; docs/quantization.md compares the two.
"""
from __future__ import annotations

import torch

from .config import QuantConfig, resolve_quant
from .packing import tensor_shapes

BYTES_16 = 2


def matrix_bytes(shape: tuple[int, int], bits: int, group_size: int | None, scale_group: int | None) -> int:
    """Stored bytes of one [out, in] matrix (no alignment padding)."""
    if bits == 16:
        return shape[0] * shape[1] * BYTES_16
    total = 0
    for s, dtype in tensor_shapes(bits, shape, group_size, scale_group).values():
        n = 1
        for d in s:
            n *= d
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


def bits_per_weight(bits: int, group_size: int | None, scale_group: int | None, shape=(4096, 14336)) -> float:
    """Average stored bits per weight of a matrix of ``shape`` under one scheme."""
    return 8 * matrix_bytes(shape, bits, group_size, scale_group) / (shape[0] * shape[1])


def size_breakdown(config, quant=None) -> dict[str, int]:
    """Bytes of each part: embeddings (with lm_head), attention, experts, routers_norms."""
    qcfg = resolve_quant(quant) or QuantConfig()
    qcfg.validate_for(config)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layers, experts = config.num_hidden_layers, config.num_local_experts
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    tied = getattr(config, "tie_word_embeddings", False)

    attn_q = qcfg.matrix("attn")
    attn = sum(matrix_bytes(s, *attn_q) for s in
               [(heads * head_dim, h), (kv * head_dim, h), (kv * head_dim, h), (h, heads * head_dim)])
    if qcfg.expert_bits == 16:
        expert = 3 * h * i * BYTES_16
    else:
        from .format import QuantizedExpertFormat
        expert = QuantizedExpertFormat(h, i, qcfg).layout.nbytes     # one buffer, as stored and copied
    return {
        "embeddings": (1 if tied else 2) * v * h * BYTES_16,
        "attention": layers * attn,
        "experts": layers * experts * expert,
        "routers_norms": layers * (experts * h + 2 * h) * BYTES_16 + h * BYTES_16,
    }


def estimate_size(config, quant=None) -> int:
    """Total bytes of a MixtralConfig's weights under ``quant`` (None = 16-bit everywhere)."""
    return sum(size_breakdown(config, quant).values())
