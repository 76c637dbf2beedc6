"""DeepSeek adapters: DeepSeek-V2 (V2-Lite, V2) and DeepSeek-V3 (V3, R1; Kimi-K2-like shapes).

Both: the first ``first_k_dense_replace`` decoder layers are dense MLPs (V2-Lite: 1, V3: 3);
every other layer's block ``mlp`` holds

    gate            a float32 router (transformers keeps ``gate.weight`` in float32 under a 16-bit
                    load, _keep_in_fp32_modules_strict; so does the engine: build_trunk)
    experts         n_routed_experts of moe_intermediate_size, offloaded
    shared_experts  one MLP of moe_intermediate_size x n_shared_experts, always on the device,
                    added to the routed sum (plain add, same normed input)

and the routing weights stay float32 (an expert's 16-bit output times a float32 weight is
float32, cast once when added, as transformers' eager experts do).

    V2  softmax over E (float32), top-k greedy or "group_limited_greedy" (keep the topk_group
        groups with the best expert, zero the rest), no renormalisation (``norm_topk_prob`` is
        ignored), times routed_scaling_factor
    V3  sigmoid scores; experts chosen by sigmoid + e_score_correction_bias (a float32 buffer of
        the router, in the checkpoint) with groups ranked by the sum of their top-2; weights are
        the sigmoid without the bias, renormalised if norm_topk_prob, times routed_scaling_factor

Attention is MLA and stays in the trunk (its KV cache holds the compressed latent: kv_lora_rank +
qk_rope_head_dim values per token and layer). The published V3/R1 checkpoints are FP8 and carry a
multi-token-prediction layer (model.layers.61, ignored as transformers ignores it); FP8 is refused.

References: transformers/models/deepseek_v2/modeling_deepseek_v2.py (DeepseekV2TopkRouter,
DeepseekV2Moe), transformers/models/deepseek_v3/modeling_deepseek_v3.py (DeepseekV3TopkRouter).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import MoEAdapter


class DeepseekV2Adapter(MoEAdapter):
    model_type = "deepseek_v2"
    config_name, model_name = "DeepseekV2Config", "DeepseekV2ForCausalLM"
    kept_attrs = ("shared_experts",)
    num_experts_attr = "n_routed_experts"
    expert_size_attr = "moe_intermediate_size"
    hf_names = ("deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V2-Lite-Chat")

    @classmethod
    def moe_layers(cls, config) -> list[int]:
        return list(range(config.first_k_dense_replace or 0, config.num_hidden_layers))

    @classmethod
    def top_k(cls, config) -> int:
        if config.num_experts_per_tok is None:     # the config class has no default; the router needs one
            raise ValueError("config.num_experts_per_tok is None: DeepSeek's router needs the number of "
                             "experts per token")
        return config.num_experts_per_tok

    @classmethod
    def shared_intermediate(cls, config) -> int:
        return config.moe_intermediate_size * (config.n_shared_experts or 0)

    @classmethod
    def combine(cls, block, x, routed):
        return routed + block.shared_experts(x)

    @classmethod
    def attention_projections(cls, config) -> tuple[str, ...]:
        q = ("q_proj",) if config.q_lora_rank is None else ("q_a_proj", "q_b_proj")
        return q + ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")

    @classmethod
    def quant_inputs(cls, config) -> dict[str, dict[str, int]]:
        h = config.hidden_size
        attn = {"q/kv_a projections (hidden_size)": h, "kv_b_proj (kv_lora_rank)": config.kv_lora_rank,
                "o_proj (heads * v_head_dim)": config.num_attention_heads * config.v_head_dim}
        if config.q_lora_rank is not None:
            attn["q_b_proj (q_lora_rank)"] = config.q_lora_rank
        return {"attn": attn, "expert": {"w1/w3 (hidden_size)": h,
                                         "w2 (moe_intermediate_size)": config.moe_intermediate_size}}

    @classmethod
    def attention_temporaries(cls, config) -> int:
        # MLA expands the cached latent into every head's keys and values on each step
        heads, h = config.num_attention_heads, config.hidden_size
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        return 4 * h + heads * (2 * qk + 2 * config.v_head_dim) + config.kv_lora_rank + config.qk_rope_head_dim

    @classmethod
    def kv_cache_bytes(cls, config, dtype: torch.dtype, tokens: int, batch: int = 1) -> int:
        # the compressed latent (k_nope: kv_lora_rank) and the shared rotary key (qk_rope_head_dim)
        b = torch.empty((), dtype=dtype).element_size()
        per_token = config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_hidden_layers * per_token * tokens * batch * b

    @classmethod
    def router_probs(cls, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # the router's own scores, experts outside the chosen groups zeroed (group_limited_greedy)
        logits = nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]).float(), router.weight.float())
        scores = torch.softmax(logits, dim=-1)                                          # [T, E]
        if router.topk_method == "group_limited_greedy":
            scores = _keep_groups(scores, scores.view(scores.shape[0], router.num_group, -1).max(-1).values,
                                  router.topk_group)
        return scores


def _keep_groups(scores: torch.Tensor, group_scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores [T, E] with every expert outside the ``keep`` best groups (group_scores [T, G]) zeroed."""
    T, G = group_scores.shape
    mask = torch.zeros_like(group_scores).scatter_(1, torch.topk(group_scores, keep, dim=-1).indices, 1.0)
    return scores * mask.repeat_interleave(scores.shape[1] // G, dim=1)


class DeepseekV3Adapter(DeepseekV2Adapter):
    model_type = "deepseek_v3"
    config_name, model_name = "DeepseekV3Config", "DeepseekV3ForCausalLM"
    hf_names = ("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1", "moonshotai/Kimi-K2-Instruct")

    @classmethod
    def attention_projections(cls, config) -> tuple[str, ...]:
        return DeepseekV2Adapter.attention_projections(config)

    @classmethod
    def router_probs(cls, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # experts are chosen by sigmoid + correction bias: rank by that, scaled to sum to 1 so the
        # cache's "probability" rules (prefetch_min_share, no more likely than the victim) still read
        logits = nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]).float(), router.weight.float())
        choice = torch.sigmoid(logits) + router.e_score_correction_bias.float()              # [T, E]
        groups = choice.view(choice.shape[0], router.num_group, -1).topk(2, dim=-1).values.sum(-1)   # [T, G]
        score = _keep_groups(choice.clamp(min=1e-6), groups, router.topk_group)
        return score / score.sum(dim=-1, keepdim=True)
