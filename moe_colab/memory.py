"""How many bytes each part of a Mixtral takes in this package, computed from shapes alone.

    expert_bytes          one packed expert: the exact ExpertFormat layout the engine copies
    trunk_bytes           embeddings, lm_head, attention (low-bit or 16-bit), routers, norms
    kv_cache_bytes        transformers' KV cache for a context, batch 1
    workspace_bytes       temporaries of one prefill (an estimate)
    pinned_allocation_bytes   what torch's pinned host allocator takes for one request
    parse_bytes           "15GiB" -> 16106127360

The planner (planner.py) adds them up against the machine's budgets. Nothing is allocated.
Reference: Eliseev & Mazur, arXiv 2312.17238, sections 3.1-3.3.
"""
from __future__ import annotations

import math

import torch

MiB = 2**20
FIXED_WORKSPACE = 64 * MiB          # cuBLAS workspace, Triton scratch, small temporaries


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def expert_bytes(config, qcfg, dtype: torch.dtype) -> int:
    """Bytes of one packed expert: the exact layout the engine copies."""
    from .engine.storage import DenseExpertFormat
    if qcfg is None or qcfg.expert_bits == 16:
        return DenseExpertFormat(config.hidden_size, config.intermediate_size, dtype).layout.nbytes
    from .quant.format import QuantizedExpertFormat
    return QuantizedExpertFormat(config.hidden_size, config.intermediate_size, qcfg, dtype).layout.nbytes


def trunk_bytes(config, qcfg, dtype: torch.dtype) -> int:
    """Bytes of everything but the experts, as the loaded model holds it on the device."""
    from .quant.size import matrix_bytes
    b = _itemsize(dtype)
    h, v, L, E = config.hidden_size, config.vocab_size, config.num_hidden_layers, config.num_local_experts
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or h // heads
    shapes = [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd)]
    if qcfg is None or qcfg.attn_bits == 16:
        attn = sum(o * i for o, i in shapes) * b
    else:
        attn = sum(matrix_bytes(s, *qcfg.matrix("attn")) for s in shapes)
    embed = (1 if getattr(config, "tie_word_embeddings", False) else 2) * v * h * b
    return embed + L * (attn + (E + 2) * h * b) + h * b


def kv_cache_bytes(config, dtype: torch.dtype, max_context: int, batch: int = 1) -> int:
    b = _itemsize(dtype)
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * hd * max_context * batch * b


def workspace_bytes(config, qcfg, dtype: torch.dtype, tokens: int, device_type: str) -> int:
    """Temporaries of one forward over ``tokens`` tokens (a prefill), batch 1: an estimate."""
    b = _itemsize(dtype)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv, k, E = (config.num_attention_heads, config.num_key_value_heads,
                       config.num_experts_per_tok, config.num_local_experts)
    hd = getattr(config, "head_dim", None) or h // heads
    attention = tokens * (4 * h + 2 * kv * hd + 2 * heads * hd) * b     # x, norm, q, k, v, attn, o
    moe = tokens * ((3 * i + (k + 3) * h) * b + 2 * E * 4)              # gate/up/act, outputs, router
    dequant = 0
    if qcfg is not None and qcfg.expert_bits != 16:
        # Prefill multiplies through one dequantized matrix at a time: the Triton path writes it
        # in the model dtype; the torch path (CPU) goes through float32 temporaries.
        dequant = i * h * (b if device_type == "cuda" else 14)
    kv_step = 2 * kv * hd * tokens * b              # one layer's KV exists twice while it grows
    logits = 3 * v * 4                              # last-token logits in float32, softmax, sampling
    return attention + moe + dequant + kv_step + logits + FIXED_WORKSPACE


def pinned_allocation_bytes(nbytes: int) -> int:
    """What torch's pinned host allocator really takes for one tensor of ``nbytes``: it rounds
    every request up to a power of two (ATen CachingHostAllocator; no upper threshold by default).
    ExpertStore allocates one pinned tensor per layer, so this is per layer."""
    return 1 << (int(nbytes) - 1).bit_length() if nbytes > 0 else 0



_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text) -> int | None:
    """"15GiB", "12.7GB", "1024" -> bytes; None or "" -> None."""
    if text is None or str(text).strip() == "":
        return None
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num) * _UNITS[unit]
    except (KeyError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:     # "inf", "nan", "-1", "GB", "12.7.1GB"
        raise ValueError(f"cannot read {text!r} as a byte count; write e.g. '15GiB', '12.7GB' or '16106127360'")
    return int(value)
