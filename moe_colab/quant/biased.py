"""A low-bit expert with biases and/or GPT-OSS's clamped SwiGLU, still ONE byte buffer.

    w1., w2., w3.   the low-bit matrices of QuantizedExpertFormat (codes, scales, zeros)
    b13 [2I], b2 [H] the biases in float32 (exact for any source dtype, and the layout does not
                     depend on the dtype a directory is loaded in): 0.3% of a gpt-oss-20b expert

    y = w2 @ glu(w1 @ x + b1, w3 @ x + b3) + b2         (engine/expert_fn.py: ExpertFn)

Used for GPT-OSS (moe_colab/adapters/gpt_oss.py); the other families' experts are plain SwiGLU
and use QuantizedExpertFormat itself.
"""
from __future__ import annotations

import torch

from ..engine.expert_fn import ExpertFn, write_bias
from ..engine.storage import PackedLayout
from .config import QuantConfig
from .format import QuantizedExpertFormat


class BiasedQuantizedFormat(QuantizedExpertFormat):
    def __init__(self, fn: ExpertFn, qcfg: QuantConfig, dtype: torch.dtype = torch.float16, compute=None):
        act = fn.activation() if fn.glu == "swiglu" else None
        super().__init__(fn.hidden, fn.intermediate, qcfg, dtype, act, compute)
        self.fn = fn
        entries = [(s.name, s.shape, s.dtype) for s in self.layout.specs]
        if fn.bias:
            entries += [("b13", (2 * fn.intermediate,), torch.float32), ("b2", (fn.hidden,), torch.float32)]
        self.layout = PackedLayout(entries)

    def matrices(self, views):
        """The low-bit matrices (as QuantizedExpertFormat) plus "bias": {"b13", "b2"} views."""
        mats = super().matrices({k: v for k, v in views.items() if "." in k})
        mats["bias"] = {k: views[k] for k in ("b13", "b2") if k in views}
        return mats

    def write(self, views, name, weight, device=None):
        if not write_bias(views, name, weight, self.intermediate):
            super().write(views, name, weight, device)

    def _forward(self, m, x, trusted):
        # QuantizedExpertFormat.forward calls this (eagerly, or inside a slot's CUDA graph)
        q = (self.bits, self.group_size, self.scale_group)
        linear, i, bias = self.compute.quant_linear, self.intermediate, m["bias"]
        gate = linear(x, m["w1"], *q, self.shapes["w1"], trusted)                 # [T, I]
        up = linear(x, m["w3"], *q, self.shapes["w3"], trusted)                   # [T, I]
        if bias:      # in x's dtype, as transformers adds its 16-bit bias parameters
            gate, up = gate + bias["b13"][:i].to(gate.dtype), up + bias["b13"][i:].to(up.dtype)
        y = linear(self.fn.combine(gate, up, self.act), m["w2"], *q, self.shapes["w2"], trusted)   # [T, H]
        return y + bias["b2"].to(y.dtype) if bias else y
