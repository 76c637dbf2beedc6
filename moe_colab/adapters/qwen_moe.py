"""Qwen-MoE adapters: Qwen3-MoE (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B) and Qwen2-MoE (Qwen1.5-MoE-A2.7B).

Both: router ``mlp.gate`` (softmax over all E in float32, top-k, optional renormalisation
``norm_topk_prob``, weights cast back to the activation dtype), experts of
``moe_intermediate_size``, per-expert checkpoint keys ``mlp.experts.{e}.{gate,up,down}_proj``.
A decoder layer is MoE iff it is not in ``mlp_only_layers`` and (L + 1) % decoder_sparse_step == 0;
the others hold a dense MLP of ``intermediate_size`` (trunk, never offloaded).

Qwen2-MoE adds a shared expert (``mlp.shared_expert``, width shared_expert_intermediate_size)
gated per token by sigmoid(``mlp.shared_expert_gate`` x), added after the routed sum; it stays on
the device with the trunk.

References: transformers/models/qwen3_moe/modeling_qwen3_moe.py (Qwen3MoeTopKRouter,
Qwen3MoeSparseMoeBlock), transformers/models/qwen2_moe/modeling_qwen2_moe.py (Qwen2MoeSparseMoeBlock).
"""
from __future__ import annotations

import torch

from .base import MoEAdapter


class Qwen3MoeAdapter(MoEAdapter):
    model_type = "qwen3_moe"
    config_name, model_name = "Qwen3MoeConfig", "Qwen3MoeForCausalLM"
    num_experts_attr = "num_experts"
    expert_size_attr = "moe_intermediate_size"
    hf_names = ("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-Coder-30B-A3B-Instruct")

    @classmethod
    def moe_layers(cls, config) -> list[int]:
        dense = set(getattr(config, "mlp_only_layers", None) or [])
        step = getattr(config, "decoder_sparse_step", 1) or 1
        if cls.num_experts(config) <= 0:
            return []
        return [l for l in range(config.num_hidden_layers) if l not in dense and (l + 1) % step == 0]


class Qwen2MoeAdapter(Qwen3MoeAdapter):
    model_type = "qwen2_moe"
    config_name, model_name = "Qwen2MoeConfig", "Qwen2MoeForCausalLM"
    kept_attrs = ("shared_expert", "shared_expert_gate")
    hf_names = ("Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen1.5-MoE-A2.7B-Chat", "Qwen/Qwen2-57B-A14B")

    @classmethod
    def shared_intermediate(cls, config) -> int:
        return config.shared_expert_intermediate_size

    @classmethod
    def combine(cls, block, x, routed):
        # as Qwen2MoeSparseMoeBlock: routed + sigmoid(x . g) * shared(x), in the activation dtype
        shared = block.shared_expert(x)                                          # [T, H]
        return routed + torch.sigmoid(block.shared_expert_gate(x)) * shared
