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


# Table 1 of the paper, size column (its "GB" are GiB), keyed by (attention bits, expert bits).
PAPER_TABLE1_GIB = {
    (16, 16): 86.99, (16, 4): 25.82, (16, 3): 23.21, (16, 2): 19.33,
    (4, 16): 85.16, (4, 4): 23.99, (4, 3): 21.37, (4, 2): 17.54,
    (3, 16): 85.08, (3, 4): 23.92, (3, 3): 21.31, (3, 2): 17.46,
    (2, 16): 84.96, (2, 4): 23.79, (2, 3): 21.18, (2, 2): 17.30,
}


def matrix_bytes(shape: tuple[int, int], bits: int, group_size: int | None, scale_group: int | None,
                 *, paper_3bit_packing: bool = False) -> int:
    """Stored bytes of one [out, in] matrix (no alignment padding).

    paper_3bit_packing: count 3-bit codes as hqq 0.1 stored them for the paper (axis=0, its
    "3bit_32" packing: 10 codes per int32 along a group, the group padded to a multiple of 10,
    i.e. 7 words = 3.5 bits per weight for group 64) instead of our exact 3 bits.
    """
    if bits == 16:
        return shape[0] * shape[1] * BYTES_16
    total = 0
    for name, (s, dtype) in tensor_shapes(bits, shape, group_size, scale_group).items():
        n = 1
        for d in s:
            n *= d
        total += n * torch.empty((), dtype=dtype).element_size()
    if bits == 3 and paper_3bit_packing:
        n_groups = shape[0] * shape[1] // group_size
        total += n_groups * 4 * -(-group_size // 10) - shape[0] * shape[1] * 3 // 8
    return total


def bits_per_weight(bits: int, group_size: int | None, scale_group: int | None, shape=(4096, 14336)) -> float:
    """Average stored bits per weight of a matrix of ``shape`` under one scheme."""
    return 8 * matrix_bytes(shape, bits, group_size, scale_group) / (shape[0] * shape[1])


def size_breakdown(config, quant=None, *, paper_3bit_packing: bool = False) -> dict[str, int]:
    """Bytes of each part: embeddings (with lm_head), attention, experts (the routed experts of
    every MoE layer), routers_norms; for families that have them also dense_shared (dense layers'
    MLPs and shared experts, never offloaded). Any supported family (its adapter and its
    transformers class on the meta device, moe_colab.memory.trunk_inventory); an unsupported
    model_type is refused."""
    from ..adapters import adapter_for
    from ..memory import ATTN_OTHER, ATTN_PROJ, DENSE_SHARED, EMBEDDINGS, trunk_inventory
    adapter = adapter_for(config)                    # refuses an unsupported family
    qcfg = resolve_quant(quant) or QuantConfig()
    qcfg.validate_for(config)
    fn = adapter.expert_fn(config)
    h, i = fn.hidden, fn.intermediate
    attn_q = qcfg.matrix("attn")
    parts = {"embeddings": 0, "attention": 0, "experts": 0, "routers_norms": 0, "dense_shared": 0}
    for _, shape, _, part in trunk_inventory(config, torch.float16):     # 16-bit, as quantize writes
        n = 1
        for d in shape:
            n *= d
        if part == ATTN_PROJ:
            parts["attention"] += matrix_bytes(shape, *attn_q, paper_3bit_packing=paper_3bit_packing)
        elif part == ATTN_OTHER:
            parts["attention"] += n * BYTES_16
        elif part == EMBEDDINGS:
            parts["embeddings"] += n * BYTES_16
        elif part == DENSE_SHARED:
            parts["dense_shared"] += n * BYTES_16
        else:
            parts["routers_norms"] += n * BYTES_16
    from .format import expert_format
    expert = expert_format(config, qcfg if qcfg.expert_bits != 16 else None).layout.nbytes   # one buffer, as stored
    if qcfg.expert_bits != 16:
        if paper_3bit_packing and qcfg.expert_bits == 3:
            q = qcfg.matrix("expert")
            expert += sum(matrix_bytes(s, *q, paper_3bit_packing=True) - matrix_bytes(s, *q)
                          for s in [(i, h), (h, i), (i, h)])
    parts["experts"] = adapter.num_layers(config) * adapter.num_experts(config) * expert
    if not parts["dense_shared"]:
        del parts["dense_shared"]                    # Mixtral, OLMoE, PhiMoE, GPT-OSS have none
    return parts


def estimate_size(config, quant=None) -> int:
    """Total bytes of a model config's weights under ``quant`` (None = 16-bit everywhere), as
    quantize() writes them: any supported family (MixtralConfig, Qwen3MoeConfig, ...)."""
    return sum(size_breakdown(config, quant).values())


def table1_rows(config=None) -> list[dict]:
    """Our sizes beside the paper's Table 1 for Mixtral-8x7B, all 16 (attention, experts) pairs."""
    if config is None:
        from ..config import mixtral_config
        config = mixtral_config("mixtral-8x7b")
    rows = []
    for (a, e), paper in PAPER_TABLE1_GIB.items():
        q = QuantConfig(a, e)
        ours = estimate_size(config, q) / 2**30
        hqq01 = sum(size_breakdown(config, q, paper_3bit_packing=True).values()) / 2**30
        rows.append(dict(attn=a, experts=e, attn_bpw=bits_per_weight(*q.matrix("attn")),
                         expert_bpw=bits_per_weight(*q.matrix("expert")), ours_gib=ours, paper_gib=paper,
                         diff_pct=100 * (ours - paper) / paper, hqq01_gib=hqq01,
                         hqq01_diff_pct=100 * (hqq01 - paper) / paper))
    return rows


def table1_markdown(config=None) -> str:
    """docs/quantization.md's size table (tests check that the document contains exactly this)."""
    name = lambda b: "FP16" if b == 16 else f"{b}-bit"
    lines = ["| Attn | Experts | attn bits/param | expert bits/param | ours GiB | paper GiB | diff | "
             "ours, 3-bit codes as hqq 0.1 packed them | diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table1_rows(config):
        lines.append(f"| {name(r['attn'])} | {name(r['experts'])} | {r['attn_bpw']:.3f} | {r['expert_bpw']:.3f} | "
                     f"{r['ours_gib']:.2f} | {r['paper_gib']:.2f} | {r['diff_pct']:+.1f}% | "
                     f"{r['hqq01_gib']:.2f} | {r['hqq01_diff_pct']:+.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table1_markdown())
