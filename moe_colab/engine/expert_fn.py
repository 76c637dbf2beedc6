"""What one routed expert computes, for every family, and the dense format of experts with biases.

Every supported family's expert is a gated MLP over three matrices, stored under the names the
engine uses everywhere (storage, quantized directories, the planner):

    w1 gate [I, H]    w3 up [I, H]    w2 down [H, I]        (+ b1 [I], b3 [I], b2 [H] with biases)

    y = w2 @ glu(w1 @ x + b1, w3 @ x + b3) + b2

    glu "swiglu"          act(gate) * up                  Mixtral, Qwen2/3-MoE, OLMoE, PhiMoE, DeepSeek
    glu "clamped_swiglu"  gate' = gate.clamp(max=limit), up' = up.clamp(-limit, limit)
                          (up' + 1) * gate' * sigmoid(alpha * gate')          GPT-OSS

Families without biases and with plain SwiGLU use ``storage.DenseExpertFormat`` and
``quant.format.QuantizedExpertFormat`` unchanged; ``BiasedDenseFormat`` here (and
``quant.biased.BiasedQuantizedFormat``) add the biases and the clamped GLU.

GPT-OSS stores gate_up as one [H, 2I] matrix with gate and up columns interleaved (x @ W); the
adapter de-interleaves and transposes it into w1/w3 on the way in, so every format and kernel
sees the [out, in] orientation. The arithmetic is the same; only the summation order inside a
matmul may differ (fp32: ~1e-7).

References: transformers/models/gpt_oss/modeling_gpt_oss.py (GptOssExperts._apply_gate),
transformers/models/qwen3_moe/modeling_qwen3_moe.py (Qwen3MoeExperts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .storage import DenseExpertFormat, PackedLayout

GLUS = ("swiglu", "clamped_swiglu")


@dataclass(frozen=True)
class ExpertFn:
    hidden: int                 # H
    intermediate: int           # I (one expert's width)
    act: str = "silu"           # the gate's activation (hidden_act) for "swiglu"
    glu: str = "swiglu"
    bias: bool = False          # b1, b3 [I] and b2 [H]
    alpha: float = 1.702        # clamped_swiglu only
    limit: float = 7.0

    def __post_init__(self):
        if self.glu not in GLUS:
            raise ValueError(f"glu must be one of {GLUS}, got {self.glu!r}")

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor of one expert, as readers emit them and formats store them."""
        return ("w1", "w2", "w3") + (("b1", "b2", "b3") if self.bias else ())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        h, i = self.hidden, self.intermediate
        s = {"w1": (i, h), "w2": (h, i), "w3": (i, h)}
        if self.bias:
            s.update(b1=(i,), b2=(h,), b3=(i,))
        return s

    @property
    def plain(self) -> bool:
        """Mixtral's expert: SwiGLU without biases (the original formats handle it)."""
        return self.glu == "swiglu" and not self.bias

    def activation(self):
        from transformers.activations import ACT2FN
        return ACT2FN[self.act]

    def combine(self, gate: torch.Tensor, up: torch.Tensor, act=None) -> torch.Tensor:
        """glu(gate [T, I], up [T, I]) -> [T, I], in the same operations as transformers."""
        if self.glu == "swiglu":
            return (act or self.activation())(gate) * up
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def parameters(self) -> int:
        """Weights (and biases) of one expert."""
        n = 3 * self.hidden * self.intermediate
        return n + (2 * self.intermediate + self.hidden if self.bias else 0)


def write_bias(views, name: str, weight: torch.Tensor, intermediate: int) -> bool:
    """Store expert bias b1, b3 (into "b13") or b2 in place; False if ``name`` is no bias."""
    if name not in ("b1", "b3", "b2"):
        return False
    dst = {"b1": views["b13"][:intermediate], "b3": views["b13"][intermediate:], "b2": views["b2"]}[name]
    if tuple(weight.shape) != tuple(dst.shape):
        raise ValueError(f"expert bias {name} has shape {tuple(weight.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(weight)
    return True


class BiasedDenseFormat(DenseExpertFormat):
    """A 16-bit expert with biases and/or another GLU: w13 [2I, H], w2 [H, I], b13 [2I], b2 [H]."""

    def __init__(self, fn: ExpertFn, dtype: torch.dtype):
        super().__init__(fn.hidden, fn.intermediate, dtype, fn.activation() if fn.glu == "swiglu" else None)
        self.fn = fn
        entries = [("w13", (2 * fn.intermediate, fn.hidden), dtype), ("w2", (fn.hidden, fn.intermediate), dtype)]
        if fn.bias:
            entries += [("b13", (2 * fn.intermediate,), dtype), ("b2", (fn.hidden,), dtype)]
        self.layout = PackedLayout(entries)

    def write(self, views, name, weight):
        if not write_bias(views, name, weight, self.intermediate):
            super().write(views, name, weight)

    def forward(self, views, x):
        gate, up = F.linear(x, views["w13"], views.get("b13")).chunk(2, dim=-1)      # [T, I] each
        return F.linear(self.fn.combine(gate, up, self.act), views["w2"], views.get("b2"))   # [T, H]
