"""The GPT-OSS adapter (openai/gpt-oss-20b, gpt-oss-120b).

    router   ``mlp.router`` with a bias: top-k on the logits, then a softmax over those k only
    experts  fused in every checkpoint (no per-expert keys), with biases and a clamped SwiGLU:
                 gate_up_proj [E, H, 2I] (x @ W; gate and up columns INTERLEAVED), gate_up_proj_bias [E, 2I]
                 down_proj    [E, I, H],                                        down_proj_bias    [E, H]
             published as MXFP4: gate_up_proj_blocks/_scales [E, 2I, H/32, (16)], down_proj_blocks/_scales
             [E, H, I/32, (16)] ([out, in] on disk), decoded by adapters/mxfp4.py (why it is converted,
             not kept: see there)
             h = (clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g), g = clamp(gate, max=7)
    block    returns (out, router_scores), a tuple
    trunk    attention with sinks and a bias, sliding window on alternate layers; norms kept in
             float32 under an fp16 load (_keep_in_fp32_modules, as transformers does)

The reader turns the fused tensors into the engine's w1/w3 [I, H], w2 [H, I] and b1/b3 [I], b2 [H]
(engine/expert_fn.py), one expert slice at a time.

Reference: transformers/models/gpt_oss/modeling_gpt_oss.py (GptOssTopKRouter, GptOssExperts,
GptOssMLP), transformers/integrations/mxfp4.py.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..engine.expert_fn import ExpertFn
from . import mxfp4
from .base import ExpertReader, ExpertTensor, MoEAdapter, _check_shape, quant_method

_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(|_bias|_blocks|_scales)$")


class GptOssAdapter(MoEAdapter):
    model_type = "gpt_oss"
    config_name, model_name = "GptOssConfig", "GptOssForCausalLM"
    router_attr = "router"
    num_experts_attr = "num_local_experts"
    expert_size_attr = "intermediate_size"
    hf_names = ("openai/gpt-oss-20b", "openai/gpt-oss-120b")

    @classmethod
    def prepare_config(cls, config):
        if quant_method(config) == "mxfp4":          # the reader decodes the experts itself
            delattr(config, "quantization_config")
        return super().prepare_config(config)

    @classmethod
    def expert_fn(cls, config) -> ExpertFn:
        return ExpertFn(config.hidden_size, config.intermediate_size, glu="clamped_swiglu", bias=True,
                        alpha=float(getattr(config, "swiglu_alpha", 1.702)),
                        limit=float(getattr(config, "swiglu_limit", 7.0)))

    @classmethod
    def dense_intermediate(cls, config) -> int:
        return 0

    @classmethod
    def kv_cache_bytes(cls, config, dtype: torch.dtype, tokens: int, batch: int = 1) -> int:
        # sliding_attention layers keep the last sliding_window - 1 tokens (DynamicSlidingWindowLayer)
        b = torch.empty((), dtype=dtype).element_size()
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        held = sum(min(tokens, window - 1) if t == "sliding_attention" and window else tokens for t in types)
        return 2 * config.num_key_value_heads * config.head_dim * held * batch * b

    @classmethod
    def _expert_re(cls):
        return re.compile(r"(?!)")          # no per-expert keys: matches nothing

    @classmethod
    def _fused_re(cls):
        return _FUSED

    @classmethod
    def expert_key(cls, layer: int, expert: int, name: str) -> str:
        which = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj",
                 "b1": "gate_up_proj_bias", "b3": "gate_up_proj_bias", "b2": "down_proj_bias"}[name]
        return f"model.layers.{layer}.mlp.experts.{which}[{expert}]"

    @classmethod
    def expert_reader(cls, config) -> "GptOssReader":
        return GptOssReader(cls, config)

    @classmethod
    def block_output(cls, out, weights):
        return out, weights                              # GptOssMLP returns (hidden, router_scores)

    @classmethod
    def router_probs(cls, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), router.weight, router.bias)
        return torch.softmax(logits.float(), dim=-1)     # ranks experts as top-k on the logits does


class GptOssReader(ExpertReader):
    """bf16 fused tensors, or MXFP4 blocks + scales (paired, in any order, across shards)."""

    def __init__(self, adapter, config):
        super().__init__(adapter, config)
        self._half: dict[tuple[int, str], dict[str, torch.Tensor]] = {}      # MXFP4 waiting for its pair

    def _expect_fused(self, layer, m, shape):
        E, i, h = self.num_experts, self.intermediate, self.config.hidden_size
        gu = m[2] == "gate_up_proj"
        out, inn = (2 * i, h) if gu else (h, i)
        want = {"": (E, inn, out), "_bias": (E, out), "_blocks": (E, out, inn // 32, 16),
                "_scales": (E, out, inn // 32)}[m[3]]
        _check_shape(shape, want, f"{m[2]}{m[3]}")
        names = (("b1", "b3") if gu else ("b2",)) if m[3] == "_bias" else (("w1", "w3") if gu else ("w2",))
        return [(layer, e, w) for e in range(E) for w in names]

    def feed(self, name: str, tensor: torch.Tensor) -> list[ExpertTensor] | None:
        m = self._fused.match(name)
        if not m:
            return None
        layer, which, suffix = self.moe_layer(int(m[1])), m[2], m[3]
        E, i = self.num_experts, self.intermediate
        if tensor.shape[0] != E:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}: expected {E} experts first")
        if suffix == "":                 # [E, in, out] as the module holds it: transpose to [out, in]
            if which == "gate_up_proj":
                items = [it for e in range(E) for it in ((layer, e, "w1", tensor[e][:, 0::2].t()),
                                                         (layer, e, "w3", tensor[e][:, 1::2].t()))]
            else:
                items = [(layer, e, "w2", tensor[e].t()) for e in range(E)]
        elif suffix == "_bias":
            if which == "gate_up_proj":
                items = [it for e in range(E) for it in ((layer, e, "b1", tensor[e, 0::2]),
                                                         (layer, e, "b3", tensor[e, 1::2]))]
            else:
                items = [(layer, e, "b2", tensor[e]) for e in range(E)]
        else:                            # MXFP4, [E, out, in] on disk: wait for the other half
            half = self._half.setdefault((layer, which), {})
            half[suffix] = tensor
            if len(half) < 2:
                return []
            del self._half[(layer, which)]
            items = []
            for e in range(E):           # decode one expert at a time: float32 [out, in]
                w = mxfp4.dequantize(half["_blocks"][e], half["_scales"][e])
                if which == "gate_up_proj":
                    if w.shape[0] != 2 * i:
                        raise ValueError(f"{name}: {w.shape[0]} rows, expected 2 x {i}")
                    items += [(layer, e, "w1", w[0::2]), (layer, e, "w3", w[1::2])]
                else:
                    items.append((layer, e, "w2", w))
        return self._emit(items)

    def missing(self):
        waiting = [f"MXFP4 {which} of MoE layer {l} without its {'scales' if '_blocks' in h else 'blocks'}"
                   for (l, which), h in self._half.items()]
        if waiting:
            raise ValueError("; ".join(waiting))
        return super().missing()
