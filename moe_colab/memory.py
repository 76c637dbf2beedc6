"""How many bytes each part of a model takes in this package, computed from shapes alone.

    expert_bytes          one packed expert: the exact ExpertFormat layout the engine copies
    trunk_bytes           embeddings, lm_head, attention (low-bit or 16-bit), routers, norms,
                          dense layers' MLPs and shared experts (never offloaded)
    trunk_inventory       every trunk tensor of a config (name, shape, part), from the family's
                          transformers class built on the meta device (nothing allocated)
    kv_cache_bytes        transformers' KV cache for a context, batch 1 (GQA, or DeepSeek's latent)
    workspace_bytes       temporaries of one prefill (an estimate)
    pinned_allocation_bytes   what torch's pinned host allocator takes for one request
    parse_bytes           "15GiB" -> 16106127360

The planner (planner.py) adds them up against the machine's budgets. Nothing is allocated.
Reference: Eliseev & Mazur, arXiv 2312.17238, sections 3.1-3.3.
"""
from __future__ import annotations

import functools
import json
import math
import re

import torch

MiB = 2**20
FIXED_WORKSPACE = 64 * MiB          # cuBLAS workspace, Triton scratch, small temporaries


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def expert_bytes(config, qcfg, dtype: torch.dtype) -> int:
    """Bytes of one packed expert: the exact layout the engine copies (any family's expert)."""
    from .quant.format import expert_format
    return expert_format(config, qcfg, dtype).layout.nbytes


# parts of the trunk (trunk_inventory)
EMBEDDINGS, ATTN_PROJ, ATTN_OTHER, ROUTERS_NORMS, DENSE_SHARED = (
    "embeddings", "attention projection", "attention other", "routers and norms", "dense and shared MLPs")


@functools.lru_cache(maxsize=64)
def _inventory(model_type: str, config_json: str, dtype: torch.dtype):
    from .adapters import adapter_for
    from .engine.build import keep_fp32_
    adapter = adapter_for(model_type)
    config = adapter.config_class().from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = adapter.model_class()(config)
    keep_fp32_(model.to(dtype), dtype)
    moe = set(adapter.moe_layers(config))
    projections = set(adapter.attention_projections(config))
    kept = (adapter.router_attr,) + tuple(adapter.kept_attrs)
    tied = getattr(config, "tie_word_embeddings", False)
    rows = []
    for name, p in model.named_parameters(remove_duplicate=True):
        m = re.match(r"^model\.layers\.(\d+)\.(\w+)\.(\w+)", name)
        layer, module, sub = (int(m[1]), m[2], m[3]) if m else (None, None, None)
        if layer in moe and module == "mlp" and sub not in kept:
            continue                                    # routed experts: the store, not the trunk
        if layer is None and ("embed_tokens" in name or "lm_head" in name):
            part = EMBEDDINGS
        elif module == "self_attn":
            part = ATTN_PROJ if sub in projections and name.endswith(f"{sub}.weight") and p.dim() == 2 else ATTN_OTHER
        elif module == "mlp" and (layer not in moe or sub in adapter.kept_attrs):
            part = DENSE_SHARED
        else:
            part = ROUTERS_NORMS
        rows.append((name, tuple(p.shape), p.element_size(), part))
    for prefix, module in model.named_modules():                       # persistent buffers
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                rows.append((f"{prefix}.{name}", tuple(buf.shape), buf.element_size(), ROUTERS_NORMS))
    return tuple(rows), bool(tied)


def trunk_inventory(config, dtype: torch.dtype = torch.float16) -> list[tuple[str, tuple, int, str]]:
    """(name, shape, bytes per element as the engine holds it, part) of every trunk tensor of
    ``config`` (any supported family): the family's transformers model on the meta device minus
    its routed experts. Bytes per element: ``dtype``, or 4 where transformers keeps float32."""
    return list(_inventory(config.model_type, config.to_json_string(use_diff=False), dtype)[0])


def trunk_bytes(config, qcfg, dtype: torch.dtype) -> int:
    """Bytes of everything but the routed experts, as the loaded model holds it on the device:
    every trunk tensor (trunk_inventory) in its dtype, attention projections in the low-bit
    format when ``qcfg`` quantizes attention."""
    from .quant.size import matrix_bytes
    quant = qcfg is not None and qcfg.attn_bits != 16
    total = 0
    for _, shape, size, part in trunk_inventory(config, dtype):
        if quant and part == ATTN_PROJ:
            total += matrix_bytes(shape, *qcfg.matrix("attn"))
        else:
            total += math.prod(shape) * size
    return total


def kv_cache_bytes(config, dtype: torch.dtype, max_context: int, batch: int = 1) -> int:
    """transformers' KV cache after ``max_context`` tokens: the family's rule (adapter.kv_cache_bytes)."""
    from .adapters import adapter_for
    return adapter_for(config).kv_cache_bytes(config, dtype, max_context, batch)


def workspace_bytes(config, qcfg, dtype: torch.dtype, tokens: int, device_type: str) -> int:
    """Temporaries of one forward over ``tokens`` tokens (a prefill), batch 1: an estimate."""
    from .adapters import adapter_for
    ad = adapter_for(config)
    b = _itemsize(dtype)
    h, i, v = config.hidden_size, ad.expert_size(config), config.vocab_size
    k, E = ad.top_k(config), ad.num_experts(config)
    attention = tokens * ad.attention_temporaries(config) * b          # x, norm, q, k, v, attn, o
    wide = max(i, ad.dense_intermediate(config), ad.shared_intermediate(config))   # dense/shared MLPs too
    moe = tokens * ((3 * wide + (k + 3) * h) * b + 2 * E * 4)           # gate/up/act, outputs, router
    dequant = 0
    if qcfg is not None and qcfg.expert_bits != 16:
        # Prefill multiplies through one dequantized matrix at a time: the Triton path writes it
        # in the model dtype; the torch path (CPU) goes through float32 temporaries.
        dequant = i * h * (b if device_type == "cuda" else 14)
    # one layer's KV exists twice while it grows
    kv_step = ad.kv_cache_bytes(config, dtype, tokens) // max(1, config.num_hidden_layers)
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
