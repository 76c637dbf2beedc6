"""MoEAdapter: everything the engine asks a model family, with the defaults most families share.

The engine (engine/build.py, engine/moe_block.py, engine/prefetch.py), the loader, the writer of
quantized directories and the planner never name a family: they call these hooks. A family's
module (qwen3_moe.py, deepseek.py, ...) subclasses MoEAdapter and overrides what differs.
docs/adapters.md is the checklist for adding one.

Layers. ``moe_layers(config)`` lists the decoder layers whose MLP is a routed MoE block; the
engine numbers them 0..num_layers-1 ("MoE layer" i is decoder layer moe_layers[i]), so the store,
the cache, routing traces and quantized directories have one row per MoE layer. Dense layers
and shared experts stay in the trunk, on the device, never offloaded.

Checkpoints. ``expert_reader(config)`` turns checkpoint tensors into expert matrices under the
engine's names (w1 gate [I, H], w3 up [I, H], w2 down [H, I], biases b1/b3/b2; see
engine/expert_fn.py), whatever the layout on disk:

    per expert   model.layers.{L}.mlp.experts.{e}.gate_proj.weight ...  (what save_pretrained writes)
    fused        model.layers.{L}.mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]
                 (transformers >= 5 modules, save_pretrained(save_original_format=False))

Everything else is "trunk": ``trunk_key`` gives its parameter name in transformers >= 5 (None:
a tensor transformers itself ignores).

Blocks. The offloaded block (engine/moe_block.py) keeps the original router and the modules of
``kept_modules`` (shared experts) under their original names, so trunk names, hooks and
``output_router_logits`` behave as in transformers; ``combine`` adds what the family adds to the
routed sum, ``block_output`` returns what the family's block returns.

Every method is a classmethod: ``Adapter.moe_block(layer)`` works without an instance.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..engine.expert_fn import ExpertFn

# (MoE layer, expert, engine name, tensor) for one expert matrix or bias
ExpertTensor = tuple[int, int, str, torch.Tensor]


class MoEAdapter:
    model_type = ""
    config_name = ""                  # transformers class names
    model_name = ""
    router_attr = "gate"              # the router inside the block (layer.mlp.<router_attr>)
    kept_attrs: tuple[str, ...] = ()  # other block modules kept on the device (shared experts)
    num_experts_attr = "num_experts"
    expert_size_attr = "moe_intermediate_size"
    # per-expert checkpoint names -> engine names
    proj_names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    expert_prefix = "mlp.experts"     # after "model.layers.{L}."
    hf_names: tuple[str, ...] = ()    # published checkpoints (docs, scaling, notebooks)

    # -- config ---------------------------------------------------------------------------
    @classmethod
    def config_class(cls):
        import transformers
        return getattr(transformers, cls.config_name)

    @classmethod
    def model_class(cls):
        import transformers
        return getattr(transformers, cls.model_name)

    @classmethod
    def prepare_config(cls, config):
        """Check (and adjust) a config read from a checkpoint before the model is built; returns
        it. Quantized checkpoints (GPTQ, AWQ, FP8, ...) are refused: the loader reads 16-bit
        weights (an adapter that reads one such format, GPT-OSS's MXFP4, overrides this)."""
        method = quant_method(config)
        if method is not None:
            raise ValueError(f"this {cls.model_type} checkpoint is quantized ({method}); moe_colab reads "
                             f"16-bit checkpoints (load the original weights, or serve this one with "
                             f"vLLM/SGLang: docs/scaling.md)")
        return config

    @classmethod
    def num_experts(cls, config) -> int:
        return getattr(config, cls.num_experts_attr)

    @classmethod
    def top_k(cls, config) -> int:
        """Experts per token: the width of the router's index output."""
        return config.num_experts_per_tok

    @classmethod
    def expert_size(cls, config) -> int:
        """I, one routed expert's intermediate width."""
        return getattr(config, cls.expert_size_attr)

    @classmethod
    def moe_layers(cls, config) -> list[int]:
        """Decoder layers whose MLP is a routed MoE block (default: all)."""
        return list(range(config.num_hidden_layers))

    @classmethod
    def num_layers(cls, config) -> int:
        """MoE layers: the engine's (store, cache, trace) layer count."""
        return len(cls.moe_layers(config))

    @classmethod
    def expert_fn(cls, config) -> ExpertFn:
        return ExpertFn(config.hidden_size, cls.expert_size(config), config.hidden_act)

    @classmethod
    def expert_shapes(cls, config) -> dict[str, tuple[int, ...]]:
        return cls.expert_fn(config).shapes

    @classmethod
    def activation(cls, config):
        """The expert gate's activation function (a callable)."""
        return cls.expert_fn(config).activation()

    @classmethod
    def shared_intermediate(cls, config) -> int:
        """Width of the block's always-on MLP (shared experts), 0 if none; for the planner."""
        return 0

    @classmethod
    def dense_intermediate(cls, config) -> int:
        """Width of the dense layers' MLP, 0 if none; for the planner."""
        return config.intermediate_size if len(cls.moe_layers(config)) < config.num_hidden_layers else 0

    @classmethod
    def attention_projections(cls, config) -> tuple[str, ...]:
        """Linear layers of ``layer.self_attn`` that a QuantConfig's attention bits apply to."""
        return ("q_proj", "k_proj", "v_proj", "o_proj")

    @classmethod
    def quant_inputs(cls, config) -> dict[str, dict[str, int]]:
        """Input width of every quantized matrix, by part, for QuantConfig.validate_for."""
        h, heads = config.hidden_size, config.num_attention_heads
        hd = getattr(config, "head_dim", None) or h // heads
        i = cls.expert_size(config)
        return {"attn": {"q/k/v_proj (hidden_size)": h, "o_proj (heads * head_dim)": heads * hd},
                "expert": {"w1/w3 (hidden_size)": h, "w2 (expert intermediate size)": i}}

    @classmethod
    def attention_temporaries(cls, config) -> int:
        """Values per token that one attention layer's forward holds at once (x, norm, q, k, v,
        attention output, o): the planner's workspace estimate."""
        h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        hd = getattr(config, "head_dim", None) or h // heads
        return 4 * h + 2 * kv * hd + 2 * heads * hd

    @classmethod
    def kv_cache_bytes(cls, config, dtype: torch.dtype, tokens: int, batch: int = 1) -> int:
        """Bytes of transformers' KV cache after ``tokens`` tokens (GQA: keys and values per layer)."""
        b = torch.empty((), dtype=dtype).element_size()
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * config.num_key_value_heads * hd * tokens * batch * b

    # -- checkpoint names -------------------------------------------------------------------
    @classmethod
    def _expert_re(cls):
        names = "|".join(map(re.escape, cls.proj_names))
        return re.compile(rf"^model\.layers\.(\d+)\.{re.escape(cls.expert_prefix)}\.(\d+)\.({names})\.weight$")

    @classmethod
    def _fused_re(cls):
        return re.compile(rf"^model\.layers\.(\d+)\.{re.escape(cls.expert_prefix)}\.(gate_up_proj|down_proj)$")

    @classmethod
    def expert_key(cls, layer: int, expert: int, name: str) -> str:
        """Checkpoint name of one expert matrix (decoder layer, expert, engine name)."""
        proj = {v: k for k, v in cls.proj_names.items()}.get(name, name)
        return f"model.layers.{layer}.{cls.expert_prefix}.{expert}.{proj}.weight"

    @classmethod
    def parse_expert_key(cls, key: str):
        """(decoder layer, expert, engine name) for a per-expert matrix, else None."""
        m = cls._expert_re().match(key)
        return (int(m[1]), int(m[2]), cls.proj_names[m[3]]) if m else None

    @classmethod
    def is_fused_expert_key(cls, key: str) -> bool:
        return cls._fused_re().match(key) is not None

    @classmethod
    def trunk_key(cls, key: str) -> str | None:
        """Checkpoint name of a non-expert tensor -> parameter name in transformers >= 5."""
        return key

    @classmethod
    def expert_reader(cls, config) -> "ExpertReader":
        return ExpertReader(cls, config)

    # -- modules ----------------------------------------------------------------------------
    @classmethod
    def decoder_layers(cls, model) -> nn.ModuleList:
        return model.model.layers

    @classmethod
    def moe_decoder_layers(cls, model) -> list[nn.Module]:
        """The decoder layers holding MoE blocks, in MoE-layer order."""
        layers = cls.decoder_layers(model)
        return [layers[l] for l in cls.moe_layers(model.config)]

    @classmethod
    def moe_block(cls, layer_module) -> nn.Module:
        return layer_module.mlp

    @classmethod
    def set_moe_block(cls, layer_module, block: nn.Module) -> None:
        layer_module.mlp = block

    @classmethod
    def router(cls, block) -> nn.Module:
        """The router module; called on [T, H] it returns (logits, top-k weights, top-k indices)."""
        return getattr(block, cls.router_attr)

    @classmethod
    def kept_modules(cls, block) -> dict[str, nn.Module]:
        """Modules of the original block the offloaded block keeps, by name: the router first."""
        return {cls.router_attr: cls.router(block), **{n: getattr(block, n) for n in cls.kept_attrs}}

    @classmethod
    def combine(cls, block, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """The block's output [T, H] from its input x [T, H] and the routed experts' sum."""
        return routed

    @classmethod
    def block_output(cls, out: torch.Tensor, weights: torch.Tensor):
        """What the family's block returns (out [B, S, H]; weights [T, k] the router's)."""
        return out

    @classmethod
    def pre_moe_norm(cls, layer_module) -> nn.Module:
        """The norm whose input is the residual stream just before this layer's MoE block."""
        return layer_module.post_attention_layernorm

    @classmethod
    def reinit_buffers(cls, model, config, device) -> None:
        """Non-persistent buffers are not in checkpoints: rebuild them on the device."""
        rotary = model.model.rotary_emb
        with torch.device("cpu"):
            model.model.rotary_emb = type(rotary)(config).to(device)

    @classmethod
    def router_probs(cls, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Scores [T, E] (float32) that rank experts as the router does: for a guess of the
        next layer's experts, without calling the router module (its hooks record routing)."""
        logits = nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), router.weight)
        return torch.softmax(logits.float(), dim=-1)


def _check_shape(shape, want, what: str) -> None:
    if tuple(shape) != tuple(want):
        raise ValueError(f"{what} has shape {list(shape)}, config.json needs {list(want)}")


def quant_method(config) -> str | None:
    """The checkpoint's quantization_config.quant_method, None when it has none."""
    q = getattr(config, "quantization_config", None)
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(method or q)


class ExpertReader:
    """Checkpoint tensors -> expert tensors under engine names, for one config.

        reader = adapter.expert_reader(config)
        for name, tensor in checkpoint:
            out = reader.feed(name, tensor)      # None: a trunk tensor
            for moe_layer, expert, w, t in out: ...
        reader.check_complete()                  # every expert of every MoE layer, every name

    Handles the per-expert and the fused layouts; families with others (GPT-OSS's interleaved
    and MXFP4 tensors) subclass it. A tensor of a dense layer is never an expert tensor.
    """

    def __init__(self, adapter: type[MoEAdapter], config):
        self.adapter, self.config = adapter, config
        self.moe_index = {l: i for i, l in enumerate(adapter.moe_layers(config))}
        self.num_experts = adapter.num_experts(config)
        self.names = adapter.expert_fn(config).names
        self.intermediate = adapter.expert_size(config)
        self.emitted: set[tuple[int, int, str]] = set()
        self._expert, self._fused = adapter._expert_re(), adapter._fused_re()

    def moe_layer(self, decoder_layer: int) -> int:
        if decoder_layer not in self.moe_index:
            raise ValueError(f"expert tensor of decoder layer {decoder_layer}, which the config makes dense "
                             f"(MoE layers: {sorted(self.moe_index)})")
        return self.moe_index[decoder_layer]

    def layer_of(self, name: str) -> int | None:
        """The MoE layer an expert tensor belongs to, from its name alone (None: not an expert
        tensor). Lets a writer order and skip tensors before reading them."""
        m = self._expert.match(name) or self._fused.match(name)
        return self.moe_layer(int(m[1])) if m else None

    def trunk_name(self, name: str) -> str | None:
        """The transformers parameter a non-expert tensor fills, or None for a tensor transformers
        itself ignores when loading (``_keys_to_ignore_on_load_unexpected``: DeepSeek-V3's
        multi-token-prediction layer)."""
        for pattern in getattr(self.adapter.model_class(), "_keys_to_ignore_on_load_unexpected", None) or ():
            if re.search(pattern, name):
                return None
        return self.adapter.trunk_key(name)

    def expect(self, name: str, shape: tuple[int, ...]) -> list[tuple[int, int, str]] | None:
        """From a shard header alone: the (MoE layer, expert, name) entries this tensor will give,
        None if it is not an expert tensor; ValueError if its layer, expert or shape does not fit
        the config."""
        shapes = self.adapter.expert_shapes(self.config)
        m = self._expert.match(name)
        if m:
            layer, e, w = self.moe_layer(int(m[1])), int(m[2]), self.adapter.proj_names[m[3]]
            if not 0 <= e < self.num_experts:
                raise ValueError(f"is expert {e} of layer {m[1]}, but config.json has {self.num_experts} "
                                 f"experts per layer")
            _check_shape(shape, shapes[w], f"(layer {m[1]}, expert {e}, {w})")
            return [(layer, e, w)]
        m = self._fused.match(name)
        if m:
            layer = self.moe_layer(int(m[1]))
            return self._expect_fused(layer, m, tuple(shape))
        return None

    def _expect_fused(self, layer, m, shape) -> list[tuple[int, int, str]]:
        E, i, h = self.num_experts, self.intermediate, self.config.hidden_size
        if m[2] == "gate_up_proj":
            _check_shape(shape, (E, 2 * i, h), "fused gate_up_proj [experts, 2 x intermediate, hidden]")
            return [(layer, e, w) for e in range(E) for w in ("w1", "w3")]
        _check_shape(shape, (E, h, i), "fused down_proj [experts, hidden, intermediate]")
        return [(layer, e, "w2") for e in range(E)]

    def feed(self, name: str, tensor: torch.Tensor) -> list[ExpertTensor] | None:
        m = self._expert.match(name)
        if m:
            layer, e = self.moe_layer(int(m[1])), int(m[2])
            return self._emit([(layer, e, self.adapter.proj_names[m[3]], tensor)])
        m = self._fused.match(name)
        if m:
            return self._emit(self.split_fused(self.moe_layer(int(m[1])), m[2], tensor, name))
        return None

    def split_fused(self, layer: int, which: str, t: torch.Tensor, name: str) -> list[ExpertTensor]:
        """transformers-5 fused experts: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""
        E, i = self.num_experts, self.intermediate
        if t.shape[0] != E:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected {E} experts first")
        if which == "gate_up_proj":
            return [item for e in range(E) for item in ((layer, e, "w1", t[e, :i]), (layer, e, "w3", t[e, i:]))]
        return [(layer, e, "w2", t[e]) for e in range(E)]

    def _emit(self, items: list[ExpertTensor]) -> list[ExpertTensor]:
        for layer, e, w, _ in items:
            if not 0 <= e < self.num_experts:
                raise ValueError(f"expert {e} of MoE layer {layer} is outside 0..{self.num_experts - 1}")
            self.emitted.add((layer, e, w))
        return items

    def missing(self) -> list[tuple[int, int, str]]:
        """(decoder layer, expert, name) of every expert tensor not seen yet."""
        moe = self.adapter.moe_layers(self.config)
        return [(moe[l], e, w) for l in range(len(moe)) for e in range(self.num_experts) for w in self.names
                if (l, e, w) not in self.emitted]

    def check_complete(self, where: str = "") -> None:
        missing = self.missing()
        if missing:
            names = [self.adapter.expert_key(*m) for m in missing[:3]]
            raise ValueError(f"{where}expert weights missing, e.g. {names} ({len(missing)} in all)")
