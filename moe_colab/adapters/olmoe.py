"""The OLMoE adapter (allenai/OLMoE-1B-7B): 64 experts, top-8, every layer MoE, no shared expert.

The router and experts are Qwen3's (softmax over E in float32, top-k, ``norm_topk_prob`` False
in the published model); the one difference that matters here: the expert width is
``intermediate_size`` (there is no moe_intermediate_size). Attention normalises q and k over the
whole projection (q_norm [H], k_norm [kv * head_dim]); that stays in the trunk.
Reference: transformers/models/olmoe/modeling_olmoe.py.
"""
from __future__ import annotations

from .base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    model_type = "olmoe"
    config_name, model_name = "OlmoeConfig", "OlmoeForCausalLM"
    num_experts_attr = "num_experts"
    expert_size_attr = "intermediate_size"
    hf_names = ("allenai/OLMoE-1B-7B-0924", "allenai/OLMoE-1B-7B-0924-Instruct")

    @classmethod
    def dense_intermediate(cls, config) -> int:
        return 0
