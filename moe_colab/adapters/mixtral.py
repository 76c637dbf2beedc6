"""The Mixtral adapter: checkpoint names, the MoE block, its router and its expert weights.

Checkpoints on the Hub (and transformers' ``save_pretrained``) use the original layout:

    model.layers.{L}.block_sparse_moe.gate.weight             router   [E, H]
    model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight   gate     [I, H]
    model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight   down     [H, I]
    model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight   up       [I, H]

while transformers >= 5 names the module ``model.layers.{L}.mlp`` (router ``mlp.gate``, experts
fused into ``mlp.experts``). Every layer is an MoE layer; no shared experts; softmax top-k
routing with renormalised weights. Reference: transformers/models/mixtral/modeling_mixtral.py.
"""
from __future__ import annotations

import re

from .base import MoEAdapter

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_V5_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


class MixtralAdapter(MoEAdapter):
    model_type = "mixtral"
    config_name, model_name = "MixtralConfig", "MixtralForCausalLM"
    num_experts_attr = "num_local_experts"
    expert_size_attr = "intermediate_size"
    proj_names = {"w1": "w1", "w2": "w2", "w3": "w3"}
    expert_weight_names = ("w1", "w2", "w3")
    hf_names = ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x7B-v0.1")

    @classmethod
    def _expert_re(cls):
        return _EXPERT_KEY

    @classmethod
    def _fused_re(cls):
        return _V5_EXPERT_KEY

    @classmethod
    def expert_key(cls, layer: int, expert: int, name: str) -> str:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}.weight"

    @classmethod
    def trunk_key(cls, key: str) -> str:
        """Checkpoint name of a non-expert tensor -> parameter name in transformers >= 5."""
        return key.replace(".block_sparse_moe.gate.", ".mlp.gate.")
