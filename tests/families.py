"""Tiny random checkpoints of every supported MoE family, written by transformers' save_pretrained.

Each is the family's own class (Qwen3MoeForCausalLM, DeepseekV3ForCausalLM, ...) with random
weights, saved in the layout the Hub serves (per-expert keys; GPT-OSS fused, and MXFP4 as
published), sharded or not; transformers' class loaded back is the oracle the tests compare with.
Routers are sharpened (x ROUTER_SCALE) so that routing, and so caching, depends on the input as
in a trained model; DeepSeek-V3's correction bias is given non-zero values.

    FAMILY_CHECKPOINTS   name -> spec: family, config overrides, shards, layout
    write_family_checkpoint(path, spec)
    reference(path, spec)   transformers' own model, eager experts (ascending-expert sums, as the engine)
"""
from __future__ import annotations

import json

import torch

# The common tiny trunk: vocab 128, hidden 64, 4 heads of 16, 2 key/value heads.
COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
ROUTER_SCALE = 20.0

CLASSES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
}

# name -> (family, config overrides, max_shard_size or None, layout): several shapes per family
# (layer counts, experts, top-k, dense layers, shared experts, routing variants), sharded and not.
FAMILY_CHECKPOINTS = {
    # layer 0 dense (mlp_only_layers), head_dim given as Qwen3-30B-A3B does, renormalised top-k
    "qwen3-L3-E8-k2-dense0-sharded": ("qwen3_moe", dict(
        num_hidden_layers=3, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0]), "40KB", "per_expert"),
    "qwen3-L2-E4-k3-mha": ("qwen3_moe", dict(
        num_hidden_layers=2, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
        num_experts=4, num_experts_per_tok=3, norm_topk_prob=False), None, "per_expert"),
    # transformers-5 fused layout on disk (save_original_format=False)
    "qwen3-L2-E4-k2-fused": ("qwen3_moe", dict(
        num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True), None, "fused"),
    # decoder_sparse_step=2: layers 1 and 3 MoE, 0 and 2 dense; shared expert with its sigmoid gate
    "qwen2-L4-E4-k2-step2-sharded": ("qwen2_moe", dict(
        num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2), "40KB", "per_expert"),
    "qwen2-L2-E8-k2": ("qwen2_moe", dict(
        num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True), None, "per_expert"),
    "olmoe-L2-E8-k2": ("olmoe", dict(
        num_hidden_layers=2, intermediate_size=32, num_experts=8, num_experts_per_tok=2), None, "per_expert"),
    "olmoe-L3-E4-k3-sharded": ("olmoe", dict(
        num_hidden_layers=3, intermediate_size=32, num_experts=4, num_experts_per_tok=3), "30KB", "per_expert"),
    # sparse-mixer: a wide jitter threshold (0.5) gives weights below 1 that vary by token
    "phimoe-L2-E4-jitter05-sharded": ("phimoe", dict(
        num_hidden_layers=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        router_jitter_noise=0.5, input_jitter_noise=0.01), "40KB", "per_expert"),
    "phimoe-L2-E8-biases": ("phimoe", dict(
        num_hidden_layers=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        router_jitter_noise=0.01, attention_bias=True, lm_head_bias=True), None, "per_expert"),
    # V2-Lite's shape: greedy top-k, q_lora_rank None, one dense layer, two shared experts
    "dsv2-L3-E8-k2-greedy": ("deepseek_v2", dict(
        COMMON, **MLA, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None,
        topk_method="greedy", routed_scaling_factor=1.0), None, "per_expert"),
    # V2's routing: group-limited greedy, scaled weights, q_lora
    "dsv2-L3-E8-k3-grouped-sharded": ("deepseek_v2", dict(
        COMMON, **MLA, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0), "40KB",
        "per_expert"),
    # V3: sigmoid + correction bias, group top-2 sums, renormalised x 2.5, two dense layers
    "dsv3-L4-E8-k2-sharded": ("deepseek_v3", dict(
        COMMON, **MLA, num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=2, q_lora_rank=32, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True), "40KB", "per_expert"),
    "dsv3-L2-E4-k2-onegroup": ("deepseek_v3", dict(
        COMMON, **MLA, num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, n_group=1,
        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=False), None, "per_expert"),
    # GPT-OSS: fused bf16-style tensors with biases; sliding window on alternate layers; sinks
    "gptoss-L2-E8-k2": ("gpt_oss", dict(
        num_hidden_layers=2, head_dim=16, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=4), None, "fused"),
    "gptoss-L3-E4-k3-sharded": ("gpt_oss", dict(
        num_hidden_layers=3, head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=3,
        sliding_window=6), "40KB", "fused"),
    # as published: experts in MXFP4 (uint8 blocks and scales), the rest bf16, quantization_config mxfp4
    "gptoss-L2-E4-k2-mxfp4-sharded": ("gpt_oss", dict(
        num_hidden_layers=2, head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=4), 3, "mxfp4"),
}


def family_model(spec, seed: int = 0):
    """(config, the family's transformers model with sharpened random routers)."""
    import transformers
    family, over, _, _ = spec
    cfg_name, model_name = CLASSES[family]
    config = getattr(transformers, cfg_name)(**{**COMMON, **over})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            router = getattr(layer.mlp, "router", None) or getattr(layer.mlp, "gate", None)
            if router is None or not hasattr(router, "weight") or getattr(layer.mlp, "experts", None) is None:
                continue                                   # a dense layer
            if router.weight.abs().max() == 0:             # GPT-OSS/DeepSeek routers start at zero
                router.weight.normal_(0, 0.02)
            router.weight.mul_(ROUTER_SCALE)
            if hasattr(router, "bias") and router.bias is not None:
                router.bias.normal_(0, 0.5)
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.uniform_(-0.1, 0.1)
            experts = layer.mlp.experts
            for name in ("gate_up_proj_bias", "down_proj_bias"):   # GPT-OSS's start at zero
                if hasattr(experts, name):
                    getattr(experts, name).normal_(0, 0.1)
    return config, model


def write_family_checkpoint(path, spec, seed: int = 0):
    family, _, shard, layout = spec
    config, model = family_model(spec, seed)
    if layout == "mxfp4":
        _write_mxfp4(path, model, n_shards=shard)
        return path
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, save_original_format=(layout != "fused"), **kwargs)
    return path


def _write_mxfp4(dst, model, n_shards: int = 1):
    """gpt-oss as published: experts MXFP4 ([E, out, in/32, 16] blocks + [E, out, in/32] scales,
    from the module's [E, in, out]), everything else bf16, quantization_config mxfp4."""
    from pathlib import Path

    from safetensors.torch import save_file

    from moe_colab.adapters import mxfp4
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[k + "_blocks"], tensors[k + "_scales"] = mxfp4.quantize(v.transpose(1, 2))
        else:
            tensors[k] = v.detach().to(torch.bfloat16).contiguous()
    keys = sorted(tensors)
    weight_map, per = {}, -(-len(keys) // n_shards)
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors" if n_shards > 1 else "model.safetensors"
        part = {k: tensors[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    if n_shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    cfg = model.config.to_dict()
    cfg["dtype"] = "bfloat16"
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))


def reference(path, spec, dtype=torch.float32, device="cpu"):
    """transformers' own class on the checkpoint, experts computed eagerly (ascending expert
    order, as the engine adds them)."""
    import transformers
    cls = getattr(transformers, CLASSES[spec[0]][1])
    kw = {}
    if spec[3] == "mxfp4":
        from transformers import Mxfp4Config
        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    model = cls.from_pretrained(path, dtype=dtype, experts_implementation="eager", **kw)
    if spec[3] == "mxfp4":      # transformers < 5.24 dequantizes MXFP4 to bf16 whatever dtype asks
        with torch.no_grad():
            for layer in model.model.layers:
                for p in layer.mlp.experts.parameters():
                    p.data = p.data.to(dtype)
    return model.to(device).eval()
