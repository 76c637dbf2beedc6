"""The PhiMoE adapter (microsoft/Phi-3.5-MoE-instruct): 16 experts, sparse-mixer top-2 routing.

What differs from Mixtral, whose checkpoint layout it shares (block_sparse_moe.experts.{e}.w1/w2/w3):

    router      ``mlp.router`` (a PhimoeTopKRouter, an nn.Linear), not ``mlp.gate``: the checkpoint's
                ``block_sparse_moe.gate.weight`` is ``mlp.router.weight`` in transformers >= 5
    routing     sparsemixer in eval: top-1 is the argmax, top-2 the argmax of the rest; each weight
                is a softmax over the logits within 2 * router_jitter_noise (relative) of the pick,
                in the activation dtype, NOT renormalised; always exactly 2 experts whatever
                num_experts_per_tok says
    norms       LayerNorm with bias (the pre-MoE norm too); attention and lm_head have biases

Reference: transformers/models/phimoe/modeling_phimoe.py (sparsemixer, PhimoeSparseMoeBlock).
"""
from __future__ import annotations

import re

from .base import MoEAdapter

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_FUSED_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


class PhimoeAdapter(MoEAdapter):
    model_type = "phimoe"
    config_name, model_name = "PhimoeConfig", "PhimoeForCausalLM"
    router_attr = "router"
    num_experts_attr = "num_local_experts"
    expert_size_attr = "intermediate_size"
    proj_names = {"w1": "w1", "w2": "w2", "w3": "w3"}
    hf_names = ("microsoft/Phi-3.5-MoE-instruct",)

    @classmethod
    def top_k(cls, config) -> int:
        return 2                  # sparsemixer picks two, whatever num_experts_per_tok says

    @classmethod
    def _expert_re(cls):
        return _EXPERT_KEY

    @classmethod
    def _fused_re(cls):
        return _FUSED_KEY

    @classmethod
    def expert_key(cls, layer: int, expert: int, name: str) -> str:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}.weight"

    @classmethod
    def trunk_key(cls, key: str) -> str:
        return key.replace(".block_sparse_moe.gate.weight", ".mlp.router.weight").replace(".block_sparse_moe.", ".mlp.")

    @classmethod
    def dense_intermediate(cls, config) -> int:
        return 0
