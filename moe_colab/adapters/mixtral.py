"""The Mixtral adapter: checkpoint names, the MoE block, its router and its expert weights.

Checkpoints on the Hub (and transformers' ``save_pretrained``) use the original layout:

    model.layers.{L}.block_sparse_moe.gate.weight             router   [E, H]
    model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight   gate     [I, H]
    model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight   down     [H, I]
    model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight   up       [I, H]

while transformers >= 5 names the module ``model.layers.{L}.mlp`` (router ``mlp.gate``, experts
fused into ``mlp.experts``). Reference: transformers/models/mixtral/modeling_mixtral.py.
"""
from __future__ import annotations

import re

import torch
from torch import nn

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_V5_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


class MixtralAdapter:
    model_type = "mixtral"
    expert_weight_names = ("w1", "w2", "w3")

    # -- config ---------------------------------------------------------------------------
    @staticmethod
    def config_class():
        from transformers import MixtralConfig
        return MixtralConfig

    @staticmethod
    def model_class():
        from transformers import MixtralForCausalLM
        return MixtralForCausalLM

    @staticmethod
    def num_layers(config) -> int:
        return config.num_hidden_layers

    @staticmethod
    def num_experts(config) -> int:
        return config.num_local_experts

    @staticmethod
    def top_k(config) -> int:
        return config.num_experts_per_tok

    @staticmethod
    def expert_shapes(config) -> dict[str, tuple[int, int]]:
        h, i = config.hidden_size, config.intermediate_size
        return {"w1": (i, h), "w2": (h, i), "w3": (i, h)}

    # -- checkpoint names -------------------------------------------------------------------
    @staticmethod
    def expert_key(layer: int, expert: int, name: str) -> str:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}.weight"

    @staticmethod
    def parse_expert_key(key: str):
        """(layer, expert, 'w1'|'w2'|'w3') for an expert weight, else None."""
        m = _EXPERT_KEY.match(key)
        return (int(m[1]), int(m[2]), m[3]) if m else None

    @staticmethod
    def is_fused_expert_key(key: str) -> bool:
        """transformers-5 style fused experts (a checkpoint saved by a future writer)."""
        return _V5_EXPERT_KEY.match(key) is not None

    @staticmethod
    def trunk_key(key: str) -> str:
        """Checkpoint name of a non-expert tensor -> parameter name in transformers >= 5."""
        return key.replace(".block_sparse_moe.gate.", ".mlp.gate.")

    # -- modules ----------------------------------------------------------------------------
    @staticmethod
    def decoder_layers(model) -> nn.ModuleList:
        return model.model.layers

    @staticmethod
    def moe_block(layer_module) -> nn.Module:
        return layer_module.mlp

    @staticmethod
    def set_moe_block(layer_module, block: nn.Module) -> None:
        layer_module.mlp = block

    @staticmethod
    def router(block) -> nn.Module:
        """The router module; called on [T, H] it returns (logits, top-k weights, top-k indices)."""
        return block.gate

    @staticmethod
    def pre_moe_norm(layer_module) -> nn.Module:
        """The norm whose input is the residual stream just before this layer's MoE block."""
        return layer_module.post_attention_layernorm

    @staticmethod
    def reinit_buffers(model, config, device) -> None:
        """Non-persistent buffers are not in checkpoints: rebuild them on the device."""
        rotary = model.model.rotary_emb
        with torch.device("cpu"):
            model.model.rotary_emb = type(rotary)(config).to(device)

    @staticmethod
    def activation(config):
        from transformers.activations import ACT2FN
        return ACT2FN[config.hidden_act]

    @staticmethod
    def router_probs(router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Softmax router probabilities [T, E] (float32), as the router itself computes them."""
        logits = nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), router.weight)
        return torch.softmax(logits.float(), dim=-1)
