"""ModelCompute: how one model runs its low-bit matmuls and one-token calls, and what fell back.

Two choices belong to a model, never to the process:

    kernels       "auto": the fused Triton kernels on CUDA (moe_colab/quant/kernels.py), the torch
                  reference (quant/packing.py) on CPU; "triton" or "torch" force one
    cuda_graphs   replay one-token calls as CUDA graphs (engine/graphs.py)

A Triton launch or a graph capture that fails switches THIS model to the slower path, warns
once, and is recorded in ``fallbacks`` (``model.offload_stats()["fallbacks"]``); another model
in the same process keeps its own choice. A bad input (wrong shape, wrong device) is an error,
never a fallback.
"""
from __future__ import annotations

import warnings

import torch


class ModelCompute:
    def __init__(self, kernels: str = "auto", cuda_graphs: bool = False):
        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kernels!r}")
        self.kernels = kernels
        self.cuda_graphs = bool(cuda_graphs)
        self.fallbacks: dict[str, str] = {}     # what -> why (kernels, cuda_graphs)
        self.graph_pool = None                  # one private memory pool for this model's graphs
        self.capture_streams: dict = {}         # device index -> side stream captures run on

    def fall_back(self, what: str, reason: str, cost: str) -> None:
        """Record that ``what`` is off for this model, and warn once."""
        if what in self.fallbacks:
            return
        self.fallbacks[what] = reason
        if what == "cuda_graphs":
            self.cuda_graphs = False
        warnings.warn(f"moe_colab: {what} switched off for this model ({reason}); {cost}", stacklevel=3)

    @property
    def triton_on(self) -> bool:
        return self.kernels != "torch" and "kernels" not in self.fallbacks

    def quant_linear(self, x, mat, bits, group_size, scale_group, shape, trusted: bool = False):
        """x [..., in] -> x @ W.T [..., out] from the low-bit format. ``trusted``: mat was checked
        before (a cache slot's fixed views): skip the per-call checks."""
        from ..quant import kernels as K

        if not x.is_cuda or not self.triton_on:
            if self.kernels == "triton" and not x.is_cuda and K.interpreting():
                return K.quant_linear_triton(x, mat, bits, group_size, scale_group, shape)
            return K.quant_linear(x, mat, bits, group_size, scale_group, shape, backend="torch")
        if not trusted:
            K.check_call(x, mat, bits, group_size, scale_group, shape)  # bad input raises, never falls back
        if K.triton is None:
            self._kernel_failed(f"Triton is not available ({K.TRITON_ERROR})", x)
            return K.quant_linear(x, mat, bits, group_size, scale_group, shape, backend="torch")
        try:
            return K.quant_linear_triton(x, mat, bits, group_size, scale_group, shape, trusted=True)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:              # a compile or launch failure on this GPU / Triton
            if torch.cuda.is_current_stream_capturing():
                raise                       # inside a capture: the graph falls back, not the kernels
            if self.kernels == "triton":
                raise
            self._kernel_failed(f"{type(e).__name__}: {str(e).strip()[:300]}", x)
        return K.quant_linear(x, mat, bits, group_size, scale_group, shape, backend="torch")

    def _kernel_failed(self, reason: str, x) -> None:
        where = torch.cuda.get_device_name(x.device) if x.is_cuda else "this device"
        self.fall_back("kernels", f"on {where}: {reason}",
                       "low-bit matmuls use the torch dequantize path from now on (slower)")

    def report(self) -> dict:
        return dict(self.fallbacks)
