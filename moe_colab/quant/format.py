"""Quantized modules: an expert as ONE byte buffer, and low-bit attention projections.

    QuantizedExpertFormat   the ExpertFormat (moe_colab/engine/storage.py) of a low-bit expert: codes,
                            scales and zeros of w1, w2, w3 under "w1.", "w2.", "w3." in one
                            PackedLayout, so moving an expert is still a single copy
    QuantLinear             nn.Linear replacement holding the same named tensors as buffers
    quantize_trunk_         swap a model's attention projections for QuantLinear (q/k/v/o, or
                            the family's own: adapter.attention_projections)

The matmuls go through the model's ``ModelCompute`` (moe_colab/engine/compute.py): the fused
Triton kernels on CUDA, the reference ``packing.quant_linear_torch`` on CPU or after a failure
of Triton on this model. ``bind_compute_`` hands a loaded model's ModelCompute to its modules.

Reference: Eliseev & Mazur, arXiv 2312.17238, sections 3.2-3.3.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.compute import ModelCompute
from ..engine.graphs import OneTokenGraphs
from ..engine.storage import DenseExpertFormat, PackedLayout, Views
from .config import QuantConfig
from .matrix import quantize_matrix
from .packing import tensor_shapes

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


class QuantizedExpertFormat:
    """One expert = w1 [I, H], w2 [H, I], w3 [I, H] in the low-bit format, in one buffer."""

    names = ("w1", "w2", "w3")

    def __init__(self, hidden: int, intermediate: int, qcfg: QuantConfig, dtype: torch.dtype = torch.float16,
                 act=F.silu, compute: ModelCompute | None = None):
        bits, group_size, scale_group = qcfg.matrix("expert")
        if bits == 16:
            raise ValueError("expert_bits=16: experts are not quantized; use storage.DenseExpertFormat "
                             "(or quant.format.expert_format, which picks the right one)")
        self.hidden, self.intermediate, self.qcfg, self.dtype, self.act = hidden, intermediate, qcfg, dtype, act
        self.compute = compute if compute is not None else ModelCompute()
        self.bits, self.group_size, self.scale_group = bits, group_size, scale_group
        self.shapes = {"w1": (intermediate, hidden), "w2": (hidden, intermediate), "w3": (intermediate, hidden)}
        entries = []
        for name in self.names:
            for t, (shape, dt) in tensor_shapes(bits, self.shapes[name], group_size, scale_group).items():
                entries.append((f"{name}.{t}", shape, dt))
        self.layout = PackedLayout(entries)

    def matrices(self, views: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """{"w1": {"q2": ..., "s_q": ...}, ...} from the flat views of one buffer."""
        mats = {n: {} for n in self.names}
        for key, t in views.items():
            name, _, tensor = key.partition(".")
            mats[name][tensor] = t
        return mats

    def write(self, views, name, weight, device=None):
        if name not in self.shapes:
            raise KeyError(f"unknown expert matrix {name!r}; expected one of {self.names}")
        if tuple(weight.shape) != self.shapes[name]:
            raise ValueError(f"expert weight {name} has shape {tuple(weight.shape)}, expected {self.shapes[name]}")
        mat = quantize_matrix(weight, self.bits, self.group_size, self.scale_group, device)
        for t, value in mat.items():
            views[f"{name}.{t}"].copy_(value)

    def forward(self, views, x):
        # A cache slot passes the same views every time: split and check them once (the per-call
        # checks and dict building cost more host time than a decode kernel takes), and replay
        # the slot's CUDA graphs for one-token calls where they are on (moe_colab.engine.graphs). That
        # state is kept on the views (storage.Views), so it goes when the slot goes.
        state = getattr(views, "cached", None)
        if state is None:
            m = self.matrices(views)
            if isinstance(views, Views):
                views.cached = (m, OneTokenGraphs(self.compute))
            return self._forward(m, x, trusted=False)
        m, graphs = state
        return graphs.run("expert", lambda xs: self._forward(m, xs, trusted=True), x)

    def _forward(self, m, x, trusted):
        q = (self.bits, self.group_size, self.scale_group)
        linear = self.compute.quant_linear
        gate = linear(x, m["w1"], *q, self.shapes["w1"], trusted)                 # [T, I]
        up = linear(x, m["w3"], *q, self.shapes["w3"], trusted)                   # [T, I]
        return linear(self.act(gate) * up, m["w2"], *q, self.shapes["w2"], trusted)   # [T, H]


def expert_format(config, qcfg: QuantConfig | None, dtype: torch.dtype = torch.float16, act=None,
                  compute: ModelCompute | None = None):
    """The ExpertFormat for a model config (any supported family: its adapter says what one
    expert is, engine/expert_fn.py) and scheme: dense for None or expert_bits=16."""
    from ..adapters import adapter_for
    fn = adapter_for(config).expert_fn(config)
    dense = qcfg is None or qcfg.expert_bits == 16
    if not fn.plain:                  # biases or another GLU (GPT-OSS)
        if dense:
            from ..engine.expert_fn import BiasedDenseFormat
            return BiasedDenseFormat(fn, dtype)
        from .biased import BiasedQuantizedFormat
        return BiasedQuantizedFormat(fn, qcfg, dtype, compute)
    act = act if act is not None else fn.activation()
    if dense:
        return DenseExpertFormat(fn.hidden, fn.intermediate, dtype, act)
    return QuantizedExpertFormat(fn.hidden, fn.intermediate, qcfg, dtype, act, compute)


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W stored in the low-bit format (buffers q4|q2|q1, s_*, z_*)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, scale_group: int,
                 bias: bool = False, device=None, dtype: torch.dtype = torch.float16,
                 compute: ModelCompute | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.scale_group = bits, group_size, scale_group
        for name, (shape, dt) in tensor_shapes(bits, (out_features, in_features), group_size, scale_group).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._checked, self._checked_dtype = None, None
        self.bind(compute if compute is not None else ModelCompute())

    def bind(self, compute: ModelCompute) -> None:
        """Run through ``compute`` (a loaded model's shared ModelCompute) from now on."""
        self.compute = compute
        self._graphs = OneTokenGraphs(compute)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, scale_group: int, device=None):
        """Quantize an nn.Linear (hqq + meta-quantization); the result sits on linear's device."""
        W = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, bits, group_size, scale_group,
                bias=linear.bias is not None, device=W.device, dtype=W.dtype)
        for name, value in quantize_matrix(W, bits, group_size, scale_group, device).items():
            getattr(q, name).copy_(value)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def matrix(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers(recurse=False) if name != "bias"}

    def forward(self, x):
        lead = x.shape[:-1]
        mat = self.matrix()
        args = (self.bits, self.group_size, self.scale_group, (self.out_features, self.in_features))
        x2 = x.reshape(-1, self.in_features)                                      # [T, in]
        key = tuple((t.data_ptr(), t.shape) for t in mat.values())   # checked once per set of buffers
        if key == self._checked and x.dtype == self._checked_dtype:
            # Known buffers: one-token calls replay a CUDA graph from the second on (moe_colab.engine.graphs).
            y = self._graphs.run(key, lambda xs: self.compute.quant_linear(xs, mat, *args, trusted=True), x2)
        else:
            y = self.compute.quant_linear(x2, mat, *args)                         # [T, out]
            self._checked, self._checked_dtype = key, x.dtype
            self._graphs.clear()                 # graphs of replaced buffers would keep them alive
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, scale_group={self.scale_group}")


def _attention_modules(model):
    """(self_attn, names of its projections that attention bits apply to), per decoder layer."""
    from ..adapters import adapter_for
    adapter = adapter_for(model.config)
    names = adapter.attention_projections(model.config)
    for layer in adapter.decoder_layers(model):
        yield layer.self_attn, names


def quantize_trunk_(model, qcfg: QuantConfig | None, *, device=None):
    """Replace the attention q/k/v/o projections of a transformers Mixtral model by QuantLinear,
    in place (quantizing their weights); a no-op for None or attn_bits=16. Returns the model."""
    if qcfg is None or qcfg.attn_bits == 16:
        return model
    qcfg.validate_for(model.config)
    bits, g, sg = qcfg.matrix("attn")
    for attn, names in _attention_modules(model):
        for name in names:
            lin = getattr(attn, name)
            if isinstance(lin, QuantLinear):
                raise ValueError(f"{name} is already quantized; quantize_trunk_ runs once per model")
            setattr(attn, name, QuantLinear.from_linear(lin, bits, g, sg, device))
    return model


def attach_quant_linears_(model, qcfg: QuantConfig | None, *, device=None):
    """Install EMPTY QuantLinear shells for the attention projections (to be filled by
    load_state_dict from a quantized directory's trunk). A no-op for None or attn_bits=16."""
    if qcfg is None or qcfg.attn_bits == 16:
        return model
    bits, g, sg = qcfg.matrix("attn")
    for attn, names in _attention_modules(model):
        for name in names:
            lin = getattr(attn, name)
            setattr(attn, name, QuantLinear(lin.in_features, lin.out_features, bits, g, sg,
                                            bias=lin.bias is not None, device=device,
                                            dtype=lin.weight.dtype))
    return model


def bind_compute_(model, compute: ModelCompute):
    """Hand ``compute`` to every QuantLinear of ``model``; returns the model."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.bind(compute)
    return model
