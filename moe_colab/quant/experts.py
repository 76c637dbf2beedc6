"""A whole model quantized in memory, no offloading: the reference for quality measurements.

    QuantizedExperts        drop-in for transformers' MixtralExperts (layer.mlp.experts): every
                            expert of a layer in one uint8 [E, nbytes] tensor (rows exactly as
                            ExpertStore holds them), computed through the ExpertFormat
    quantize_model_         attention (QuantLinear) + experts (QuantizedExperts) of a model
    model_from_quantized_dir  a directory written by moe_colab.quantize, back as an ordinary
                            transformers model (checks quantize() and the loader API end to end)

The offloading engine (moe_colab.model) computes the same experts from the same buffers; this
module keeps every expert resident, which is what perplexity.py needs on a small model or a big GPU.

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.3 and Table 1.
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters.mixtral import MixtralAdapter as A
from .config import QuantConfig
from .format import attach_quant_linears_, expert_format, quantize_trunk_


class QuantizedExperts(nn.Module):
    """forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], like MixtralExperts."""

    def __init__(self, fmt, buffers: torch.Tensor):
        super().__init__()
        if buffers.dtype != torch.uint8 or buffers.dim() != 2 or buffers.shape[1] != fmt.layout.nbytes:
            raise ValueError(f"expert buffers must be uint8 [num_experts, {fmt.layout.nbytes}], got "
                             f"{buffers.dtype} {list(buffers.shape)}")
        self.format = fmt
        self.num_experts = buffers.shape[0]
        self.register_buffer("packed", buffers)

    @classmethod
    def from_experts(cls, experts: nn.Module, config, qcfg: QuantConfig, device=None):
        """Quantize a transformers MixtralExperts (gate_up_proj [E, 2I, H] = cat(w1, w3), down_proj
        [E, H, I]); hqq runs where the weights are unless ``device`` says otherwise."""
        fmt = expert_format(config, qcfg, experts.down_proj.dtype)
        i = config.intermediate_size
        bufs = torch.zeros(experts.down_proj.shape[0], fmt.layout.nbytes, dtype=torch.uint8,
                           device=experts.down_proj.device)
        with torch.no_grad():
            for e in range(bufs.shape[0]):
                views = fmt.layout.views(bufs[e])
                w13 = experts.gate_up_proj[e]
                for name, w in (("w1", w13[:i]), ("w3", w13[i:]), ("w2", experts.down_proj[e])):
                    fmt.write(views, name, w if device is None else w.to(device))
        return cls(fmt, bufs)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)                 # [n] tokens routed to e
            y = self.format.forward(self.format.layout.views(self.packed[e]), hidden_states[token])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def quantize_model_(model, qcfg: QuantConfig | None, *, device=None):
    """Quantize a transformers Mixtral model in place: attention projections and experts."""
    if qcfg is None:
        return model
    quantize_trunk_(model, qcfg, device=device)
    if qcfg.expert_bits != 16:
        qcfg.validate_for(model.config)
        for layer in A.decoder_layers(model):
            block = A.moe_block(layer)
            block.experts = QuantizedExperts.from_experts(block.experts, model.config, qcfg, device)
    return model


def model_from_quantized_dir(path, *, dtype: torch.dtype = torch.float32, device="cpu", quant=None):
    """A MixtralForCausalLM rebuilt from ``moe_colab.quantize``'s output, every expert resident."""
    from ..convert.manifest import expert_format_for, load_layer_experts, load_trunk_state_dict, model_config, open_quantized

    manifest, qcfg = open_quantized(path, quant)
    config = model_config(manifest)
    model = A.model_class()(config).to(dtype)     # small models: a random init, then overwritten
    attach_quant_linears_(model, qcfg)
    fmt = expert_format_for(manifest, dtype)
    for l, layer in enumerate(A.decoder_layers(model)):
        A.moe_block(layer).experts = QuantizedExperts(fmt, load_layer_experts(path, manifest, l))
    trunk = load_trunk_state_dict(path, manifest)
    trunk = {k: (v.to(dtype) if v.is_floating_point() and not _is_quant_meta(k) else v) for k, v in trunk.items()}
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    missing = [k for k in missing if not k.endswith(".experts.packed")]
    if missing or unexpected:
        raise ValueError(f"trunk of {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _is_quant_meta(key: str) -> bool:
    """fp16 meta-scales/zeros of a QuantLinear keep their dtype (the format fixes it)."""
    return key.rsplit(".", 1)[-1] in ("s_scale", "s_zero", "z_scale", "z_zero")
